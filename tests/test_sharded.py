"""Sharded verbalize / round-trip jobs: under torchrun (2 gloo ranks), resumed, redone shard by shard."""

from __future__ import annotations

import fractions
import functools
import json
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import docs_text
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from launch import torchrun_cli
from safetensors.torch import load_file, save_file

import nla_lens as nl
from nla_lens import loading, shard_store, sharded
from nla_lens.cli import main
from nla_lens.distributed import World, device_for
from nla_lens.sharded import Sampling
from nla_lens.toy.demo import TOY_DIR
from nla_lens.toy.evaluate import HELDOUT_FILE, MIN_CONTEXT, ToyNLA
from nla_lens.vector_files import read_input, read_vectors, write_vectors

N_ROWS, SHARD_SIZE = 10, 3  # shards of 3, 3, 3, 1: uneven, and each of 2 ranks gets two
GREEDY = Sampling(max_new_tokens=8)


def write_parquet(path: Path, vectors: torch.Tensor, **columns: list) -> Path:
    pq.write_table(pa.table({**columns, "vector": pa.array(vectors.tolist(), pa.list_(pa.float32()))}), path)
    return path


@pytest.fixture()
def rows() -> torch.Tensor:
    return torch.randn(N_ROWS, 64, generator=torch.Generator().manual_seed(7))


@pytest.fixture()
def input_file(rows, tmp_path) -> Path:
    return write_parquet(tmp_path / "in.parquet", rows, doc_id=[f"doc{i // 4}" for i in range(N_ROWS)],
                         position=list(range(N_ROWS)))


def verbalize_args(av: Path, input_file: Path, output: Path, *extra: str) -> list[str]:
    return ["verbalize", "--av", str(av), "--input", str(input_file), "--output", str(output),
            "--shard-size", str(SHARD_SIZE), "--max-new-tokens", "8", *extra]


def test_two_torchrun_ranks_give_the_single_process_rows(av_karvonen, tiny_paths, input_file, rows, tmp_path):
    torchrun_cli(*verbalize_args(tiny_paths["av_karvonen"], input_file, tmp_path / "two.parquet"))
    assert main(verbalize_args(tiny_paths["av_karvonen"], input_file, tmp_path / "one.parquet")) == 0
    two, one = pq.read_table(tmp_path / "two.parquet"), pq.read_table(tmp_path / "one.parquet")
    assert two.equals(one)
    assert two.column_names == ["index", "doc_id", "position", "explanation", "text", "truncated"]
    assert two.column("index").to_pylist() == list(range(N_ROWS))
    assert two.column("doc_id").to_pylist() == [f"doc{i // 4}" for i in range(N_ROWS)]
    expected = av_karvonen.verbalize(rows, max_new_tokens=8, progress=False)
    assert two.column("text").to_pylist() == [v.text for v in expected]
    assert two.column("truncated").to_pylist() == [v.truncated for v in expected]


@pytest.fixture(scope="module")
def toy_vectors(tmp_path_factory) -> Path:
    """Activations of the bundled toy base model, which its trained AV explains with parseable text."""
    toy = ToyNLA.load(TOY_DIR)
    text = json.loads((TOY_DIR / HELDOUT_FILE).read_text())[0]["text"]
    ids = toy.av.tokenizer.encode(text, add_special_tokens=False)[:MIN_CONTEXT + N_ROWS]
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    save_file({"vectors": toy.activations(ids)[MIN_CONTEXT:].contiguous()}, path)
    return path


def test_two_torchrun_ranks_score_the_round_trip_as_one_process_and_nla(toy_vectors, tmp_path):
    args = ["round-trip", "--av", str(TOY_DIR / "av"), "--ar", str(TOY_DIR / "ar"), "--input", str(toy_vectors),
            "--shard-size", str(SHARD_SIZE), "--max-new-tokens", "40"]
    torchrun_cli(*args, "--output", str(tmp_path / "two.parquet"))
    result = sharded.round_trip_file(TOY_DIR / "av", TOY_DIR / "ar", toy_vectors, tmp_path / "one.parquet",
                                     sampling=Sampling(max_new_tokens=40), shard_size=SHARD_SIZE, progress=False)
    two = pq.read_table(tmp_path / "two.parquet")
    assert two.equals(result.table)
    summary, one = (json.loads(sharded.summary_path(tmp_path / name).read_text()) for name in ("two.parquet",
                                                                                                "one.parquet"))
    assert (summary.pop("output"), one.pop("output")) == ("two.parquet", "one.parquet") and summary == one

    toy = ToyNLA.load(TOY_DIR)
    reference = nl.NLA(toy.av, toy.ar).round_trip(load_file(toy_vectors)["vectors"], max_new_tokens=40,
                                                  progress=False)
    assert reference.n_failed_parses < N_ROWS  # rows parse, so the AR's reconstructions are really scored
    assert summary["n_failed_parses"] == reference.n_failed_parses
    assert summary["n_misses"] == sum(reference.misses)
    assert summary["n_truncated"] == sum(v.truncated for v in reference.verbalizations)
    assert summary["baseline"] == pytest.approx(reference.baseline, abs=1e-9)
    assert summary["fve"] == pytest.approx(reference.fve, abs=1e-6)
    assert torch.allclose(torch.tensor(two.column("mse").to_numpy()), reference.mse, atol=1e-6)
    assert two.column("explanation").to_pylist() == reference.explanations


def test_an_explicit_gpu_index_under_torchrun_is_refused_and_cuda_means_each_ranks_own(monkeypatch):
    """`cuda:1` under torchrun put every rank on GPU 1 (no GPU is needed: only the device count is read)."""
    rank1 = World(rank=1, world_size=2, local_rank=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(nl.ConfigError, match=r"'cuda:1' with 2 torchrun processes puts every rank on GPU 1: set the "
                                             r"device to 'cuda' \(`--device cuda`, or `device: cuda` in the YAML "
                                             r"config.*cuda:LOCAL_RANK"):
        device_for(rank1, "cuda:1")
    assert device_for(rank1, "cuda") == torch.device("cuda:1")
    assert device_for(World(), "cuda:1") == torch.device("cuda:1")
    assert device_for(rank1, "cpu") == torch.device("cpu")


def test_a_rank_shown_one_gpu_takes_it_whatever_its_local_rank(monkeypatch):
    """A launcher that shows each rank only its own GPU (SLURM's --gpus-per-task=1) numbers it cuda:0 in
    every rank: `cuda` must not ask for cuda:LOCAL_RANK there, and `cuda:0` is that rank's own GPU."""
    rank3 = World(rank=3, world_size=4, local_rank=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_for(rank3, "cuda") == torch.device("cuda:0")
    assert device_for(rank3, "cuda:0") == torch.device("cuda:0")


def test_a_killed_run_resumes_with_only_the_missing_shards(tiny_paths, input_file, tmp_path, monkeypatch):
    av = tiny_paths["av_karvonen"]
    reference = sharded.verbalize_file(av, input_file, tmp_path / "ref.parquet", sampling=GREEDY,
                                       shard_size=SHARD_SIZE, progress=False).table
    out = tmp_path / "out.parquet"
    folder = shard_store.shard_folder(out)
    folder.mkdir()
    (folder / ".shard-00001.parquet.0123abcd.tmp").write_bytes(b"half a file")  # a write cut short earlier
    save = shard_store.save_shard

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first shard")

    monkeypatch.setattr(shard_store, "save_shard", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.parquet"] and not out.exists()

    monkeypatch.setattr(shard_store, "save_shard", save)
    calls = []
    verbalize = nl.ActivationVerbalizer.verbalize
    monkeypatch.setattr(nl.ActivationVerbalizer, "verbalize",
                        lambda self, vectors, **kw: calls.append(len(vectors)) or verbalize(self, vectors, **kw))
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                    progress=False)
    assert result.computed == [1, 2, 3] and calls == [3, 3, 1]
    assert pq.read_table(out).equals(reference)


def test_shards_of_an_older_version_without_truncated_merge_with_nulls_there(tiny_paths, input_file, tmp_path):
    """Shards written before the `truncated` column resume: their rows read null there (unknown, not false)."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    reference = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                       progress=False).table
    folder = shard_store.shard_folder(out)
    older = shard_store.shard_path(folder, 0)
    pq.write_table(pq.read_table(older).drop_columns(["truncated"]), older)
    shard_store.shard_path(folder, 1).unlink()
    out.unlink()
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1] and result.table.column_names == reference.column_names
    truncated = reference.column("truncated").to_pylist()
    assert result.table.column("truncated").to_pylist() == [None] * SHARD_SIZE + truncated[SHARD_SIZE:]
    assert result.table.drop_columns(["truncated"]).equals(reference.drop_columns(["truncated"]))


def test_a_round_trip_summary_counts_the_rows_max_new_tokens_cut(tiny_paths, input_file, tmp_path):
    out = tmp_path / "out.parquet"
    result = sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file, out,
                                     sampling=Sampling(max_new_tokens=3), baseline=0.8, shard_size=SHARD_SIZE)
    cut = result.table.column("truncated").to_pylist()
    assert result.summary.n_truncated == cut.count(True) > 0 and f"{cut.count(True)} truncated" in repr(result)
    assert json.loads(sharded.summary_path(out).read_text())["n_truncated"] == cut.count(True)


def test_a_round_trip_file_checks_each_tokenizer_against_its_sidecar_once(tiny_paths, input_file, tmp_path,
                                                                          monkeypatch):
    """The job checked the AR's tokenizer for its sample length, then the AR loader checked it again. A drifted one
    is still refused (`test_a_drifted_folder_loaded_for_you_is_blamed_on_its_tokenizer_not_on_tokenizer_equals`).
    Each sidecar is parsed once too: the AV loader parsed the AV's again, after the job's check of its role."""
    av, ar = tiny_paths["av_karvonen"].resolve(), tiny_paths["ar_nanonla"].resolve()
    checks, parses = Counter(), Counter()
    check_tokenizer, parse_meta = loading.check_tokenizer, nl.sidecar.parse_meta

    def counted(meta, tokenizer, role=None, **kwargs):
        checks[Path(kwargs["source"]).resolve()] += 1
        return check_tokenizer(meta, tokenizer, role, **kwargs)

    def counted_parse(data, *, source):
        parses[Path(source).resolve()] += 1
        return parse_meta(data, source=source)

    monkeypatch.setattr(loading, "check_tokenizer", counted)
    monkeypatch.setattr(nl.sidecar, "parse_meta", counted_parse)
    sharded.round_trip_file(av, ar, input_file, tmp_path / "out.parquet", sampling=Sampling(max_new_tokens=2),
                            baseline=0.5, shard_size=N_ROWS)
    assert checks == {av / "nla_meta.yaml": 1, ar / "nla_meta.yaml": 1}
    assert parses == {av / "nla_meta.yaml": 1, ar / "nla_meta.yaml": 1}
    parses.clear()
    sharded.verbalize_file(av, input_file, tmp_path / "out.jsonl", sampling=Sampling(max_new_tokens=2),
                           shard_size=N_ROWS)
    assert parses == {av / "nla_meta.yaml": 1}


def test_a_sharded_round_trip_scores_a_reconstruction_with_no_direction_as_a_miss_and_says_so(
        tiny_paths, input_file, tmp_path, monkeypatch):
    """A NaN reconstruction (an AR overflowing float16) wrote a NaN MSE and made the summary's FVE NaN, unsaid."""
    text = "<explanation>the cat</explanation>"
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: [
        nl.Verbalization(text, "the cat", [1])] * len(vectors))
    monkeypatch.setattr(nl.ActivationReconstructor, "reconstruct", lambda self, texts, batch_size=64: torch.full(
        (len(texts), 64), float("nan")))
    with pytest.warns(UserWarning) as record:
        result = sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file,
                                         tmp_path / "out.parquet", sampling=GREEDY, baseline=0.5,
                                         shard_size=SHARD_SIZE)
    said = [str(w.message) for w in record if "no direction" in str(w.message)]
    assert [s.split(" reconstructions")[0] for s in said] == ["shard 0: 3/3", "shard 1: 3/3", "shard 2: 3/3",
                                                                "shard 3: 1/1"]
    assert "rows [3, 4, 5]" in said[1] and "rows [9]" in said[3]  # the input's rows, not the shard's
    assert all(w.filename == __file__ for w in record if "no direction" in str(w.message))
    miss = nl.metrics.miss_mse(64, nl.load_meta(tiny_paths["ar_nanonla"]).mse_scale)
    assert result.table.column("mse").to_pylist() == [miss] * N_ROWS
    assert result.summary.fve == pytest.approx(1 - miss / 0.5)


