"""AR SFT: a truncated base + identity readout learns explanation -> vector; held-out FVE, export, resume."""

from __future__ import annotations

import dataclasses
import logging
import stat
import warnings

import pytest
import torch
from conftest import LAYER, NEEDS_TL3
from torch import nn

import hf_reference as ref
import nla_lens as nl
from nla_lens import metrics
from nla_lens.training import TrainConfig, ar_loss, ar_rows, export_ar, init_ar, train_ar

pytestmark = NEEDS_TL3

CONFIG = TrainConfig(steps=100, batch_size=16, lr=1e-3, warmup_steps=10)
ONE_STEP = TrainConfig(steps=1, warmup_steps=0)  # a run inside its warmup warns


@pytest.fixture(scope="module")
def trained(base_folder, dataset_meta, label_split, tmp_path_factory):
    ar = init_ar(base_folder, dataset_meta)
    result = train_ar(ar, *label_split, CONFIG, out_dir=tmp_path_factory.mktemp("ar_run"), progress=False)
    return ar, result


def test_ar_starts_from_the_first_k_plus_1_blocks_and_an_identity_readout(base_folder, dataset_meta):
    ar = init_ar(base_folder, dataset_meta)
    assert ar.model.cfg.n_layers == LAYER + 1
    assert isinstance(ar.model.ln_final, nn.Identity) and isinstance(ar.model.unembed, nn.Identity)
    assert torch.equal(ar.readout.weight, torch.eye(dataset_meta.d_model)) and ar.readout.bias is None
    assert (ar.meta.role, ar.meta.layer, ar.meta.mse_scale) == ("ar", LAYER, dataset_meta.mse_scale)


def test_ar_sft_explains_half_the_variance_of_held_out_vectors(trained):
    _, result = trained
    first, last = result.evals[0], result.evals[-1]
    # Measured: FVE -11.0 -> 0.95 in 100 steps, ~3 s on one CPU thread.
    assert last["fve"] >= 0.5, f"held-out FVE {first['fve']:.3f} -> {last['fve']:.3f}"
    assert last["baseline_source"] == "paper (held-out targets)"
    assert last["eval_mse"] < first["eval_mse"]


def test_training_loss_is_the_served_reconstruction_error(trained, label_split):
    ar, _ = trained
    held_out = label_split[1]
    rows = ar_rows(held_out, ar.meta, ar.tokenizer)
    with torch.no_grad():
        loss = float(ar_loss(ar, rows, torch.arange(len(rows))))
    served = metrics.mse_per_item(ar.reconstruct(held_out.explanations), held_out.vectors, ar.meta.mse_scale)
    assert abs(loss - float(served.mean())) < 1e-6


def test_exported_ar_reloads_with_no_flags_and_identical_vectors(trained, base_folder, label_split, tmp_path,
                                                                 group_umask):
    ar, result = trained
    folder = export_ar(ar, tmp_path / "ar", base_folder, heldout=label_split[1].vectors)
    # Every file gets the umask's mode, so other users of a shared machine can load it (safetensors writes 0600).
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes == dict.fromkeys(modes, group_umask)
    reloaded = nl.ActivationReconstructor.from_pretrained(folder)
    # The sidecar records the held-out split's paper baseline, the one AR training reported FVE against.
    assert reloaded.meta.fve_baseline == pytest.approx(result.evals[-1]["baseline"], rel=1e-6)
    assert reloaded.meta.fve_baseline_n == len(label_split[1])
    texts = label_split[1].explanations[:6]
    before, after = ar.reconstruct(texts), reloaded.reconstruct(texts)
    assert (before - after).abs().max() <= 1e-6
    # The paper's critic, in plain HF, reads the truncated folder + value head to the same vectors
    # (to fp32 rounding: entries reach ~30, so the bound is relative).
    assert (ref.ar_reconstruct(folder, texts) - before).abs().max() < 1e-5 * before.abs().max()


def test_a_held_out_split_under_32_vectors_puts_no_baseline_in_the_sidecar(trained, base_folder, label_split,
                                                                           tmp_path):
    """Round trips use the sidecar's baseline whatever its n: a split of 12 vectors' noisy one set every later FVE
    (README "Scores": a baseline of fewer than 32 vectors is not used)."""
    ar, _ = trained
    with pytest.warns(UserWarning, match="no fve_baseline: 12 held-out vectors are too few"):
        folder = export_ar(ar, tmp_path / "ar", base_folder, heldout=label_split[1].vectors[:12])
    assert nl.ActivationReconstructor.from_pretrained(folder).meta.fve_baseline is None


def test_non_finite_weights_are_not_exported(base_folder, dataset_meta, tmp_path):
    """A run whose loss went NaN exported its NaN weights, a folder that loads and reconstructs garbage; so did a
    weight past the export dtype's range (inf once cast). Neither writes a file now."""
    ar = init_ar(base_folder, dataset_meta)
    with torch.no_grad():
        ar.model.blocks[0].attn.W_Q[0, 0, 0] = float("nan")
    with pytest.raises(nl.ConfigError, match=r"not exporting to .*: 1 of \d+ weight tensors holds NaN or inf in "
                                             r"float32 \(model\.layers\.0\.self_attn\.q_proj\.weight\)\. The training "
                                             r"diverged"):
        export_ar(ar, tmp_path / "nan", base_folder)
    assert not (tmp_path / "nan").exists()
    ar = init_ar(base_folder, dataset_meta)
    with torch.no_grad():
        ar.readout.weight[0, 0] = 1e5  # float16 tops out at 65504
    export_ar(ar, tmp_path / "float32", base_folder)
    with pytest.raises(nl.ConfigError, match=r"1 of 1 weight tensor holds NaN or inf in float16 \(weight\)"):
        export_ar(ar, tmp_path / "half", base_folder, dtype=torch.float16)
    assert not (tmp_path / "half").exists()


