"""The NLA pair and its round trip."""

from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import nla_lens as nl
from nla_lens import backends, loading, metrics
from nla_lens.explain import Explanation
from nla_lens.nla import resolve_baseline
from nla_lens.parsing import injection_warning
from nla_lens.sidecar import ar_prompt_ids
from nla_lens.testing import build_tokenizer
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
    # Four vectors are too few for a paper baseline, and the tiny AR's sidecar records none: no FVE.
    assert rt.baseline is None and rt.fve is None and rt.fves is None and rt.baseline_source == "none"
    assert len(rt.warnings) == 1 and "pass baseline=" in rt.warnings[0].lower()
    # The printed table marks the failed parse and shows its raw completion; a blank reads as an empty explanation.
    row = next(line for line in repr(rt).splitlines() if line.split()[0] == "1")
    # Its MSE reads as the miss it was scored as, not a reconstruction that bad
    assert "(no <explanation> tags) no tags here" in row and row.split()[-3:] == ["False", "miss", "(2.000)"]


CAT = Verbalization("<explanation>the cat</explanation>", "the cat", [])


def _fake_verbalize(av, monkeypatch, text="<explanation>the cat</explanation>"):
    monkeypatch.setattr(av, "verbalize", lambda v, **kw: [Verbalization(text, nl.verbalizer.parse_explanation(text),
                                                                        [])] * len(v))


def test_enough_vectors_give_the_paper_baseline_and_per_item_fve(av_karvonen, ar_nanonla, monkeypatch):
    _fake_verbalize(av_karvonen, monkeypatch)
    many = torch.randn(nl.nla.MIN_BASELINE_VECTORS, 64, generator=torch.Generator().manual_seed(0))
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(many)
    scale = ar_nanonla.meta.mse_scale
    assert rt.baseline == pytest.approx(metrics.paper_baseline(many, scale), rel=1e-6)
    assert rt.baseline_source == "paper (these vectors)" and rt.baseline_n == len(many)
    assert rt.fve == pytest.approx(1 - float(rt.mse.mean()) / rt.baseline, abs=1e-6)
    assert torch.allclose(rt.fves, 1 - rt.mse / rt.baseline)
    assert float(rt.fves.mean()) == pytest.approx(rt.fve, abs=1e-6)
    assert rt.warnings == []
    assert [r["fve"] for r in rt.to_records()] == pytest.approx(rt.fves.tolist())


def test_the_sidecar_baseline_wins_over_the_vectors_and_the_caller_over_both(av_karvonen, tiny_paths, tmp_path,
                                                                             vectors, monkeypatch):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["fve_baseline"] = {"value": 0.7, "n": 500}
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    nla = nl.NLA(av_karvonen, nl.ActivationReconstructor.from_pretrained(folder))
    _fake_verbalize(av_karvonen, monkeypatch)
    rt = nla.round_trip(vectors)
    assert (rt.baseline, rt.baseline_source, rt.baseline_n) == (0.7, "sidecar (held-out)", 500)
    assert rt.fve == pytest.approx(1 - float(rt.mse.mean()) / 0.7) and rt.warnings == []
    assert "baseline 0.700, sidecar (held-out), n=500" in repr(rt)
    given = nla.round_trip(vectors, baseline=0.5)
    assert (given.baseline, given.baseline_source) == (0.5, "given")


def test_a_given_baseline_may_be_any_real_scalar_but_must_be_positive_and_finite():
    """numpy and torch scalars (a baseline computed with either) are numbers; inf made every FVE 1.0."""
    vectors = torch.randn(4, 8)
    for given in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5):
        resolved = resolve_baseline(vectors, 8**0.5, given)
        assert (resolved.value, resolved.source) == (0.5, "given") and type(resolved.value) is float
    for given in (math.inf, math.nan, 0.0, -0.5, True, "0.5", torch.tensor([0.5, 0.6])):
        with pytest.raises(nl.InputError, match=r"baseline=.* must be a positive finite number"):
            resolve_baseline(vectors, 8**0.5, given)