def scored_parsed_miss_and_failed_parse(monkeypatch) -> list[bool]:
    """Rows that cycle through a scored explanation, a parsed one whose reconstruction is zero (scored the miss) and
    a failed parse (the miss too), by input row; returns which rows scored the miss."""
    said = {0: nl.Verbalization("<explanation>the cat</explanation>", "the cat", [1]),
            1: nl.Verbalization("<explanation>nothing</explanation>", "nothing", [1]),
            2: nl.Verbalization("no tags", None, [1])}
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: [
        said[(shard * SHARD_SIZE + i) % 3] for i in range(len(vectors))])
    reconstruct = nl.ActivationReconstructor.reconstruct
    monkeypatch.setattr(nl.ActivationReconstructor, "reconstruct", lambda self, texts, batch_size=64: reconstruct(
        self, texts, batch_size=batch_size) * torch.tensor([[t != "nothing"] for t in texts]))  # "nothing": zero
    return [i % 3 != 0 for i in range(N_ROWS)]


def _greedy_round_trip(tiny_paths, input_file, out) -> sharded.JobResult:
    """The tiny pair's greedy sharded round trip of `input_file` into `out` (baseline 0.5, SHARD_SIZE rows a shard)."""
    return sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file, out,
                                   sampling=GREEDY, baseline=0.5, shard_size=SHARD_SIZE)


def test_a_sharded_round_trips_miss_column_says_which_rows_scored_the_miss(tiny_paths, input_file, tmp_path,
                                                                            monkeypatch):
    """Only the job's warnings named the parsed rows scored as misses: a reader of the output could not filter them
    (their mse reads as a reconstruction that bad). The `miss` column holds `RoundTrip.misses`'s rule. Shards an
    older nla_lens wrote, without it, merged with nulls there; their rows' miss is now told from what they hold (a
    failed parse, an mse of `miss_mse`, or NaN: no direction, before such rows scored the miss)."""
    expected = scored_parsed_miss_and_failed_parse(monkeypatch)
    out = tmp_path / "out.parquet"

    def run() -> sharded.JobResult:
        return _greedy_round_trip(tiny_paths, input_file, out)

    with pytest.warns(UserWarning, match="no direction"):
        reference = run().table
    assert reference.column_names[-2:] == ["mse", "miss"] and reference.column("miss").to_pylist() == expected
    miss = nl.metrics.miss_mse(64, nl.load_meta(tiny_paths["ar_nanonla"]).mse_scale)
    assert [m == pytest.approx(miss) for m in reference.column("mse").to_pylist()] == expected
    assert nl.read_result(out)["miss"].tolist() == expected
    folder = shard_store.shard_folder(out)
    older = shard_store.shard_path(folder, 0)
    pq.write_table(pq.read_table(older).drop_columns(["miss"]), older)
    out.unlink()
    assert run().table.column("miss").to_pylist() == expected
    for shard in sorted(folder.glob("shard-*.parquet"))[1:]:  # shard 0 lacks it already
        pq.write_table(pq.read_table(shard).drop_columns(["miss"]), shard)
    out.unlink()
    result = run()
    assert result.computed == [] and result.table.equals(reference)
    rows = pq.read_table(older)  # row 0 parsed and scored; an older nla_lens scored it NaN had it no direction
    pq.write_table(rows.set_column(rows.column_names.index("mse"), "mse", pa.array(
        [float("nan"), *rows.column("mse").to_pylist()[1:]], pa.float32())), older)
    out.unlink()
    assert expected[0] is False and run().table.column("miss").to_pylist() == [True, *expected[1:]]


def test_a_round_trip_summary_counts_the_rows_scored_the_miss_failed_parses_included(tiny_paths, input_file, tmp_path,
                                                                                      monkeypatch):
    """The summary counted failed parses only: the parsed rows scored the miss (too long for the AR, no direction)
    were in no count of it or its file. Rows of shards an older nla_lens wrote (no miss column) are counted as their
    recomputed miss says: the parsed one scored the miss there was left out."""
    misses = scored_parsed_miss_and_failed_parse(monkeypatch)
    out = tmp_path / "out.parquet"

    def run() -> sharded.JobResult:
        return _greedy_round_trip(tiny_paths, input_file, out)

    with pytest.warns(UserWarning, match="no direction"):
        result = run()
    assert (result.summary.n_misses, result.summary.n_failed_parses) == (misses.count(True), 3) == (6, 3)
    assert "3 failed parses, 6 rows scored the miss (failed parses included), 0 truncated" in repr(result)
    assert json.loads(sharded.summary_path(out).read_text())["n_misses"] == 6
    older = shard_store.shard_path(shard_store.shard_folder(out), 0)  # rows 0-2: scored, zero reconstruction, no tags
    pq.write_table(pq.read_table(older).drop_columns(["miss"]), older)
    out.unlink()
    merged = run()  # from the shards on disk: nothing computed, nothing warned
    assert merged.computed == [] and merged.summary.n_misses == 6  # row 1's miss too, told by its mse


