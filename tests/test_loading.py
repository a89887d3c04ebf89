"""Loading HF folders into TransformerLens: no weight processing, safetensors only, AR truncation."""

from __future__ import annotations

import json
import re
import shutil
import weakref

import pytest
import torch
import yaml
from conftest import NEEDS_TL3
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import hf_reference as ref
import nla_lens as nl
from nla_lens import backends, loading


def test_weights_are_loaded_without_processing(av_karvonen, tiny_paths):
    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    block, layer = av_karvonen.model.blocks[1], hf.model.layers[1]
    # fold_ln would set ln weights to one and scale W_Q; centering would shift W_E / W_U.
    assert torch.equal(block.ln1.w, layer.input_layernorm.weight)
    hf_q = layer.self_attn.q_proj.weight.reshape(4, 16, 64).transpose(1, 2)  # [head, d_model, d_head]
    assert torch.equal(block.attn.W_Q, hf_q)
    assert torch.equal(block.attn.k_norm.w, layer.self_attn.k_norm.weight)
    assert torch.equal(av_karvonen.model.W_E, hf.model.embed_tokens.weight)
    assert torch.equal(av_karvonen.model.W_U, hf.lm_head.weight.T)
    assert torch.equal(av_karvonen.model.ln_final.w, hf.model.norm.weight)
    assert not torch.equal(block.ln1.w, torch.ones_like(block.ln1.w))


def test_n_ctx_comes_from_the_hf_config(av_karvonen, ar_nanonla):
    assert av_karvonen.model.cfg.n_ctx == 256 == ar_nanonla.model.cfg.n_ctx


def test_bf16_load_casts_on_the_fly_to_the_hf_weights_rounded_to_bf16(tiny_paths):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], dtype=torch.bfloat16)
    assert av.model.W_E.dtype == torch.bfloat16
    assert av.model.blocks[0].attn.W_Q.dtype == torch.bfloat16
    hf, _ = ref.load_hf(tiny_paths["av_karvonen"])
    cfg, block, layer = av.model.cfg, av.model.blocks[1], hf.model.layers[1]

    def bf16(w: torch.Tensor) -> torch.Tensor:
        return w.to(torch.bfloat16)

    # Exact: a cast rounds each fp32 value to its nearest bf16 one, whatever chunk it is read in.
    assert torch.equal(av.model.W_E, bf16(hf.model.embed_tokens.weight))
    hf_q = layer.self_attn.q_proj.weight.reshape(cfg.n_heads, cfg.d_head, cfg.d_model).transpose(1, 2)
    assert torch.equal(block.attn.W_Q, bf16(hf_q))  # TL's [head, d_model, d_head]
    assert torch.equal(block.mlp.W_in, bf16(layer.mlp.up_proj.weight.T))  # TL's [d_model, d_mlp]
    assert torch.equal(block.mlp.W_out, bf16(layer.mlp.down_proj.weight.T))
    assert torch.equal(block.ln1.w, bf16(layer.input_layernorm.weight))


_UNINITIALISED = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                  torch.ops.aten.empty_like.default)


