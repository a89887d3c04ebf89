"""The NLA pair and its round trip."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import nla_lens as nl
from nla_lens import metrics
from nla_lens.verbalizer import Verbalization


def test_round_trip_scores_parsed_rows_and_counts_failed_parses(av_karvonen, ar_nanonla, vectors, monkeypatch):
    texts = ["<explanation>\nthe cat\n</explanation>", "no tags here", "<explanation>the sea</explanation>",
             "<explanation>numbers one two</explanation>"]
    fake = [Verbalization(t, nl.verbalizer.parse_explanation(t), []) for t in texts]
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors)

    parsed = [0, 2, 3]
    expected = ar_nanonla.reconstruct(["the cat", "the sea", "numbers one two"])
    assert rt.explanations == ["the cat", None, "the sea", "numbers one two"]
    assert rt.n_failed_parses == 1
    assert torch.equal(rt.reconstructions[parsed], expected)
    assert torch.isnan(rt.reconstructions[1]).all()
    scale = ar_nanonla.meta.mse_scale
    assert torch.allclose(rt.mse[parsed], metrics.mse_per_item(expected, vectors[parsed], scale))
    assert float(rt.mse[1]) == metrics.miss_mse(64, scale) == 2.0
    assert rt.baseline == pytest.approx(metrics.paper_baseline(vectors, scale))
    assert rt.baseline_source == "paper (these vectors)"
    assert rt.fve == pytest.approx(1 - float(rt.mse.mean()) / rt.baseline)
    assert rt.warnings == []


def test_round_trip_with_a_given_baseline_and_a_failed_injection_warning(av_karvonen, ar_nanonla, vectors,
                                                                         monkeypatch):
    fake = [Verbalization("中文中文中文中文", None, [])] * len(vectors)
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.56)
    assert rt.baseline == 0.56 and rt.baseline_source == "given"
    assert rt.n_failed_parses == 4 and rt.fve == pytest.approx(1 - 2.0 / 0.56)
    assert len(rt.warnings) == 1 and "injection probably failed" in rt.warnings[0]


def test_round_trip_end_to_end_on_the_tiny_pair(av_karvonen, ar_paper, vectors):
    rt = nl.NLA(av_karvonen, ar_paper).round_trip(vectors, max_new_tokens=6, progress=False)
    assert len(rt.verbalizations) == 4 and rt.mse.shape == (4,)
    assert rt.n_failed_parses == sum(v.explanation is None for v in rt.verbalizations)


def test_pair_mismatch_is_refused(av_karvonen, tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["extraction"]["layer_index"] = 1
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    other = nl.ActivationReconstructor.from_pretrained(folder)
    with pytest.raises(nl.PairMismatchError, match="layer"):
        nl.NLA(av_karvonen, other)


def test_a_zero_baseline_asks_for_a_held_out_one(av_karvonen, ar_nanonla, vectors, monkeypatch):
    fake = [Verbalization("<explanation>a</explanation>", "a", [])]
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    nla = nl.NLA(av_karvonen, ar_nanonla)
    with pytest.raises(nl.InputError, match="baseline= computed on a larger held-out set"):
        nla.round_trip(vectors[:1])
    assert nla.round_trip(vectors[:1], baseline=0.56).baseline == 0.56