def test_a_sharded_round_trip_refuses_a_max_new_tokens_the_ar_cannot_read_before_any_model_loads(
        tiny_paths, input_file, tmp_path, monkeypatch):
    """RL's rule, as `NLA.round_trip` applies it: the AR's `reconstruct` refused a long explanation mid-shard, after
    the models loaded and the AV had verbalized the shard."""
    ar = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    config = json.loads((ar / "config.json").read_text())
    tokenizer = nl.loading.load_tokenizer(ar)
    prompt = len(nl.sidecar.ar_prompt_ids(nl.load_meta(ar), tokenizer, ""))
    (ar / "config.json").write_text(json.dumps({**config, "max_position_embeddings": prompt + 10}))
    monkeypatch.setattr(nl.ActivationVerbalizer, "_from_folder", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(nl.PromptTooLongError, match=re.escape(f"over the AR's n_ctx={prompt + 10}; set "
                                                              "max_new_tokens <= 10")):
        sharded.round_trip_file(tiny_paths["av_karvonen"], ar, input_file, tmp_path / "out.parquet",
                                sampling=Sampling(max_new_tokens=11), baseline=0.5, shard_size=SHARD_SIZE)
    assert not list(shard_store.shard_folder(tmp_path / "out.parquet").glob("shard-*"))


def test_a_sharded_round_trip_refuses_an_ar_whose_config_gives_no_context_length_before_any_model_loads(
        tiny_paths, input_file, tmp_path, monkeypatch):
    """The AR's context bounds `max_new_tokens` (`check_sample_fits`), read from its config.json: a config of no
    architecture nla_lens loads (a T5's has no max_position_embeddings) raised a bare AttributeError."""
    ar = shutil.copytree(tiny_paths["ar_nanonla"], tmp_path / "ar")
    config = json.loads((ar / "config.json").read_text())
    del config["max_position_embeddings"]
    (ar / "config.json").write_text(json.dumps({**config, "model_type": "t5", "architectures": ["T5Model"]}))
    monkeypatch.setattr(nl.ActivationVerbalizer, "_from_folder", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(nl.CheckpointError, match=re.escape(f"{ar}/config.json (model_type 't5') gives no context "
                                                           "length (max_position_embeddings), so it is no model "
                                                           "nla_lens loads (Qwen3ForCausalLM, ")):
        sharded.round_trip_file(tiny_paths["av_karvonen"], ar, input_file, tmp_path / "out.parquet",
                                sampling=GREEDY, baseline=0.5, shard_size=SHARD_SIZE)


def test_a_sharded_round_trips_warnings_name_the_input_rows_scored_though_their_sample_ran_on(
        tiny_paths, input_file, rows, tmp_path, monkeypatch):
    """As `NLA.round_trip`'s: an explanation that closed its tag in a sample cut at max_new_tokens is scored (the
    paper's parse rule), where RL's reward scores it as a miss. The job's warnings, kept in its output and summary,
    name those rows by the input's numbering."""
    ran_on = nl.Verbalization("<explanation>the cat</explanation> and", "the cat", [1], truncated=True)
    cut = nl.Verbalization("<explanation>the cat and", None, [1], truncated=True)
    healthy = nl.Verbalization("<explanation>the cat</explanation>", "the cat", [1])
    said = [ran_on if i in (1, 7) else cut if i == 4 else healthy for i in range(N_ROWS)]
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: said[shard * SHARD_SIZE:][
        :len(vectors)])
    result = sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file,
                                     tmp_path / "out.parquet", sampling=GREEDY, baseline=0.5, shard_size=SHARD_SIZE)
    ar = nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])
    expected = nl.metrics.mse_per_item(ar.reconstruct(["the cat"]).expand(N_ROWS, -1), rows, ar.meta.mse_scale)
    mse = torch.tensor(result.table.column("mse").to_pylist())
    scored = [i for i in range(N_ROWS) if i != 4]
    assert torch.allclose(mse[scored], expected[scored], atol=1e-5)  # rows 1 and 7 among them
    assert float(mse[4]) == nl.metrics.miss_mse(64, ar.meta.mse_scale)
    said_so = ("2/10 explanations closed their tag but the AV did not end the sample before max_new_tokens (rows "
               "[1, 7]): the round trip scores them")
    assert len(result.warnings) == 1 and result.warnings[0].startswith(said_so)
    assert nl.read_result(result.output).attrs["warnings"] == result.warnings
    assert json.loads(sharded.summary_path(result.output).read_text())["warnings"] == result.warnings


def test_a_round_trip_does_not_replace_another_outputs_summary(tiny_paths, input_file, tmp_path, monkeypatch):
    """out.parquet and out.jsonl share out.summary.json: the second round trip replaced the first one's summary.
    It is refused before any model loads; a rerun of the same output, and an older summary naming none, go on."""
    av, ar, out = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], tmp_path / "out.parquet"
    run = functools.partial(sharded.round_trip_file, av, ar, input_file, sampling=Sampling(max_new_tokens=3),
                            baseline=0.8, shard_size=SHARD_SIZE)
    run(out)
    summary = sharded.summary_path(out)
    written = summary.read_text()
    assert json.loads(written)["output"] == "out.parquet" and run(out).summary is not None  # a rerun of the same
    monkeypatch.setattr(nl.ActivationVerbalizer, "_from_folder", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(nl.InputError, match=r"out.summary.json holds the summary of out.parquet, .*pass an output= "
                                            r"of another stem"):
        run(tmp_path / "out.jsonl")
    assert summary.read_text() == written
    summary.write_text("not json")
    with pytest.raises(nl.InputError, match=r"out.summary.json is not a round-trip summary"):
        run(tmp_path / "out.jsonl")
    monkeypatch.undo()
    summary.write_text(json.dumps({k: v for k, v in json.loads(written).items() if k != "output"}))  # an older one
    assert run(tmp_path / "out.jsonl").summary is not None
    assert json.loads(summary.read_text())["output"] == "out.jsonl"


def test_a_round_trip_merged_only_from_shards_of_an_older_version_has_a_null_truncated_column(
        tiny_paths, input_file, tmp_path):
    """Every shard written before `truncated` existed: the merge has none of the column to promote, and the
    round trip's summary read it (a KeyError); the column is now all null and counts no truncation."""
    out = tmp_path / "out.parquet"

    def run() -> sharded.JobResult:
        return sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file, out,
                                       sampling=GREEDY, baseline=0.8, shard_size=SHARD_SIZE)

    reference = run().table
    for shard in shard_store.shard_folder(out).glob("shard-*.parquet"):
        pq.write_table(pq.read_table(shard).drop_columns(["truncated"]), shard)
    out.unlink()
    result = run()
    assert result.computed == [] and result.table.column_names == reference.column_names
    assert result.table.column("truncated").null_count == N_ROWS and result.summary.n_truncated == 0
    assert result.table.drop_columns(["truncated"]).equals(reference.drop_columns(["truncated"]))


def test_a_damaged_shard_file_is_named_and_recomputed_once_deleted(tiny_paths, input_file, tmp_path):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    reference = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                       progress=False).table
    damaged = shard_store.shard_path(shard_store.shard_folder(out), 1)
    damaged.write_bytes(damaged.read_bytes()[:100])  # renamed into place, its data never reached the disk
    with pytest.raises(nl.ConfigError, match=r"shard-00001\.parquet cannot be read.*Delete it and rerun"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    damaged.unlink()
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1] and result.table.equals(reference)


@pytest.mark.parametrize(("damage", "held"), [
    (lambda shard, other: shutil.copy(other, shard), "input rows 0-2"),  # shard 0's file copied over shard 1's
    (lambda shard, other: pq.write_table(pq.read_table(shard).slice(0, 2), shard), "input rows 3-4"),
    (lambda shard, other: pq.write_table(pq.read_table(shard).drop_columns(["index"]), shard), "no index column"),
], ids=["another_shards_file", "rows_missing", "no_index"])
def test_a_shard_file_holding_other_rows_is_named_not_merged_as_its_rows(tiny_paths, input_file, tmp_path, damage,
                                                                          held):
    """A shard file of other rows merged as its shard's: the output repeated rows 0-2 where rows 3-5 belong (index
    0, 1, 2, 0, 1, 2, 6, ...), or lost a row, without a word."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    reference = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                       progress=False).table
    folder = shard_store.shard_folder(out)
    damage(shard_store.shard_path(folder, 1), shard_store.shard_path(folder, 0))
    out.unlink()
    with pytest.raises(nl.ConfigError, match=rf"shard-00001\.parquet holds {held}, where shard 1 holds input rows "
                                             r"3-5: it is another shard's .*Delete it and rerun"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert not out.exists()
    shard_store.shard_path(folder, 1).unlink()
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1] and result.table.equals(reference)


ANOTHER_JOBS_SHARD = (r"shard-0000{}\.parquet holds rows that another job computed \(vectors_sha256: '\w+' -> "
                      r"'\w+'\): its file copied in from another job's folder, or written by a second job started on "
                      r"the same output\. Delete it and rerun")


def test_a_shard_file_of_another_job_copied_in_is_named_not_merged_as_this_jobs_rows(tiny_paths, input_file, rows,
                                                                                     tmp_path):
    """Shard 1 of a job over other vectors (same row count and shard size, so the same input rows 3-5), copied into
    this job's folder, merged as this job's rows 3-5: their explanations sat beside this input's ids, without a
    word."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    reference = sharded.verbalize_file(av, input_file, tmp_path / "ref.parquet", sampling=GREEDY,
                                       shard_size=SHARD_SIZE, progress=False).table
    other_input = write_parquet(tmp_path / "other.parquet", -rows, doc_id=[f"doc{i // 4}" for i in range(N_ROWS)],
                                position=list(range(N_ROWS)))
    other = tmp_path / "other_out.parquet"
    other_rows = sharded.verbalize_file(av, other_input, other, sampling=GREEDY, shard_size=SHARD_SIZE,
                                        progress=False).table
    assert other_rows.column("text").to_pylist()[3:6] != reference.column("text").to_pylist()[3:6]
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    folder = shard_store.shard_folder(out)
    shutil.copy(shard_store.shard_path(shard_store.shard_folder(other), 1), shard_store.shard_path(folder, 1))
    with pytest.raises(nl.ConfigError, match=ANOTHER_JOBS_SHARD.format(1)):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert not out.exists()
    shard_store.shard_path(folder, 1).unlink()
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1] and result.table.equals(reference)


def test_a_second_job_writing_into_the_same_shards_folder_is_named_at_either_jobs_merge(tiny_paths, input_file, rows,
                                                                                       tmp_path, monkeypatch):
    """Job B (other vectors) started before job A saved its first shard, so neither found a manifest to check; B's
    shard 1 then went in under A's manifest and each job merged the other's rows as its own."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    other_input = write_parquet(tmp_path / "other.parquet", -rows, doc_id=[f"doc{i // 4}" for i in range(N_ROWS)],
                                position=list(range(N_ROWS)))
    save = shard_store.save_shard

    def job_a_saves_first(*args, **kwargs):
        monkeypatch.setattr(shard_store, "save_shard", save)
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0, 2, 3],
                               progress=False)
        save(*args, **kwargs)

    monkeypatch.setattr(shard_store, "save_shard", job_a_saves_first)
    with pytest.raises(nl.ConfigError, match=ANOTHER_JOBS_SHARD.format(0)):  # B's merge
        sharded.verbalize_file(av, other_input, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[1],
                               progress=False)
    with pytest.raises(nl.ConfigError, match=ANOTHER_JOBS_SHARD.format(1)):  # A's rerun
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert not out.exists()


def test_shards_whose_manifest_is_gone_are_refused_not_reused_with_other_settings(tiny_paths, input_file, tmp_path):
    """Without its manifest, a shards folder was read as a new one: its shards, computed with max_new_tokens 8, were
    merged into a rerun with max_new_tokens 4."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    folder = shard_store.shard_folder(out)
    (folder / shard_store.MANIFEST).unlink()
    with pytest.raises(nl.ConfigError, match=r"out\.parquet\.shards holds shards but no manifest\.json, so they cannot "
                                             r"be checked .*Delete .*out\.parquet\.shards and rerun"):
        sharded.verbalize_file(av, input_file, out, sampling=Sampling(max_new_tokens=4), shard_size=SHARD_SIZE,
                               progress=False)
    assert not out.exists()


