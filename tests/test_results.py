"""Every result type prints short, shows as HTML, and leaves as a DataFrame, parquet, JSONL or a page."""

from __future__ import annotations

import copy
import html
import importlib
import json
import operator
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import D_MODEL, HAS_SAE_LENS, LAYER, make_sae, stray_byte_verbalization
from safetensors.torch import save_file

import nla_lens as nl
from nla_lens import display
from nla_lens.results import records_frame
from nla_lens.testing import TINY_LABELS

FAST = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def results(base, av_karvonen, ar_nanonla) -> dict[str, nl.TabularResult]:
    """One of each result type, built on the tiny NLA (its explanations are noise; the plumbing is not)."""
    nla = nl.NLA(av_karvonen, ar_nanonla)
    vectors = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))
    tokens = base.to_tokens(["The cat sat on the mat.", "A dog sat on the mat."])
    steer = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    return {
        "verbalizations": av_karvonen.verbalize(vectors, **FAST),
        "round_trip": nla.round_trip(vectors, baseline=0.8, **FAST),
        "steering": nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=4.0, steer_layer=1,
                                            baseline=0.8, **FAST),
        "patching": nl.patching_study(base, nla, tokens, tokens.flip(0), patch_layer=1, patch_position=1,
                                      baseline=0.8, **FAST),
        "direction": nl.verbalize_direction(av_karvonen, vectors, **FAST),
        "explanation": nla.explain(base, ["The cat sat.", "A dog"], baseline=0.8, **FAST),
        "word_steering": nl.steer_with_words(nla, base, tokens, -1, explanations=TINY_LABELS[:2],
                                             edit=lambda text: text + " the end", continue_tokens=2),
        "difference": nl.describe_difference(nla, vectors, vectors.flip(0) + 1, **FAST),
        **(sae_results(base, nla) if HAS_SAE_LENS else {}),
    }


def sae_results(base, nla) -> dict[str, nl.TabularResult]:
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    texts = ["The cat sat on the mat.", "A dog sat on the mat, and the cat ran."]
    return {"feature_verbalizations": nl.verbalize_sae_features(nla, sae, [3, 0, 7], progress=False, **FAST),
            "feature_card": nl.feature_card(sae, base, texts, 5, nla, k=4, progress=False, **FAST)}


KINDS = ["verbalizations", "round_trip", "steering", "patching", "direction", "explanation", "word_steering",
         "difference"] + (["feature_verbalizations", "feature_card"] if HAS_SAE_LENS else [])


@pytest.mark.parametrize("kind", KINDS)
def test_repr_is_short_and_holds_no_tensor(results, kind):
    text = repr(results[kind])
    assert text.startswith(type(results[kind]).__name__ + ": ")
    assert "tensor(" not in text and len(text) < 1500 and len(text.splitlines()) <= 8


@pytest.mark.parametrize("kind", KINDS)
def test_records_pandas_parquet_and_jsonl_agree(results, kind, tmp_path):
    result = results[kind]
    records = result.to_records()
    assert records and all(isinstance(r, dict) and r.keys() == records[0].keys() for r in records)
    assert list(result.schema.names) == list(records[0])  # what an empty one keeps
    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(records[0]) and len(frame) == len(records)
    assert pq.read_table(result.save(tmp_path / "out.parquet")).to_pylist() == records
    lines = (result.save(tmp_path / "out.jsonl")).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(records))


def toy_experiment_results() -> dict[str, nl.TabularResult]:
    """The toy experiments' results, built directly (running the experiments takes minutes); the SAE one
    where sae-lens is installed (its module needs it)."""
    from nla_lens.toy.steer_words_experiment import AlphaRow, SteerWordsExperiment

    results: dict[str, nl.TabularResult] = {
        "steer_words_experiment": SteerWordsExperiment(10, 1, "random", "add", 0.5, 0.4,
                                                       [AlphaRow(1.0, 0.6, 1.2, 0.0, 0.01, 0.9, 2.0)])}
    if HAS_SAE_LENS:
        from nla_lens.toy.sae_experiment import FeatureRow, SAEExperimentConfig, SAEExperimentResult

        feature = FeatureRow(3, " the", 0.9, None, "The token", None, False, True, False, " a", False)
        results["sae_experiment"] = SAEExperimentResult(500, 40, 1, 0.0, 1.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.3, 9.5,
                                                        12.0, SAEExperimentConfig(), [feature])
    return results


def emptied(kind: str, result: nl.TabularResult) -> nl.TabularResult:
    """`result` with its rows taken away and everything else kept (the only route to an empty one for most
    types: their calls refuse inputs that select nothing)."""
    import dataclasses

    from nla_lens.verbalizer import Verbalizations

    replace = dataclasses.replace
    if kind == "verbalizations":
        return Verbalizations()
    if kind in ("steering", "patching", "explanation", "sae_experiment", "steer_words_experiment"):
        return replace(result, rows=[])
    if kind == "round_trip":
        return replace(result, verbalizations=[], mse=result.mse[:0], fves=result.fves[:0])
    if kind == "direction":
        return replace(result, vectors=result.vectors[:0], verbalizations=[])
    if kind == "difference":
        return replace(result, difference=result.difference[:0], cosine=result.cosine[:0], verbalizations=[])
    if kind == "word_steering":
        return replace(result, rows=result.rows[:0], positions=result.positions[:0], tokens_at=[], explanations=[],
                       edited=[])
    assert kind == "feature_verbalizations"
    return replace(result, features=[], verbalizations=[], vectors=result.vectors[:0], cosines=result.cosines[:0],
                   reconstructions=result.reconstructions[:0])


@pytest.fixture(scope="module")
def empty_results(results) -> dict[str, tuple[nl.TabularResult, nl.TabularResult]]:
    """(non-empty, empty) per result type, emptied by taking their rows away; not a feature card, which is never
    empty: a feature that never fires gets one row of the card's own columns (`silent_card`)."""
    pairs = {kind: (results[kind], emptied(kind, results[kind])) for kind in KINDS if kind != "feature_card"}
    return pairs | {kind: (result, emptied(kind, result)) for kind, result in toy_experiment_results().items()}


@pytest.fixture(scope="module")
def silent_card(base, nla) -> nl.TabularResult:
    """The card of a feature that never fires in its text."""
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        sae.b_enc[9] = -1e6  # feature 9 is 0 everywhere
    return nl.feature_card(sae, base, ["The cat sat on the mat."], 9, nla, k=3, progress=False, **FAST)


EMPTY_KINDS = ([kind for kind in KINDS if kind != "feature_card"] + ["steer_words_experiment"]
               + (["sae_experiment"] if HAS_SAE_LENS else []))


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_an_empty_result_keeps_the_columns_and_types_of_a_full_one(empty_results, kind, tmp_path):
    """An empty result had no columns at all (a feature card: arrow's null type for all but its floats), and a
    column that was None in every row (every parse failed) was null-typed: runs would not concatenate."""
    full, empty = empty_results[kind]
    assert full.to_records() and empty.to_records() == []
    full_schema = pq.read_schema(full.save(tmp_path / "full.parquet"))
    empty_schema = pq.read_schema(empty.save(tmp_path / "empty.parquet"))
    assert empty_schema.remove_metadata() == full_schema.remove_metadata()
    assert not [f.name for f in full_schema if pa.types.is_null(f.type)]
    full_frame, empty_frame = full.to_pandas(), empty.to_pandas()
    assert list(empty_frame.columns) == list(full_frame.columns) and empty_frame.empty
    numeric = {c: str(t) for c, t in full_frame.dtypes.items() if t.kind in "biuf"}
    assert {c: str(empty_frame.dtypes[c]) for c in numeric} == numeric
    assert empty.save(tmp_path / "empty.jsonl").read_text(encoding="utf-8") == ""


@pytest.mark.parametrize("kind", [kind for kind in EMPTY_KINDS if kind not in ("word_steering",
                                                                                "steer_words_experiment")])