class _PeakAllocated(TorchDispatchMode):
    """The most bytes of uninitialised storage alive at once while active: what a CUDA allocator's peak
    counts, on the CPU, where untouched pages never show in RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _UNINITIALISED and not out.is_meta:
            n_bytes = out.untyped_storage().nbytes()
            self.live += n_bytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(out.untyped_storage(), self._free, n_bytes)
        return out

    def _free(self, n_bytes: int) -> None:
        self.live -= n_bytes


@NEEDS_TL3
@pytest.mark.parametrize("role", ["av_karvonen", "ar_paper"])
def test_the_loader_holds_one_copy_of_the_weights_at_its_peak(tiny_paths, role):
    """No parameter is given a TL-layout storage that its HF-layout storage then replaces (on a GPU the
    load peaked at 1.58x the weights, measured on an H200; on the CPU the untouched pages never showed
    in RSS), and the block built to compute the rotary tables is freed before the weights are allocated."""
    meta = nl.load_meta(tiny_paths[role])
    n_layers = meta.layer + 1 if role.startswith("ar") else None
    tokenizer = loading.load_tokenizer(tiny_paths[role])
    with _PeakAllocated() as allocated:
        model = loading.load_hooked_transformer(tiny_paths[role], tokenizer, dtype=torch.float32, device="cpu",
                                                n_layers=n_layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum({b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()}.values())
    assert weights <= allocated.peak <= weights + buffers


def test_ar_keeps_k_plus_1_blocks_and_no_final_norm_or_unembed(ar_paper):
    model = ar_paper.model
    assert len(model.blocks) == ar_paper.meta.layer + 1
    final = [model.ln_final, model.unembed]
    if backends.backend_of(model) == "bridge":  # bridge components keep their hooks around the HF module
        final = [component.original_component for component in final]
    assert all(isinstance(module, torch.nn.Identity) for module in final)
    tokens, mask = ar_paper.prompt_tokens(["a cat"])
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    last = f"blocks.{ar_paper.meta.layer}.hook_resid_post"
    assert torch.equal(model(tokens, attention_mask=mask), cache[last])


def test_ar_loads_from_a_full_depth_folder_reading_only_kept_blocks(tiny_paths, tmp_path):
    """An AR sidecar beside full-depth weights: blocks past K, the final norm and lm_head are ignored."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "ar_full")
    shutil.copy(tiny_paths["ar_nanonla"] / "value_head.safetensors", folder)
    ar = nl.ActivationReconstructor.from_pretrained(folder)
    reference = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    texts = ["a cat", "the sea"]
    assert torch.equal(ar.reconstruct(texts), reference.reconstruct(texts))