def test_a_manifest_that_is_no_json_object_is_named_with_the_fix(tiny_paths, input_file, tmp_path):
    """A manifest holding a JSON list failed with a bare AttributeError ('list' object has no attribute 'items')."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    (shard_store.shard_folder(out) / shard_store.MANIFEST).write_text("[]\n")
    with pytest.raises(nl.ConfigError, match=r"manifest\.json cannot be read \(it holds a JSON list, not an object\).*"
                                             r"Delete .*out\.parquet\.shards and rerun"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)


def test_a_damaged_manifest_is_named_with_the_fix(tiny_paths, input_file, tmp_path):
    """A manifest renamed into place before its data reached the disk was json's bare JSONDecodeError."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    (shard_store.shard_folder(out) / shard_store.MANIFEST).write_bytes(b"")
    with pytest.raises(nl.ConfigError, match=r"manifest\.json cannot be read.*Delete .*out\.parquet\.shards and rerun"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)


def test_listed_shards_run_alone_and_the_merge_waits_for_all(tiny_paths, input_file, tmp_path, capsys):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.jsonl"
    assert main(verbalize_args(av, input_file, out, "--shards", "1,3")) == 0
    # How far the job is, that the output is not there yet, and how to finish it.
    said = capsys.readouterr().out
    assert f"2 of 4 shards done (2 by this process), so {out} is not written yet" in said and not out.exists()
    assert "Rerun the same command with --shards 0,2 (the missing ones" in said
    assert main(verbalize_args(av, input_file, out, "--shards", "0,2")) == 0
    assert f"wrote {N_ROWS} rows" in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in lines] == list(range(N_ROWS))
    assert main(verbalize_args(av, input_file, out, "--shards", "4")) == 2
    assert ("--shards [4] names shards that do not exist: this input has shards 0..3"
            in capsys.readouterr().err)  # in flags, as the user typed them (it named neither)


def test_the_outputs_record_the_job_that_produced_them(tiny_paths, input_file, tmp_path):
    """The README says to delete the shards folder once done, and its manifest was the only record of the input,
    checkpoints and settings behind an output: the parquet rows and summary.json said nothing of them."""
    av, ar, out = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], tmp_path / "out.parquet"
    sharded.round_trip_file(av, ar, input_file, out, sampling=GREEDY, baseline=0.5, shard_size=SHARD_SIZE,
                            progress=False)
    manifest = json.loads((shard_store.shard_folder(out) / shard_store.MANIFEST).read_text())
    shutil.rmtree(shard_store.shard_folder(out))
    job = json.loads(pq.read_schema(out).metadata[b"nla_lens_job"])
    assert job == {"nla_lens_version": nl.__version__, **manifest}
    assert job["job"] == "round-trip" and job["av"] == str(av.resolve()) and job["input"] == str(input_file.resolve())
    assert json.loads(sharded.summary_path(out).read_text())["job"] == job
    docs = docs_text.readme_and_guides()
    snippet = next(b.split("```")[0] for b in docs.split("```python\n")[1:] if "nla_lens_job" in b.split("```")[0])
    namespace: dict = {}
    exec(snippet.replace('"explained.parquet"', repr(str(out))), namespace)  # the docs' way to read it back
    assert namespace["job"] == job


def test_an_output_this_job_did_not_write_is_refused_not_overwritten(tiny_paths, input_file, rows, tmp_path,
                                                                   monkeypatch):
    """A file at output= that another job or the user wrote was replaced by the merge, silently. It is refused before
    any shard is computed, and left as it was; this job's own output (its job record, or its shards beside it) is
    still merged again by a rerun."""
    av = tiny_paths["av_karvonen"]
    run = functools.partial(sharded.verbalize_file, av, input_file, shard_size=SHARD_SIZE, progress=False)
    users = {tmp_path / "users.parquet": write_parquet(tmp_path / "users.parquet", rows * 2).read_bytes(),
             tmp_path / "users.jsonl": b'{"note": "my own rows"}\n'}
    for path, held in users.items():
        path.write_bytes(held)
        with pytest.raises(nl.InputError, match=re.escape(
                f"{path} exists, and nothing shows this job wrote it (no job record in it, no shards of this job in "
                f"{shard_store.shard_folder(path)}): this job's merged rows would replace it. Pass another output=, "
                f"or delete {path} to write this job's rows there")):
            run(path, sampling=GREEDY)
        assert path.read_bytes() == held and not shard_store.shard_folder(path).exists()

    out = tmp_path / "out.parquet"
    reference = run(out, sampling=GREEDY).table
    shutil.rmtree(shard_store.shard_folder(out))  # as the README says, once the job is done
    written = out.read_bytes()
    with pytest.raises(nl.InputError, match=re.escape(f"{out} holds the rows of another job (max_new_tokens: 8 -> 4)"
                                                      ": this job's merged rows would replace it")):
        run(out, sampling=Sampling(max_new_tokens=4))
    assert out.read_bytes() == written
    assert run(out, sampling=GREEDY).table.equals(reference)  # the same job, by its record: computed again
    jsonl = tmp_path / "out.jsonl"
    run(jsonl, sampling=GREEDY)
    assert run(jsonl, sampling=GREEDY).computed == []  # merged again from its own shards
    shutil.rmtree(shard_store.shard_folder(jsonl))
    with pytest.raises(nl.InputError, match="nothing shows this job wrote it"):  # a .jsonl keeps no record
        run(jsonl, sampling=GREEDY)


def test_the_readme_imports_sampling_from_where_it_lives_with_the_clis_defaults():
    """The README used `Sampling(...)` without saying where to import it from."""
    from nla_lens.cli import build_parser
    from nla_lens.commands import _sampling

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = next(b.split("```")[0] for b in readme.split("```python\n")[1:] if "Sampling(" in b.split("```")[0])
    namespace: dict = {}
    exec(snippet.split("\nresult = ")[0], namespace)  # the import and the settings, not the job
    cli = _sampling(build_parser().parse_args(["verbalize", "--av", "av", "--input", "v.pt"]))
    assert namespace["sampling"] == Sampling() == cli  # "the CLI's defaults"
    assert namespace["verbalize_file"] is sharded.verbalize_file and namespace["Sampling"] is Sampling


def test_a_rerun_with_other_settings_names_them(tiny_paths, input_file, tmp_path):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0],
                           progress=False)
    with pytest.raises(nl.ConfigError, match=r"max_new_tokens: 8 -> 9.*another output="):
        sharded.verbalize_file(av, input_file, out, sampling=Sampling(max_new_tokens=9), shard_size=SHARD_SIZE,
                               progress=False)
    with pytest.raises(nl.ConfigError, match="shard_size"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=4, progress=False)