def test_too_few_vectors_for_a_baseline_are_counted_in_words():
    """One vector (explain(..., positions=-1)) read "1 vectors are too few"."""
    assert "and 1 vector is too few for one (need >= 32)" in resolve_baseline(torch.randn(1, 8), 8**0.5).warning
    assert "and 4 vectors are too few for one (need >= 32)" in resolve_baseline(torch.randn(4, 8), 8**0.5).warning


def test_a_malformed_sidecar_baseline_is_refused(tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["fve_baseline"] = {"value": -1, "n": 500}
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    with pytest.raises(nl.SidecarError, match="fve_baseline"):
        nl.ActivationReconstructor.from_pretrained(folder)


def test_summaries_say_which_failed_parses_were_cut_at_max_new_tokens(av_karvonen, ar_nanonla, vectors, monkeypatch):
    """A completion cut at max_new_tokens opens <explanation> and never closes it: the summaries say so, and to raise
    max_new_tokens. One that opened the tag and ended (EOS) was also told to raise it, which would change nothing,
    and its row read "(no <explanation> tags)" under its raw "<explanation>". Untagged text is neither."""
    said = [("<explanation>\nthe sea and the", True), ("<explanation>\nthe sun", False), ("no tags here", False),
            ("<explanation>the cat</explanation>", False)]
    fake = nl.Verbalizations([Verbalization(text, nl.verbalizer.parse_explanation(text), [], truncated=cut)
                              for text, cut in said])
    note = ("(1 cut at max_new_tokens before </explanation>: verbalize with a larger one; 1 opened <explanation> and "
            "ended without closing it)")
    assert fake.summary() == f"4 verbalizations, 3 failed to parse {note}"
    assert fake[1:].summary() == ("3 verbalizations, 2 failed to parse (1 opened <explanation> and ended without "
                                  "closing it)")
    assert fake[2:].summary() == "2 verbalizations, 1 failed to parse"
    assert "(<explanation> never closed) <explanation>\\nthe sun" in repr(fake)
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors)
    assert rt.summary().endswith(f"3 failed parses {note}")
    explained = Explanation(rows=[], texts=["abcd"], tokens=[["abcd"]], layer=av_karvonen.meta.layer,
                            vectors=vectors, round_trip=rt)  # nl.explain's result: its summary reads the round trip
    assert explained.summary().endswith(f"3 failed parses {note}")


def test_a_completion_cut_after_its_explanation_closed_is_not_counted_as_cut_before_it():
    """A completion that closed </explanation> and ran on to max_new_tokens without its end token parses: the note
    counts only the failed parses cut before </explanation>, not every completion cut."""
    said = [("<explanation>the cat</explanation> and the cat and the", True), ("<explanation>\nthe sea and the", True)]
    fake = nl.Verbalizations([Verbalization(text, nl.verbalizer.parse_explanation(text), [], truncated=cut)
                              for text, cut in said])
    assert fake.summary() == ("2 verbalizations, 1 failed to parse (1 cut at max_new_tokens before </explanation>: "
                              "verbalize with a larger one)")


def test_a_reconstruction_with_no_direction_scores_as_a_miss_and_is_named(av_karvonen, ar_nanonla, vectors,
                                                                        monkeypatch):
    """An AR that returns NaN (a float16 overflow) or zeros (a hook) for a row left that row's MSE NaN, and with it
    the mean MSE and the FVE of the whole round trip, without a word; RL's rewards score such a row as a miss."""
    _fake_verbalize(av_karvonen, monkeypatch)
    last = f"blocks.{ar_nanonla.meta.layer}.hook_resid_post"

    def break_rows_0_and_2(resid, hook):
        resid[0] = float("nan")
        resid[2] = 0.0
        return resid

    with ar_nanonla.model.hooks(fwd_hooks=[(last, break_rows_0_and_2)]):
        rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)

    scale, healthy = ar_nanonla.meta.mse_scale, [1, 3]
    expected = metrics.mse_per_item(ar_nanonla.reconstruct(["the cat"] * 2), vectors[healthy], scale)
    assert torch.allclose(rt.mse[healthy], expected, atol=1e-6)
    assert rt.mse[[0, 2]].tolist() == [metrics.miss_mse(64, scale)] * 2
    assert math.isclose(rt.fve, 1 - float(rt.mse.mean()) / 0.5, abs_tol=1e-6)
    assert torch.isnan(rt.reconstructions[0]).all() and (rt.reconstructions[2] == 0).all()  # kept as the AR gave them
    assert rt.n_failed_parses == 0
    assert len(rt.warnings) == 1 and "2/4 reconstructions have no direction" in rt.warnings[0]
    assert "rows [0, 2]" in rt.warnings[0]