def test_an_empty_result_prints_and_shows(empty_results, kind, tmp_path):
    """(steer_with_words and the steer-words experiment refuse to return no rows.)"""
    empty = empty_results[kind][1]
    assert repr(empty).startswith(type(empty).__name__ + ": ")
    assert empty.save(tmp_path / "empty.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_jsonl_writes_a_missing_number_as_null_not_nan(tmp_path):
    from nla_lens.vector_files import write_table

    write_table(pa.table({"explanation": ["a", None], "mse": [0.5, float("nan")], "fve": [float("inf"), 0.2]}),
                tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines() == [
        '{"explanation": "a", "mse": 0.5, "fve": null}', '{"explanation": null, "mse": null, "fve": 0.2}']


@pytest.mark.parametrize("kind", KINDS)
def test_html_is_self_contained_and_shows_every_shown_column(results, kind, tmp_path):
    result = results[kind]
    html = result._repr_html_()
    assert "<script" not in html and "http" not in html and "<table" in html
    for column in ("explanation", "fve") if kind in ("round_trip", "explanation") else ():
        assert column in html.lower()
    page = result.save(tmp_path / "view.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and html in page


def test_the_rows_carry_the_numbers_of_the_result(results):
    rt = results["round_trip"]
    assert [r["mse"] for r in rt.to_records()] == pytest.approx(rt.mse.tolist())
    assert [r["fve"] for r in rt.to_records()] == pytest.approx((1 - rt.mse / 0.8).tolist())
    steering = results["steering"]
    assert [r["fve_steered"] for r in steering.to_records()] == [r.fve_steered for r in steering.rows]
    assert [r["run"] for r in results["patching"].to_records()] == ["clean"] * 2 + ["corrupted"] * 2 + ["patched"] * 2
    assert isinstance(results["verbalizations"], list)  # still a plain list to compare and index


def test_a_saved_steering_or_patching_table_records_the_experiment(results, tmp_path):
    """A saved table said neither where it steered (layer, scale) nor what it patched (hook, column), and the
    result objects held neither: the file could not be read back as an experiment."""
    steering = pd.read_parquet(results["steering"].save(tmp_path / "steer.parquet"))
    assert steering[["layer", "steer_layer", "scale"]].drop_duplicates().values.tolist() == [[LAYER, 1, 4.0]]
    assert f"steered at layer 1 (scale 4), read out at layer {LAYER}" in results["steering"].summary()
    patching = pd.read_parquet(results["patching"].save(tmp_path / "patch.parquet"))
    assert patching[["patched", "patch_position", "layer"]].drop_duplicates().values.tolist() == [
        ["blocks.1.hook_resid_pre", 1, LAYER]]
    assert f"patched blocks.1.hook_resid_pre at column 1, read out at layer {LAYER}" in results["patching"].summary()


@pytest.mark.parametrize("kind", [kind for kind in KINDS if kind not in ("verbalizations", "feature_card")])
def test_results_holding_tensors_compare_by_identity_instead_of_raising(results, kind):
    result = results[kind]
    twin = copy.deepcopy(result)  # equal rows and equal tensors: a generated == compared the tensors and raised
    assert result == result and result != twin and len({result, twin}) == 2


def test_save_refuses_unknown_suffixes_folders_and_missing_folders_before_writing(results, tmp_path):
    rt = results["round_trip"]
    with pytest.raises(nl.InputError, match=r"\.parquet or \.jsonl"):
        rt.save(tmp_path / "out.csv")
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(nl.InputError, match="is a folder"):
        rt.save(tmp_path / "dir.parquet")
    with pytest.raises(nl.InputError, match="does not exist"):
        rt.save(tmp_path / "no" / "such" / "out.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.parquet"]


@pytest.mark.parametrize("path", [None, 3, b"out.parquet"])
def test_save_refuses_a_path_that_is_no_path_with_an_input_error(results, path):
    """save(None), save(3) and save(b"...") were bare TypeErrors from pathlib."""
    with pytest.raises(nl.InputError, match="file path"):
        results["round_trip"].save(path)
    with pytest.raises(nl.InputError, match="file path"):
        results["word_steering"].save_vectors(path)


def test_save_expands_a_home_folder_as_loading_does(results, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert results["round_trip"].save("~/out.parquet") == tmp_path / "out.parquet"
    assert results["word_steering"].save_vectors("~/delta.safetensors") == tmp_path / "delta.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors", "out.parquet"]


@pytest.mark.parametrize("kind", KINDS)
def test_read_result_gives_back_the_rows_and_from_parquet_the_summary(results, kind, tmp_path):
    """A saved table lost the summary line (FVE, which baseline and its n, failed parses): read back later, its rows
    could not be trusted or compared. A .parquet file keeps it with the result type; .jsonl holds the rows alone."""
    result = results[kind]
    frame = nl.read_result(result.save(tmp_path / "out.parquet"))
    pd.testing.assert_frame_equal(frame, result.to_pandas())
    kept = {} if result.warnings_at is None else {"warnings": list(operator.attrgetter(result.warnings_at)(result))}
    assert frame.attrs == {"result_type": type(result).__name__, "summary": result.summary(),
                           "nla_lens_version": nl.__version__, **kept}
    rows = nl.read_result(result.save(tmp_path / "out.jsonl"))  # no types: a column None in every row is object
    cells = rows.astype(object).where(rows.notna(), None).to_dict("records")
    assert cells == json.loads(json.dumps(result.to_records())) and rows.attrs == {}


@pytest.mark.parametrize("kind", KINDS)
def test_read_result_of_a_jsonl_file_given_its_result_type_gives_back_its_frame(results, kind, tmp_path):
    result = results[kind]
    frame = nl.read_result(result.save(tmp_path / "out.jsonl"), result_type=type(result))
    pd.testing.assert_frame_equal(frame, result.to_pandas())


@pytest.mark.parametrize("mse", ["abc", [1, 2]], ids=["text", "list"])
def test_a_jsonl_row_whose_score_is_no_number_is_named_given_the_result_type(results, tmp_path, mse):
    """A .jsonl score column holding text or a list, read as a RoundTrip's float column, was pandas' bare
    ValueError ("could not convert string to float")."""
    row = results["round_trip"].to_records()[0] | {"mse": mse}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(nl.InputError, match=r"rows\.jsonl:1: mse is .*, which the mse of RoundTrip rows \(double\) "
                                            "cannot be: pass the result_type whose save"):
        nl.read_result(path, result_type=nl.RoundTrip)


def edited_parquet(result: nl.TabularResult, path: Path, edit: str) -> Path:
    """`result` saved to `path`, then edited by hand with pyarrow, which keeps the schema metadata that records the
    result type and its summary."""
    table = pq.read_table(result.save(path))
    if edit == "column dropped":
        table = table.drop_columns(["mse"])
    elif edit == "column added":
        table = table.append_column("note", pa.array(["mine"] * table.num_rows))
    elif edit == "index as float":
        table = table.set_column(0, "index", table["index"].cast(pa.float64()))
    else:
        assert edit == "mse as text"
        table = table.set_column(table.schema.get_field_index("mse"), "mse", table["mse"].cast(pa.string()))
    assert table.schema.metadata == pq.read_schema(path).metadata
    pq.write_table(table, path)
    return path


EDITS = {"column dropped": r"it lacks the columns \['mse'\], which RoundTrip\.save\(\) writes",
         "column added": r"it has the columns \['note'\], which RoundTrip rows have not",
         "index as float": r"column 'index' is double, not int64",
         "mse as text": r"column 'mse' is string, not double"}


@pytest.mark.parametrize("edit", EDITS)
def test_a_parquet_result_edited_by_hand_is_refused_naming_what_changed(results, tmp_path, edit):
    """A .parquet file edited with pyarrow keeps the record of the result type and summary: it read back as a frame
    that type's to_pandas() never gave (a column gone, a score as text), with that type's summary in attrs."""
    path = edited_parquet(results["round_trip"], tmp_path / "rt.parquet", edit)
    for result_type in (None, nl.RoundTrip):
        with pytest.raises(nl.InputError, match=rf"rt\.parquet does not hold RoundTrip rows: {EDITS[edit]}\. "
                                                r"The file was edited or damaged since save\(\) wrote it: save the "
                                                r"result again, or read the file as it is with pandas\.read_parquet"):
            nl.read_result(path, result_type=result_type)


def test_a_parquet_of_other_columns_read_as_a_result_type_is_refused(results, tmp_path):
    """A table nla_lens did not write records no type; named as one, it was read without a look at its columns."""
    path = tmp_path / "mine.parquet"
    results["round_trip"].to_pandas().drop(columns=["miss"]).to_parquet(path)
    assert len(nl.read_result(path)) == 3  # no type named, none recorded: the table as it is
    with pytest.raises(nl.InputError, match=r"does not hold RoundTrip rows: it lacks the columns \['miss'\]"
                                            r".*\. It records no result type \(a result's save\(\) did not write it\): "
                                            "read it without result_type="):
        nl.read_result(path, result_type=nl.RoundTrip)
    pd.testing.assert_frame_equal(nl.read_result(results["round_trip"].to_pandas().to_parquet(path) or path,
                                                 result_type=nl.RoundTrip).astype(object),
                                  results["round_trip"].to_pandas().astype(object))  # pandas' own types are its kinds


JSONL_EDITS = {"column dropped": (lambda row: {k: v for k, v in row.items() if k != "parsed"},
                                  r"rt\.jsonl: its rows are not RoundTrip rows: it lacks the columns \['parsed'\]"),
               "bool as text": (lambda row: row | {"parsed": "yes"},
                                r"rt\.jsonl:1: parsed is \"yes\", which the parsed of RoundTrip rows "
                                r"\(bool\) cannot be"),
               "index as float": (lambda row: row | {"index": 1.5},
                                  r"rt\.jsonl:1: index is 1\.5, which the index of RoundTrip rows \(int64\) cannot be")}


@pytest.mark.parametrize("edit", JSONL_EDITS)
def test_a_jsonl_result_edited_by_hand_is_refused_given_its_result_type(results, tmp_path, edit):
    """Read as a RoundTrip's, a .jsonl file lacking a column gave a frame without it, and one whose flag or index
    held text or a fraction gave an object or float column; only a score that pandas could not cast was caught."""
    change, message = JSONL_EDITS[edit]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(change(row)) + "\n" for row in results["round_trip"].to_records()),
                    encoding="utf-8")
    with pytest.raises(nl.InputError, match=message):
        nl.read_result(path, result_type=nl.RoundTrip)


def test_a_jsonl_row_that_lost_a_column_is_refused(results, tmp_path):
    """A row edited by hand to lack a column read back with NaN there, typed or not."""
    rows = results["round_trip"].to_records()
    rows[1].pop("mse")
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    for result_type in (None, nl.RoundTrip):
        with pytest.raises(nl.InputError, match=r"rt\.jsonl:2: its row lacks \['mse'\] beside line 1's columns; "
                                                r"every row a result's save\(\) writes has the same columns"):
            nl.read_result(path, result_type=result_type)


def test_a_word_steering_without_its_optional_columns_reads_back_given_its_type(base, nla, tmp_path):
    """Without compare= or continue_tokens=, a WordSteering has no next-token or continuation columns: its own
    files are not refused for lacking them."""
    tokens = base.to_tokens(["The cat sat on the mat."])
    result = nl.steer_with_words(nla, base, tokens, -1, explanations=TINY_LABELS[:1],
                                 edit=lambda text: text + " the end", compare=False, continue_tokens=0)
    assert "kl" not in result.to_records()[0] and "clean_continuation" not in result.to_records()[0]
    for suffix in (".parquet", ".jsonl"):
        frame = nl.read_result(result.save(tmp_path / f"steer{suffix}"), result_type=nl.WordSteering)
        pd.testing.assert_frame_equal(frame, result.to_pandas())


def test_a_jsonl_score_none_in_every_row_reads_back_as_a_float_column_given_the_result_type(nla, tmp_path):
    """A score None in every row (no FVE, every parse failed) read back from .jsonl as an object column where
    `to_pandas()` gave float64. A .jsonl file does not say which type wrote it: `result_type=` says so."""
    rt = nla.round_trip(torch.randn(2, D_MODEL, generator=torch.Generator().manual_seed(3)), **FAST)  # no FVE
    assert rt.fves is None and rt.to_pandas()["fve"].dtype == "float64"
    path = rt.save(tmp_path / "rt.jsonl")
    assert nl.read_result(path)["fve"].dtype == object  # the values alone say nothing of the type
    pd.testing.assert_frame_equal(nl.read_result(path, result_type=nl.RoundTrip), rt.to_pandas())


@pytest.mark.parametrize("kind", sorted(toy_experiment_results()))
def test_read_result_of_a_toy_experiments_result_gives_back_its_frame(kind, tmp_path):
    result = toy_experiment_results()[kind]
    pd.testing.assert_frame_equal(nl.read_result(result.save(tmp_path / "out.parquet")), result.to_pandas())


# Reads each file named after the first argument with `import nla_lens` alone, as a fresh process does; with
# "no-sae-lens", as if sae-lens were not installed (`import sae_lens` raises ImportError, as under TL 4.x).
FRESH_READ = """
import sys
if sys.argv[1] == "no-sae-lens":
    sys.modules["sae_lens"] = None
import nla_lens as nl
for path in sys.argv[2:]:
    try:
        print(f"rows {len(nl.read_result(path))}")
    except nl.InputError as exc:
        print(f"refused {exc}")
"""


def read_in_a_fresh_process(paths: list[Path], sae_lens: bool = True) -> list[str]:
    """What `nl.read_result` says of each path in a new Python process: "rows N" or "refused <its message>"."""
    mode = "sae-lens" if sae_lens else "no-sae-lens"
    run = subprocess.run([sys.executable, "-c", FRESH_READ, mode, *map(str, paths)], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def without_column(path: Path, column: str) -> Path:
    """A copy of the parquet file at `path` with `column` dropped by pyarrow, which keeps the recorded type."""
    edited = path.with_name(f"edited_{path.name}")
    pq.write_table(pq.read_table(path).drop_columns([column]), edited)
    return edited


def test_an_edited_result_of_a_type_import_nla_lens_does_not_load_is_refused_in_a_fresh_process(results, tmp_path):
    """The toy experiments' and SAE types' modules are not imported by `import nla_lens`: a process that had not
    imported them read a file of theirs edited by hand without a look at its columns, returning a half-result."""
    saved = toy_experiment_results() | {kind: results[kind] for kind in ("feature_verbalizations", "feature_card")
                                        if HAS_SAE_LENS}
    paths, expected = [], []
    for kind, result in saved.items():
        path = result.save(tmp_path / f"{kind}.parquet")
        first = result.schema.names[0]
        paths += [path, without_column(path, first)]
        expected += [f"rows {len(result.to_records())}",
                     f"refused {paths[-1]} does not hold {type(result).__name__} rows: it lacks the columns "
                     f"['{first}'], which {type(result).__name__}.save() writes. The file was edited or damaged"]
    said = read_in_a_fresh_process(paths)
    assert len(said) == len(expected)
    for line, start in zip(said, expected, strict=True):
        assert line.startswith(start)


SAE_ROWS = {  # one row of each type whose module needs sae-lens, as its save() writes it: written here without it
    "FeatureVerbalizations": {"feature": 3, "explanation": "The token \"cat\"", "parsed": True, "text": "x",
                              "truncated": False, "cosine": 0.25, "hook_name": f"blocks.{LAYER}.hook_resid_post",
                              "offset": False, "offset_n": None, "offset_layer": None, "offset_mean_norm": None,
                              "offset_spread": None},
    "SAEExperimentResult": {"feature": 3, "token": " the", "purity": 0.9, "explanation": None,
                            "explanation_offset": "The token", "explanation_top_context": None, "named": False,
                            "named_offset": True, "named_top_context": False, "control_token": " a",
                            "named_control": False},
}


def test_an_edited_sae_result_is_refused_without_sae_lens(tmp_path):
    """The SAE types' columns are declared where sae-lens is not needed: a process without it reads their files
    (no ImportError) and refuses one edited by hand (a score made text, a column dropped)."""
    from nla_lens.results import RESULT_KEY

    def saved(name: str, row: dict) -> Path:
        record = {"result_type": name, "summary": "1 row", "nla_lens_version": nl.__version__}
        path = tmp_path / f"{name}_{len(row)}_{type(row.get('cosine')).__name__}.parquet"
        pq.write_table(pa.Table.from_pylist([row]).replace_schema_metadata({RESULT_KEY: json.dumps(record)}), path)
        return path

    verbalizations, experiment = SAE_ROWS["FeatureVerbalizations"], SAE_ROWS["SAEExperimentResult"]
    paths = [saved("FeatureVerbalizations", verbalizations), saved("SAEExperimentResult", experiment),
             saved("FeatureVerbalizations", verbalizations | {"cosine": "0.25"}),
             saved("SAEExperimentResult", {k: v for k, v in experiment.items() if k != "named_control"})]
    assert read_in_a_fresh_process(paths, sae_lens=False) == [
        "rows 1", "rows 1",
        f"refused {paths[2]} does not hold FeatureVerbalizations rows: column 'cosine' is string, not double. The "
        "file was edited or damaged since save() wrote it: save the result again, or read the file as it is with "
        "pandas.read_parquet(path)",
        f"refused {paths[3]} does not hold SAEExperimentResult rows: it lacks the columns ['named_control'], which "
        "SAEExperimentResult.save() writes. The file was edited or damaged since save() wrote it: save the result "
        "again, or read the file as it is with pandas.read_parquet(path)"]


def test_every_result_type_import_nla_lens_does_not_load_has_its_columns_declared_for_read_result():
    """read_result checks a file of a type that `import nla_lens` leaves unloaded against `_DECLARED_ELSEWHERE`: a
    new such type missing there, or a declaration that drifted from its type's columns, fails here."""
    import pkgutil

    from nla_lens.results import _DECLARED_ELSEWHERE, ResultColumns, _declared_elsewhere, _result_types

    fresh = subprocess.run([sys.executable, "-c", "import nla_lens; from nla_lens.results import TabularResult, "
                            "_result_types; print(*sorted(kind.__name__ for kind in _result_types(TabularResult)))"],
                           cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    for module in pkgutil.walk_packages(nl.__path__, "nla_lens."):  # every result type this install can load
        try:
            importlib.import_module(module.name)
        except (nl.BackendError, ImportError):  # sae-lens or a backend this TransformerLens lacks
            pass
    unloaded = {kind.__name__: kind for kind in _result_types(nl.TabularResult)
                if kind.__name__ not in fresh.stdout.split() and kind.schema is not None}
    assert {"SteerWordsExperiment"} | ({"FeatureVerbalizations", "FeatureCard", "SAEExperimentResult"}
                                       if HAS_SAE_LENS else set()) <= set(unloaded)
    assert set(unloaded) <= set(_DECLARED_ELSEWHERE)
    for name, kind in unloaded.items():
        assert _declared_elsewhere(name) == ResultColumns.of(kind)


def test_read_result_converts_each_column_as_the_rows_would_give_it(tmp_path):
    """read_result built its frame from one dict per row (seconds for each million rows of a job's output); arrow
    converts the columns now, and every type a job output can carry over from its input reads back as before."""
    import datetime
    import decimal

    columns = {"int64": pa.array([1, None, 3]), "int32": pa.array([1, 2, 3], pa.int32()),
               "int8_some_none": pa.array([1, None, -3], pa.int8()), "uint32": pa.array([1, 2, 2**32 - 1], pa.uint32()),
               "uint64_past_int64": pa.array([1, 2, 2**63 + 5], pa.uint64()),
               "uint64": pa.array([1, 2, 3], pa.uint64()), "int_all_none": pa.array([None] * 3, pa.int64()),
               "float32": pa.array([0.1, None, 2.5], pa.float32()), "float16": pa.array([0.5, 1.5, None], pa.float16()),
               "float_all_none": pa.array([None] * 3, pa.float32()),
               "nan": pa.array([float("nan"), None, 1.0]), "bool": pa.array([True, False, True]),
               "bool_some_none": pa.array([True, None, False]), "bool_all_none": pa.array([None] * 3, pa.bool_()),
               "str_some_none": pa.array(["a", None, "c"]), "str_all_none": pa.array([None] * 3, pa.string()),
               "large_str": pa.array(["a", "b", None], pa.large_string()), "null": pa.array([None] * 3),
               "list_of_str": pa.array([["a"], [], None], pa.list_(pa.string())),
               "date": pa.array([datetime.date(2026, 12, 1), None, datetime.date(2026, 12, 3)]),
               "decimal": pa.array([decimal.Decimal("1.5")] * 3),
               "dictionary": pa.array(["a", "b", "a"]).dictionary_encode(), "bytes": pa.array([b"x", None, b"z"])}
    path = tmp_path / "carried.parquet"
    pq.write_table(pa.table(columns), path)
    table = pq.read_table(path)
    rows = records_frame(table.to_pylist(), table.schema)  # what read_result gave, and to_pandas gives from records
    frame = nl.read_result(path)
    pd.testing.assert_frame_equal(frame, rows)
    assert frame.map(type).equals(rows.map(type))  # a list stays a list, not a NumPy array
    pd.DataFrame({"a": [1, 2]}, index=[7, 8]).to_parquet(path)  # a pandas-written index is a column of the rows
    assert list(nl.read_result(path).columns) == ["a", "__index_level_0__"]


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_read_result_of_an_empty_result_keeps_its_columns_and_types(empty_results, kind, tmp_path):
    empty = empty_results[kind][1]
    frame = nl.read_result(empty.save(tmp_path / "empty.parquet"))
    pd.testing.assert_frame_equal(frame, empty.to_pandas())
    assert frame.empty and frame.attrs["summary"] == empty.summary()
    rows = nl.read_result(empty.save(tmp_path / "empty.jsonl"), result_type=type(empty))  # an empty file
    pd.testing.assert_frame_equal(rows, empty.to_pandas())


def test_read_result_reads_a_file_jobs_output_with_the_record_of_the_job(tiny_paths, tmp_path):
    from nla_lens import sharded

    vectors = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(2))
    pq.write_table(pa.table({"vector": pa.array(vectors.tolist(), pa.list_(pa.float32()))}), tmp_path / "in.parquet")
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], tmp_path / "in.parquet", tmp_path / "out.parquet",
                                    sampling=sharded.Sampling(max_new_tokens=4), shard_size=2)
    out = result.output
    frame = nl.read_result(out)
    assert frame.astype(object).where(frame.notna(), None).to_dict("records") == pq.read_table(out).to_pylist()
    job = json.loads(pq.read_schema(out).metadata[sharded.JOB_KEY.encode()])
    assert frame.attrs == {"job": job, "warnings": result.warnings} and job["job"] == "verbalize"