@pytest.mark.parametrize(("device", "kind"), [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda"), ("mps", "mps")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_manifest_records_the_device_type_and_off_the_cpu_in_float32_a_greedy_jobs_batch_size(device, kind, dtype):
    """Greedy rows were proven batch-invariant bit for bit on the CPU in float32 only: on a GPU, or in bf16, a resume
    with another batch size or on another device type could merge rows that differ."""
    facts = Sampling(max_new_tokens=8, batch_size=5).facts(torch.device(device), dtype)
    assert facts["device"] == kind
    assert facts.get("batch_size") == (None if (kind, dtype) == ("cpu", torch.float32) else 5)
    assert Sampling(temperature=1.0, batch_size=5).facts(torch.device(device), dtype)["batch_size"] == 5


def test_a_round_trip_in_bf16_records_both_batch_sizes(tiny_paths, input_file, tmp_path):
    """The AR's scores, like the AV's greedy rows, may change with the batch size outside CPU float32: a bf16 job
    resumed with another reconstruct_batch_size would merge scores rounded differently."""
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    manifests = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.parquet"
        sharded.round_trip_file(av, ar, input_file, out, sampling=GREEDY, baseline=0.5, reconstruct_batch_size=7,
                                shard_size=SHARD_SIZE, shards=[0], dtype=dtype, progress=False)
        manifests[dtype] = json.loads((shard_store.shard_folder(out) / shard_store.MANIFEST).read_text())
    assert "batch_size" not in manifests["float32"] and "reconstruct_batch_size" not in manifests["float32"]
    assert manifests["bfloat16"]["batch_size"] == 32 and manifests["bfloat16"]["reconstruct_batch_size"] == 7


def test_a_manifest_of_an_older_version_resumes_on_the_cpu_and_is_refused_on_a_gpu(tiny_paths, input_file, tmp_path):
    """Manifests written before the device was recorded lack the key: those jobs are read as CPU jobs."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    folder = shard_store.shard_folder(out)
    manifest = json.loads((folder / shard_store.MANIFEST).read_text())
    assert manifest["device"] == "cpu" and "batch_size" not in manifest
    del manifest["device"]
    (folder / shard_store.MANIFEST).write_text(json.dumps(manifest))
    on_gpu = {**manifest, **GREEDY.facts(torch.device("cuda"), torch.bfloat16)}
    with pytest.raises(nl.ConfigError, match=r"\(batch_size: not recorded -> 32, device: not recorded \(an older "
                                             r"nla_lens; read as 'cpu'\) -> 'cuda'\)\. Pass another output="):
        shard_store.check_manifest(folder, shard_store.read_manifest(folder), on_gpu)
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1, 2, 3] and result.table.num_rows == N_ROWS


def test_a_greedy_job_resumed_on_the_cpu_names_the_gpu_settings_it_lacks(tmp_path):
    recorded = {"job": "verbalize", **GREEDY.facts(torch.device("cuda:0"), torch.bfloat16)}
    shard_store.save_shard(tmp_path, 0, pa.table({"index": [0]}), recorded)
    with pytest.raises(nl.ConfigError, match=r"\(batch_size: 32 -> not used, device: 'cuda' -> 'cpu'\)"):
        shard_store.check_manifest(tmp_path, shard_store.read_manifest(tmp_path),
                                   {"job": "verbalize", **GREEDY.facts(torch.device("cpu"), torch.float32)})


def test_an_input_whose_carried_columns_changed_is_not_resumed(tiny_paths, rows, tmp_path):
    """Same vectors, same file size, other ids: resuming would merge old ids with new ones."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    path = write_parquet(tmp_path / "in.parquet", rows, doc_id=[f"doc{i}" for i in range(N_ROWS)])
    sharded.verbalize_file(av, path, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    size = path.stat().st_size
    write_parquet(path, rows, doc_id=[f"DOC{i}" for i in range(N_ROWS)])
    assert path.stat().st_size == size
    with pytest.raises(nl.ConfigError, match="columns_sha256"):
        sharded.verbalize_file(av, path, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)


def _written(path: Path) -> tuple[int, int]:
    """A file's inode and modification time: a shard written again (renamed into place) changes both."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_a_moved_input_resumes_its_shards_and_the_output_names_where_it_is_now(tiny_paths, input_file, tmp_path):
    """Rows depend on the input's bytes, not its path: a renamed input was refused as other settings
    (input: ... -> ...), so every shard was computed again."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    reference = sharded.verbalize_file(av, input_file, tmp_path / "ref.parquet", sampling=GREEDY,
                                       shard_size=SHARD_SIZE, progress=False).table
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    manifest = shard_store.shard_folder(out) / shard_store.MANIFEST
    older = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "device"}  # as an older nla_lens wrote
    manifest.write_text(json.dumps(older))
    first_shard = shard_store.shard_path(shard_store.shard_folder(out), 0)
    first_write = _written(first_shard)
    recorded = str(input_file.resolve())
    (tmp_path / "elsewhere").mkdir()
    moved = input_file.rename(tmp_path / "elsewhere" / "renamed.parquet")
    with pytest.warns(UserWarning, match=rf"input found at {re.escape(str(moved.resolve()))}, not at "
                                         rf"{re.escape(recorded)} where .*manifest\.json recorded it \(same vectors "
                                         rf"and columns\): the shards are reused, and from now on the manifest and "
                                         rf"the output's job record name {re.escape(str(moved.resolve()))}$"):
        result = sharded.verbalize_file(av, moved, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1, 2, 3] and _written(first_shard) == first_write
    assert result.table.equals(reference)
    assert json.loads(pq.read_schema(out).metadata[b"nla_lens_job"])["input"] == str(moved.resolve())
    assert json.loads(manifest.read_text()) == older | {"input": str(moved.resolve())}  # only the path changed


def test_a_round_trip_resumed_from_a_renamed_input_warns_in_one_line_and_its_summary_names_the_new_path(
        tiny_paths, input_file, tmp_path, capsys):
    av, ar, out = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], tmp_path / "scores.parquet"

    def round_trip(path: Path, output: Path, *extra: str) -> list[str]:
        return ["round-trip", "--ar", str(ar), *verbalize_args(av, path, output, "--baseline", "0.5", *extra)[1:]]

    assert main(round_trip(input_file, tmp_path / "ref.parquet")) == 0
    assert main(round_trip(input_file, out, "--shards", "0")) == 0
    first_shard = shard_store.shard_path(shard_store.shard_folder(out), 0)
    first_write = _written(first_shard)
    renamed = input_file.rename(input_file.with_name("renamed.parquet"))
    capsys.readouterr()
    assert main(round_trip(renamed, out)) == 0
    said = capsys.readouterr()
    assert "3 of 4 shards computed by this process" in said.out and _written(first_shard) == first_write
    warned = [line for line in said.err.splitlines() if "input found at" in line]
    assert len(warned) == 1 and warned[0].startswith("nla-lens round-trip: warning: input found at ")
    assert warned[0].endswith(f"the output's job record name {renamed.resolve()}")
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "ref.parquet"))
    assert json.loads(sharded.summary_path(out).read_text())["job"]["input"] == str(renamed.resolve())


def test_a_moved_input_warns_once_the_rerun_from_its_new_place_resumes_silently(tiny_paths, input_file, tmp_path):
    """The manifest kept the first path, so every later rerun from the new one warned again that the input moved."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    moved = input_file.rename(tmp_path / "renamed.parquet")
    with pytest.warns(UserWarning, match="input found at"):
        sharded.verbalize_file(av, moved, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[1], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = sharded.verbalize_file(av, moved, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [2, 3] and result.table.num_rows == N_ROWS


@pytest.mark.parametrize("role", ["av", "ar"])
def test_a_moved_checkpoint_with_the_same_files_resumes_with_one_warning(tiny_paths, input_file, tmp_path, role):
    """A checkpoint folder moved or renamed, its files unchanged (same fingerprint), was refused as other settings
    (av: ... -> ...), so every shard was computed again; a moved input resumed."""
    folders = {"av": tmp_path / "av", "ar": tmp_path / "ar"}
    shutil.copytree(tiny_paths["av_karvonen"], folders["av"])
    shutil.copytree(tiny_paths["ar_nanonla"], folders["ar"])
    out = tmp_path / "out.parquet"

    def round_trip(shards: list[int] | None = None) -> sharded.JobResult:
        return sharded.round_trip_file(folders["av"], folders["ar"], input_file, out, sampling=GREEDY, baseline=0.5,
                                       shard_size=SHARD_SIZE, shards=shards, progress=False)

    round_trip([0])
    first_write = _written(shard_store.shard_path(shard_store.shard_folder(out), 0))
    recorded = str(folders[role].resolve())
    folders[role] = folders[role].rename(tmp_path / f"moved_{role}")
    with pytest.warns(UserWarning) as caught:
        result = round_trip()
    moved = [str(w.message) for w in caught if "found at" in str(w.message)]
    assert moved == [f"{role.upper()} found at {folders[role].resolve()}, not at {recorded} where "
                     f"{shard_store.shard_folder(out) / shard_store.MANIFEST} recorded it (same fingerprint of its "
                     "files): the shards are reused, and from now on the manifest and the output's job record name "
                     f"{folders[role].resolve()}"]
    assert result.computed == [1, 2, 3] and _written(shard_store.shard_path(shard_store.shard_folder(out), 0)) == (
        first_write)
    assert json.loads(pq.read_schema(out).metadata[b"nla_lens_job"])[role] == str(folders[role].resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert round_trip().computed == []  # the manifest names the new folder: no second warning


def test_an_input_with_other_bytes_is_refused_under_a_new_name_as_under_its_own(tiny_paths, input_file, rows,
                                                                                 tmp_path):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    first_shard = shard_store.shard_path(shard_store.shard_folder(out), 0)
    first_write = _written(first_shard)
    columns = {"doc_id": [f"doc{i // 4}" for i in range(N_ROWS)], "position": list(range(N_ROWS))}
    other = write_parquet(tmp_path / "other.parquet", rows.flip(0), **columns)  # same size, rows in another order
    assert other.stat().st_size == input_file.stat().st_size
    with pytest.raises(nl.ConfigError, match=r"input: .*in\.parquet' -> .*other\.parquet', .*vectors_sha256"):
        sharded.verbalize_file(av, other, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    other.replace(input_file)
    with pytest.raises(nl.ConfigError, match=r"\(vectors_sha256: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert _written(first_shard) == first_write


def test_an_input_written_again_with_the_same_rows_resumes_whatever_its_size(tiny_paths, input_file, tmp_path):
    """The size of the same vectors and columns depends on how they were written (here the compression): it was
    compared, and refused the resume as "other settings"."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    size = input_file.stat().st_size
    pq.write_table(pq.read_table(input_file), input_file, compression="zstd")
    assert input_file.stat().st_size != size
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1, 2, 3]
    job = json.loads(result.table.schema.metadata[sharded.JOB_KEY.encode()])
    assert job["input_bytes"] == input_file.stat().st_size  # the job record describes the input as it is now


def test_a_checkpoint_exported_again_into_the_same_folder_is_not_resumed(tiny_paths, input_file, tmp_path):
    av, out = tmp_path / "av", tmp_path / "out.parquet"
    shutil.copytree(tiny_paths["av_karvonen"], av)
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], progress=False)
    shutil.rmtree(av)
    shutil.copytree(tiny_paths["av_embedding"], av)  # another AV of the same shape, same folder name
    with pytest.raises(nl.ConfigError, match="av_fingerprint"):
        sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    shutil.rmtree(av)
    shutil.copytree(tiny_paths["av_karvonen"], av, copy_function=shutil.copyfile)  # the same files, new times
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1, 2, 3]


def test_a_dtype_resumes_whatever_its_spelling(tiny_paths, input_file, tmp_path):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0], dtype="bf16",
                           progress=False)
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                    dtype=torch.bfloat16, progress=False)
    assert result.computed == [1, 2, 3] and result.table.num_rows == N_ROWS


def test_a_checkpoint_resumes_whatever_its_path_spelling(tiny_paths, input_file, tmp_path, monkeypatch):
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av.resolve(), input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, shards=[0],
                           progress=False)
    monkeypatch.chdir(av.parent)
    result = sharded.verbalize_file(av.name, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=False)
    assert result.computed == [1, 2, 3] and result.table.num_rows == N_ROWS