def test_round_trip_refuses_a_max_new_tokens_the_ar_cannot_read_before_verbalizing(av_karvonen, ar_nanonla, vectors,
                                                                                  monkeypatch):
    """By RL's rule (the AR prompt of an empty explanation plus the sample fits the AR's n_ctx): `reconstruct` refused
    a long explanation after the AV had verbalized every vector, and the work was lost."""
    prompt = len(ar_prompt_ids(ar_nanonla.meta, ar_nanonla.tokenizer, ""))
    monkeypatch.setattr(ar_nanonla.model.cfg, "n_ctx", prompt + 10)  # an AR that reads shorter texts than the AV writes
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: pytest.fail("verbalized before the check"))
    nla = nl.NLA(av_karvonen, ar_nanonla)
    message = (f"max_new_tokens=11 after the {prompt}-token AR prompt needs {prompt + 11} positions, over the AR's "
               f"n_ctx={prompt + 10}; set max_new_tokens <= 10")
    with pytest.raises(nl.PromptTooLongError, match=re.escape(message)):
        nla.round_trip(vectors, max_new_tokens=11)
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"max_new_tokens={nl.verbalizer.MAX_NEW_TOKENS} after")):
        nla.round_trip(vectors)  # verbalize's default
    _fake_verbalize(av_karvonen, monkeypatch)
    assert nla.round_trip(vectors, max_new_tokens=10).mse.isfinite().all()


@pytest.mark.parametrize("peak", [1e39, 1e-39, 1e-46], ids=["overflow", "subnormal", "underflow"])
def test_round_trip_refuses_float64_vectors_past_float32s_range_by_row_before_verbalizing(av_karvonen, ar_nanonla,
                                                                                            vectors, monkeypatch, peak):
    """round_trip computes in float32: its .float() made such a row inf (refused as "vectors at rows [2] hold NaN or
    Inf; check how they were computed"), zero ("are zero") or a few coarse subnormal steps (another direction,
    verbalized without a word). The rescale the message gives is taken."""
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: pytest.fail("verbalized before the check"))
    nla = nl.NLA(av_karvonen, ar_nanonla)
    wide = vectors.double()
    wide[2] = wide[2] / wide[2].abs().max() * peak
    with pytest.raises(nl.VectorError, match=re.escape(
            f"vectors at rows [2] are float64 past float32's range, in which nla_lens computes them: row 2's largest "
            f"entry is {peak:.3g} in magnitude, where float32 holds 1.18e-38 to 3.4e+38, so the row would become inf, "
            "zero or a few coarse steps. Rescale such rows into that range")):
        nla.round_trip(wide, baseline=0.5, max_new_tokens=4)
    monkeypatch.undo()
    rescaled = nla.round_trip(wide / wide.abs().amax(dim=1, keepdim=True), baseline=0.5, max_new_tokens=4)
    assert len(rescaled.mse) == 4 and rescaled.mse.isfinite().all()
    assert nla.round_trip(vectors.double(), baseline=0.5, max_new_tokens=4).mse.isfinite().all()  # in range: taken