def test_read_result_says_why_it_cannot_read_a_file(results, tmp_path):
    rt = results["round_trip"]
    with pytest.raises(nl.InputError, match="does not exist"):
        nl.read_result(tmp_path / "missing.parquet")
    with pytest.raises(nl.InputError, match="HTML view, which holds no table"):
        nl.read_result(rt.save(tmp_path / "view.html"))
    with pytest.raises(nl.InputError, match=r"reads the \.parquet or \.jsonl file .* not a \.csv file"):
        nl.read_result(tmp_path / "out.csv")
    with pytest.raises(nl.InputError, match="file path"):
        nl.read_result(None)
    rows = rt.save(tmp_path / "rt.jsonl")
    with pytest.raises(nl.InputError, match=r"rt\.jsonl: its rows are not DirectionVerbalization rows: it has the "
                                            r"columns \[.*'mse'.*\], which DirectionVerbalization rows have not"):
        nl.read_result(rows, result_type=nl.DirectionVerbalization)
    with pytest.raises(nl.InputError, match=r"holds RoundTrip rows, not Verbalizations rows: pass "
                                            r"result_type=RoundTrip, or none"):
        nl.read_result(rt.save(tmp_path / "rt.parquet"), result_type=nl.Verbalizations)
    with pytest.raises(nl.InputError, match=r"result_type='RoundTrip' is not a result type"):
        nl.read_result(rows, result_type="RoundTrip")
    (tmp_path / "text.parquet").write_text("index,explanation\n0,a\n", encoding="utf-8")
    with pytest.raises(nl.InputError, match="text.parquet is not a parquet file"):
        nl.read_result(tmp_path / "text.parquet")
    (tmp_path / "text.jsonl").write_text("index,explanation\n", encoding="utf-8")
    with pytest.raises(nl.InputError, match=r"text.jsonl:1: not JSON \(Expecting value at character 1\); read_result "
                                            r"reads the .jsonl file a result's save\(\) wrote"):
        nl.read_result(tmp_path / "text.jsonl")
    (tmp_path / "list.jsonl").write_text('{"index": 0}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(nl.InputError, match=r"list.jsonl:2: holds \[1, 2\], not a JSON object; "):
        nl.read_result(tmp_path / "list.jsonl")
    damaged = pq.read_table(rt.save(tmp_path / "rt.parquet")).replace_schema_metadata({"nla_lens_result": "{"})
    pq.write_table(damaged, tmp_path / "damaged.parquet")
    with pytest.raises(nl.InputError, match="'nla_lens_result' is not JSON"):
        nl.read_result(tmp_path / "damaged.parquet")


def test_read_result_of_a_safetensors_file_says_what_reads_one(results, tmp_path):
    """A .safetensors file was refused as "not a .safetensors file", without a word of what reads one; then as a file
    that fwd_hooks_from reads, which a file of vectors (the README's input to `nla-lens round-trip`) is not."""
    delta = results["word_steering"].save_vectors(tmp_path / "delta.safetensors")
    vectors = tmp_path / "vectors.safetensors"
    save_file({"vectors": torch.randn(2, 8)}, vectors)
    for path in (delta, vectors):
        with pytest.raises(nl.InputError, match=rf"{path.name} holds tensors, not a result's rows: "
                                                r"safetensors\.torch\.load_file\(path\) loads them .* "
                                                r"nl\.WordSteering\.fwd_hooks_from\(path\) reads the steering"):
            nl.read_result(path)
    assert [name for name, _ in nl.WordSteering.fwd_hooks_from(delta)] == [results["word_steering"].hook_name]


def test_read_result_of_a_folder_says_it_is_one(tmp_path):
    """A file job's `<output>.shards` folder was refused as "not a .shards file"."""
    shards = tmp_path / "scores.parquet.shards"
    shards.mkdir()
    with pytest.raises(nl.InputError, match=r"scores\.parquet\.shards is a folder: read_result reads one \.parquet "
                                            r"or \.jsonl file .* merged rows are in its --output file"):
        nl.read_result(shards)


def test_read_result_of_a_parquet_file_named_jsonl_says_what_it_is(tmp_path):
    """It said the file was "not UTF-8 text ... write it as UTF-8 JSONL"."""
    saved = nl.Verbalizations([nl.Verbalization("t", "an explanation", [1])]).save(tmp_path / "said.parquet")
    renamed = saved.rename(tmp_path / "said.jsonl")
    with pytest.raises(nl.InputError, match=r"said\.jsonl is a parquet file \(it starts with b'PAR1'\), not JSONL "
                                            r"text: give it a \.parquet name"):
        nl.read_result(renamed)
    assert len(nl.read_result(renamed.rename(tmp_path / "said.parquet"))) == 1


def test_repr_shows_carriage_returns_and_tabs_as_escapes():
    cells = [display.format_cell(text) for text in ("a\r\nb", "c\td", "e\rf")]
    assert cells == ["a\\r\\nb", "c\\td", "e\\rf"]  # a bare \r would make a terminal overwrite the row


def test_repr_shows_control_characters_of_its_summary_line_as_escapes_as_its_rows_do():
    """The plain-text repr escaped its rows' control characters but printed the summary line bare: an ESC that a
    summary quotes (model text, an SAE's metadata) reached the terminal as a command ("\\x1b[2J" clears it)."""

    class Said(nl.TabularResult):
        def to_records(self) -> list[dict[str, str]]:
            return [{"explanation": "a\x1b[2Jb"}]

        def summary(self) -> str:
            return "said \x1b[2J\r\u202e"

    assert repr(Said()).split("\n") == ["Said: said \\x1b[2J\\r\\u202e", "  explanation", "  a\\x1b[2Jb"]


def test_repr_and_views_show_every_control_character_as_an_escape():
    said = "a\x0cb\x1b[2Jc\u2028d"
    assert display.format_cell(said) == "a\\x0cb\\x1b[2Jc\\u2028d" and display.format_cell(["x\x0b", "y"]) == "x\\x0b y"
    tokens = ["\r\n", "\x0c", "\x1b", "\t"]
    cells = [display.TokenCell(t, p, True, "x", None, 0.5 + p / 10) for p, t in enumerate(tokens)]
    html = display.explained_text_html([cells], title="t", layer=1).split("</style>")[1]
    assert not {"\r", "\x0c", "\x1b"} & set(html)  # HTML reads a \r as a line break; the others draw nothing
    assert "\\r\u21b5<sub>0</sub>" in html and "\\x0c<sub>1</sub>" in html and "\\t<sub>3</sub>" in html
    card = display.feature_card_html("f", "h", "s", "e", "", [(["\r", "a"], [1.0, 0.5], 0)])
    assert "\r" not in card.split("</style>")[1]


def test_explained_view_marks_a_newline_token_visibly():
    cells = [display.TokenCell("a", 0, True, "x", None, 0.5), display.TokenCell("\n", 1, True, "y", None, 0.9)]
    html = display.explained_text_html([cells], title="t", layer=1)
    assert "\n" not in html.split("</style>")[1] and html.count("\u21b5") == 2  # in the line and in its row


def test_colour_scale_spreads_by_rank_and_keeps_negative_fve_red():
    cells = [display.TokenCell("a", 0, True, "x", None, fve) for fve in (0.90, 0.92, 0.95, -0.5, -2.0)]
    scale = display.ColourScale.from_cells(cells)
    assert scale.metric == "FVE" and scale.observed == (0.90, 0.92, 0.95) and scale.most_negative == -2.0
    lowest, middle, highest = (scale.colour(v) for v in (0.90, 0.92, 0.95))
    assert lowest == "#ffffcc" and highest == "#2254a0" and len({lowest, middle, highest}) == 3
    red = [int(scale.colour(v)[i:i + 2], 16) for v in (-0.5, -2.0) for i in (1, 3, 5)]
    assert red[0] > red[1] and red[3] > red[4]  # both red-dominant
    assert scale.colour(-2.0) == "#de2d26" and scale.colour(-0.5) != scale.colour(-2.0)
    html = display.explained_text_html([cells], title="t", layer=7)
    assert "blocks.7.hook_resid_post" in html and "below 0, down to -2.00" in html and "0.90" in html


def test_without_fve_the_view_colours_by_mse_and_says_so():
    cells = [display.TokenCell("a", 0), display.TokenCell("b", 1, True, None, "raw", None, 2.0),
             display.TokenCell("c", 2, True, "said", None, None, 0.1),
             display.TokenCell("d", 3, True, "it", None, None, 0.4)]
    scale = display.ColourScale.from_cells(cells)
    assert scale.metric == "MSE" and scale.colour(0.1) == "#2254a0" and scale.colour(0.4) == "#ffffcc"
    html = display.explained_text_html([cells], title="t", layer=None)
    assert "no FVE without a baseline" in html and "(no &lt;explanation&gt; tags) raw" in html
    assert "nla-failed" in html and "context token (not explained)" in html


def test_a_parse_cut_at_max_new_tokens_says_so_where_a_missing_tag_said_no_tags(results, tmp_path):
    """A row whose completion ran out of max_new_tokens inside its <explanation> read "(no <explanation> tags)", as
    if the AV had never opened one; its own truncated flag says what happened."""
    import dataclasses

    from nla_lens.verbalizer import Verbalization

    explanation = results["explanation"]
    said = [Verbalization("<explanation>\nThe token", None, [1, 2], truncated=True),
            Verbalization("no tags at all", None, [3], truncated=False)]
    rows = [dataclasses.replace(r, verbalization=said[i % 2]) for i, r in enumerate(explanation.rows)]
    cut = dataclasses.replace(explanation, rows=rows)
    view = _body(cut.save(tmp_path / "cut.html").read_text(encoding="utf-8"))
    assert view.count("(cut at max_new_tokens before &lt;/explanation&gt;) &lt;explanation&gt;\\nThe token") == (
        2 * len(rows[::2]))  # the row, and the token's tooltip
    assert view.count("(no &lt;explanation&gt; tags) no tags at all") == 2 * len(rows[1::2])
    assert "(cut at max_new_tokens before </explanation>) <explanation>" in repr(cut)
    card = display.feature_card_html("f", "h", "s", None, "<explanation>\nThe", [(["a"], [1.0], 0)], truncated=True)
    assert "NLA: <span class='nla-unparsed'>(cut at max_new_tokens before &lt;/explanation&gt;)" in card


def test_a_legend_with_no_fve_at_or_above_0_draws_no_empty_bar():
    """Every FVE below 0: the legend drew the FVE gradient with no tick labels, a scale of nothing; it now says no
    token scored 0 or above, beside the red swatch that holds them. Every parse failed: no token scored."""
    cells = [display.TokenCell("a", p, True, "x", None, -1.56 + p / 10, 2.0) for p in range(3)]
    legend = display.ColourScale.from_cells(cells).legend_html()
    assert "nla-bar" not in legend and "nla-ticks" not in legend
    assert "<b>FVE</b> <span class='nla-note'>(no token scored 0 or above)</span>" in legend
    assert "FVE below 0, down to -1.56" in legend
    failed = [display.TokenCell("a", p, True, None, "<explanation>\nx", -1.56, 2.0) for p in range(3)]
    legend = display.ColourScale.from_cells(failed).legend_html()
    assert "nla-bar" not in legend and "<span class='nla-note'>(no token scored)</span>" in legend
    assert "below 0" not in legend
    with_one = display.ColourScale.from_cells([*cells, display.TokenCell("b", 3, True, "y", None, 0.4, 0.5)])
    assert "nla-bar" in with_one.legend_html() and "0.40" in with_one.legend_html()


def test_the_explained_view_names_a_model_loaded_from_a_folder_by_the_folder_not_its_path(results):
    """The title was "Explained text · /home/me/models/base": the model's path (HF's _name_or_path) in every saved
    page that is shared."""
    explanation = results["explanation"]
    folder = Path(explanation.model_name)
    assert folder.is_absolute()  # the tiny base is loaded from a folder, as a user's local model is
    view = explanation._repr_html_()
    assert f"<b>Explained text · {folder.name}</b>" in view and str(folder.parent) not in view
    assert display.model_label("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B" and display.model_label("gpt2") == "gpt2"
    for path in ("/srv/models/qwen3-8b/", "~/models/qwen3-8b", "./qwen3-8b", "C:\\models\\qwen3-8b"):
        assert display.model_label(path) == "qwen3-8b"


def test_a_relative_folder_of_one_slash_is_named_by_its_folder_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`models/qwen3-8b`, a folder loaded by its relative path, is spelled as the hub's owner/name and was shown
    whole in the title."""
    (tmp_path / "models" / "qwen3-8b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert display.model_label("models/qwen3-8b") == "qwen3-8b"
    assert display.model_label("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # no such folder here: a hub id


def test_the_word_steering_view_shows_the_clean_next_tokens_beside_the_steered_ones(results):
    """The view showed only the steered next tokens: what the steering changed could not be read off it."""
    steering = results["word_steering"]
    view = _body(steering._repr_html_())
    headers = re.findall(r"<th>([^<]*)</th>", view)
    assert headers.index("clean_next (token p)") + 1 == headers.index("steered_next (token p)")
    for record in steering.to_records():  # a cell of more than a few words keeps a readable width (nla-prose)
        assert re.search(rf"<td(?: class='nla-prose')?>{re.escape(html.escape(record['clean_next']))}</td>", view)
        assert re.search(rf"<td(?: class='nla-prose')?>{re.escape(html.escape(record['steered_next']))}</td>", view)
    assert "clean_next (token p)" in repr(steering).splitlines()[1]


def test_the_word_steering_view_shows_each_rows_clean_and_steered_continuations_side_by_side(results):
    """The continuations were left to to_pandas(): the view did not show what the steering did to the text."""
    import dataclasses

    steering = results["word_steering"]
    view = _body(steering._repr_html_())
    headers = re.findall(r"<th>([^<]*)</th>", view)
    assert headers.index("clean_continuation") + 1 == headers.index("steered_continuation")
    for record in steering.to_records():
        clean, steered = (html.escape(display.format_cell(record[column]))
                          for column in ("clean_continuation", "steered_continuation"))
        assert re.search(rf"<td(?: class='nla-prose')?>{re.escape(clean)}</td>"
                         rf"<td(?: class='nla-prose')?>{re.escape(steered)}</td>", view)
    rows = steering.token_shape[0]
    long = dataclasses.replace(steering, continuations=[("x" * 200, "y" * 200)] * rows)
    printed = repr(long).splitlines()
    assert printed[1].split()[-2:] == ["clean_continuation", "steered_continuation"]
    assert all(line.endswith("x" * 59 + "\u2026  " + "y" * 59 + "\u2026") for line in printed[2:])  # cut as other cells


def test_a_feature_card_with_no_contexts_says_so_in_place_of_an_empty_table():
    """A feature never active in the texts drew a table of headers alone."""
    card = _body(display.feature_card_html("f", "h", "s", "e", "", [], n_positions=38))
    assert "<table" not in card and "<th>" not in card
    assert "not active (above 0) at any of the 38 positions scanned" in card
    assert "<table" in display.feature_card_html("f", "h", "s", "e", "", [(["a"], [1.0], 0)], n_positions=38)
    one = _body(display.feature_card_html("f", "h", "s", "e", "", [], n_positions=1))
    assert "not active (above 0) at the 1 position scanned" in one  # not "any of the 1 positions"


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_a_silent_features_card_names_the_positions_it_scanned(silent_card):
    silent = silent_card
    assert silent.n_active == 0 and silent.n_positions > 0
    card = _body(silent._repr_html_())
    assert "<table" not in card and f"at any of the {silent.n_positions} positions scanned" in card


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_a_silent_features_card_keeps_the_columns_and_types_of_a_full_one(results, silent_card, tmp_path):
    """A card of a feature that never fires saved no row, so its explanation was in no .jsonl file or frame; its one
    row now has None in the context columns and every column keeps a full card's type (the files concatenate)."""
    full = pq.read_schema(results["feature_card"].save(tmp_path / "full.parquet"))
    silent = pq.read_table(silent_card.save(tmp_path / "silent.parquet"))
    assert silent.schema.remove_metadata() == full.remove_metadata() and silent.num_rows == 1
    assert silent.to_pylist()[0]["explanation_text"] == silent_card.verbalization.text != ""
    pd.testing.assert_frame_equal(nl.read_result(tmp_path / "silent.parquet"), silent_card.to_pandas())
    assert repr(silent_card) == f"FeatureCard: {silent_card.summary()}"  # no table of empty context cells
    assert silent_card.save(tmp_path / "silent.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    from nla_lens.vector_files import write_atomic

    def half_then_fail(tmp):
        tmp.write_bytes(b"half a shard")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "shard.parquet", half_then_fail)
    assert list(tmp_path.iterdir()) == []
    write_atomic(tmp_path / "shard.parquet", lambda tmp: tmp.write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]
    assert (tmp_path / "shard.parquet").read_bytes() == b"whole"


def test_replaced_folders_refuses_a_symlink_loop_naming_the_link_before_staging_anything(tmp_path):
    """Path.resolve raised a bare RuntimeError ("Symlink loop from ...") on entering the block."""
    from nla_lens.vector_files import replaced_folders

    (tmp_path / "a").symlink_to("b", target_is_directory=True)
    (tmp_path / "b").symlink_to("a", target_is_directory=True)
    with pytest.raises(nl.ConfigError, match=re.escape(f"{tmp_path / 'b'} is a symlink that leads round a loop of "
                                                       "links, so there is no folder there to write into: point it "
                                                       "at a folder, or remove it")):
        with replaced_folders([tmp_path / "fine", tmp_path / "b"]):
            pytest.fail("staged folders for a link that leads nowhere")
    assert sorted((p.name, os.readlink(p)) for p in tmp_path.iterdir()) == [("a", "b"), ("b", "a")]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".html"])