def test_sampled_rows_do_not_depend_on_which_process_ran_the_shard(tiny_paths, input_file, tmp_path):
    av, sampling = tiny_paths["av_karvonen"], Sampling(max_new_tokens=8, temperature=1.0, seed=3)
    whole = sharded.verbalize_file(av, input_file, tmp_path / "a.parquet", sampling=sampling,
                                   shard_size=SHARD_SIZE, progress=False).table
    for shards in ([3, 1], [0, 2]):
        split = sharded.verbalize_file(av, input_file, tmp_path / "b.parquet", sampling=sampling,
                                       shard_size=SHARD_SIZE, shards=shards, progress=False).table
    assert split.equals(whole)
    assert whole.column("text").to_pylist() != sharded.verbalize_file(
        av, input_file, tmp_path / "c.parquet", sampling=GREEDY, shard_size=SHARD_SIZE,
        progress=False).table.column("text").to_pylist()


def test_sampling_settings_as_numpy_or_tensor_numbers_reach_the_manifest_as_floats(tiny_paths, input_file, tmp_path):
    """Sampling accepts any real number, but a numpy float32 (or tensor) temperature reached the job manifest
    as is: json.dumps raised "Object of type float32 is not JSON serializable"."""
    av = tiny_paths["av_karvonen"]
    plain = sharded.verbalize_file(av, input_file, tmp_path / "a.parquet", progress=False,
                                   sampling=Sampling(max_new_tokens=8, temperature=1.0, top_p=0.5, seed=3))
    typed = sharded.verbalize_file(av, input_file, tmp_path / "b.parquet", progress=False,
                                   sampling=Sampling(max_new_tokens=8, temperature=np.float32(1.0),
                                                     top_p=torch.tensor(0.5), seed=np.int64(3)))
    assert typed.table.equals(plain.table)
    manifest = json.loads((shard_store.shard_folder(tmp_path / "b.parquet") / shard_store.MANIFEST).read_text())
    assert (manifest["temperature"], manifest["top_p"], manifest["seed"]) == (1.0, 0.5, 3)


def test_numpy_integer_counts_run_a_file_job_and_reach_the_manifest_as_ints(tiny_paths, input_file, tmp_path):
    """Sampling took a NumPy seed but refused max_new_tokens / batch_size, and shard_size was refused too, as not
    whole numbers; taken as they are, they would reach the manifest, whose json.dumps cannot write them."""
    av = tiny_paths["av_karvonen"]
    plain = sharded.verbalize_file(av, input_file, tmp_path / "a.parquet", progress=False, shard_size=2,
                                   sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=3, batch_size=2))
    typed = sharded.verbalize_file(av, input_file, tmp_path / "b.parquet", progress=False, shard_size=np.int64(2),
                                   sampling=Sampling(max_new_tokens=np.int64(8), temperature=1.0, seed=3,
                                                     batch_size=np.int32(2)))
    assert typed.table.equals(plain.table)
    manifest = json.loads((shard_store.shard_folder(tmp_path / "b.parquet") / shard_store.MANIFEST).read_text())
    assert (manifest["shard_size"], manifest["max_new_tokens"], manifest["batch_size"]) == (2, 8, 2)


def test_sampling_keeps_numpy_and_tensor_settings_as_python_numbers_in_its_repr_and_equality():
    """`check_sampling` took NumPy and tensor settings, but Sampling kept them as given: its repr read
    `max_new_tokens=np.int64(5)`, and two equal ones with tensor top_ps hashed apart (a tensor hashes by id)."""
    typed = Sampling(max_new_tokens=np.int64(5), temperature=np.float32(0.5), top_p=torch.tensor(0.25),
                     seed=np.int32(3), batch_size=np.uint8(4))
    assert repr(typed) == "Sampling(max_new_tokens=5, temperature=0.5, top_p=0.25, seed=3, batch_size=4)"
    assert typed == Sampling(max_new_tokens=5, temperature=0.5, top_p=0.25, seed=3, batch_size=4)
    assert [type(getattr(typed, name)) for name in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size")
            ] == [int, float, float, int, int]
    assert hash(Sampling(top_p=torch.tensor(0.25))) == hash(Sampling(top_p=torch.tensor(0.25)))


@pytest.mark.parametrize("seed", [1.5, "3", True])
def test_a_seed_that_is_not_a_whole_number_is_refused(seed):
    with pytest.raises(nl.InputError, match=rf"seed={seed!r} must be a whole number"):
        Sampling(temperature=1.0, seed=seed)


def test_the_vector_column_is_found_or_must_be_named(tiny_paths, rows, tmp_path):
    av = tiny_paths["av_karvonen"]
    path = write_parquet(tmp_path / "two.parquet", rows, other=rows.double().tolist(), tag=["x"] * N_ROWS)
    with pytest.raises(nl.InputError, match=r"several: \['other', 'vector'\].*--column"):
        sharded.verbalize_file(av, path, tmp_path / "o.parquet", sampling=GREEDY, progress=False)
    with pytest.warns(UserWarning, match=r"columns \['other'\] are lists or structs and are not copied"):
        table = sharded.verbalize_file(av, path, tmp_path / "o.parquet", sampling=GREEDY, column="vector",
                                       progress=False).table
    assert table.column_names == ["index", "tag", "explanation", "text", "truncated"]  # list columns are not carried
    pq.write_table(pa.table({"vector": [[1.0] * 64, [1.0] * 63]}), tmp_path / "ragged.parquet")
    with pytest.raises(nl.InputError, match=r"lengths \[63, 64\]"):
        sharded.verbalize_file(av, tmp_path / "ragged.parquet", tmp_path / "o.parquet", progress=False)
    pq.write_table(pa.table({"vector": pa.array([], pa.list_(pa.float32()))}), tmp_path / "empty.parquet")
    with pytest.raises(nl.InputError, match="'vector' has no rows"):  # was "shape [n, 64], got (0, 0)"
        sharded.verbalize_file(av, tmp_path / "empty.parquet", tmp_path / "o.parquet", progress=False)


def test_a_vector_column_of_integers_is_named_with_the_fix_in_the_file(tiny_paths, tmp_path):
    """It read "found none; name it with --column", and --column then refused the column as not floats."""
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "vector": pa.array([[1] * 64, [2] * 64], pa.list_(pa.int64()))}), path)
    with pytest.raises(nl.InputError, match=r"lists of other values: 'vector' \(list<.*int64>\); write the vectors "
                                            r"as floats"):
        sharded.verbalize_file(tiny_paths["av_karvonen"], path, tmp_path / "o.parquet", progress=False)


def test_null_values_inside_a_parquet_vector_are_named_as_nulls_not_as_nan(tiny_paths, rows, tmp_path):
    """A null inside a row read as NaN: "vectors at rows [1] hold NaN or Inf", where the file holds no NaN."""
    values = rows[:3].tolist()
    values[1][5] = None
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"vector": pa.array(values, pa.list_(pa.float32()))}).slice(1), path)
    with pytest.raises(nl.InputError, match=r"column 'vector' holds null values inside rows \[0\]; fill or drop them"):
        sharded.verbalize_file(tiny_paths["av_karvonen"], path, tmp_path / "o.parquet", progress=False)


@pytest.mark.parametrize("name", ["truncated", "miss"])
def test_an_input_column_named_as_an_output_column_is_refused_not_replaced(tiny_paths, rows, tmp_path, name):
    """An input's own `truncated` column was silently replaced by the AV's, as `index` or `text` would have been,
    and a round trip's `miss` is one of them."""
    path = write_parquet(tmp_path / "in.parquet", rows, **{name: [True] * N_ROWS})
    with pytest.raises(nl.InputError, match=rf"columns \['{name}'\], which the output writes itself"):
        sharded.verbalize_file(tiny_paths["av_karvonen"], path, tmp_path / "o.parquet", sampling=GREEDY,
                               progress=False)


@pytest.mark.parametrize(("keywords", "match"), [
    ({"sampling": {"temperature": 0.0}}, r"sampling= takes an nla_lens.sharded.Sampling, got dict"),
    ({"sampling": None}, r"sampling= takes an nla_lens.sharded.Sampling, got NoneType"),
    ({"shards": 0}, r"shards=0 must be a list of shard ids"),
    ({"shards": ["0"]}, r"shards=\['0'\] must be a list of shard ids"),
    ({"input_path": torch.zeros(2, 64)}, r"input_path takes a file path \(a str or pathlib.Path\), got Tensor"),
    ({"output": None}, r"output takes a file path \(a str or pathlib.Path\), got NoneType"),
], ids=["sampling_dict", "sampling_none", "shards_int", "shards_str", "input_tensor", "output_none"])
def test_a_file_jobs_arguments_of_the_wrong_type_are_named(tiny_paths, input_file, tmp_path, keywords, match):
    """They failed with a bare AttributeError or TypeError, the shards only after the input was read and hashed."""
    arguments = {"input_path": input_file, "output": tmp_path / "o.parquet", **keywords}
    with pytest.raises(nl.InputError, match=match):
        sharded.verbalize_file(tiny_paths["av_karvonen"], progress=False, **arguments)
    with pytest.raises(nl.InputError, match=match):
        sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], baseline=0.5, progress=False,
                                **arguments)


def test_shards_given_as_a_generator_or_numpy_or_tensor_ids_are_computed(tiny_paths, input_file, tmp_path):
    """The check of `shards` read a generator to its end, so the job then computed no shard at all."""
    out = tmp_path / "o.parquet"
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                    shards=(i for i in [0, 2]), progress=False)
    assert result.computed == [0, 2]
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                    shards=np.array([1]), progress=False)
    assert result.computed == [1]
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE,
                                    shards=torch.tensor([3]), progress=False)
    assert result.computed == [3] and out.exists()