def test_ar_resume_from_a_mid_run_checkpoint_gives_the_uninterrupted_weights(base_folder, dataset_meta,
                                                                             label_split, tmp_path, caplog):
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, save_every=2, keep_checkpoints=2)
    whole = init_ar(base_folder, dataset_meta)
    train_ar(whole, *label_split, config, out_dir=tmp_path / "whole", progress=False)
    resumed = init_ar(base_folder, dataset_meta)
    with caplog.at_level(logging.INFO, logger="nla_lens.training.loop"):
        train_ar(resumed, *label_split, config, out_dir=tmp_path / "resumed",
                 resume=tmp_path / "whole" / "checkpoints" / "step-000002", progress=False)
    # Another out_dir's checkpoint: the log says this run branches from that one, which it leaves as it is.
    assert f"at step 2: a branch of the run in {tmp_path / 'whole'}, continued in {tmp_path / 'resumed'}" in caplog.text
    assert torch.equal(whole.readout.weight, resumed.readout.weight)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # Resuming with a changed trajectory setting is refused rather than silently diverging.
    with pytest.raises(nl.ConfigError, match="batch_size"):
        train_ar(init_ar(base_folder, dataset_meta), *label_split, dataclasses.replace(config, batch_size=4),
                 out_dir=tmp_path / "whole", resume="latest", progress=False)
    # So is resuming on other rows (another explanations file or split) under the same config.
    train, held_out = label_split
    with pytest.raises(nl.ConfigError, match="other data than the run started with"):
        train_ar(init_ar(base_folder, dataset_meta), train.select(range(len(train) - 1)), held_out, config,
                 out_dir=tmp_path / "whole", resume="latest", progress=False)
    # And from other starting weights (another base folder or dtype): a block not trained still differs.
    other = init_ar(base_folder, dataset_meta)
    with torch.no_grad():
        other.model.blocks[0].attn.W_O.mul_(1.01)
    with pytest.raises(nl.ConfigError, match="other starting weights"):
        train_ar(other, *label_split, config, out_dir=tmp_path / "whole", resume="latest", progress=False)
    # Resuming from an earlier checkpoint into a folder with later ones warns: `resume: latest` would pick those.
    with pytest.warns(UserWarning, match=r"later checkpoints of another run \(step-000004\)"):
        train_ar(init_ar(base_folder, dataset_meta), *label_split, config, out_dir=tmp_path / "whole",
                 resume=tmp_path / "whole" / "checkpoints" / "step-000002", progress=False)
    # A resume folder that is gone (pruned) is said alone, without that warning about the later checkpoints.
    with warnings.catch_warnings(record=True) as caught, pytest.raises(nl.CheckpointError, match="does not exist"):
        warnings.simplefilter("always")
        train_ar(init_ar(base_folder, dataset_meta), *label_split, config, out_dir=tmp_path / "whole",
                 resume=tmp_path / "whole" / "checkpoints" / "step-000001", progress=False)
    assert caught == []


def test_a_held_out_split_too_small_for_a_baseline_scores_mse_without_fve(base_folder, dataset_meta, label_split):
    """An FVE against the paper baseline of a few held-out vectors was reported as if trustworthy (README "Scores":
    >= 32 vectors); one vector's zero spread was a ZeroDivisionError, so it was refused."""
    train, held_out = label_split
    few = held_out.select(range(31))
    with pytest.warns(UserWarning, match="no FVE: a baseline from 31 held-out vectors is not trustworthy"):
        result = train_ar(init_ar(base_folder, dataset_meta), train, few, ONE_STEP, progress=False)
    assert [e["fve"] for e in result.evals] == [None, None] and all(e["eval_mse"] > 0 for e in result.evals)
    with pytest.raises(nl.InputError, match="held-out split is empty"):
        train_ar(init_ar(base_folder, dataset_meta), train, held_out.select([]), ONE_STEP, progress=False)


def test_float16_weights_are_refused_before_a_step_turns_them_nan(base_folder, dataset_meta, label_split):
    """Adam's eps (1e-8) rounds to 0 in float16: one step turned the AR's weights NaN, and the run went on."""
    ar = init_ar(base_folder, dataset_meta, dtype=torch.float16)
    before = {name: p.clone() for name, p in ar.model.named_parameters()}
    with pytest.raises(nl.ConfigError, match="the weights to train: float16 weights cannot train here"):
        train_ar(ar, *label_split, ONE_STEP, progress=False)
    assert all(torch.equal(before[name], p) for name, p in ar.model.named_parameters())


def test_the_held_out_fve_uses_the_paper_baseline_of_32_or_more_vectors(base_folder, dataset_meta, label_split):
    train, held_out = label_split
    enough = held_out.select(range(32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no FVE" warning
        result = train_ar(init_ar(base_folder, dataset_meta), train, enough, ONE_STEP, progress=False)
    baseline = metrics.paper_baseline(enough.vectors.float(), dataset_meta.mse_scale)
    expected = 1 - result.evals[-1]["eval_mse"] / baseline
    assert result.evals[-1]["fve"] == pytest.approx(expected, rel=1e-5)
    assert result.evals[-1]["baseline_source"] == "paper (held-out targets)"