@pytest.mark.parametrize("loop", ["self", "pair"])
def test_save_refuses_a_symlink_loop_naming_the_link_and_writes_nothing(tmp_path, suffix, loop):
    """`save` (check_save_path) passed a link that leads round a loop, which `exists()` and `is_dir()` call absent,
    and the write's Path.resolve raised a bare RuntimeError ("Symlink loop from ...")."""
    link = tmp_path / f"out{suffix}"
    link.symlink_to(link.name if loop == "self" else f"other{suffix}")
    if loop == "pair":
        (tmp_path / f"other{suffix}").symlink_to(link.name)
    before = sorted((p.name, os.readlink(p)) for p in tmp_path.iterdir())
    with pytest.raises(nl.InputError) as info:
        nl.Verbalizations([nl.Verbalization("t", "words", [1])]).save(link)
    assert str(info.value) == (f"output {link} is a symlink that leads round a loop of links, so there is no file "
                               "there to write into: point it at a file, or remove it")
    assert sorted((p.name, os.readlink(p)) for p in tmp_path.iterdir()) == before  # no temporary file left


@pytest.mark.parametrize("name", ["record.json", "shard.safetensors", "vectors.pt"])
def test_an_atomic_write_through_a_symlink_loop_is_an_input_error_naming_the_link(tmp_path, name):
    """write_atomic (shards, manifests, json records, tensors) resolved the link: a bare RuntimeError ("Symlink loop
    from ...") on Python 3.11. Python 3.13's resolve says nothing, so the check is os.stat's, tested apart."""
    from nla_lens.vector_files import save_tensors, write_json, write_vectors

    link = tmp_path / name
    link.symlink_to(link.name)
    writes = {"record.json": lambda: write_json(link, {"a": 1}, indent=1),
              "shard.safetensors": lambda: save_tensors({"v": torch.ones(2)}, link),
              "vectors.pt": lambda: write_vectors(torch.ones(2, 3), link)}
    with pytest.raises(nl.InputError, match=rf"^{re.escape(str(link))} is a symlink that leads round a loop of links, "
                                            "so there is no file there to write into: point it at a file, or remove "
                                            "it$"):
        writes[name]()
    assert [(p.name, os.readlink(p)) for p in tmp_path.iterdir()] == [(name, name)]