def test_an_av_and_ar_the_other_way_round_are_refused_before_the_input_is_read(tiny_paths, input_file, tmp_path):
    """Refused only at the first shard's load, after the AV's sidecar had been read for the AR's baseline (a warning of
    no FVE), and in terms of from_pretrained."""
    av, ar, out = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], tmp_path / "o.parquet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(nl.InputError, match=r"av=.* is an AR \(activation reconstructor\) checkpoint: pass it as "
                                                r"ar=, and give av= the AV \(activation verbalizer\) trained with it"):
            sharded.round_trip_file(ar, av, input_file, out, sampling=GREEDY, progress=False)
        with pytest.raises(nl.InputError, match=r"av=.* is an AR \(activation reconstructor\) checkpoint: pass it as "
                                                r"ar="):
            sharded.verbalize_file(ar, input_file, out, sampling=GREEDY, progress=False)
    assert not shard_store.shard_folder(out).exists()


def test_an_output_on_the_input_file_is_refused_before_it_replaces_the_vectors(tiny_paths, input_file, capsys):
    before = input_file.read_bytes()
    with pytest.raises(nl.InputError, match="is the input file"):
        sharded.verbalize_file(tiny_paths["av_karvonen"], input_file, input_file.parent / "." / input_file.name,
                               sampling=GREEDY, progress=False)
    assert main(["round-trip", "--av", str(tiny_paths["av_karvonen"]), "--ar", str(tiny_paths["ar_nanonla"]),
                 "--input", str(input_file), "--output", str(input_file), "--baseline", "0.5"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert input_file.read_bytes() == before and not shard_store.shard_folder(input_file).exists()


@pytest.mark.parametrize("case", ["shard_size", "output_is_input", "shards_folder_is_a_file", "other_settings",
                                  "another_outputs_summary", "a_file_of_the_users"])
def test_a_file_jobs_messages_name_the_keyword_in_python_and_the_flag_in_the_cli(tiny_paths, input_file, tmp_path,
                                                                                 capsys, case):
    """They named --shard-size and --output, flags a caller of round_trip_file / verbalize_file (README) never typed:
    the library names its keywords, which the CLI writes as its flags, as it does the other library messages."""
    av, ar, out = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], tmp_path / "out.parquet"
    keywords, flags = {"shard_size": SHARD_SIZE}, ["--shard-size", str(SHARD_SIZE)]
    if case == "shard_size":
        keywords, flags = {"shard_size": 0}, ["--shard-size", "0"]
        python, shell = "shard_size=0: must be a whole number >= 1", "--shard-size 0: must be a whole number >= 1"
    elif case == "output_is_input":
        out = input_file
        python, shell = (f"output={out} is the input file: the rows written there would replace its vectors; pass "
                         "another output=", f"--output {out} is the input file: the rows written there would replace "
                                            "its vectors; pass another --output")
    elif case == "shards_folder_is_a_file":
        shard_store.shard_folder(out).write_text("notes")
        python, shell = "move the file or pass another output=", "move the file or pass another --output"
    elif case == "other_settings":
        sharded.round_trip_file(av, ar, input_file, out, sampling=Sampling(max_new_tokens=2), baseline=0.5,
                                shard_size=SHARD_SIZE, shards=[0])
        python, shell = "Pass another output=, or delete", "Pass another --output, or delete"
    elif case == "a_file_of_the_users":
        write_parquet(out, torch.zeros(2, 64))
        python, shell = "Pass another output=, or delete", "Pass another --output, or delete"
    else:
        sharded.summary_path(out).write_text(json.dumps({"output": "out.jsonl"}))
        python, shell = "pass an output= of another stem", "pass an --output of another stem"
    with pytest.raises(nl.NLAError, match=re.escape(python)):
        sharded.round_trip_file(av, ar, input_file, out, sampling=Sampling(max_new_tokens=3), baseline=0.5, **keywords)
    capsys.readouterr()
    assert main(["round-trip", "--av", str(av), "--ar", str(ar), "--input", str(input_file), "--output", str(out),
                 "--baseline", "0.5", "--max-new-tokens", "3", *flags]) == 2
    assert shell in capsys.readouterr().err


def test_a_pt_file_saved_from_a_gpu_or_with_grad_is_read_as_its_values(tiny_paths, rows, tmp_path, monkeypatch):
    """torch.save of captured activations records their device and grad; the job needs CPU values."""
    torch.save(rows.clone().requires_grad_(True) * 1.0, tmp_path / "grad.pt")
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as saved on a GPU
    torch.save(rows, tmp_path / "gpu.pt")
    monkeypatch.undo()
    for name in ("grad", "gpu"):
        assert torch.equal(read_vectors(tmp_path / f"{name}.pt"), rows)
        result = sharded.verbalize_file(tiny_paths["av_karvonen"], tmp_path / f"{name}.pt",
                                        tmp_path / f"{name}.parquet", sampling=GREEDY, progress=False)
        assert result.table.num_rows == N_ROWS


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".pt":
        torch.save(tensors, path)
    else:
        save_file(tensors, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_vector_file_of_several_tensors_reads_the_one_named_vectors_or_the_only_one_in_either_format(
        rows, tmp_path, suffix):
    """One rule for both formats: a .pt dict was refused whatever it held, where .safetensors picked `vectors`."""
    _save_tensors({"vectors": rows, "layer": torch.tensor(3)}, tmp_path / f"named{suffix}")
    _save_tensors({"activations": rows}, tmp_path / f"only{suffix}")
    assert torch.equal(read_vectors(tmp_path / f"named{suffix}"), rows)
    assert torch.equal(read_vectors(tmp_path / f"only{suffix}"), rows)
    _save_tensors({"resid": rows, "layer": torch.tensor(3)}, tmp_path / f"two{suffix}")
    with pytest.raises(nl.InputError, match=r"holds \['layer', 'resid'\]: which is the \[n, d_model\] vectors\? "
                                            r"Name that tensor 'vectors'"):
        read_vectors(tmp_path / f"two{suffix}")


def test_a_pt_file_of_a_list_says_how_to_save_the_vectors(rows, tmp_path):
    torch.save([rows], tmp_path / "list.pt")
    with pytest.raises(nl.InputError, match=r"must hold a \[n, d_model\] tensor, got list; save the bare tensor "
                                            r"\(torch.save\(vectors, path\)\)"):
        read_vectors(tmp_path / "list.pt")


@pytest.mark.parametrize("saved", ["array", "dict_of_array"])
def test_a_pt_file_of_a_numpy_array_says_so_and_how_to_save_a_tensor(rows, tmp_path, saved):
    """torch.load(weights_only=True) refuses NumPy's pickled array: the file was called "corrupt or of another
    format", which torch.save wrote it in."""
    array = rows.numpy()
    torch.save(array if saved == "array" else {"vectors": array}, tmp_path / "v.pt")
    with pytest.raises(nl.InputError, match=r"v\.pt holds a NumPy array, not a torch tensor: nla_lens reads a \.pt "
                                            r"file with torch\.load\(weights_only=True\), so that no pickled code "
                                            r"runs, which refuses the pickled numpy\..*Save the array as a tensor, "
                                            r"torch\.save\(torch\.from_numpy\(array\), path\), or as safetensors"):
        read_vectors(tmp_path / "v.pt")
    torch.save(torch.from_numpy(array), tmp_path / "v.pt")  # the fix the message gives
    assert torch.equal(read_vectors(tmp_path / "v.pt"), rows)
    (tmp_path / "v.pt").write_bytes(b"not a torch file")
    with pytest.raises(nl.InputError, match=r"cannot be read as a \.pt file of vectors; is it corrupt"):
        read_vectors(tmp_path / "v.pt")


def test_a_pt_file_pickling_another_python_object_names_it(rows, tmp_path):
    """Any object a weights-only load refuses was "corrupt or of another format" too."""
    torch.save({"vectors": rows, "ratio": fractions.Fraction(1, 3)}, tmp_path / "v.pt")
    with pytest.raises(nl.InputError, match=r"v\.pt holds Python objects besides tensors: .*weights_only=True.*which "
                                            r"refuses the pickled fractions\.Fraction\. Save the vectors as a bare "
                                            r"tensor"):
        read_vectors(tmp_path / "v.pt")


@pytest.mark.parametrize("peak", [1e39, 1e-46], ids=["overflow", "underflow"])
def test_float64_vectors_past_float32s_range_are_refused_by_input_row_before_any_shard(tiny_paths, rows, tmp_path,
                                                                                       peak):
    """The job's .float() made them inf (or zero rows), which a shard then refused as "vectors at rows [1] hold NaN or
    Inf" (row 4 of the file, counted from its shard) or "are zero"; the AV needs only their direction."""
    vectors = rows.double()
    vectors[4] = vectors[4] / vectors[4].abs().max() * peak
    save_file({"vectors": vectors}, tmp_path / "v.safetensors")
    out = tmp_path / "o.parquet"
    with pytest.raises(nl.VectorError, match=re.escape(
            f"vectors at rows [4] are float64 past float32's range, in which nla_lens computes them: row 4's largest "
            f"entry is {peak:.3g} in magnitude, where float32 holds 1.18e-38 to 3.4e+38, so the row would become "
            "inf, zero or a few coarse steps. Rescale such rows into that range (e.g. "
            "v / v.abs().amax(dim=1, keepdim=True)")):
        sharded.verbalize_file(tiny_paths["av_karvonen"], tmp_path / "v.safetensors", out, sampling=GREEDY,
                               shard_size=SHARD_SIZE, progress=False)
    assert not shard_store.shard_folder(out).exists()
    vectors[4] = vectors[4] / vectors[4].abs().max()  # the rescale the message gives
    save_file({"vectors": vectors}, tmp_path / "v.safetensors")
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], tmp_path / "v.safetensors", out, sampling=GREEDY,
                                    shard_size=SHARD_SIZE, progress=False)
    assert result.table.num_rows == N_ROWS


@pytest.mark.parametrize(("vectors", "error", "match"), [
    (torch.randn(3, 32), nl.VectorError, r"shape \[n, 64\]"),
    (torch.tensor([[float("nan")] * 64, [1.0] * 64]), nl.VectorError, "NaN"),
])
def test_bad_vectors_are_refused_before_any_work(tiny_paths, tmp_path, vectors, error, match):
    path = tmp_path / "v.safetensors"
    save_file({"vectors": vectors}, path)
    with pytest.raises(error, match=match):
        sharded.verbalize_file(tiny_paths["av_karvonen"], path, tmp_path / "o.parquet", progress=False)
    assert not shard_store.shard_folder(tmp_path / "o.parquet").exists()