def test_an_explanation_that_retokenizes_past_the_ars_context_scores_as_a_miss_named_in_warnings(
        av_karvonen, ar_nanonla, vectors, monkeypatch):
    """The up-front check bounds the tokens the AV samples, not its text tokenized again: a sampled byte token of a
    split character decodes to U+FFFD, three byte tokens here. That row made `reconstruct` refuse the whole call
    after the AV's work; it scores as a miss and the warnings name it."""
    tokenizer = av_karvonen.tokenizer
    stray = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")  # one byte of a character
    ids = [*tokenizer.encode("<explanation>\n", add_special_tokens=False), *[stray] * 20,
           *tokenizer.encode("\n</explanation>", add_special_tokens=False), tokenizer.eos_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    garbled = Verbalization(text, nl.verbalizer.parse_explanation(text), ids)
    prompt = len(ar_prompt_ids(ar_nanonla.meta, ar_nanonla.tokenizer, ""))
    retokenized = len(ar_prompt_ids(ar_nanonla.meta, ar_nanonla.tokenizer, garbled.explanation))
    assert retokenized > prompt + len(ids)  # longer than any bound on the sampled tokens can foresee
    monkeypatch.setattr(ar_nanonla.model.cfg, "n_ctx", prompt + len(ids))
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: [CAT, garbled, CAT, CAT])
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5, max_new_tokens=len(ids))

    scale, read = ar_nanonla.meta.mse_scale, [0, 2, 3]
    expected = metrics.mse_per_item(ar_nanonla.reconstruct(["the cat"] * 3), vectors[read], scale)
    assert torch.allclose(rt.mse[read], expected, atol=1e-6)
    assert float(rt.mse[1]) == metrics.miss_mse(64, scale) and torch.isnan(rt.reconstructions[1]).all()
    assert rt.n_failed_parses == 0
    assert rt.warnings == [f"1/4 explanations make AR prompts over the AR's n_ctx={prompt + len(ids)} (rows [1]), "
                           "scored as misses: their text retokenizes to more tokens than the AV sampled (a sampled "
                           "token holding stray bytes of a split character decodes to U+FFFD, which may tokenize as "
                           "three); read their `text`"]  # and no "no direction" for its NaN row


def test_a_closed_explanation_whose_sample_ran_on_is_scored_and_its_rows_named(av_karvonen, ar_nanonla, vectors,
                                                                              monkeypatch):
    """The paper's parse rule scores an explanation whose sample closed its tag but never reached EOS; RL's reward
    scores the same sample as a miss. The round trip keeps the paper's rule and names those rows, once silent."""
    ran_on = "<explanation>the cat</explanation> and then the"
    said = [Verbalization(ran_on, "the cat", [], truncated=True), CAT, Verbalization(ran_on, "the cat", [],
            truncated=True), Verbalization("<explanation>the sea and", None, [], truncated=True)]
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: said)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)

    scored = [0, 1, 2]
    expected = metrics.mse_per_item(ar_nanonla.reconstruct(["the cat"] * 3), vectors[scored], ar_nanonla.meta.mse_scale)
    assert torch.allclose(rt.mse[scored], expected, atol=1e-6)
    assert rt.warnings == ["2/4 explanations closed their tag but the AV did not end the sample before max_new_tokens "
                           "(rows [0, 2]): the round trip scores them, by the paper's parse rule, where RL's reward "
                           "scores such samples as misses. A larger max_new_tokens lets a tag closed at the cap end "
                           "with EOS; what the AV wrote on after its tag is in the row's `text`"]


def test_an_empty_explanation_is_reconstructed_and_scored_as_rls_reward_scores_it(av_karvonen, ar_nanonla, vectors,
                                                                                  monkeypatch):
    """The paper's critic reconstructs whatever its parser returns, "" included, and so does RL's reward: round trips
    score an AV's empty explanation the same way (`nla-lens reconstruct` refuses an empty argument as a slip)."""
    from nla_lens.training import rl

    text = "<explanation></explanation>"
    _fake_verbalize(av_karvonen, monkeypatch, text)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)
    assert rt.explanations == [""] * 4 and rt.n_failed_parses == 0 and rt.warnings == []
    assert torch.allclose(rt.reconstructions, ar_nanonla.reconstruct([""]).expand(4, -1), atol=1e-5)
    _, rl_mse, _ = rl.score(ar_nanonla, vectors, [text] * 4, torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(rt.mse.double(), rl_mse, atol=1e-6)
    assert (rt.mse < metrics.miss_mse(64, ar_nanonla.meta.mse_scale)).any()  # a reconstruction, not a miss


def test_round_trip_with_a_given_baseline_and_a_failed_injection_warning(av_karvonen, ar_nanonla, vectors,
                                                                         monkeypatch):
    fake = [Verbalization("中文中文中文中文", None, [])] * len(vectors)
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.56)
    assert rt.baseline == 0.56 and rt.baseline_source == "given"
    assert rt.n_failed_parses == 4 and rt.fve == pytest.approx(1 - 2.0 / 0.56)
    assert len(rt.warnings) == 1 and "injection probably failed" in rt.warnings[0]