def test_leads_round_a_loop_is_true_of_loops_alone(tmp_path):
    """Not of a file, a folder, a link to either, a link to nothing, nor a path under a loop (itself no link)."""
    from nla_lens.checks import leads_round_a_loop

    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for name, target in [("to_file", "file"), ("to_folder", "folder"), ("dangling", "nowhere"), ("self", "self"),
                         ("a", "b"), ("b", "a")]:
        (tmp_path / name).symlink_to(target)
    looped = {name for name in ("file", "folder", "to_file", "to_folder", "dangling", "self", "a", "b", "missing")
              if leads_round_a_loop(tmp_path / name)}
    assert looped == {"self", "a", "b"}
    assert not leads_round_a_loop(tmp_path / "self" / "inside")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".html"])
def test_save_replaces_an_existing_file_and_writes_through_a_symlink_to_its_target(tmp_path, suffix):
    """Saved to a link (`latest.parquet -> runs/3.parquet`), the rows replaced the link with a file of their own and
    left its target holding the old rows."""
    old, new = (nl.Verbalizations([nl.Verbalization("t", said, [1])]) for said in ("old words", "new words"))
    (tmp_path / "runs").mkdir()
    target = old.save(tmp_path / "runs" / f"3{suffix}")
    link = tmp_path / f"latest{suffix}"
    link.symlink_to(Path("runs") / target.name)
    assert new.save(link) == link
    assert link.is_symlink() and link.resolve() == target
    if suffix == ".html":
        page = target.read_text(encoding="utf-8")
        assert "new words" in page and "old words" not in page
    else:
        assert nl.read_result(target)["explanation"].tolist() == ["new words"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["runs", target.name, link.name])


def test_saving_a_result_whose_column_mixes_numbers_and_text_names_the_column(tmp_path):
    """Saving as .parquet or .jsonl was pyarrow's bare ArrowInvalid ("Could not convert 'diverged' with type str"),
    naming neither the column nor its rows."""
    from nla_lens.training.runs import TrainingRun

    history = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": "diverged", "lr": 1e-3}]
    run = TrainingRun("train-av", Path("run/train_result.json"), True, 2, history, [], 1.0, {})
    for name in ("run.parquet", "run.jsonl"):
        with pytest.raises(nl.InputError, match=r"column 'loss' \(row 0: a number 2.5; row 1: text \"diverged\"\) "
                                                r"cannot be written as one arrow column .* save as \.html"):
            run.save(tmp_path / name)
        assert not (tmp_path / name).exists()
    assert "<svg" in run.save(tmp_path / "run.html").read_text()

def test_written_tensor_vector_and_table_files_get_the_umask_mode_others_can_read(tmp_path, group_umask):
    """safetensors creates its files 0600: exported weights and saved vectors were unreadable to the other users
    of a shared machine."""
    from nla_lens.vector_files import save_tensors, write_table, write_vectors

    save_tensors({"weight": torch.ones(2, 2)}, tmp_path / "value_head.safetensors")
    write_vectors(torch.ones(2, 4), tmp_path / "vectors.safetensors")
    write_vectors(torch.ones(2, 4), tmp_path / "vectors.pt")
    write_table(pa.table({"index": [0]}), tmp_path / "scores.parquet")
    write_table(pa.table({"index": [0]}), tmp_path / "scores.jsonl")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, group_umask) and len(modes) == 5


def test_a_filesystem_that_refuses_chmod_still_gets_the_written_files(tmp_path, monkeypatch):
    """write_atomic chmod-ed every file it wrote: on a mount that refuses chmod (some FUSE and SMB ones) every shard,
    checkpoint and table write failed once finished, and the finished file was deleted."""
    from nla_lens.vector_files import read_vectors, save_tensors, write_table

    calls = []

    def refuse(path, mode, *args, **kwargs):
        calls.append(path.name)
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(Path, "chmod", refuse)
    write_table(pa.table({"index": [0]}), tmp_path / "scores.parquet")
    assert calls == []  # a writer that keeps the created file's mode needs no chmod
    save_tensors({"vectors": torch.ones(2, 4)}, tmp_path / "vectors.safetensors")
    assert len(calls) == 1 and torch.equal(read_vectors(tmp_path / "vectors.safetensors"), torch.ones(2, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "vectors.safetensors"]


# Each result's per-row scores and the record key saying whether that row's explanation parsed
SCORES = {"round_trip": {"mse": "parsed", "fve": "parsed"}, "explanation": {"mse": "parsed", "fve": "parsed"},
          "patching": {"fve": "parsed"}, "steering": {"fve_clean": "clean_parsed", "fve_steered": "steered_parsed"}}


@pytest.mark.parametrize("kind", SCORES)
def test_a_failed_parses_score_shows_as_the_miss_in_the_repr_and_table(results, kind, tmp_path):
    """A failed parse scores as a miss (an orthogonal guess): its row showed FVE -1.500 / MSE 2.000 as if the AR
    had rebuilt the vector that badly. The files keep the numbers; the parsed columns say which rows failed."""
    result = results[kind]
    records = result.to_records()
    view, printed = _body(result._repr_html_()), repr(result)
    failed = [(r, column) for r in records for column, flag in SCORES[kind].items() if r[flag] is False]
    assert failed  # the tiny NLA's 4-token completions never close their tag
    for record, column in failed:  # to 3 decimals in every view, as in the repr
        assert f"<td class='num nla-unparsed'>miss ({record[column]:.3f})</td>" in view
    assert f"miss ({failed[0][0][failed[0][1]]:.3f})" in printed
    assert pq.read_table(result.save(tmp_path / "out.parquet")).to_pylist() == records  # numbers, as they were


def test_a_parsed_rows_score_stays_a_plain_number_beside_a_failed_ones_miss():
    from nla_lens.nla import RoundTrip
    from nla_lens.results import text_table
    from nla_lens.verbalizer import Verbalization

    said = [Verbalization("<explanation>\na\n</explanation>", "a", [1]), Verbalization("b", None, [2])]
    rebuilt = torch.tensor([[1.0, 0.0, 0.0, 0.0], [float("nan")] * 4])  # as round_trip leaves them: a direction, NaN
    rt = RoundTrip(said, rebuilt, torch.tensor([0.5, 2.0]), 1.25, -0.5625, 0.8, "given", 1,
                   fves=torch.tensor([0.375, -1.5]))
    parsed_row, failed_row = text_table(rt.to_records(), ["index", "mse", "fve"])[1:]
    assert parsed_row.split() == ["0", "0.500", "0.375"] and failed_row.split() == ["1", "miss", "(2.000)", "miss",
                                                                                    "(-1.500)"]
    view = _body(rt._repr_html_())
    assert "<td class='num'>0.500</td><td class='num'>0.375</td>" in view
    assert "<td class='num nla-unparsed'>miss (2.000)</td><td class='num nla-unparsed'>miss (-1.500)</td>" in view
    assert rt.to_pandas()["mse"].tolist() == [0.5, 2.0]


def _round_trip_with_every_kind_of_miss(nla, monkeypatch, vectors, **kwargs):
    """The round trip of 4 vectors whose row 0 scores, row 1's explanation retokenizes past the AR's n_ctx, row 2's
    reconstruction has no direction (zeroed by a hook) and row 3 fails to parse; `kwargs` go to `round_trip`."""
    ar = nla.ar
    stray = stray_byte_verbalization(ar.tokenizer)
    cat = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [])
    said = [cat, stray, cat, nl.Verbalization("no tags", None, [])]
    monkeypatch.setattr(ar.model.cfg, "n_ctx", len(nl.sidecar.ar_prompt_ids(ar.meta, ar.tokenizer, "")) +
                        len(stray.tokens))
    monkeypatch.setattr(nla.av, "verbalize", lambda v, **kw: said[:len(v)])

    def zero_row_2(resid, hook):  # the AR reads rows 0 and 2 (row 1 is too long): its second is row 2
        resid[1] = 0.0
        return resid

    with ar.model.hooks(fwd_hooks=[(f"blocks.{ar.meta.layer}.hook_resid_post", zero_row_2)]):
        return nla.round_trip(vectors, baseline=0.5, max_new_tokens=len(stray.tokens), **kwargs)


def test_every_row_scored_as_the_miss_shows_as_the_miss_in_a_round_trips_tables(av_karvonen, ar_nanonla, vectors,
                                                                                monkeypatch, tmp_path):
    """A parsed row the AR could not score (its explanation past the AR's n_ctx, its reconstruction with no
    direction) scores the miss as a failed parse does, but the tables marked only failed parses: its MSE 2.000 and
    FVE -3.000 read as a reconstruction that bad. Every row's `miss` says it, in the files too."""
    from nla_lens.results import text_table

    rt = _round_trip_with_every_kind_of_miss(nl.NLA(av_karvonen, ar_nanonla), monkeypatch, vectors)
    assert rt.mse[1:].tolist() == [2.0] * 3 and rt.fves[1:].tolist() == [-3.0] * 3  # miss_mse at sqrt(d); 1 - 2/0.5
    assert rt.misses == [False, True, True, True]
    records = rt.to_records()
    assert [r["miss"] for r in records] == rt.misses and [r["parsed"] for r in records] == [True, True, True, False]
    lines = text_table(records, ["index", "mse", "fve"])[1:]
    assert lines[0].split() == ["0", f"{records[0]['mse']:.3f}", f"{records[0]['fve']:.3f}"]
    assert [line.split() for line in lines[1:]] == [[str(i), "miss", "(2.000)", "miss", "(-3.000)"] for i in (1, 2, 3)]
    view = _body(rt._repr_html_())
    assert view.count("<td class='num nla-unparsed'>miss (2.000)</td><td class='num nla-unparsed'>miss (-3.000)</td>"
                      ) == 3
    assert nl.read_result(rt.save(tmp_path / "rt.parquet"))["miss"].tolist() == rt.misses
    assert [r["miss"] for r in nl.read_result(rt.save(tmp_path / "rt.jsonl")).to_dict("records")] == rt.misses


def test_the_explained_view_marks_every_row_scored_as_the_miss_and_leaves_it_off_the_colour_scale(
        base, av_karvonen, ar_nanonla, vectors, monkeypatch):
    """`explain`'s rows and view, as a round trip's tables: a parsed token the AR could not score was coloured by its
    miss (the darkest red) and its row read FVE -3.000 as a reconstruction's."""
    nla = nl.NLA(av_karvonen, ar_nanonla)
    tokens = base.to_tokens("The cat sat on")[0].tolist()
    assert len(tokens) == 4  # one token per row of the round trip above
    monkeypatch.setattr(nla, "round_trip", lambda v, **kw: _round_trip_with_every_kind_of_miss(
        nl.NLA(av_karvonen, ar_nanonla), monkeypatch, vectors))
    explained = nla.explain(base, "The cat sat on")
    assert [r.miss for r in explained.rows] == [False, True, True, True]
    assert [r["miss"] for r in explained.to_records()] == [False, True, True, True]
    assert "miss (-3.000)" not in repr(explained).splitlines()[2] and repr(explained).count("miss (-3.000)") == 3
    cells = explained.cells()[0]
    assert [c.missed for c in cells] == [False, True, True, True]
    scale = display.ColourScale.from_cells(cells)
    assert scale.observed == () and scale.most_negative == explained.rows[0].fve  # the misses set no colour
    view = _body(explained._repr_html_())
    assert view.count("<td class='num nla-unparsed'>miss (-3.000)</td><td class='num nla-unparsed'>miss (2.000)</td>"
                      ) == 3
    assert view.count("<span class='nla-tok nla-failed' style='background:#ffffff;color:#000' title='FVE miss") == 3


