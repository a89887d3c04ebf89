"""Data-parallel SFT under a real `torchrun` (gloo, 2 CPU ranks): the same weights as one process.

The world size only changes float summation order: in float64 the 2-rank run equals the 1-process
run to 1e-9 (measured: bit for bit). In float32 one element in ~1e5 differs by up to ~2.4e-6 after
a few steps: Adam's first update g / (|g| + eps) amplifies rounding in a gradient that nearly cancels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEEDS_TL3
from launch import torchrun_cli
from safetensors.torch import load_file

from nla_lens import testing
from nla_lens.cli import main
from nla_lens.distributed import World
from nla_lens.training import label_activations, load_activations, save_explanations, split_by_document
from nla_lens.training.parallel import rank_share

TRAIN = {"steps": 4, "batch_size": 7, "lr": 1e-3, "warmup_steps": 1, "save_every": 2, "keep_checkpoints": 4}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, base_folder, extract_config) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n"
                              for d in testing.tiny_corpus(12, words_per_doc=10)))
    assert main(["extract", _write(root / "extract.yaml", {
        "base_model": str(base_folder), "corpus": str(corpus), "out_dir": str(root / "acts"),
        "extract": dataclasses.asdict(extract_config)})]) == 0
    data = label_activations(load_activations(root / "acts"), lambda r: f"the token {r.token.strip()}")
    save_explanations(data, root / "explanations.jsonl")
    return root


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def _config(workdir: Path, base_folder: Path, name: str, *, dtype: str, **overrides) -> str:
    """A train-av / train-ar YAML whose run lands in workdir/name; `overrides` go into `train:`."""
    config = {"base_model": str(base_folder), "activations": str(workdir / "acts"),
              "explanations": str(workdir / "explanations.jsonl"), "eval_fraction": 0.25, "dtype": dtype,
              "out_dir": str(workdir / name), "train": {**TRAIN, **overrides.pop("train", {})}, **overrides}
    return _write(workdir / f"{name}.yaml", config)


def _weights(workdir: Path, name: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(workdir / name / "checkpoints" / f"step-{step:06d}" / "params.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@NEEDS_TL3
def test_two_rank_ddp_av_sft_gives_the_one_process_weights(workdir, base_folder):
    assert main(["train-av", _config(workdir, base_folder, "av_1", dtype="float64")]) == 0
    torchrun_cli("train-av", _config(workdir, base_folder, "av_2", dtype="float64"))
    one, two = _weights(workdir, "av_1"), _weights(workdir, "av_2")
    assert next(iter(one.values())).dtype == torch.float64
    assert _max_diff(one, two) <= 1e-9
    # Both runs logged the same global losses, and the 2-rank run wrote one export and one summary.
    history = [json.loads((workdir / name / "train_result.json").read_text())["history"] for name in ("av_1", "av_2")]
    assert [h["loss"] for h in history[0]] == pytest.approx([h["loss"] for h in history[1]], abs=1e-9)
    assert json.loads((workdir / "av_2" / "train_result.json").read_text())["world_size"] == 2
    assert (workdir / "av_2" / "model" / "model.safetensors").is_file()

    # Resuming across world sizes: the 2-rank run's mid-run checkpoint, finished by one process.
    resumed = _config(workdir, base_folder, "av_2_then_1", dtype="float64",
                      resume=str(workdir / "av_2" / "checkpoints" / "step-000002"))
    assert main(["train-av", resumed]) == 0
    assert _max_diff(one, _weights(workdir, "av_2_then_1")) <= 1e-9


@NEEDS_TL3
def test_fsdp_with_activation_checkpointing_resumes_a_one_process_run_on_two_ranks(workdir, base_folder):
    assert main(["train-av", _config(workdir, base_folder, "av_1_fp32", dtype="float32")]) == 0
    torchrun_cli("train-av", _config(workdir, base_folder, "av_1_then_fsdp", dtype="float32",
                                  train={"data_parallel": "fsdp", "activation_checkpointing": True},
                                  resume=str(workdir / "av_1_fp32" / "checkpoints" / "step-000002")))
    one, fsdp = _weights(workdir, "av_1_fp32"), _weights(workdir, "av_1_then_fsdp")
    # float32: see the module docstring for why one element may move by ~2e-6.
    assert _max_diff(one, fsdp) <= 1e-5
    close = sum(int(((one[k] - fsdp[k]).abs() <= 1e-6).sum()) for k in one)
    assert close >= 0.9999 * sum(t.numel() for t in one.values())
    exported = load_file(workdir / "av_1_then_fsdp" / "model" / "model.safetensors")
    assert exported["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # gathered whole, not a shard


@pytest.fixture(scope="module")
def ar_train_settings(workdir, base_folder) -> dict:
    """The one-process AR run both data-parallel modes are compared with (trained once: a second run into its
    out_dir would be refused over its checkpoints)."""
    # Every other micro-batch holds one row, so rank 1 has nothing of its own there (rank_share).
    data = label_activations(load_activations(workdir / "acts"), str(workdir / "explanations.jsonl"))
    n_train = len(split_by_document(data, 0.25, 0)[0])  # the pipeline's split: eval_fraction, split_seed 0
    train = {"batch_size": n_train - 1, "grad_clip": 1e6}  # no clipping: it would hide a mis-scaled gradient
    assert main(["train-ar", _config(workdir, base_folder, "ar_1", dtype="float64", train=train)]) == 0
    return train


@NEEDS_TL3
@pytest.mark.parametrize("data_parallel", ["ddp", "fsdp"])
def test_two_rank_ar_sft_gives_the_one_process_weights(workdir, base_folder, ar_train_settings, data_parallel):
    torchrun_cli("train-ar", _config(workdir, base_folder, f"ar_2_{data_parallel}", dtype="float64",
                                     train={**ar_train_settings, "data_parallel": data_parallel}))
    one, two = _weights(workdir, "ar_1"), _weights(workdir, f"ar_2_{data_parallel}")
    assert "readout.weight" in one
    assert _max_diff(one, two) <= 1e-9


def test_rank_share_splits_a_micro_batch_and_keeps_empty_ranks_in_the_all_reduce():
    index = torch.tensor([5, 1, 4, 2, 3])
    shares = [rank_share(index, World(rank, 2)) for rank in range(2)]
    assert [s.tolist() for s, _ in shares] == [[5, 1, 4], [2, 3]] and all(c for _, c in shares)
    share, counts = rank_share(torch.tensor([7]), World(1, 2))
    assert share.tolist() == [7] and not counts  # runs a row, scaled by zero