def test_ar_with_fewer_blocks_than_its_sidecar_reads_is_refused(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    meta["extraction"]["layer_index"] = blocks
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    with pytest.raises(nl.CheckpointError, match=rf"needs K\+1={blocks + 1} blocks.*num_hidden_layers={blocks}"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_an_av_whose_config_json_has_fewer_blocks_than_its_weights_is_refused(tiny_paths, tmp_path):
    """The AR's K+1-block config.json copied into an AV folder: the AV loaded with its last block silently dropped."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    shutil.copy(tiny_paths["ar_nanonla"] / "config.json", folder / "config.json")
    with pytest.raises(nl.CheckpointError, match=r"holds model\.layers\.3\..*a block past the 3 of .*av/config\.json"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize("checkpoint", ["av_karvonen", "gemma_av_multimodal"])
def test_weights_of_another_shape_than_config_json_name_the_folder_and_the_fix(tiny_paths, bos_paths, tmp_path,
                                                                               checkpoint):
    """It said only "config.json and the weights disagree": not which folder, nor what to restore. The Gemma-3
    wrapper goes through its own streaming loader on the bridge backend."""
    source = {**tiny_paths, **bos_paths}[checkpoint]
    folder = shutil.copytree(source, tmp_path / "av")
    config = json.loads((folder / "config.json").read_text())
    sizes = config.get("text_config", config)  # a Gemma-3 wrapper keeps the sizes in text_config
    sizes["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(nl.CheckpointError, match=rf"mlp.* in {re.escape(str(folder))} has shape .*, but its "
                                                 r"config.json makes it .*config.json and the weights disagree.*"
                                                 "Restore the config.json saved with these weights, or download the "
                                                 "checkpoint again"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_ar_loads_without_a_chat_template(tiny_paths, tmp_path):
    """The AR never builds the AV's chat prompt, so its tokenizer need not carry the template."""
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    ar = nl.ActivationReconstructor.from_pretrained(folder)
    reference = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    assert not ar.tokenizer.chat_template
    assert torch.equal(ar.reconstruct(["a cat"]), reference.reconstruct(["a cat"]))


def test_pickle_only_checkpoint_is_refused(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(nl.CheckpointError, match="safetensors only, never pickle"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_missing_or_malformed_value_head(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    (folder / "value_head.safetensors").unlink()
    with pytest.raises(nl.CheckpointError, match="no value_head.safetensors"):
        nl.ActivationReconstructor.from_pretrained(folder)
    save_file({"weight": torch.zeros(64, 32)}, folder / "value_head.safetensors")
    with pytest.raises(nl.CheckpointError, match=r"shape \[64, 64\]"):
        nl.ActivationReconstructor.from_pretrained(folder)


@pytest.mark.parametrize("damage", [lambda path: path.unlink(), lambda path: path.write_bytes(b"\x00" * 7)],
                         ids=["missing", "corrupt"])
def test_a_missing_or_damaged_readout_is_refused_before_the_backbone_is_read(tiny_paths, tmp_path, monkeypatch, damage):
    folder = shutil.copytree(tiny_paths["ar_paper"], tmp_path / "ar")
    damage(folder / "value_head.safetensors")
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("read the backbone first"))
    with pytest.raises(nl.CheckpointError, match="value_head.safetensors"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_a_pickled_readout_is_refused_with_how_to_convert_it(tiny_paths, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    (folder / "value_head.safetensors").rename(folder / "value_head.pt")  # the bytes do not matter: never read
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(nl.CheckpointError, match=r"no value_head.safetensors.*It holds value_head.pt, a pickle, which "
                                                 r"nla_lens never loads.*safetensors.torch.save_file"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_missing_weights_are_reported(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    # Each backend names the weight as its model does: TL's parameter, or the HF checkpoint key.
    name = {"hooked": "blocks.2.mlp.W_in", "bridge": "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(nl.CheckpointError, match=name[backends.default_backend()] + r".*download the checkpoint again"):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_rotary_inv_freq_buffers_older_transformers_saved_are_skipped(tiny_paths, tmp_path, av_karvonen):
    """Checkpoints saved by older transformers hold each layer's rotary_emb.inv_freq: the hooked loader refused
    them as an unexpected tensor, where HF skips them. RoPE comes from config.json either way."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    weights = load_file(str(folder / "model.safetensors"))
    n_layers = av_karvonen.model.cfg.n_layers
    weights.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.full((4,), 123.0)
                    for i in range(n_layers)})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = nl.ActivationVerbalizer.from_pretrained(folder)
    tokens = loaded.prompt_tokens(2)
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), av_karvonen.model(tokens))


def _rewrite_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="nla_lens's own reader (the bridge loads via HF)")
@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b"\x05"), "not a readable safetensors file"),
    (lambda path: path.write_bytes(path.read_bytes()[:8] + b"{not json"), "not a readable safetensors file"),
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]), "ends early"),
    (lambda path: _rewrite_header(path, lambda h: h["model.embed_tokens.weight"].update(dtype="F8_E4M3")),
     "stored as F8_E4M3, which nla_lens does not read"),
], ids=["short", "header_not_json", "truncated", "fp8"])
def test_damaged_weight_files_are_checkpoint_errors(tiny_paths, tmp_path, damage, message):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    damage(folder / "model.safetensors")
    with pytest.raises(nl.CheckpointError, match=message):
        nl.ActivationVerbalizer.from_pretrained(folder)


def _retype_first_matrix(path, dtype) -> None:
    tensors = load_file(str(path))
    name = next(n for n, t in sorted(tensors.items()) if t.ndim == 2)
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]), "ends early"),
    (lambda path: path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"),
     "not a readable safetensors file"),
    (lambda path: _retype_first_matrix(path, torch.int32), "stored as I32, but model weights are floating point"),
    (lambda path: _retype_first_matrix(path, torch.bool), "stored as BOOL, but model weights are floating point"),
], ids=["truncated", "lfs_pointer", "int32", "bool"])
def test_a_damaged_or_integer_shard_is_a_checkpoint_error_on_every_backend(tiny_paths, tmp_path, damage, message):
    """The bridge's HF loader raised a bare SafetensorError on a damaged shard, and both backends cast integer
    weights (a quantized or damaged file) to float without a word."""
    folder = shutil.copytree(tiny_paths["ar_paper"], tmp_path / "ar")
    damage(folder / "model-00002-of-00003.safetensors")
    with pytest.raises(nl.CheckpointError, match=f"ar/model-00002-of-00003.safetensors.*{message}"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_an_integer_readout_is_a_checkpoint_error(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    save_file({"weight": torch.ones(64, 64, dtype=torch.int64)}, folder / "value_head.safetensors")
    with pytest.raises(nl.CheckpointError, match="value_head.safetensors: tensor weight is stored as int64"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_a_shard_missing_from_an_index_is_named(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(nl.CheckpointError, match=r"1 of the 2 weight shards .* missing \(model-00002-of-00002"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize(("weight_map", "match"), [({"model.embed_tokens.weight": 1}, "names 1 as a file"),
                                                   ({}, "names no tensor")])
def test_a_damaged_weight_index_is_a_checkpoint_error(tiny_paths, tmp_path, weight_map, match):
    """A weight_map with a number for a file got a bare TypeError; an empty one, an IndexError in transformers."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(nl.CheckpointError, match=f"index.json {match}: .* download it again"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize("outside", ["../elsewhere/model.safetensors", "absolute", "..\\elsewhere\\model.safetensors",
                                     "\\elsewhere\\model.safetensors", "C:model.safetensors"])
def test_a_weight_index_naming_a_file_outside_the_checkpoint_is_refused(tiny_paths, tmp_path, outside):
    """An index could make a load read any safetensors file on the machine (`../x`, an absolute path). Names that
    leave the folder on Windows only (`..\\x`, `\\x` on the current drive, `C:x` in drive C's working directory;
    there `\\x` is not `is_absolute()`) are refused on every OS, so a checkpoint loads alike everywhere."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    (tmp_path / "elsewhere").mkdir()
    target = (folder / "model.safetensors").rename(tmp_path / "elsewhere" / "model.safetensors")
    name = str(target) if outside == "absolute" else outside
    weight_map = dict.fromkeys(load_file(str(target)), name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    message = f"index.json names {re.escape(repr(name))}, a file outside {re.escape(str(folder))}: .* own folder"
    with pytest.raises(nl.CheckpointError, match=message):
        nl.ActivationVerbalizer.from_pretrained(folder)


def test_an_index_without_metadata_loads_or_says_what_to_add(av_karvonen, tiny_paths, tmp_path):
    """transformers' loader, the bridge's, reads the index's "metadata" (a bare KeyError without it); the hooked
    backend reads the weight_map alone."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    names = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if backends.default_backend() == "bridge":
        with pytest.raises(nl.CheckpointError, match='no "metadata" object.* add "metadata": {} to it'):
            nl.ActivationVerbalizer.from_pretrained(folder)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, **index}))
    assert torch.equal(nl.ActivationVerbalizer.from_pretrained(folder).model.W_E, av_karvonen.model.W_E)


def test_an_av_with_no_eos_anywhere_is_refused(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(nl.CheckpointError, match="names no EOS token"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize("text, match", [
    ("{not json", "generation_config.json is not valid JSON"),
    ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id or a list of token ids, got \\['</s>'\\]"),
])
def test_a_broken_generation_config_is_a_checkpoint_error(tiny_paths, tmp_path, text, match):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(nl.CheckpointError, match=match):
        loading.eos_token_ids(folder, loading.load_tokenizer(folder))


def test_an_av_sidecar_without_its_prompt_template_is_refused_before_the_weights(tiny_paths, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    del meta["prompt_templates"]["actor"]
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(nl.SidecarError, match="no AV \\(actor\\) prompt template"):
        nl.ActivationVerbalizer.from_pretrained(folder)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a valid JSON file"),
    ('{"model_type": "wibble"}', "model type `wibble`"),
    ("[1]", "model_type"),
])
def test_an_unreadable_config_json_is_a_checkpoint_error(tiny_paths, tmp_path, text, match):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "base")
    (folder / "config.json").write_text(text)
    with pytest.raises(nl.CheckpointError, match=f"config.json cannot be read as a model config .*{match}"):
        loading.load_hf_config(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda config: [config], "Should have a `model_type` key"),
    (lambda config: {**config, "hidden_size": "64"}, "field 'hidden_size': TypeError: .*expected int, got str"),
    (lambda config: {**config, "num_hidden_layers": 3}, "num_hidden_layers.*\\(3\\) must be equal to the number of"),
], ids=["list", "string_hidden_size", "layers_vs_layer_types"])
def test_a_config_json_with_wrong_fields_is_named_by_every_loader(tiny_paths, tmp_path, edit, match):
    """transformers' strict config fields raise huggingface_hub's StrictDataclass errors (not ValueError), and
    AutoTokenizer reads config.json first: both surfaced bare, or blamed the tokenizer files."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    for load in (nl.ActivationVerbalizer.from_pretrained, loading.load_tokenizer):
        with pytest.raises(nl.CheckpointError, match=f"av/config.json cannot be read as a model config .*{match}"):
            load(folder)


def test_an_av_sidecar_in_an_ar_folder_is_refused_before_the_weights(tiny_paths, tmp_path, monkeypatch):
    """It loaded the AR's K+1 blocks as an AV until the placeholder lm_head.weight misfit the unembed."""
    folder = shutil.copytree(tiny_paths["ar_paper"], tmp_path / "ar")
    shutil.copy(tiny_paths["av_embedding"] / "nla_meta.yaml", folder / "nla_meta.yaml")
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    for load in (nl.ActivationVerbalizer.from_pretrained, nl.ActivationReconstructor.from_pretrained):
        with pytest.raises(nl.SidecarError, match=r"says role 'av', but the folder holds an AR readout"):
            load(folder)


def test_loading_the_wrong_role_is_a_typed_error(tiny_paths):
    with pytest.raises(nl.SidecarError, match="AR checkpoint"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["ar_paper"])
    with pytest.raises(nl.SidecarError, match="AV checkpoint"):
        nl.ActivationReconstructor.from_pretrained(tiny_paths["av_embedding"])


def test_a_loaded_model_where_a_folder_goes_is_a_typed_error(av_karvonen, ar_nanonla, tmp_path):
    """The README's `verbalize_file(av, ...)` takes the AV's folder; handed the loaded `av`, it (and
    `from_pretrained`) raised Path()'s TypeError "expected str, bytes or os.PathLike object"."""
    from nla_lens.sharded import verbalize_file

    for call in (lambda: verbalize_file(av_karvonen, tmp_path / "v.pt", tmp_path / "out.parquet"),
                 lambda: nl.ActivationVerbalizer.from_pretrained(av_karvonen),
                 lambda: nl.NLA.from_pretrained(av_karvonen, ar_nanonla)):
        with pytest.raises(nl.InputError, match="got ActivationVerbalizer: pass the path the model was loaded from"):
            call()


def test_unknown_path_or_uncached_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(nl.CheckpointError, match="neither a local folder"):
        loading.resolve_checkpoint("nobody/no-such-nla")


@pytest.mark.parametrize("name", ["/no/such/nla", "./av", "~/av", "runs/avv", "runs/sft/av"])
def test_a_missing_path_is_no_such_folder_not_a_hub_download(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs").mkdir()  # so `runs/avv` names a folder in it, not the hub repo `avv` of user `runs`
    with pytest.raises(nl.CheckpointError, match="no such folder") as info:
        loading.resolve_checkpoint(name)
    assert "hf download" not in str(info.value)


def test_a_missing_folder_names_the_folder_its_name_is_a_typo_of(monkeypatch):
    root = nl.toy.TOY_DIR.parents[2]  # where `nla_lens/toy/checkpoints/av` is a relative path
    monkeypatch.chdir(root)
    with pytest.raises(nl.CheckpointError) as info:
        nl.ActivationVerbalizer.from_pretrained("nla_lens/toy/checkpoints/avv")
    assert str(info.value) == (f"'nla_lens/toy/checkpoints/avv': no such folder (relative to {root}); "
                               "did you mean nla_lens/toy/checkpoints/av?")
    with pytest.raises(nl.CheckpointError, match="^'/nope': no such folder; check the path$"):
        nl.ActivationReconstructor.from_pretrained("/nope")
    with pytest.raises(nl.CheckpointError, match="is a file, not a checkpoint folder"):
        loading.resolve_checkpoint(nl.toy.TOY_DIR / "av" / "config.json")


def test_user_override_of_the_injection_method(tiny_paths):
    av = nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"], injection="karvonen")
    assert av.injection_spec == nl.InjectionSpec("karvonen", "blocks.1.hook_resid_post")


@pytest.mark.parametrize("injection, match", [
    ("telepathy", r"^injection='telepathy' is no injection method; pass one of \['embedding', 'karvonen'\]"),
    (1, "^injection must be a method name .*got int$"),  # it was ignored: the sidecar's method ran
])
def test_a_bad_injection_argument_is_an_input_error_before_the_weights(tiny_paths, monkeypatch, injection, match):
    """The caller's typo was a SidecarError, which sent them to a sidecar that is fine."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(nl.InputError, match=match):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], injection=injection)


def test_a_hook_point_past_the_blocks_is_refused_before_the_weights(tiny_paths, monkeypatch):
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(nl.InjectionError, match=r"names block 99, but .*config.json has 4 blocks \(0-3\)"):
        nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"], hook_point="blocks.99.hook_resid_post")


@pytest.mark.skipif(backends.default_backend() != "hooked", reason="the bridge's own hook names are checked once built")
@pytest.mark.parametrize("hook_point, hint", [
    ("blocks.1.hook_resid_pots", "did you mean 'blocks.1.hook_resid_post'? "),
    ("hook_embd", "did you mean 'hook_embed'? "),
    ("blocks.01.hook_resid_post", "did you mean 'blocks.<N>.hook_resid_post'? "),
    ("hook_resid_post", "did you mean 'blocks.<N>.hook_resid_post'? "),
    ("nonsense", ""),
])
def test_a_misspelt_hook_point_is_refused_before_the_weights(tiny_paths, tmp_path, monkeypatch, hook_point, hint):
    """A typo in the sidecar's or the caller's hook point was reported only after the whole model loaded."""
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["injection"] = {"method": "karvonen", "hook_point": hook_point}
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    expected = f"hook point '{hook_point}' does not exist in this model; {hint}pick one of model.hook_dict"
    for load in (dict(path_or_id=folder), dict(path_or_id=tiny_paths["av_karvonen"], hook_point=hook_point)):
        with pytest.raises(nl.InjectionError) as info:
            nl.ActivationVerbalizer.from_pretrained(**load)
        assert str(info.value).startswith(expected)


def test_embedding_injection_without_a_scale_is_refused(tiny_paths, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_paths["av_karvonen"], tmp_path / "av")
    # Refused before the weights: the loaded AV could never inject.
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(nl.InjectionError, match="needs an injection_scale.*injection='karvonen'"):
        nl.ActivationVerbalizer.from_pretrained(folder, injection="embedding")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    assert "injection_scale" not in meta["extraction"]