def test_steering_and_patching_tables_show_every_row_scored_as_the_miss_as_the_miss(base, av_karvonen, ar_nanonla,
                                                                                    monkeypatch, tmp_path):
    """The steering and patching tables marked a score as the miss only where its readout failed to parse: a parsed
    readout the AR could not score (too long for it, a reconstruction with no direction) printed FVE -3.000 as a
    reconstruction that bad. Their rows carry `RoundTrip.misses`, in the files too."""
    from nla_lens.results import text_table

    nla = nl.NLA(av_karvonen, ar_nanonla)
    monkeypatch.setattr(nla, "round_trip", lambda v, **kw: _round_trip_with_every_kind_of_miss(
        nl.NLA(av_karvonen, ar_nanonla), monkeypatch, v))
    tokens = base.to_tokens(["The cat sat on the mat.", "A dog sat on the mat."])
    steer = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    steering = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=4.0, steer_layer=1)
    # clean rows 0 (scored) and 1 (too long for the AR), steered rows 0 (no direction) and 1 (failed parse)
    assert [(r.clean_miss, r.steered_miss) for r in steering.rows] == [(False, True), (True, True)]
    records = steering.to_records()
    assert [(r["clean_parsed"], r["steered_parsed"]) for r in records] == [(True, True), (True, False)]
    lines = [line.split() for line in text_table(records, ["batch", "fve_clean", "fve_steered"])[1:]]
    assert lines == [["0", f"{records[0]['fve_clean']:.3f}", "miss", "(-3.000)"],
                     ["1", "miss", "(-3.000)", "miss", "(-3.000)"]]
    assert _body(steering._repr_html_()).count("<td class='num nla-unparsed'>miss (-3.000)</td>") == 3
    saved = nl.read_result(steering.save(tmp_path / "steering.parquet"))
    assert saved[["clean_miss", "steered_miss"]].values.tolist() == [[False, True], [True, True]]

    study = nl.patching_study(base, nla, tokens[:1], tokens[:1], patch_layer=1, patch_position=1)
    # the clean row scored, the corrupted row's explanation was too long for the AR, the patched row had no direction
    assert [r.miss for r in study.rows] == [False, True, True]
    assert all(r["parsed"] for r in study.to_records())
    fves = [line.split()[1:] for line in text_table(study.to_records(), ["run", "fve"])[1:]]
    assert fves == [[f"{study.rows[0].fve:.3f}"], ["miss", "(-3.000)"], ["miss", "(-3.000)"]]
    assert _body(study._repr_html_()).count("<td class='num nla-unparsed'>miss (-3.000)</td>") == 2
    assert nl.read_result(study.save(tmp_path / "patching.parquet"))["miss"].tolist() == [False, True, True]
    assert [r.miss for r in nl.patching_study(base, av_karvonen, tokens[:1], tokens[:1], patch_layer=1,
                                              patch_position=1, max_new_tokens=4).rows] == [None] * 3  # no AR: no score


def test_steering_and_patching_warnings_name_each_row_by_its_run_and_site(base, av_karvonen, ar_nanonla, monkeypatch):
    """Both experiments round-trip every run's readouts in one batch, and its warnings named rows of that batch
    ("rows [1]", the steered rows numbered after the clean ones), which their tables do not show."""
    nla = nl.NLA(av_karvonen, ar_nanonla)
    monkeypatch.setattr(nla, "round_trip", lambda v, baseline=None, **kw: _round_trip_with_every_kind_of_miss(
        nl.NLA(av_karvonen, ar_nanonla), monkeypatch, v, **kw))  # kw: how the experiment names its rows
    tokens = base.to_tokens(["The cat sat on the mat.", "A dog sat on the mat."])
    steer = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(1))
    steering = nl.steer_then_verbalize(base, nla, tokens, steering_vector=steer, scale=4.0, steer_layer=1)
    last = [(r.batch, r.position, r.token) for r in steering.rows]
    said = " | ".join(steering.round_trip.warnings)
    # the joint batch's row 1 is clean row 1 (too long for the AR), row 2 steered row 0 (no direction)
    assert f"(clean run, batch {last[1][0]} position {last[1][1]} ({last[1][2]!r})), scored as misses" in said
    assert f"steered run, batch {last[0][0]} position {last[0][1]} ({last[0][2]!r})), scored as misses" in said
    assert "rows [" not in said

    study = nl.patching_study(base, nla, tokens[:1], tokens[:1], patch_layer=1, patch_position=1)
    said = " | ".join(study.round_trip.warnings)
    assert "(corrupted run, batch 0 position" in said and "patched run, batch 0 position" in said
    assert "rows [" not in said


def test_the_explained_view_marks_a_failed_parses_score_as_the_miss_and_leaves_it_off_the_colour_scale():
    """A failed parse's token was coloured by its miss (the darkest red, paling every real negative FVE), and its
    row and tooltip read FVE -1.56 / MSE 2.00 as a reconstruction's."""
    cells = [display.TokenCell("a", 0, True, "x", None, 0.9, 0.1),
             display.TokenCell("b", 1, True, "y", None, -0.4, 0.6),
             display.TokenCell("c", 2, True, None, "raw", -1.56, 2.0)]
    scale = display.ColourScale.from_cells(cells)
    assert scale.most_negative == -0.4 and scale.colour(-0.4) == "#de2d26"  # the darkest red: the worst real score
    view = _body(display.explained_text_html([cells], title="t", layer=1))
    assert "<td class='num'>-0.400</td><td class='num'>0.600</td>" in view
    assert "<td class='num nla-unparsed'>miss (-1.560)</td><td class='num nla-unparsed'>miss (2.000)</td>" in view
    assert ("<span class='nla-tok nla-failed' style='background:#ffffff;color:#000' title='FVE miss (-1.560): "
            "(no &lt;explanation&gt; tags) raw'>c") in view
    assert "down to -0.40" in view and "down to -1.56" not in view


def test_a_feature_cards_nla_at_the_peak_says_why_a_parse_failed_as_the_cards_explanation_does():
    """The "NLA at the peak" column said "(no <explanation> tags)" of every failed parse, a completion cut at
    max_new_tokens too, without the completion."""
    said_here = [display.Readout(None, "<explanation>\nThe", truncated=True), display.Readout(None, "never tagged"),
                 display.Readout("said")]
    card = _body(display.feature_card_html("f", "h", "s", "e", "", [(["a"], [1.0], 0)] * 3, said_here))
    assert re.findall(r"<td>(.*?)</td></tr>", card) == [
        "<span class='nla-unparsed'>(cut at max_new_tokens before &lt;/explanation&gt;) &lt;explanation&gt;\\nThe"
        "</span>", "<span class='nla-unparsed'>(no &lt;explanation&gt; tags) never tagged</span>", "said"]


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_a_feature_cards_contexts_carry_what_the_av_wrote_at_their_peaks_to_the_view(base, nla):
    sae = make_sae(D_MODEL, 16, f"blocks.{LAYER}.hook_resid_post")
    card = nl.feature_card(sae, base, ["The cat sat on the mat."], 5, nla, k=2, explain_contexts=True,
                           progress=False, **FAST)
    assert card.contexts and all(c.explanation is None for c in card.contexts)  # 4 tokens never close the tag
    assert any(c.explanation_truncated for c in card.contexts)
    view = _body(card._repr_html_())
    for context in card.contexts:
        said = display.unparsed_text(context.explanation_text, context.explanation_truncated)
        assert f"<td><span class='nla-unparsed'>{html.escape(display.format_cell(said))}</span></td>" in view


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_a_feature_cards_own_failed_explanation_is_saved_as_failed_with_its_raw_text(results, tmp_path):
    """A card's rows held its own explanation alone: None on a failed parse, which a table read back could not
    tell from a card never asked, with no raw completion to look at (the summary alone said it failed)."""
    card = results["feature_card"]
    said = card.verbalization
    assert card.contexts and said.explanation is None and said.truncated and said.text  # 4 tokens never close it
    expected = {"explanation": None, "explanation_parsed": False, "explanation_text": said.text,
                "explanation_truncated": True}
    columns = list(expected)
    for rows in (card.to_pandas(), nl.read_result(card.save(tmp_path / "card.parquet")),
                 nl.read_result(card.save(tmp_path / "card.jsonl"))):
        rows = rows[columns].astype(object).where(rows[columns].notna(), None)
        assert rows.to_dict("records") == [expected] * len(card.contexts)
    record = card.to_records()[0]
    assert isinstance(record["text"], int)  # the index of the context's text, not the completion
    marked = display.unparsed_cell(record, "explanation")
    assert marked == display.unparsed_text(said.text, truncated=True)
    assert ("<td class='nla-prose nla-unparsed'>(cut at max_new_tokens before &lt;/explanation&gt;) "
            in display.result_html("FeatureCard", "s", [record], ["explanation"]))


@pytest.mark.skipif(not HAS_SAE_LENS, reason="needs sae-lens")
def test_a_feature_cards_summary_says_why_its_explanation_failed_to_parse_as_its_columns_do(results):
    """The summary line said "(failed to parse)" alone where the columns and the view said "cut at max_new_tokens"."""
    import dataclasses

    from nla_lens.verbalizer import Verbalization

    cut = results["feature_card"]
    assert cut.verbalization.truncated and cut.explanation is None
    assert "(failed to parse: cut at max_new_tokens before </explanation>);" in cut.summary()
    untagged = dataclasses.replace(cut, verbalization=Verbalization("no tags here", None, [1, 2]))
    assert "(failed to parse: no <explanation> tags);" in untagged.summary()
    assert html.escape("(failed to parse: cut at max_new_tokens before </explanation>)") in cut._repr_html_()


def test_a_failed_parse_is_marked_in_the_repr_and_table_not_shown_as_an_explanation():
    from nla_lens.experiments import DirectionVerbalization
    from nla_lens.verbalizer import Verbalization, Verbalizations

    failed = Verbalization("The token <b> and no closing tag", None, [1, 2])
    for result in (Verbalizations([failed]), DirectionVerbalization(torch.ones(1, 4), [failed])):
        assert "(no <explanation> tags) The token <b>" in repr(result)  # was blank, or the raw text unmarked
        assert ("<td class='nla-prose nla-unparsed'>(no &lt;explanation&gt; tags) The token &lt;b&gt; and no closing "
                "tag</td>"
                in result._repr_html_())


def test_scores_missing_from_every_row_stay_float_columns(tmp_path):
    from nla_lens.nla import RoundTrip
    from nla_lens.verbalizer import Verbalization

    said = [Verbalization("<explanation>\na\n</explanation>", "a", [1]), Verbalization("b", None, [2])]
    rt = RoundTrip(said, torch.zeros(2, 4), torch.tensor([0.5, 2.0]), 1.25, None, None, "none", 1)  # no baseline
    frame = rt.to_pandas()
    assert frame["fve"].dtype == "float64" and frame["fve"].isna().all()  # was object: .mean() and plots fail
    assert pq.read_table(rt.save(tmp_path / "rt.parquet")).schema.field("fve").type == "double"  # was null
    assert pd.read_parquet(tmp_path / "rt.parquet")["fve"].dtype == "float64"
    assert [r["fve"] for r in pq.read_table(tmp_path / "rt.parquet").to_pylist()] == [None, None]