def test_a_round_trips_warnings_are_counted_where_its_repr_and_view_show_it(av_karvonen, ar_nanonla, vectors,
                                                                             monkeypatch):
    """The round trip's warnings are kept on the result, never emitted: its repr and view did not mention them, so
    a failed injection (which no summary says) was seen only by a user who knew to read `rt.warnings`."""
    fake = [Verbalization("中文中文中文中文", None, [])] * 2
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors[:2])  # too few for a baseline: no FVE as well
    assert len(rt.warnings) == 2
    assert repr(rt).splitlines()[0] == f"RoundTrip: {rt.summary()}; 2 warnings (.warnings)"
    assert "2 warnings (.warnings)" in rt._repr_html_()
    assert "warning" not in rt.summary()  # the line `nla-lens explain` prints, just before the warnings themselves
    explained = Explanation(rows=[], texts=["abcd"], tokens=[["abcd"]], layer=av_karvonen.meta.layer,
                            vectors=vectors[:2], round_trip=rt)
    assert repr(explained).splitlines()[0].endswith("; 2 warnings (.round_trip.warnings)")
    assert "2 warnings (.round_trip.warnings)" in explained._repr_html_()
    _fake_verbalize(av_karvonen, monkeypatch)
    healthy = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)
    assert healthy.warnings == [] and "warning" not in repr(healthy) + healthy._repr_html_()


def test_a_round_trip_holds_back_only_the_injection_warning_it_reports_itself(av_karvonen, ar_nanonla, vectors,
                                                                              monkeypatch):
    """round_trip silenced every warning raised while the AV verbalized (torch's, TL's, the user's hooks'), to keep
    the one it reports on the result from showing twice."""
    texts = ["中文中文中文中文"] * len(vectors)

    def verbalize(v, **kwargs):  # what verbalize warns of such outputs, and a warning of a user's hook
        warnings.warn("a warning of the user's hook", UserWarning, stacklevel=1)
        warnings.warn(injection_warning(texts, av_karvonen.meta.injection_char), UserWarning, stacklevel=1)
        return [Verbalization(t, None, []) for t in texts]

    monkeypatch.setattr(av_karvonen, "verbalize", verbalize)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)
    assert [str(w.message) for w in shown] == ["a warning of the user's hook"]
    assert any("injection probably failed" in w for w in rt.warnings)


def test_a_saved_page_shows_the_warnings_word_for_word(av_karvonen, ar_nanonla, vectors, monkeypatch, tmp_path):
    """A saved .html page said "2 warnings (.warnings)", which its reader has no result to look up."""
    import html

    fake = [Verbalization("中文中文中文中文", None, [])] * 2
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors[:2])
    explained = Explanation(rows=[], texts=["abcd"], tokens=[["abcd"]], layer=av_karvonen.meta.layer,
                            vectors=vectors[:2], round_trip=rt)
    for result in (rt, explained):
        page = result.save(tmp_path / f"{type(result).__name__}.html").read_text(encoding="utf-8")
        assert all(f"warning: {html.escape(w)}" in page for w in rt.warnings) and len(rt.warnings) == 2


