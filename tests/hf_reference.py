"""An independent reference: plain HF transformers with plain torch hooks, no nla_lens code.

This is what the training code does (nanoNLA: a forward hook on `model.layers[1]`; the paper: a hook
on the input embeddings), written from the facts in DESIGN.md, not from nla_lens.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_hf(folder: Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """`attn_implementation`: None for HF's default (SDPA), or "eager"."""
    # ignore_mismatched_sizes: a paper AR may carry an eye(d) lm_head placeholder, unused here.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, ignore_mismatched_sizes=True,
                                                 attn_implementation=attn_implementation).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def sidecar(folder: Path) -> dict:
    return yaml.safe_load((Path(folder) / "nla_meta.yaml").read_text())


def marker_sites(ids: torch.Tensor, tokens: dict) -> list[tuple[int, int]]:
    sites = []
    for b, row in enumerate(ids.tolist()):
        for p in range(1, len(row) - 1):
            if (row[p] == tokens["injection_token_id"] and row[p - 1] == tokens["injection_left_neighbor_id"]
                    and row[p + 1] == tokens["injection_right_neighbor_id"]):
                sites.append((b, p))
    return sites


def _replace_output(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextlib.contextmanager
def karvonen_hook(model, sites, vectors, layer_module=None):
    """h' = h + ||h|| (v/||v||) on the output of decoder layer 1, prefill only (seq_len > 1), in the residual's
    dtype with v normalised first, as nanoNLA's `karvonen_inject_in_residual` computes it (bf16 rounds
    (||h|| v)/||v|| otherwise)."""
    module = layer_module if layer_module is not None else model.model.layers[1]

    def hook(_module, _inputs, output):
        def add(h):
            if h.shape[1] < 2:
                return h
            h = h.clone()
            for i, (b, p) in enumerate(sites):
                v = vectors[i].to(h.dtype)
                h[b, p] = h[b, p] + h[b, p].norm() * (v / v.norm())
            return h
        return _replace_output(output, add)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def embedding_hook(model, sites, vectors, injection_scale):
    """The marker's embedding becomes v * injection_scale / ||v|| (prefill only)."""
    def hook(_module, _inputs, output):
        if output.shape[1] < 2:
            return output
        output = output.clone()
        for i, (b, p) in enumerate(sites):
            v = vectors[i].float()
            output[b, p] = (v / (v.norm() / injection_scale)).to(output.dtype)
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def layer_output_hook(model, layer: int, fn):
    """Apply fn(h) to the output of decoder layer `layer` (TL blocks.{layer}.hook_resid_post)."""
    handle = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: _replace_output(out, fn))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def head_ablation_hook(model, layer: int, head: int, head_dim: int):
    """Zero one head's output: the input of o_proj (TL blocks.{layer}.attn.hook_z)."""
    def pre_hook(_module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] = 0
        return (x, *args[1:])

    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def replaced_embeddings(model, ids: torch.Tensor, sites, vectors, injection_scale) -> torch.Tensor:
    """The paper's recipe (kitft docs/inference.md): embed with the model's own embedding layer (Gemma's
    includes the sqrt(d) scale), overwrite each marker row with v * injection_scale / ||v||."""
    embeds = model.get_input_embeddings()(ids).clone()
    for i, (b, p) in enumerate(sites):
        v = vectors[i].float()
        embeds[b, p] = (v * (injection_scale / v.norm())).to(embeds.dtype)
    return embeds


def text_causal_lm(model):
    """A multimodal wrapper's text side as a causal LM (kitft `resolve_text_model`): the wrapper's
    own language model and lm_head, so `generate(inputs_embeds=...)` runs the text model alone."""
    language_model = getattr(model.model, "language_model", None)
    if language_model is None:
        return model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(model.config.text_config)
    text.model, text.lm_head = language_model, model.lm_head
    return text.eval()


@contextlib.contextmanager
def mlp_post_hook(model, layer: int, fn):
    """Apply fn(a) to the MLP's gated activation, the input of down_proj (TL blocks.{layer}.mlp.hook_post)."""
    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: (fn(args[0]), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def av_prompt(tokenizer, meta: dict) -> list[int]:
    templates = meta["prompt_templates"]
    template = templates.get("av", templates.get("actor"))
    content = template.replace("{injection_char}", meta["tokens"]["injection_char"])
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def ar_reconstruct(folder: Path, texts: list[str], special_tokens: bool = True,
                   hooks=contextlib.nullcontext, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> torch.Tensor:
    """The paper's NLACritic: truncated backbone, final norm -> Identity, value head at the last token,
    the prompt tokenized WITH special tokens (BOS first for Gemma / Llama, nothing for Qwen); run in
    `dtype` with `attn_implementation` (`load_hf`'s), returned in float32.

    `hooks(model)`: a context manager installing torch hooks on the HF model for the forwards.
    """
    from safetensors.torch import load_file

    model, tokenizer = load_hf(folder, dtype, attn_implementation)
    model.model.norm = torch.nn.Identity()
    meta = sidecar(folder)
    templates = meta["prompt_templates"]
    template = templates.get("ar", templates.get("critic"))
    head = load_file(str(Path(folder) / "value_head.safetensors"))["weight"].to(dtype)
    out = []
    with torch.no_grad(), hooks(model):
        for text in texts:  # one at a time: no padding in the reference
            ids = tokenizer(template.replace("{explanation}", text), add_special_tokens=special_tokens)["input_ids"]
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            out.append((hidden @ head.T).float())
    return torch.stack(out)