def test_whitespace_tokens_stay_visible_in_tables_reprs_and_cards():
    from nla_lens.results import text_table

    records = [{"token": " ", "n": 1}, {"token": " king", "n": 2}, {"token": "\n", "n": 3}]
    table = display.result_html("R", "s", records, ["token", "n"]).split("</style>")[1]
    chip = "<td><span class='nla-tok' style='background:#e8e8e8'>{}</span></td>"
    for shown in ("\u2423", " king", "\u21b5"):  # a chip keeps a leading space that a bare cell collapses
        assert chip.format(shown) in table
    assert [line.split()[0] for line in text_table(records, ["token", "n"])[1:]] == ["\u2423", "king", "\u21b5"]
    card = display.feature_card_html("f", "h", "s", "e", "", [(["a", " "], [0.5, 1.0], 1)])
    assert "nla-peak' style='background:#fd8d3c;color:#000' title='1.000'>\u2423</span>" in card  # was an empty box


def test_an_all_space_token_of_other_spaces_shows_each_as_its_escape():
    """A no-break or ideographic space token left a chip blank: only ASCII spaces became ␣."""
    assert display.visible_token("\xa0") == "\\xa0" and display.visible_token(" \u3000") == "\u2423\\u3000"
    assert display.visible_token("a\xa0b") == "a\xa0b"  # inside a word the space shows as one


def test_table_headers_name_the_units_of_their_columns(results):
    steering = results["word_steering"]
    assert "kl (nats)" in repr(steering).splitlines()[1] and "steered_next (token p)" in repr(steering)
    assert ">kl (nats)</th>" in steering._repr_html_() and "kl" in steering.to_pandas().columns  # keys stay bare


def test_a_lone_or_constant_score_takes_the_same_colour_in_fve_and_mse():
    """A scale with nothing to spread drew a lone FVE in the best colour and a lone MSE in the worst one: one
    result's single token changed from blue to pale yellow when no baseline was given."""
    middle = "#41b6c4"  # the middle of the sequential ramp: no rank to show
    for fve, mse in ((0.7,), (0.3,)), ((0.7, 0.7), (0.3, 0.3)):
        pairs = enumerate(zip(fve, mse, strict=True))
        with_fve = [display.TokenCell("a", p, True, "x", None, f, m) for p, (f, m) in pairs]
        without = [display.TokenCell("a", p, True, "x", None, None, m) for p, m in enumerate(mse)]
        for cells in (with_fve, without):
            scale = display.ColourScale.from_cells(cells)
            assert [scale.colour(scale.value(c)) for c in cells] == [middle] * len(cells)


def _body(page: str) -> str:
    return page.split("</style>", 1)[1]


def test_a_legend_shows_each_tick_label_once():
    """One token's view labelled the bar 0.70 0.70 0.70 0.70 0.70 (the five quantiles of one value); a lone label
    sits mid-bar, where the scale draws a lone value."""
    def ticks(fves: tuple[float, ...]) -> tuple[str, list[str]]:
        cells = [display.TokenCell("a", p, True, "x", None, f, 0.3) for p, f in enumerate(fves)]
        legend = display.ColourScale.from_cells(cells).legend_html()
        style, spans = re.search(r"class='nla-ticks'([^>]*)>((?:<span>[^<]*</span>)*)</span>", legend).groups()
        return style, re.findall(r"<span>([^<]*)</span>", spans)

    for fves in ((0.7,), (0.7, 0.7, 0.7)):
        assert ticks(fves) == (" style='justify-content: center'", ["0.70"])
    assert ticks((0.2, 0.9)) == ("", ["0.20", "0.90"])
    assert ticks((0.1, 0.2, 0.3, 0.4, 0.5)) == ("", ["0.10", "0.20", "0.30", "0.40", "0.50"])


def test_a_feature_card_with_a_non_finite_peak_activation_draws():
    """An infinite activation (a float16 SAE that overflowed) or a NaN at a peak raised a ValueError from the
    colour ramp."""
    for peaks in ([float("inf"), 2.0], [float("nan"), 2.0], [float("inf")]):
        windows = [(["a", "b"], [peak, 1.0], 0) for peak in peaks]
        card = _body(display.feature_card_html("f", "h", "s", "e", "", windows))
        assert card.count("nla-peak") == len(peaks) + 1  # every window drawn, plus the legend's swatch
    card = display.feature_card_html("f", "h", "s", "e", "", [(["a", "b"], [float("inf"), 1.0], 0),
                                                              (["c"], [2.0], 0)])
    assert "activation 0 to 2.00" in card and "title='inf'" in card


def test_a_nan_peak_activation_is_labelled_nan_not_left_out_by_skip_first():
    """The peak's tooltip said "not scanned (skip_first)": the peak is where the scan found the feature, so it was
    scanned, and its value is NaN. A NaN beside it is still a token skip_first left out."""
    card = _body(display.feature_card_html("f", "h", "s", "e", "", [(["a", "b"], [float("nan"), 1.0], 0),
                                                                    (["c", "d"], [float("nan"), 2.0], 1)]))
    assert card.count("title='nan'") == 1 and card.count("not scanned (skip_first)") == 1


def test_views_show_control_characters_of_explanations_and_raw_outputs_as_escapes():
    """The explained-text view and the feature card wrote explanations bare: a NUL (an HTML parse error), an ESC
    and a CR reached the page, where the tables beside them show escapes."""
    said, raw = "a\x00b\rc\x1bd\ne", "no tags\x00\r\x1b"
    cells = [display.TokenCell("x", 0, True, said, None, 0.5), display.TokenCell("y", 1, True, None, raw, 0.4)]
    view = _body(display.explained_text_html([cells], title="t", layer=1))
    card = _body(display.feature_card_html("f", "h", "s", said, "", [(["a"], [1.0], 0)],
                                           said_here=[display.Readout(said)]))
    failed_card = _body(display.feature_card_html("f", "h", "s", None, raw, [(["a"], [1.0], 0)]))
    for page in (view, card, failed_card):
        assert not {"\x00", "\r", "\x1b", "\n"} & set(page)
    assert "<td>a\\x00b\\rc\\x1bd\\ne</td>" in view and "no tags\\x00\\r\\x1b" in view
    assert card.count("a\\x00b\\rc\\x1bd\\ne") == 2 and "no tags\\x00\\r\\x1b" in failed_card


def test_bidi_and_other_invisible_format_characters_show_as_escapes():
    """A right-to-left override in a token reversed every token drawn after it in the line (and the rest of a
    repr row); a token of a right-to-left mark or a zero-width space drew an empty chip."""
    for char in ("\u202e", "\u2067", "\u200f", "\u200b", "\ufeff"):
        escape = char.encode("unicode_escape").decode()
        assert display.visible_token(char) == escape and display.format_cell(f"a{char}b") == f"a{escape}b"
    cells = [display.TokenCell(t, p, True, f"said {t}", None, 0.5) for p, t in enumerate(["\u202e", "ab", "\u200f"])]
    view = display.explained_text_html([cells], title="t", layer=1)
    table = display.result_html("R", "s", [{"token": "\u202e", "explanation": "x\u202ey"}], ["token", "explanation"])
    for page in (view, table):
        assert not {"\u202e", "\u200f"} & set(page)
    assert "\\u202e<sub>0</sub>" in view and "\\u200f<sub>2</sub>" in view and "x\\u202ey" in table


def test_a_lone_surrogate_shows_as_its_escape_and_the_view_saves(tmp_path):
    """A lone surrogate (a JSON file's "\\ud800", read back by `SAEExperimentResult.load`; a row built by hand) reached
    the view and the repr bare: save('.html') raised a bare UnicodeEncodeError, and the notebook could not send the
    view, which UTF-8 cannot encode."""
    from nla_lens.verbalizer import Verbalization

    said = "a\ud800b\udcffc"
    assert display.visible_token("\ud800") == "\\ud800" and display.format_cell(said) == "a\\ud800b\\udcffc"
    result = nl.Verbalizations([Verbalization(said, said, [1]), Verbalization(said, None, [1])])
    cells = [display.TokenCell("\ud800", 0, True, said, None, 0.5), display.TokenCell("x", 1, True, None, said, 0.4)]
    views = [result._repr_html_(), repr(result), display.explained_text_html([cells], title="t", layer=1),
             display.feature_card_html("f", "h", "s", said, "", [(["\ud800"], [1.0], 0)],
                                       said_here=[display.Readout(None, said)])]
    for view in views:
        assert "a\\ud800b\\udcffc" in view and not any("\ud800" <= c <= "\udfff" for c in view)
    assert "a\\ud800b" in result.save(tmp_path / "view.html").read_text(encoding="utf-8")


def test_saving_a_lone_surrogate_to_parquet_or_jsonl_is_an_input_error_naming_its_column_and_row(tmp_path):
    """A lone surrogate in a text column (a raw output read back from JSON, a row built by hand) made
    save('x.parquet') and save('x.jsonl') raise pyarrow's bare UnicodeEncodeError, naming no column and no row; one in
    a warning did so for .parquet, whose metadata keeps them. The .html view shows it as its escape and saves."""
    from nla_lens.verbalizer import Verbalization

    fine = Verbalization("<explanation>\nok\n</explanation>", "ok", [1])
    result = nl.Verbalizations([fine, Verbalization("no tags a\ud800b", None, [2])])
    for suffix in (".parquet", ".jsonl"):
        with pytest.raises(nl.InputError, match=r"column 'text' row 1 holds '\\ud800', a lone surrogate .*UTF-8 "
                                                r"cannot encode.*Save as \.html"):
            result.save(tmp_path / f"rows{suffix}")
        assert not (tmp_path / f"rows{suffix}").exists()
    assert "a\\ud800b" in result.save(tmp_path / "rows.html").read_text(encoding="utf-8")
    warned = nl.Verbalizations([fine], warnings=["fine", "text 0 holds x\udcff"])
    with pytest.raises(nl.InputError, match=r"warning 1 holds '\\udcff', a lone surrogate"):
        warned.save(tmp_path / "warned.parquet")
    assert nl.read_result(warned.save(tmp_path / "warned.jsonl"))["text"].tolist() == [fine.text]  # the rows alone


def test_views_show_control_characters_of_summaries_warnings_and_hook_names_as_escapes(tmp_path):
    """A view's summary, warnings and hook name were HTML-escaped only: a warning quoting a text's ESC or CR, a
    summary's bidi override and an SAE's hook name with a line separator reached the page bare, where the rows beside
    them show escapes; a warning quoting a lone surrogate made save('x.html') raise a bare UnicodeEncodeError."""
    from nla_lens.verbalizer import Verbalization

    warning, summary, hook = "text 0 says a\x1b[2Jb\rc\ud800", "FVE \u202e0.5", "blocks.2.hook\u2028resid_post"
    shown = {warning: "text 0 says a\\x1b[2Jb\\rc\\ud800", summary: "FVE \\u202e0.5",
             hook: "blocks.2.hook\\u2028resid_post"}
    cells = [display.TokenCell("x", 0, True, "said", None, 0.5)]
    views = {"table": display.result_html("R", summary, [{"a": 1}], ["a"], [warning]),
             "explained": display.explained_text_html([cells], title="t", layer=2, summary=summary, hook_name=hook,
                                                      warnings=[warning]),
             "card": display.feature_card_html("f", hook, summary, "e", "", [(["a"], [1.0], 0)], warnings=[warning])}
    result = nl.Verbalizations([Verbalization("<explanation>\ne\n</explanation>", "e", [1])], warnings=[warning])
    views["result"] = result.save(tmp_path / "view.html").read_text(encoding="utf-8")
    for name, view in views.items():
        page = _body(view)
        assert not {"\x1b", "\r", "\u202e", "\u2028"} & set(page), name
        assert not any("\ud800" <= c <= "\udfff" for c in page), name
        assert f"warning: {shown[warning]}" in page, name
    for name in ("table", "explained", "card"):
        assert shown[summary] in views[name], name
    for name in ("explained", "card"):
        assert f"<code>{shown[hook]}</code>" in views[name], name