def test_a_saved_round_trip_keeps_its_warnings_for_whoever_reads_the_file(av_karvonen, ar_nanonla, vectors,
                                                                            monkeypatch, tmp_path):
    """A round trip's warnings were in no saved file: a .parquet read back later could not tell that the injection
    failed (no summary line says so) or why there was no FVE. They are kept where the summary is."""
    fake = [Verbalization("中文中文中文中文", None, [])] * 2
    monkeypatch.setattr(av_karvonen, "verbalize", lambda v, **kw: fake)
    rt = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors[:2])  # a failed injection, and too few for a baseline
    saved = nl.read_result(rt.save(tmp_path / "rt.parquet"))
    assert saved.attrs["warnings"] == rt.warnings and len(rt.warnings) == 2
    assert "injection probably failed" in saved.attrs["warnings"][0] and saved.attrs["warnings"][1].startswith("no FVE")
    explained = Explanation(rows=[], texts=["abcd"], tokens=[["abcd"]], layer=av_karvonen.meta.layer,
                            vectors=vectors[:2], round_trip=rt)
    assert nl.read_result(explained.save(tmp_path / "explained.parquet")).attrs["warnings"] == rt.warnings
    _fake_verbalize(av_karvonen, monkeypatch)
    healthy = nl.NLA(av_karvonen, ar_nanonla).round_trip(vectors, baseline=0.5)
    assert nl.read_result(healthy.save(tmp_path / "healthy.parquet")).attrs["warnings"] == []


def test_round_trip_end_to_end_on_the_toy_pair():
    """The real AV generates and parses, the real AR rebuilds: every row's score from the AR alone."""
    toy = nl.toy.load()
    ids = toy.base.tokenizer.encode("Romeo: wherefore art thou Romeo? Deny thy father and refuse thy name.",
                                    add_special_tokens=False)
    vectors = toy.activations(ids)[8:13]
    rt = toy.nla.round_trip(vectors, baseline=0.78, max_new_tokens=48)
    assert [v.text for v in rt.verbalizations] == [v.text for v in toy.av.verbalize(vectors, max_new_tokens=48)]
    parsed = [i for i, e in enumerate(rt.explanations) if e is not None]
    assert len(parsed) >= 4 and rt.n_failed_parses == len(vectors) - len(parsed)
    rebuilt = toy.ar.reconstruct([rt.explanations[i] for i in parsed])
    assert torch.allclose(rt.reconstructions[parsed], rebuilt, atol=1e-6)
    mse = metrics.mse_per_item(rebuilt, vectors[parsed], toy.ar.meta.mse_scale)
    assert torch.allclose(rt.mse[parsed], mse, atol=1e-6) and len(set(mse.tolist())) == len(parsed)
    assert torch.allclose(rt.fves, 1 - rt.mse / 0.78, atol=1e-6)


