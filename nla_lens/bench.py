"""`nla-lens bench`: nla_lens's memory and speed against plain HF and TransformerLens's own loader.

Every figure comes from one run of this command: the same random Qwen3-shaped weights and the same
inputs on every side, repetitions interleaved, medians reported. The checkpoints are written as
bf16 sharded safetensors into a temporary folder that is deleted afterwards.

* memory: each load runs in a fresh subprocess, so peaks never contaminate each other. The figure
  is (peak RSS - RSS once the libraries are imported) / bytes of the loaded weights, over the load
  plus one forward pass of the same 4 tokens whichever the loader, after touching every weight (HF
  maps safetensors lazily). On a GPU the peak of allocated device memory is reported as well.
* speed: `verbalize` against HF `generate` with the reference forward hook on decoder layer 1,
  hookless and under each user edit of `_edits` (steering, a head ablation, an MLP scaling: TL
  hooks on our side, the equivalent torch hooks on HF's); the forward pass with and without the
  injection hook; `reconstruct` against the HF truncated model + readout, both batched over
  left-padded prompts, hookless and under the steering edit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_lens import backends
from nla_lens.capture import resid_post_name
from nla_lens.checks import blocks_phrase, check_counts, resolve_device

AV_TEMPLATE = ("Here is an activation vector: <c>{injection_char}</c>. Say in one sentence what the "
               "model was thinking about, inside explanation tags.")
EDIT_LAYER = 2  # where the user edits act (the AR of every plan keeps this block)
_WORDS = ("the cat sat on the mat a dog ran in the park words about weather and the sea numbers one two "
          "three names of places a question the end of a sentence").split()


@dataclass(frozen=True)
class Shape:
    """A Qwen3-shaped model: GQA, q/k norms, untied embeddings, head_dim = d_model / n_heads."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab: int

    def n_params(self) -> int:
        d, h = self.d_model, self.d_model // self.n_heads
        attn = 2 * d * self.n_heads * h + 2 * d * self.n_kv_heads * h + 2 * h + 2 * d
        return 2 * self.vocab * d + d + self.n_layers * (attn + 3 * d * self.d_mlp)

    def describe(self) -> str:
        return (f"{self.n_params() / 1e6:.1f}M params (d_model {self.d_model}, {self.n_layers} layers, "
                f"{self.n_heads}/{self.n_kv_heads} heads, d_mlp {self.d_mlp}, vocab {self.vocab})")


@dataclass(frozen=True)
class Plan:
    """The bench's model shapes (one for load memory, one for timing) and its workload."""

    memory: Shape
    speed: Shape
    ar_layer: int  # K: the AR keeps K + 1 blocks
    batches: tuple[int, ...]
    new_tokens: int
    reps: int
    forward_reps: int
    ar_texts: int
    ar_batch: int


FULL = Plan(memory=Shape(1024, 8, 16, 8, 3072, 151936), speed=Shape(512, 8, 8, 4, 1536, 16384), ar_layer=3,
            batches=(1, 16), new_tokens=64, reps=5, forward_reps=11, ar_texts=64, ar_batch=32)
QUICK = Plan(memory=Shape(64, 4, 4, 2, 128, 512), speed=Shape(64, 4, 4, 2, 128, 512), ar_layer=2,
             batches=(1, 4), new_tokens=8, reps=1, forward_reps=2, ar_texts=8, ar_batch=4)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure load memory and verbalize / reconstruct speed against HF and TransformerLens",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and few repetitions (a smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    resolve_device(args.device)  # before minutes of writing checkpoints
    if args.threads is not None:  # 0 was ignored and -1 reached torch.set_num_threads's bare RuntimeError
        check_counts(1, threads=args.threads)
        torch.set_num_threads(args.threads)
    run(QUICK if args.quick else FULL, device=args.device)