def test_a_real_explanation_escapes_model_text_in_its_view_and_repr(results):
    """What an AV writes reaches the page only as text: markup, entities, quotes, NUL and bidi controls."""
    import dataclasses

    from nla_lens.verbalizer import Verbalization

    said = "<script>alert(1)</script></td>&amp;\"'\x00\u202e"
    explanation = results["explanation"]
    rows = [dataclasses.replace(r, token="</td>\u202e", verbalization=Verbalization(said, said, [1]))
            for r in explanation.rows]
    tokens = [["</td>\u202e"] * len(t) for t in explanation.tokens]
    poisoned = dataclasses.replace(explanation, rows=rows, tokens=tokens, model_name=said)  # a config's string
    page = _body(poisoned._repr_html_())
    assert "<script" not in page and "</td>\u202e" not in page and not {"\x00", "\u202e"} & set(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/td&gt;&amp;amp;&quot;&#x27;\\x00\\u202e" in page
    assert not {"\x00", "\u202e"} & set(repr(poisoned))
    assert poisoned.to_pandas()["explanation"].tolist() == [said] * len(rows)  # the data keeps every character


def test_a_slice_of_verbalizations_is_verbalizations_with_those_rows(tmp_path):
    from nla_lens.verbalizer import Verbalization, Verbalizations

    out = Verbalizations([Verbalization(f"<explanation>\n{w}\n</explanation>", w, [i]) for i, w in
                          enumerate(["a", "b", "c"])] + [Verbalization("d untagged", None, [3, 4])])
    head, tail = out[:2], out[-2::1]
    assert type(head) is Verbalizations and type(tail) is Verbalizations  # was a plain list: no summary, no save
    assert repr(head).startswith("Verbalizations: 2 verbalizations, 0 failed to parse")
    assert tail.summary() == "2 verbalizations, 1 failed to parse"
    assert [(r["explanation"], r["n_tokens"]) for r in tail.to_records()] == [("c", 1), (None, 2)]
    assert tail.to_pandas()["text"].tolist() == ["<explanation>\nc\n</explanation>", "d untagged"]
    assert pq.read_table(head.save(tmp_path / "head.parquet"))["text"].to_pylist() == [v.text for v in out[:2]]
    assert out[1] is list.__getitem__(out, 1) and out[-1].explanation is None  # an index still gives one row
    assert type(out[::-1]) is Verbalizations and [v.tokens for v in out[::-1]][0] == [3, 4]


def test_verbalizations_stay_verbalizations_under_add_mul_and_copy_and_rows_keep_their_input_index(av_karvonen,
                                                                                                     vectors):
    """`+`, `*` and `.copy()` gave plain lists (no summary, no save), and a slice renumbered `index` from 0: `out[2:]`
    said its first row explained vector 0."""
    from nla_lens.verbalizer import Verbalization, Verbalizations

    out = av_karvonen.verbalize(vectors, max_new_tokens=2, progress=False)
    assert [v.index for v in out] == [0, 1, 2, 3]
    assert [r["index"] for r in out[2:].to_records()] == [2, 3]
    assert out[::-2].to_pandas()["index"].tolist() == [3, 1]
    joined = out[3:] + out[:1]
    assert type(joined) is Verbalizations and [r["index"] for r in joined.to_records()] == [3, 0]
    for made in (out * 2, 2 * out, out.copy()):
        assert type(made) is Verbalizations and made.summary().startswith(f"{len(made)} verbalizations")
    assert [r["index"] for r in (out[1:2] * 2).to_records()] == [1, 1]
    assert out.copy() == out and out.copy() is not out
    assert out[1] == Verbalization(out[1].text, out[1].explanation, out[1].tokens)  # index is not compared
    by_hand = Verbalizations([Verbalization("a", None, [1]), Verbalization("b", None, [2])])
    assert [r["index"] for r in by_hand[1:].to_records()] == [0]  # rows built by hand: their position


def test_each_verbalization_says_whether_max_new_tokens_cut_it(av_karvonen, vectors, monkeypatch):
    """A row that ran out of `max_new_tokens` before an EOS was told apart only by a heuristic on its text (an
    unclosed tag); `truncated` says it per row, in the table and the repr."""
    monkeypatch.setattr(av_karvonen, "eos_token_ids", [])  # no row can stop: every one is cut at 3 tokens
    cut = av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
    assert all(len(v.tokens) == 3 and v.truncated for v in cut) and "3 tokens, truncated)" in repr(cut[0])
    monkeypatch.setattr(av_karvonen, "eos_token_ids", list(range(av_karvonen.model.cfg.d_vocab)))  # every id ends
    ended = av_karvonen.verbalize(vectors, max_new_tokens=3, progress=False)
    assert all(len(v.tokens) == 1 and not v.truncated for v in ended) and "truncated" not in repr(ended[0])
    monkeypatch.setattr(av_karvonen, "eos_token_ids", [])
    one = av_karvonen.verbalize(vectors[:1], max_new_tokens=1, progress=False)[0]
    monkeypatch.setattr(av_karvonen, "eos_token_ids", [one.tokens[0]])  # an EOS as the last allowed token
    assert not av_karvonen.verbalize(vectors[:1], max_new_tokens=1, progress=False)[0].truncated
    assert cut.to_pandas()["truncated"].tolist() == [True] * len(vectors)
    assert ended.to_pandas()["truncated"].tolist() == [False] * len(vectors)


@pytest.mark.parametrize("kind", ["round_trip", "explanation", "difference"]
                         + (["feature_verbalizations"] if HAS_SAE_LENS else []))
def test_tables_of_generated_text_say_which_rows_max_new_tokens_cut(results, kind, av_karvonen):
    """Every table with a `text` column has `truncated` beside it (it was on `Verbalizations` only): a row that
    ran out of `max_new_tokens` before an EOS, read off its tokens."""
    result = results[kind]
    rows = [r.verbalization for r in result.rows] if kind == "explanation" else result.verbalizations
    eos = set(av_karvonen.eos_token_ids)
    cut = [len(v.tokens) == FAST["max_new_tokens"] and v.tokens[-1] not in eos for v in rows]
    assert any(cut)  # the tiny AV's noise rarely stops within 4 tokens: the column has something to say
    assert result.to_pandas()["truncated"].tolist() == cut == [v.truncated for v in rows]


def test_a_plain_list_plus_verbalizations_is_verbalizations():
    """`[v0] + out` stayed a plain list (no summary, no save): Python tries a list subclass's `__radd__` before
    list's own `+` only where the subclass defines one."""
    from nla_lens.verbalizer import Verbalization, Verbalizations

    first, second, third = (Verbalization(w, None, [i], i) for i, w in enumerate("abc"))
    out = Verbalizations([second, third])
    joined = [first] + out
    assert type(joined) is Verbalizations and joined == [first, second, third]
    assert [r["index"] for r in joined.to_records()] == [0, 1, 2]
    assert type([] + out) is Verbalizations and type(out + [first]) is Verbalizations
    assert out == [second, third]  # neither operand changes
    with pytest.raises(TypeError, match="can only concatenate tuple"):  # a tuple is no list: Python's own error
        (first,) + out


@pytest.mark.parametrize("where", ["read_only", "proc"])
def test_save_refuses_a_folder_it_cannot_write_naming_the_path_given(results, tmp_path, where):
    """A folder the process may not write failed at the write, with a PermissionError naming the temporary file."""
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc, a folder no file can be created in")
        folder = Path("/proc")
    else:
        folder = tmp_path / "read_only"
        folder.mkdir(mode=0o500)
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) writes even a read-only folder")
    for name in ("out.jsonl", "out.parquet", "out.html"):
        with pytest.raises(nl.InputError, match=rf"output {folder / name}: no file can be created in {folder} "
                                                r"\(.+\); pick a folder this process can write to"):
            results["round_trip"].save(folder / name)
    with pytest.raises(nl.InputError, match="no file can be created"):
        results["word_steering"].save_vectors(folder / "delta.safetensors")


def test_save_takes_a_suffix_in_any_case(results, tmp_path):
    """`out.PARQUET` was refused: "the file name must end in .parquet or .jsonl or .html"."""
    rt = results["round_trip"]
    assert pq.read_table(rt.save(tmp_path / "out.PARQUET")).to_pylist() == pq.read_table(
        rt.save(tmp_path / "out.parquet")).to_pylist()
    assert len(rt.save(tmp_path / "out.Jsonl").read_text(encoding="utf-8").splitlines()) == len(rt.to_records())
    assert rt.save(tmp_path / "view.HTML").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    path = results["word_steering"].save_vectors(tmp_path / "delta.SAFETENSORS")
    assert len(nl.WordSteering.fwd_hooks_from(path)) == 1


def test_the_steer_words_experiment_writes_its_hit_rates_as_percentages_as_its_summary_does():
    """The table wrote a hit rate of 0.25 as 0.250 where the summary (and the README's table) says 25%."""
    from nla_lens.toy.steer_words_experiment import AlphaRow, SteerWordsExperiment

    result = SteerWordsExperiment(100, 1, "plausible", "add", 0.79, 0.5,
                                  [AlphaRow(0.5, 0.57, 0.99, 0.04, -0.16, 0.76, 1.0),
                                   AlphaRow(1.0, 0.25, 1.17, 0.05, -0.52, 0.91, 2.0)])
    assert "Z' argmax 57% vs random 4% (oracle direction 76%" in result.summary()
    view, text = _body(result._repr_html_()), repr(result)
    for rate in ("57%", "4%", "76%", "25%", "5%", "91%"):
        assert f"<td class='num'>{rate}</td>" in view and f" {rate}" in text
    assert "0.570" not in view + text and "0.250" not in view + text
    assert "<td class='num'>0.990</td>" in view  # a log-probability stays a number


def test_a_summary_counts_one_in_the_singular(results):
    """Summaries read "1 verbalizations", "1 vectors", "1 failed parses", "1 site(s) ..., 1 sample(s) per site",
    "1 difference(s)", "1 held-out sites": a count of one in the plural, or with "(s)" for any count."""
    import dataclasses

    from nla_lens.toy.steer_words_experiment import AlphaRow, SteerWordsExperiment
    from nla_lens.verbalizer import Verbalization, Verbalizations

    replace, failed = dataclasses.replace, Verbalization("raw", None, [1])
    assert Verbalizations([failed]).summary() == "1 verbalization, 1 failed to parse"
    round_trip = results["round_trip"]
    one_vector = replace(round_trip, verbalizations=[failed], mse=round_trip.mse[:1], fves=round_trip.fves[:1],
                         n_failed_parses=1)
    assert one_vector.summary().startswith("1 vector, ") and one_vector.summary().endswith(", 1 failed parse")
    sites = results["word_steering"]
    one_site = replace(sites, rows=sites.rows[:1], positions=sites.positions[:1], tokens_at=sites.tokens_at[:1],
                       explanations=[sites.explanations[0][:1]], edited=sites.edited[:1])
    assert one_site.summary().startswith("1 site at ") and one_site.summary().endswith(", 1 sample per site")
    assert "2 sites at " in sites.summary()
    difference = results["difference"]
    one_difference = replace(difference, difference=difference.difference[:1], cosine=difference.cosine[:1],
                             verbalizations=difference.verbalizations[:1])
    assert one_difference.summary().startswith("1 difference a - b verbalized")
    experiment = SteerWordsExperiment(1, 1, "random", "add", 1.0, 0.4, [AlphaRow(1.0, 1.0, 1.2, 0.0, 0.0, 1.0, 2.0)])
    assert experiment.summary().startswith("1 held-out site, random Z', mode=add, 1 explanation sample per site")


def test_a_repr_aligns_left_a_column_whose_every_explanation_failed_to_parse():
    """The repr aligned a column right when no row held a value, as if it held numbers: every explanation failed to
    parse, so each cell was its raw text, and those were right-aligned. The HTML table aligned them left."""
    said = nl.Verbalizations([nl.Verbalization("garbled output here", None, [1, 2]),
                              nl.Verbalization("xx", None, [3])])
    header, *lines = repr(said).splitlines()[1:]
    assert [line.index("(no <explanation> tags)") for line in lines] == [header.index("explanation")] * 2
    assert "class='num'" not in display.result_html("Verbalizations", "", said.to_records(), ["explanation"])


def test_a_tab_token_is_drawn_as_its_escape_not_a_blank_chip():
    """A lone tab token was kept bare, as a tab beside text is: its chip was a blank box, in the view's line and rows
    alike (a miss's chip, white in its outline, showed nothing at all)."""
    assert display.visible_token("\t") == "\\t" and display.visible_token(" \t") == "\u2423\\t"
    assert display.visible_token("\tif") == "\tif"  # beside text, the indent it is
    cells = [display.TokenCell("\t", 0, True, None, "raw", -1.5, 2.0)]
    view = display.explained_text_html([cells], title="t", layer=1).split("</style>")[1]
    assert "\t" not in view and view.count(">\\t<") == 2 and "\\t<sub>0</sub>" in view  # the line and its row