def test_pair_mismatch_is_refused(av_karvonen, tiny_paths, tmp_path):
    folder = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    meta = yaml.safe_load((folder / "nla_meta.yaml").read_text())
    meta["extraction"]["layer_index"] = 1
    (folder / "nla_meta.yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    other = nl.ActivationReconstructor.from_pretrained(folder)
    with pytest.raises(nl.PairMismatchError, match="layer"):
        nl.NLA(av_karvonen, other)


def test_an_ar_of_another_family_and_the_same_shape_is_refused(av_karvonen, bos_paths):
    """A Gemma AR of the Qwen AV's width and layer passed `check_pair` (no base names to warn on) and read
    the AV's text through another vocabulary."""
    gemma_ar = nl.ActivationReconstructor.from_pretrained(bos_paths["gemma_ar"])
    assert (gemma_ar.meta.d_model, gemma_ar.meta.layer) == (av_karvonen.meta.d_model, av_karvonen.meta.layer)
    with pytest.raises(nl.PairMismatchError, match="the AV's and the AR's tokenizers have different vocabularies"):
        nl.NLA(av_karvonen, gemma_ar)


def test_nla_from_pretrained_refuses_another_family_before_reading_weights(tiny_paths, bos_paths, monkeypatch):
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(nl.PairMismatchError, match="the AV's and the AR's tokenizers have different vocabularies"):
        nl.NLA.from_pretrained(tiny_paths["av_karvonen"], bos_paths["gemma_ar"])


def test_nla_from_pretrained_loads_each_tokenizer_once(tiny_paths, monkeypatch):
    """The pair's vocabulary check loaded both tokenizers, and the AV and the AR loaded them again (about 1 s each
    on a Qwen-sized one). An AV tokenizer given, as `nla-lens explain` loads it to check the base, is not loaded."""
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    av_tokenizer = loading.load_tokenizer(av)
    loads = []
    load_tokenizer = loading.load_tokenizer

    def counted(folder, **kwargs):
        loads.append(Path(folder))
        return load_tokenizer(folder, **kwargs)

    monkeypatch.setattr(loading, "load_tokenizer", counted)
    nl.NLA.from_pretrained(av, ar)
    assert sorted(loads) == sorted([av, ar])
    loads.clear()
    assert nl.NLA.from_pretrained(av, ar, tokenizer=av_tokenizer).av.tokenizer is av_tokenizer
    assert loads == [ar]


def test_nla_from_pretrained_checks_each_tokenizer_against_its_sidecar_once(tiny_paths, monkeypatch):
    """The pair's check ran `check_tokenizer` on both tokenizers, and the AV and the AR ran it again on the one they
    were handed. A drifted tokenizer is still refused (`test_a_given_tokenizer_that_is_not_the_checkpoints_...`)."""
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    checks = []
    check_tokenizer = loading.check_tokenizer

    def counted(meta, tokenizer, role=None, **kwargs):
        checks.append((kwargs["source"], role))
        return check_tokenizer(meta, tokenizer, role, **kwargs)

    monkeypatch.setattr(loading, "check_tokenizer", counted)
    nla = nl.NLA.from_pretrained(av, ar)
    assert checks == [(str(av / "nla_meta.yaml"), "av"), (str(ar / "nla_meta.yaml"), "ar")]
    assert (nla.av.meta.source, nla.ar.meta.source) == (str(av / "nla_meta.yaml"), str(ar / "nla_meta.yaml"))


def test_a_given_tokenizer_that_is_not_the_checkpoints_is_named_as_the_argument(tiny_paths, monkeypatch):
    """`from_pretrained(tokenizer=)` of another model said to "Load the tokenizer saved with the checkpoint", whose
    files were never read; `NLA.from_pretrained` blamed the AR ("load the AR trained with this AV"); a folder's path
    given as `tokenizer=` was a TypeError from inside the check."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    other = loading.load_tokenizer(nl.toy.TOY_DIR / "av")  # the toy's: another model's vocabulary
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    loaders = [(nl.ActivationVerbalizer.from_pretrained, av), (nl.ActivationReconstructor.from_pretrained, ar),
               (lambda folder, **kwargs: nl.NLA.from_pretrained(folder, ar, **kwargs), av)]
    for load, folder in loaders:
        named = rf"^tokenizer= is not the tokenizer of {re.escape(str(folder))} \(leave it out to load that one\): "
        with pytest.raises(nl.TokenizerDriftError, match=named + r"marker '.' encodes to \[\d+\], but the sidecar"):
            load(folder, tokenizer=other)
        with pytest.raises(nl.InputError, match=r"^tokenizer= takes a loaded tokenizer .* got str '.*av_karvonen'; "
                                                r"leave it out to load the one in "):
            load(folder, tokenizer=str(av))


def test_a_given_tokenizer_is_set_up_as_a_loaded_one_and_reconstructs_the_same(tiny_paths, ar_nanonla):
    """A tokenizer from plain `AutoTokenizer` (right padding; Llama's has no pad token) is given what
    `load_tokenizer` gives one: the AR pads on the left with a pad id, so its vectors are the folder's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["ar_nanonla"], padding_side="right")
    tokenizer.pad_token = None
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"], tokenizer=tokenizer)
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", tokenizer.eos_token)
    texts = ["a cat", "the sea and the park"]
    assert torch.equal(ar.reconstruct(texts), ar_nanonla.reconstruct(texts))


@pytest.mark.parametrize(("av", "ar", "error", "match"), [
    ("ar_nanonla", "av_karvonen", nl.PairMismatchError, "given the AR first .* and the AV second .*: swap them"),
    ("ar_paper", "av_embedding", nl.PairMismatchError, "given the AR first .* and the AV second .*: swap them"),
    ("av_karvonen", "av_embedding", nl.SidecarError, "ar_path .*av_embedding is an AV checkpoint, not an AR: pass "
                                                     "the AR trained with this AV as ar_path"),
    ("ar_paper", "ar_nanonla", nl.SidecarError, "av_path .*ar_paper is an AR checkpoint, not an AV, as is ar_path"),
    ("av_karvonen", "av_karvonen", nl.CheckpointError, "av_karvonen has no value_head.safetensors.*if it is an AV"),
], ids=["swapped_nanonla", "swapped_paper", "two_avs", "two_ars", "two_nanonla_avs"])
def test_nla_from_pretrained_names_swapped_or_same_role_folders_before_reading_weights(tiny_paths, monkeypatch, av,
                                                                                        ar, error, match):
    """Given the AR first, it loaded the AR's sidecar as an AV's and said to call ActivationReconstructor
    .from_pretrained (NLA(ar, av) says to swap them); given two AVs, it read the first AV's weights first."""
    monkeypatch.setattr(backends, "load_model", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(error, match=match):
        nl.NLA.from_pretrained(tiny_paths[av], tiny_paths[ar])


def test_an_av_folder_loaded_as_an_ar_says_to_load_it_as_an_av(tiny_paths):
    """A nanoNLA sidecar names no role, so its AV folder got only "has no value_head.safetensors"."""
    with pytest.raises(nl.CheckpointError, match="has no value_head.safetensors.*if it is an AV, load it with "
                                                 "ActivationVerbalizer.from_pretrained"):
        nl.ActivationReconstructor.from_pretrained(tiny_paths["av_karvonen"])


def test_one_vocabulary_under_other_options_is_shared_and_another_familys_is_not():
    """Copies of one base agree whatever their splitting options or added tokens (a wrong refusal would have
    no way round it); tokenizers of other families do not."""
    from nla_lens.nla import shares_vocabulary
    from nla_lens.testing_families import gemma_tokenizer, llama_tokenizer

    qwen = build_tokenizer()
    with_marker = build_tokenizer()
    with_marker.add_special_tokens({"additional_special_tokens": ["<new_marker>"]})
    with_marker.add_tokens(["<explanation>"])
    assert shares_vocabulary(qwen, qwen) and shares_vocabulary(qwen, with_marker)
    gemma, llama = gemma_tokenizer(), llama_tokenizer()
    assert not shares_vocabulary(qwen, gemma) and not shares_vocabulary(gemma, llama)


def test_too_few_or_parallel_vectors_give_no_fve_said_once_on_the_result(av_karvonen, ar_nanonla, vectors,
                                                                          monkeypatch):
    """"no FVE" was both kept in `rt.warnings` and emitted with warnings.warn: said twice (the commands printed it
    twice until they dropped repeated lines). The result, which records the round trip's other warnings, says it."""
    _fake_verbalize(av_karvonen, monkeypatch)
    nla = nl.NLA(av_karvonen, ar_nanonla)
    parallel = vectors[:1].expand(40, -1) * torch.arange(1, 41)[:, None]  # paper baseline 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one, same_way = nla.round_trip(vectors[:1]), nla.round_trip(parallel)
    assert one.fve is None and one.baseline is None and "no FVE" in repr(one)
    assert len(one.warnings) == 1 and one.warnings[0].startswith("no FVE") and "need >= 32" in one.warnings[0]
    assert same_way.fve is None and len(same_way.warnings) == 1 and "point the same way" in same_way.warnings[0]
    assert nla.round_trip(vectors[:1], baseline=0.56).baseline == 0.56
    with pytest.raises(nl.InputError, match="positive"):
        nla.round_trip(vectors[:1], baseline=0.0)


def test_models_print_as_one_line_of_facts_not_a_module_tree(av_karvonen, ar_nanonla):
    nla = nl.NLA(av_karvonen, ar_nanonla)
    text = repr(nla)
    assert text.startswith("NLA(\n  av=ActivationVerbalizer(layer=") and len(text.splitlines()) == 3
    assert f"injection=karvonen at {av_karvonen.injection_spec.hook_point}" in text
    assert f"ActivationReconstructor(layer={ar_nanonla.meta.layer}, d_model={ar_nanonla.meta.d_model}" in text
    assert "HookedTransformer(" not in text and "tensor(" not in text