@pytest.mark.parametrize(("suffix", "vectors", "match"), [
    (".safetensors", torch.randn(3, 64).to(torch.float8_e4m3fn), r"vectors are torch\.float8_e4m3fn, .*\.float\(\)"),
    (".pt", torch.randn(3, 64).to_sparse(), r"must be a dense tensor, got a torch\.sparse_coo one; call \.to_dense"),
], ids=["float8", "sparse"])
def test_a_vector_file_torch_cannot_check_is_named_with_the_fix(tiny_paths, tmp_path, suffix, vectors, match):
    """float8 vectors (safetensors stores them) and a sparse tensor (.pt) failed with torch's NotImplementedError
    ('"isfinite" not implemented for 'Float8_e4m3fn'')."""
    path = tmp_path / f"v{suffix}"
    if suffix == ".safetensors":
        save_file({"vectors": vectors}, path)
    else:
        torch.save(vectors, path)
    with pytest.raises(nl.VectorError, match=match):
        sharded.verbalize_file(tiny_paths["av_karvonen"], path, tmp_path / "o.parquet", progress=False)


def test_round_trip_of_too_few_vectors_has_no_fve_and_refuses_a_bad_output(tiny_paths, rows, tmp_path):
    av, ar = tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"]
    one = tmp_path / "one.safetensors"
    save_file({"vectors": rows[:1]}, one)
    with pytest.warns(UserWarning, match="no FVE"):  # said before the job starts, and again in its result
        result = sharded.round_trip_file(av, ar, one, tmp_path / "o.parquet", sampling=Sampling(max_new_tokens=4),
                                         progress=False)
    assert result.summary.fve is None and result.summary.baseline_source == "none"
    assert any("pass baseline=" in w.lower() for w in result.warnings)
    with pytest.raises(nl.InputError, match=r"\.parquet or \.jsonl"):
        sharded.round_trip_file(av, ar, one, tmp_path / "o.csv", baseline=0.5, progress=False)


def test_a_jobs_output_and_summary_keep_its_warnings(tiny_paths, rows, tmp_path, monkeypatch):
    """A job's warnings (a failed injection, no FVE) were printed and kept on the JobResult only: a reader of the
    output or its summary.json could not tell that the injection failed."""
    echoed = [nl.Verbalization("中文中文中文中文", None, [1])]
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: echoed * len(vectors))
    one = tmp_path / "one.safetensors"
    save_file({"vectors": rows[:1]}, one)
    with pytest.warns(UserWarning, match="no FVE"):
        result = sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], one,
                                         tmp_path / "o.parquet", progress=False)
    assert len(result.warnings) == 2 and "injection probably failed" in result.warnings[0]
    assert result.warnings[1].startswith("no FVE")
    assert nl.read_result(result.output).attrs["warnings"] == result.warnings
    assert json.loads(sharded.summary_path(result.output).read_text())["warnings"] == result.warnings
    healthy = [nl.Verbalization("<explanation>the cat</explanation>", "the cat", [1])]
    monkeypatch.setattr(Sampling, "verbalize", lambda self, av, vectors, shard: healthy * len(vectors))
    done = sharded.verbalize_file(tiny_paths["av_karvonen"], one, tmp_path / "v.parquet", progress=False)
    assert done.warnings == [] and nl.read_result(done.output).attrs["warnings"] == []
    two = tmp_path / "two.safetensors"
    save_file({"vectors": rows[:2]}, two)
    with pytest.warns(UserWarning, match="no FVE"):  # one shard of two: not merged, the no FVE kept all the same
        unmerged = sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], two,
                                           tmp_path / "u.parquet", shard_size=1, shards=[0], progress=False)
    assert unmerged.missing == [1] and [w[:6] for w in unmerged.warnings] == ["no FVE"]


def test_a_job_result_prints_short_with_its_outcome_not_its_table():
    """The generated repr printed the merged table's arrow preview (ten long AV completions per column) and
    every shard id: thousands of characters for an ordinary job."""
    table = pa.table({"index": list(range(1000)), "explanation": ["w" * 500] * 1000, "text": ["t" * 500] * 1000})
    summary = sharded.RoundTripSummary(1000, 0.41, 0.47, 0.78, "sidecar (held-out)", 3, 4, 2, 8.0)
    done = sharded.JobResult(Path("out.parquet"), 2000, list(range(2000)), [], table, summary, ["a warning"])
    text = repr(done)
    assert text == ("JobResult: wrote 1000 rows to out.parquet (2000 of 2000 shards computed here); mean MSE 0.410, "
                    "FVE 0.470 (baseline 0.780, sidecar (held-out)), 3 failed parses, 4 rows scored the miss "
                    "(failed parses included), 2 truncated; "
                    "1 warning (.warnings)")
    unfinished = repr(sharded.JobResult(Path("out.parquet"), 2000, [0], list(range(1, 2000))))
    assert unfinished.startswith("JobResult: 1999 of 2000 shards not finished (1, 2, 3, 4, 5, 6, 7, 8, ...)")
    assert len(unfinished) < 300 and "nothing merged into out.parquet" in unfinished


@pytest.mark.parametrize("where", ["a_file_of_its_name", "proc", "a_symlink_loop"])
def test_a_shards_folder_that_cannot_be_made_is_refused_before_any_model_loads(tiny_paths, input_file, tmp_path,
                                                                                monkeypatch, where):
    """It ended at the first shard's write, after the model loaded, in a bare [Errno 17] or [Errno 2] (a symlink
    that leads round a loop: [Errno 17], exists() and is_dir() calling it absent)."""
    monkeypatch.setattr(nl.ActivationVerbalizer, "_from_folder", lambda *a, **k: pytest.fail("a model loaded"))
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc, a folder no file can be created in")
        output, match = Path("/proc/o.parquet"), "output /proc/o.parquet: no file can be created in /proc"
    elif where == "a_symlink_loop":
        output = tmp_path / "o.parquet"
        shard_store.shard_folder(output).symlink_to(shard_store.shard_folder(output).name, target_is_directory=True)
        match = (f"shards folder {shard_store.shard_folder(output)} is a symlink that leads round a loop of links, so "
                 "there is no folder there to write into: point it at a folder, or remove it")
    else:
        output = tmp_path / "o.parquet"
        shard_store.shard_folder(output).write_text("notes")
        match = f"{shard_store.shard_folder(output)} is a file, where the job keeps its shards in a folder"
    with pytest.raises(nl.InputError, match=re.escape(match)):
        sharded.verbalize_file(tiny_paths["av_karvonen"], input_file, output, sampling=GREEDY, progress=False)


def test_vector_files_are_read_and_written_by_their_suffix_in_any_case(tiny_paths, rows, tmp_path):
    """`v.PT`, `v.SAFETENSORS` and `in.PARQUET` were refused as files of no known kind."""
    for name in ("v.PT", "v.SAFETENSORS"):
        write_vectors(rows, tmp_path / name)
        assert torch.equal(read_vectors(tmp_path / name), rows)
    upper = write_parquet(tmp_path / "in.PARQUET", rows, doc_id=[str(i) for i in range(N_ROWS)])
    table = read_input(upper)
    assert torch.equal(table.vectors, rows) and table.columns.column_names == ["doc_id"]
    result = sharded.verbalize_file(tiny_paths["av_karvonen"], tmp_path / "v.SAFETENSORS", tmp_path / "out.JSONL",
                                    sampling=GREEDY, shard_size=N_ROWS, progress=False)
    assert len((tmp_path / "out.JSONL").read_text(encoding="utf-8").splitlines()) == result.table.num_rows == N_ROWS


def test_a_round_trip_rerun_with_another_baseline_recomputes_no_shard(tiny_paths, input_file, tmp_path):
    """The baseline was in the manifest: a rerun with another --baseline was refused as other settings, and after
    deleting the folder every shard was recomputed, though it only rescales the summary's FVE."""
    out = tmp_path / "out.parquet"

    def run(baseline: float) -> sharded.JobResult:
        return sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file, out,
                                       sampling=GREEDY, baseline=baseline, shard_size=SHARD_SIZE, progress=False)

    first = run(0.5)
    second = run(0.8)
    assert second.computed == [] and second.table.equals(first.table)
    assert second.summary.baseline == 0.8 and second.summary.baseline_source == "given"
    assert second.summary.fve == pytest.approx(1 - first.summary.mean_mse / 0.8, abs=1e-6)
    assert json.loads(sharded.summary_path(out).read_text())["baseline"] == 0.8
    # A manifest an older nla_lens wrote recorded the given baseline: its shards are reused too.
    manifest = shard_store.shard_folder(out) / shard_store.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "baseline": 0.5}))
    assert run(0.8).computed == []
    with pytest.raises(nl.ConfigError, match="shard_size"):  # settings the rows depend on are still checked
        sharded.round_trip_file(tiny_paths["av_karvonen"], tiny_paths["ar_nanonla"], input_file, out,
                                sampling=GREEDY, baseline=0.8, shard_size=4, progress=False)


def test_a_rerun_with_every_shard_on_disk_draws_no_progress_bar(tiny_paths, input_file, tmp_path, capsys):
    """The first run shows its shards' bar; a rerun with nothing left to compute printed an empty one."""
    av, out = tiny_paths["av_karvonen"], tmp_path / "out.parquet"
    sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=True)
    assert "verbalize: 100%" in capsys.readouterr().err
    result = sharded.verbalize_file(av, input_file, out, sampling=GREEDY, shard_size=SHARD_SIZE, progress=True)
    assert result.computed == [] and "shard" not in capsys.readouterr().err