def run(plan: Plan, *, device: str = "cpu", out: Callable[[str], None] = print) -> None:
    """Write the checkpoints, print the memory then the speed figures, delete the checkpoints."""
    backends.require_hooked("nla-lens bench (it measures the streaming HookedTransformer loader and decoder)")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out(f"nla-lens bench: device {device}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, load average {load} (speed ratios need an otherwise idle machine)")
    if plan == QUICK:
        out("--quick: tiny models, one repetition; a smoke run whose ratios measure per-call overhead, "
            "not the targets (run without --quick for those)")
    root = Path(tempfile.mkdtemp(prefix="nla_lens_bench_"))
    try:
        memory = write_checkpoints(root / "memory", plan.memory, plan.ar_layer)
        _report_memory(memory, plan, device, out)
        shutil.rmtree(root / "memory")
        speed = write_checkpoints(root / "speed", plan.speed, plan.ar_layer)
        _report_speed(speed, plan, device, out)
        shutil.rmtree(root / "speed")
        from nla_lens import bench_gemma

        bench_gemma.run(root / "gemma", bench_gemma.QUICK if plan == QUICK else bench_gemma.FULL, device=device,
                        out=out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- checkpoints -------------------------------------------------------------------------------


def write_checkpoints(root: Path, shape: Shape, ar_layer: int, seed: int = 0) -> dict[str, Path]:
    """A random AV (full depth, Karvonen sidecar) and AR (K+1 blocks, sharded, placeholders)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from nla_lens.sidecar import dump_meta
    from nla_lens.testing import AR_TEMPLATE, build_tokenizer, save_ar, token_facts

    tokenizer = build_tokenizer()
    sidecar = {
        "kind": "nla_dataset", "schema_version": 1, "dataset_id": "bench", "stage": "ar_sft",
        "extraction": {"base_model": "bench", "d_model": shape.d_model, "layer_index": ar_layer},
        "tokens": token_facts(tokenizer, AV_TEMPLATE),
        "prompt_templates": {"actor": AV_TEMPLATE, "critic": AR_TEMPLATE},
    }
    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, head_dim=shape.d_model // shape.n_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    # Every parameter is written below. (transformers wraps `to` in functools.wraps(nn.Module.to), whose type
    # takes the dtype for `self`: hence the ignore.)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norm weights away from one, so loading them wrong shows
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, 0.05, generator=generator)  # small writes into the residual stream
            else:  # peaked logits: few greedy near-ties between implementations
                param.normal_(0.0, 1.6 / math.sqrt(param.shape[1]), generator=generator)
    shard = f"{max(1, shape.n_params() // 3 * 2 // 2**20)}MB"  # about three shards
    av = root / "av"
    model.save_pretrained(av, max_shard_size=shard)
    tokenizer.save_pretrained(av)
    dump_meta(sidecar, av)
    readout = torch.eye(shape.d_model) + 0.05 * torch.randn(shape.d_model, shape.d_model, generator=generator)
    ar = save_ar(model, tokenizer, root / "ar", sidecar, ar_layer, readout=readout.to(torch.bfloat16),
                 shards=3, placeholders=True)
    del model
    return {"av": av, "ar": ar}


# --- memory ------------------------------------------------------------------------------------

_MEMORY_RUNS = (  # (label, loader, dtype)
    ("AV nla_lens", "nla_av", "bfloat16"), ("AV HF from_pretrained", "hf", "bfloat16"),
    ("AV TL from HF model", "tl", "bfloat16"), ("AR nla_lens (kept blocks)", "nla_ar", "bfloat16"),
    ("AV nla_lens", "nla_av", "float32"), ("AV HF from_pretrained", "hf", "float32"),
    ("AV TL from HF model", "tl", "float32"), ("AR nla_lens (kept blocks)", "nla_ar", "float32"),
)


def _report_memory(paths: dict[str, Path], plan: Plan, device: str, out: Callable[[str], None]) -> None:
    out(f"memory model: Qwen3-shaped, {plan.memory.describe()}, AR keeps {blocks_phrase(plan.ar_layer + 1)}; "
        f"bf16 sharded safetensors ({size_text(folder_bytes(paths['av']))} AV, "
        f"{size_text(folder_bytes(paths['ar']))} AR)")
    out("  peak RSS over load + one forward / weight bytes (RSS before the load subtracted; fresh process each)")
    with _ForkServer() as server:
        for label, loader, dtype in _MEMORY_RUNS:
            result = server.measure(loader, paths["ar"] if loader == "nla_ar" else paths["av"], dtype, device)
            name = f"{label} (bf16 file -> {'bf16' if dtype == 'bfloat16' else 'fp32'} model)"
            line = (f"  {name:58s} {result['growth'] / result['weights']:5.2f}x   (weights "
                    f"{size_text(result['weights']):>7s}, peak growth {size_text(result['growth']):>7s})")
            if "device_peak" in result:
                line += f"   {device} peak / weights {result['device_peak'] / result['weights']:.2f}x"
            out(line)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def size_text(n_bytes: float) -> str:
    """Whole MB, or KB below one MB: the quick plan's checkpoints would all read "0 MB"."""
    return f"{n_bytes / 2**20:.0f} MB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:.0f} KB"


_RESULT = "nla-lens-bench-result "
# Every AV loader runs this one forward: a longer input on one side (the 74-token AV prompt) put its logits,
# a few % of the weights, on that side's peak alone.
_FORWARD_IDS = [[1, 2, 3, 4]]


class _ForkServer:
    """A subprocess that imports torch, transformers and TransformerLens once, then forks a fresh
    child per measurement: every load gets its own process and peak, without paying the imports
    (seconds each) again. It computes nothing itself, so forking it is safe."""

    def __enter__(self) -> _ForkServer:
        code = "import nla_lens.bench as b; b._serve_forks()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return self

    def measure(self, loader: str, folder: Path, dtype: str, device: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([loader, str(folder), dtype, device]) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_RESULT):
                result = json.loads(line[len(_RESULT):])
                if "error" in result:
                    raise RuntimeError(f"memory measurement {loader} {dtype} failed:\n{result['error']}")
                return result
        raise RuntimeError(f"the memory measurement process died during {loader} {dtype}")

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def _serve_forks() -> None:
    import traceback

    import transformer_lens  # noqa: F401 - imported once here, inherited by every child
    import transformers  # noqa: F401

    import nla_lens  # noqa: F401

    for request in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                result: Mapping[str, int | str] = _measure_load(*json.loads(request))
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises
                result = {"error": traceback.format_exc()}
            print(_RESULT + json.dumps(result), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_load(loader: str, folder: str, dtype_name: str, device: str) -> dict[str, int]:
    """One load + one forward in this (fresh) process: weight bytes and peak RSS growth."""
    import gc

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nla_lens as nl

    dtype = getattr(torch, dtype_name)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: only the load below counts
    base = _status_bytes("VmRSS")
    if device.startswith("cuda"):  # the device the model goes to: torch's default is the current one, cuda:0
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        if loader == "nla_av":
            av = nl.ActivationVerbalizer.from_pretrained(folder, dtype=dtype, device=device)
            modules: list[torch.nn.Module] = [av.model]
            av.model(torch.tensor(_FORWARD_IDS, device=av.device))
        elif loader == "nla_ar":
            ar = nl.ActivationReconstructor.from_pretrained(folder, dtype=dtype, device=device)
            modules = [ar.model, ar.readout]
            ar.reconstruct(["a cat sat on the mat"])
        elif loader == "hf":
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
            modules = [hf]
            hf(torch.tensor(_FORWARD_IDS, device=device))
        else:
            modules = [_tl_from_hf_model(Path(folder), AutoTokenizer.from_pretrained(folder), dtype, device)]
            modules[0](torch.tensor(_FORWARD_IDS, device=device))
        params = [p for m in modules for p in m.parameters()]
        for p in params:  # fault in every page (HF maps safetensors lazily)
            p.sum()
    result = {"weights": sum(p.numel() * p.element_size() for p in params),
              "growth": _status_bytes("VmHWM") - base}
    if device.startswith("cuda"):
        result["device_peak"] = torch.cuda.max_memory_allocated(device)
    return result


def _tl_from_hf_model(folder: Path, tokenizer: Any, dtype: torch.dtype, device: str) -> Any:
    """TransformerLens 3.9's own path, as `HookedTransformer.from_pretrained_no_processing(name,
    hf_model=...)` runs it, minus its lookup of the name in TL's list of official models."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    cfg = tl_loading.get_pretrained_model_config(str(folder), hf_cfg=hf.config.to_dict(), dtype=dtype,
                                                 device=device, fold_ln=False)
    state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    del hf, state_dict
    return model.to(device)


# --- speed -------------------------------------------------------------------------------------


def _report_speed(paths: dict[str, Path], plan: Plan, device: str, out: Callable[[str], None]) -> None:
    from transformers import AutoModelForCausalLM

    import nla_lens as nl

    av = nl.ActivationVerbalizer.from_pretrained(paths["av"], device=device)
    av.eos_token_ids = []  # every row runs the full plan.new_tokens, as on the HF side
    hf = AutoModelForCausalLM.from_pretrained(paths["av"], dtype=torch.float32, device_map=device).eval()
    n_prompt = av.prompt_tokens(1).shape[1]
    out(f"speed model: Qwen3-shaped, {plan.speed.describe()}, fp32 on {device}; AV prompt {n_prompt} tokens")
    generator = torch.Generator().manual_seed(1)
    edits = _edits(av.model.cfg, device)
    for edit in (None, *edits):
        for batch in plan.batches:
            vectors = (3.0 * torch.randn(batch, plan.speed.d_model, generator=generator)).to(device)
            _report_verbalize(av, hf, vectors, plan, device, out, edit)
    vectors = (3.0 * torch.randn(plan.batches[-1], plan.speed.d_model, generator=generator)).to(device)
    _report_hook_overhead(av, vectors, plan, device, out)
    ar = nl.ActivationReconstructor.from_pretrained(paths["ar"], device=device)
    words = torch.randint(len(_WORDS), (plan.ar_texts, 40), generator=generator).tolist()
    lengths = torch.randint(4, 40, (plan.ar_texts,), generator=generator).tolist()
    texts = [" ".join(_WORDS[i] for i in row[:n]) for row, n in zip(words, lengths, strict=True)]
    critic = _HFCritic(paths["ar"], device)
    for edit in (None, edits[0]):
        _report_reconstruct(ar, critic, texts, plan, device, out, edit)


@dataclass(frozen=True)
class _Edit:
    """A user edit as TL hooks (nla_lens) and as the equivalent torch hooks on HF decoder layers."""

    label: str
    tl_hooks: list[tuple[str, Callable]]
    hf_hooks: Callable[[torch.nn.ModuleList], contextlib.AbstractContextManager]


def _edits(cfg: Any, device: str) -> tuple[_Edit, ...]:
    """Steering at resid_post, zeroing head 0 at hook_z, scaling the MLP's gated activation."""
    generator = torch.Generator().manual_seed(2)
    steer = (4.0 * torch.randn(cfg.d_model, generator=generator)).to(device)
    scale = (1.0 + torch.rand(cfg.d_mlp, generator=generator)).to(device)
    layer = EDIT_LAYER

    def zero_head(z: torch.Tensor, hook: Any) -> None:
        z[:, :, 0] = 0.0

    def hf_zero_head(_module: Any, args: tuple) -> None:
        args[0][..., :cfg.d_head] = 0.0  # o_proj's input is heads side by side, as TL's z

    return (
        _Edit(f"steering hook at blocks.{layer}.hook_resid_post",
              [(resid_post_name(layer), lambda resid, hook: resid + steer)],
              lambda layers: _torch_hook(layers[layer], "forward", lambda _m, _i, out: _map_first(out, steer))),
        _Edit(f"head 0 ablated at blocks.{layer}.attn.hook_z", [(f"blocks.{layer}.attn.hook_z", zero_head)],
              lambda layers: _torch_hook(layers[layer].get_submodule("self_attn.o_proj"), "forward_pre",
                                         hf_zero_head)),
        _Edit(f"MLP scaled at blocks.{layer}.mlp.hook_post",
              [(f"blocks.{layer}.mlp.hook_post", lambda post, hook: post * scale)],
              lambda layers: _torch_hook(layers[layer].get_submodule("mlp.down_proj"), "forward_pre",
                                         lambda _m, args: (args[0] * scale, *args[1:]))),
    )


def _map_first(output: Any, steer: torch.Tensor) -> Any:
    """A decoder layer's output (a tensor, or a tuple holding it first) with `steer` added."""
    if isinstance(output, tuple):
        return (output[0] + steer, *output[1:])
    return output + steer


@contextlib.contextmanager
def _torch_hook(module: torch.nn.Module, kind: str, fn: Callable) -> Iterator[None]:
    handle = getattr(module, f"register_{kind}_hook")(fn)
    try:
        yield
    finally:
        handle.remove()


def _report_verbalize(av: Any, hf: Any, vectors: torch.Tensor, plan: Plan, device: str,
                      out: Callable[[str], None], edit: _Edit | None = None) -> None:
    """Hookless, or with `edit` in force on both sides (`av.model.hooks` / torch hooks on HF)."""
    batch = len(vectors)

    def ours() -> list[list[int]]:
        with av.model.hooks(fwd_hooks=edit.tl_hooks if edit else []):
            outputs = av.verbalize(vectors, max_new_tokens=plan.new_tokens, batch_size=batch, progress=False)
        return [o.tokens for o in outputs]

    def theirs() -> list[list[int]]:
        with edit.hf_hooks(hf.model.layers) if edit else contextlib.nullcontext():
            return _hf_generate(hf, av, vectors, plan.new_tokens)

    same = sum(a == b for a, b in zip(ours(), theirs(), strict=True))
    path = decoder_path(av)
    t_ours, t_theirs = _interleaved(ours, theirs, plan.reps, device)
    tokens = batch * plan.new_tokens
    what = f" with {edit.label}" if edit else ""
    out(f"  verbalize batch {batch:2d}{what}, {plan.new_tokens} new tokens, greedy: nla_lens {tokens / t_ours:7.1f} "
        f"tok/s ({path}), HF generate + layer-1 hook{' + same edit' if edit else ''} {tokens / t_theirs:7.1f} "
        f"tok/s -> {t_theirs / t_ours:.2f}x (rows with identical tokens: {same}/{batch})")


def decoder_path(av: Any) -> str:
    """Which decoder served the AV's last `verbalize`: the figures time that one, not the other."""
    return "fast decoder" if av.fallback_reason is None else f"TL forward: {av.fallback_reason}"


def _report_hook_overhead(av: Any, vectors: torch.Tensor, plan: Plan, device: str,
                          out: Callable[[str], None]) -> None:
    tokens = av.prompt_tokens(len(vectors))
    injection = av.injection(vectors, tokens)
    with torch.inference_mode():
        t_hook, t_plain = _interleaved(lambda: av.model.run_with_hooks(tokens, fwd_hooks=injection.fwd_hooks()),
                                       lambda: av.model(tokens), plan.forward_reps, device)
    out(f"  injection hook overhead, forward batch {len(vectors)}: with hook / without {t_hook / t_plain:.3f}x "
        f"({100 * (t_hook / t_plain - 1):+.1f}%)")


def _report_reconstruct(ar: Any, reference: _HFCritic, texts: list[str], plan: Plan, device: str,
                        out: Callable[[str], None], edit: _Edit | None = None) -> None:
    def ours() -> torch.Tensor:
        with ar.model.hooks(fwd_hooks=edit.tl_hooks if edit else []):
            return ar.reconstruct(texts, batch_size=plan.ar_batch)

    def theirs() -> torch.Tensor:
        with edit.hf_hooks(reference.model.layers) if edit else contextlib.nullcontext():
            return reference(texts, plan.ar_batch)

    diff = (ours() - theirs()).abs().max()
    path = "fast path" if ar.fallback_reason is None else f"TL forward: {ar.fallback_reason}"
    t_ours, t_theirs = _interleaved(ours, theirs, plan.reps, device)
    what = f" with {edit.label}" if edit else ""
    out(f"  AR reconstruct {len(texts)} texts, batch {plan.ar_batch}, left-padded{what}: "
        f"nla_lens {len(texts) / t_ours:7.1f} texts/s ({path}), HF truncated model + readout"
        f"{' + same edit' if edit else ''} {len(texts) / t_theirs:7.1f} texts/s -> {t_theirs / t_ours:.2f}x "
        f"(max |diff| {float(diff):.1e})")


def _interleaved(first: Callable[[], Any], second: Callable[[], Any], reps: int, device: str) -> tuple[float, float]:
    """Median seconds of each, run alternately (order swapped every repetition) after a warm-up."""
    times: tuple[list[float], list[float]] = ([], [])
    first(), second()
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for i in order:
            if device.startswith("cuda"):  # the timed device's queue, not the current device's (cuda:0)
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            (first, second)[i]()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _hf_generate(hf: Any, av: Any, vectors: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """HF greedy `generate` with the training code's forward hook on decoder layer 1 (prefill only)."""
    tokens = av.prompt_tokens(len(vectors))
    rows, positions = torch.nonzero(tokens == av.meta.injection_token_id, as_tuple=True)

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] < 2:
            return output
        hidden = hidden.clone()
        h = hidden[rows, positions]
        hidden[rows, positions] = h + h.norm(dim=-1, keepdim=True) * vectors / vectors.norm(dim=-1, keepdim=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = hf.model.layers[1].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=av.tokenizer.pad_token_id)
    finally:
        handle.remove()
    return out[:, tokens.shape[1]:].tolist()


class _HFCritic:
    """The reference AR: HF truncated backbone, final norm removed, readout at the last token."""

    def __init__(self, folder: Path, device: str) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from nla_lens.sidecar import load_meta

        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32, device_map=device).eval()
        self.model.norm = torch.nn.Identity()
        self.head = load_file(str(folder / "value_head.safetensors"))["weight"].float().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        self.meta = load_meta(folder)
        self.device = device

    @torch.inference_mode()
    def __call__(self, texts: list[str], batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer([self.meta.ar_prompt(t) for t in texts[start:start + batch_size]],
                                   add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.model(**batch, position_ids=positions).last_hidden_state[:, -1]
            out.append(hidden @ self.head.T)
        return torch.cat(out)
