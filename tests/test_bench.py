"""`nla-lens bench --quick` runs end to end on tiny models and prints every ratio line.

Timings are not asserted: on a shared CI machine they measure the neighbours as much as the code.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import NEEDS_TL3

import nla_lens as nl
from nla_lens import bench, bench_gemma
from nla_lens.cli import main


@NEEDS_TL3  # the bench measures the streaming HookedTransformer loader and decoder
def test_quick_bench_prints_every_ratio(capsys):
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine, torch's worker threads wait on each other
        assert main(["bench", "--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "--quick: tiny models, one repetition; a smoke run whose ratios measure per-call overhead" in out
    assert not re.search(r"\b0M params", out), out  # the tiny Gemma read "0M params"
    assert not re.search(r"\b0 [KM]B\b", out), out  # the tiny checkpoints' sizes read "0 MB"
    assert len(re.findall(r"AR keeps (?:1 block \(0\)|\d+ blocks \(0-\d+\));", out)) == 2, out  # was "1 blocks"
    ratio = r"\d+\.\d+x"
    for loader in ("AV nla_lens", "AV HF from_pretrained", "AV TL from HF model", "AR nla_lens"):
        for dtype in ("bf16", "fp32"):
            assert re.search(rf"{loader}.*-> {dtype} model\)\s+{ratio}", out), (loader, dtype, out)
    # Hookless, then under a steering hook, a head ablation and an MLP hook, each on the fast path.
    assert len(re.findall(rf"verbalize batch .*\(fast decoder\).* -> {ratio}", out)) == 2 * 4, out
    for edit in ("hook_resid_post", "attn.hook_z", "mlp.hook_post"):
        assert len(re.findall(rf"verbalize batch .*{edit}.* -> {ratio}", out)) == 2, (edit, out)
    assert re.search(rf"injection hook overhead.* {ratio}", out), out
    assert len(re.findall(rf"AR reconstruct .*\(fast path\).* -> {ratio}", out)) == 2, out
    ar_diffs = [float(d) for d in re.findall(r"\(max \|diff\| (\S+)\)", out)]
    assert len(ar_diffs) == 2 and max(ar_diffs) < 1e-4, out  # the same readouts as the HF truncated model
    # Same weights, same inputs, same edits, greedy: nla_lens and HF emit the same tokens.
    assert re.findall(r"identical tokens: (\d+)/(\d+)", out) == [("1", "1"), ("4", "4")] * 4, out
    # The Gemma-3-shaped section (issue #13): memory of both layouts, verbalize against HF generate.
    for layout in ("text-only", "multimodal"):
        for dtype in ("bf16", "fp32"):
            assert re.search(rf"AV nla_lens, {layout} \(bf16 file -> {dtype} model\)\s+{ratio} loaded, {ratio} text",
                             out), (layout, dtype, out)
    # On the fast Gemma decoder, which the README's figures are of (the line did not say which decoder ran).
    assert re.findall(rf"Gemma verbalize, batch .*\(fast decoder\).* -> {ratio} \(rows with the same tokens as HF: "
                      r"(\d+)/(\d+)\)", out) == [("1", "1"), ("4", "4")], out


def test_the_bench_on_the_bridge_says_it_needs_tl3_before_it_runs(capsys, monkeypatch):
    """On both legs (the bridge chosen by $NLA_LENS_BACKEND on TL 3.x): what a TL 4.x install gets."""
    monkeypatch.setenv(nl.backends.ENV_VAR, "bridge")
    monkeypatch.setattr(bench, "write_checkpoints", lambda *a, **k: pytest.fail("the bench ran"))
    assert main(["bench", "--quick"]) == 2
    assert ("BackendError: nla-lens bench (it measures the streaming HookedTransformer loader and decoder) needs "
            "the TL 3.x backend: pip install 'nla_lens[tl3]'") in capsys.readouterr().err


def test_sizes_below_one_megabyte_are_given_in_kilobytes():
    assert [bench.size_text(n) for n in (300_000, 2**20, 43.4 * 2**20)] == ["293 KB", "1 MB", "43 MB"]


def test_gpu_timings_and_peaks_are_taken_on_the_benched_device(monkeypatch, tiny_paths):
    """`--device cuda:1`: torch's default device for synchronize and the peak counters is the current
    one (cuda:0), which would time kernels still queued on cuda:1 as free and report cuda:0's peak."""
    seen = []
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: seen.append((name, device)) or 0)
    bench._interleaved(lambda: None, lambda: None, 2, "cuda:1")
    load = nl.ActivationVerbalizer.from_pretrained.__func__  # the model itself is loaded on the CPU here
    monkeypatch.setattr(nl.ActivationVerbalizer, "from_pretrained",
                        classmethod(lambda cls, folder, **kw: load(cls, folder, **{**kw, "device": "cpu"})))
    bench._measure_load("nla_av", str(tiny_paths["av_karvonen"]), "float32", "cuda:1")
    assert {name for name, _ in seen} == {"synchronize", "reset_peak_memory_stats", "max_memory_allocated"}
    assert all(device == "cuda:1" for _, device in seen), seen


def test_a_thread_count_below_one_is_refused_before_the_run(monkeypatch, capsys):
    """`--threads 0` was ignored (the run went on with torch's count) and `--threads -1` ended in
    torch.set_num_threads's traceback."""
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("the bench ran"))
    for threads in ("0", "-1"):
        assert main(["bench", "--threads", threads]) == 2
        assert f"InputError: --threads {threads}: must be a whole number >= 1" in capsys.readouterr().err


@NEEDS_TL3  # TL's own HookedTransformer.from_pretrained is one of the loaders
def test_every_av_load_is_measured_over_the_same_forward(tiny_paths):
    """The memory rows compare loaders over load + one forward: nla_lens's AV ran its whole AV prompt where HF
    and TL ran 4 tokens, and on the bench's 412M-parameter model that prompt's logits alone were +0.03x (bf16)
    and +0.05x (fp32) of the weights on nla_lens's rows only."""
    forwards: dict[str, list[list[int]]] = {}
    loader = ""

    def record_model_input(_module: torch.nn.Module, args: tuple) -> None:
        tokens = args[0] if args else None
        if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point():
            forwards.setdefault(loader, tokens.tolist())  # the first module called is the model itself

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_model_input)
    try:
        for loader in ("nla_av", "hf", "tl"):
            bench._measure_load(loader, str(tiny_paths["av_karvonen"]), "float32", "cpu")
    finally:
        handle.remove()
    assert list(forwards) == ["nla_av", "hf", "tl"], forwards
    assert forwards["nla_av"] == forwards["hf"] == forwards["tl"], forwards


def test_gemma_text_weight_bytes_count_the_text_model_alone(tmp_path):
    """The Gemma memory rows' second denominator: the text weights, the same for the text-only folder and
    the multimodal one (SigLIP tower and projector left out), as HF counts the text model's parameters."""
    from transformers import AutoModelForCausalLM

    paths = bench_gemma.write_checkpoints(tmp_path, bench_gemma.QUICK.memory, bench_gemma.QUICK.vision)
    text = AutoModelForCausalLM.from_pretrained(paths["av"], dtype=torch.float32)
    n_text = sum(p.numel() for p in text.parameters())  # the tied unembedding once
    for folder in ("av", "av_multimodal"):
        assert bench_gemma.text_weight_bytes(paths[folder], torch.bfloat16) == 2 * n_text, folder
        assert bench_gemma.text_weight_bytes(paths[folder], torch.float32) == 4 * n_text, folder
