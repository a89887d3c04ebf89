"""Every warning a public call raises is filed under the caller's line, however deep inside nla_lens it is raised.

Python's default filter shows a warning once per (message, category, module, line): one filed under a line of
nla_lens was shown once a session and pointed the user nowhere. Each case calls one public path from this file;
the run is cut short (`_Stop`) once its warnings are out where the rest costs time and pins nothing here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import NEEDS_TL3
from safetensors.torch import save_file

import nla_lens as nl
from nla_lens import loading, sharded, testing
from nla_lens.sharded import Sampling
from nla_lens.sidecar import dump_meta


class _Stop(Exception):
    """Ends a run once its warnings are out."""


def _stop(*args, **kwargs):
    raise _Stop


@dataclasses.dataclass
class _Call:
    """What a case may use: pytest's request (for fixtures), a folder of its own, and monkeypatch."""

    request: pytest.FixtureRequest
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    def __getattr__(self, fixture: str):
        if fixture.startswith("_"):
            raise AttributeError(fixture)
        return self.request.getfixturevalue(fixture)


def _copy(folder: Path, to: Path, **sidecar) -> Path:
    """A copy of the checkpoint `folder` whose sidecar has `sidecar`'s keys replaced (`extraction` merged)."""
    copy = Path(shutil.copytree(folder, to))
    raw = nl.load_meta(copy).raw
    extraction = {**raw.get("extraction", {}), **sidecar.pop("extraction", {})}
    dump_meta({**raw, **sidecar, "extraction": extraction}, copy)
    return copy


# --- the library's paths (TransformerLens 3.x and 4.x) ---------------------------------------------------------

def _pair_of_two_stages(c: _Call) -> None:
    av = _copy(c.tiny_paths["av_embedding"], c.tmp_path / "av", stage="sft")
    nl.NLA.from_pretrained(av, c.tiny_paths["ar_paper"])


def _pair_of_two_bases(c: _Call) -> None:
    ar = _copy(c.tiny_paths["ar_nanonla"], c.tmp_path / "ar", extraction={"base_model": "another-base"})
    nl.NLA.from_pretrained(c.tiny_paths["av_karvonen"], ar)


def _base_that_is_an_av(c: _Call) -> None:
    nl.load_base(c.tiny_paths["av_karvonen"])


def _vector_file_with_list_columns(c: _Call) -> None:
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).tolist()
    path = c.tmp_path / "in.parquet"
    pq.write_table(pa.table({"other": vectors, "vector": pa.array(vectors, pa.list_(pa.float32()))}), path)
    c.monkeypatch.setattr(sharded, "_run", _stop)  # the rows are read: no need to verbalize them
    sharded.verbalize_file(c.tiny_paths["av_karvonen"], path, c.tmp_path / "out.parquet", column="vector")


def _extraction_shard_of_another_base(c: _Call) -> None:
    folder = c.tmp_path / "acts"  # as `nla-lens extract` lays it out: the sidecar names base "tiny"
    (folder / "shards").mkdir(parents=True)
    dump_meta(c.dataset_meta.raw, folder)
    save_file({"vectors": torch.randn(3, 64), "positions": torch.arange(3)}, folder / "shards" / "acts-0.safetensors")
    c.monkeypatch.setattr(sharded, "_run", _stop)
    sharded.verbalize_file(c.tiny_paths["av_karvonen"], folder / "shards" / "acts-0.safetensors",
                           c.tmp_path / "out.parquet")


def _round_trip_file_without_a_baseline(c: _Call) -> None:
    path = c.tmp_path / "in.safetensors"
    save_file({"vectors": torch.randn(4, 64, generator=torch.Generator().manual_seed(0))}, path)
    c.monkeypatch.setattr(sharded, "_run", _stop)
    sharded.round_trip_file(c.tiny_paths["av_karvonen"], c.tiny_paths["ar_nanonla"], path,
                            c.tmp_path / "out.parquet", sampling=Sampling(max_new_tokens=4))


def _yaml_run_inside_its_warmup(c: _Call) -> None:
    from nla_lens.training import ARRunConfig, load_config

    path = c.tmp_path / "ar.yaml"
    path.write_text("base_model: b\nactivations: a\nexplanations: e.jsonl\nout_dir: o\ntrain:\n  steps: 5\n")
    load_config(ARRunConfig, path)


# --- training (TransformerLens 3.x) -----------------------------------------------------------------------------

def _with_special_token_text(data):
    return dataclasses.replace(data, explanations=[data.explanations[0] + " <|im_end|>", *data.explanations[1:]])


def _train_av_on_special_token_text(c: _Call) -> None:
    from nla_lens.training import TrainConfig, init_av, loop, train_av

    train, held_out = c.label_split
    av = init_av(c.base_folder, c.dataset_meta)
    c.monkeypatch.setattr(loop, "train", _stop)
    train_av(av, _with_special_token_text(train), held_out, TrainConfig(steps=1, warmup_steps=0), progress=False)


def _train_ar_on_special_token_text(c: _Call) -> None:
    from nla_lens.training import TrainConfig, init_ar, loop, train_ar

    train, held_out = c.label_split
    ar = init_ar(c.base_folder, c.dataset_meta)
    c.monkeypatch.setattr(loop, "train", _stop)
    train_ar(ar, _with_special_token_text(train), held_out, TrainConfig(steps=1, warmup_steps=0), progress=False)


def _init_av_from_an_av(c: _Call) -> None:
    from nla_lens.training import init_av

    c.monkeypatch.setattr(loading, "load_hooked_transformer", _stop)
    init_av(c.tiny_paths["av_karvonen"], c.dataset_meta)


def _train_av_resumed_before_later_checkpoints(c: _Call) -> None:
    from nla_lens.training import TrainConfig, init_av, loop, train_av

    train, held_out = c.label_split
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=0, save_every=1, keep_checkpoints=2)
    out_dir = c.tmp_path / "run"
    with warnings.catch_warnings():  # the first run, whose own warnings are not what this case pins
        warnings.simplefilter("ignore")
        train_av(init_av(c.base_folder, c.dataset_meta), train, held_out, config, out_dir=out_dir, n_samples=0,
                 progress=False)
    train_av(init_av(c.base_folder, c.dataset_meta), train, held_out, config, out_dir=out_dir,
             resume=loop.checkpoints(out_dir)[0], n_samples=0, progress=False)


def _sft_run(c: _Call, cls, **fields):
    acts = c.extraction / "acts"
    return cls(base_model=str(c.base_folder), activations=str(acts), explanations=str(c.extraction / "labels.jsonl"),
               out_dir=str(c.tmp_path / "run"), eval_fraction=0.25, **fields)


def _train_av_run_on_unrecorded_explanations(c: _Call) -> None:
    from nla_lens.training import AVRunConfig, load_activations, pipeline, run_train_av

    path = c.tmp_path / "unrecorded.jsonl"
    path.write_text("".join(json.dumps({"doc_id": r.doc_id, "position": r.position, "explanation": "a token"}) + "\n"
                            for r in load_activations(c.extraction / "acts").records))
    c.monkeypatch.setattr(pipeline, "_train_and_export_av", _stop)
    run_train_av(dataclasses.replace(_sft_run(c, AVRunConfig), explanations=str(path)), progress=False)


def _train_av_run_on_another_base_folder(c: _Call) -> None:
    from nla_lens.training import AVRunConfig, run_train_av

    other = shutil.copytree(c.base_folder, c.tmp_path / "base-copy")
    c.monkeypatch.setattr(loading, "load_hooked_transformer", _stop)
    run_train_av(dataclasses.replace(_sft_run(c, AVRunConfig), base_model=str(other)), progress=False)


def _train_ar_run_without_an_fve(c: _Call) -> None:
    from nla_lens.training import ARRunConfig, loop, run_train_ar

    c.monkeypatch.setattr(loop, "train", _stop)
    run_train_ar(_sft_run(c, ARRunConfig), progress=False)  # 2 held-out documents: 6 vectors


def _train_rl_run(c: _Call) -> None:
    """The AR records a held-out split of 500 vectors; this split holds 6."""
    from nla_lens.training import RLConfig, RLRunConfig, rl, run_train_rl

    ar = _copy(c.tiny_paths["ar_nanonla"], c.tmp_path / "ar", fve_baseline={"value": 0.7, "n": 500})
    config = RLRunConfig(av=str(c.tiny_paths["av_karvonen"]), ar=str(ar), activations=str(c.extraction / "acts"),
                         explanations=str(c.extraction / "labels.jsonl"), out_dir=str(c.tmp_path / "rl"),
                         eval_fraction=0.25, rl=RLConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4,
                                                         kl_coef=0.0, eval_vectors=8))
    c.monkeypatch.setattr(rl, "evaluate_rl", _stop)  # after the held-out vectors are picked
    run_train_rl(config, progress=False)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, base_folder, extract_config) -> Path:
    """8 documents of layer-2 activations of the base folder (recorded by its absolute path), labelled."""
    from nla_lens.training import extract_activations, label_activations, load_activations, save_explanations

    root = tmp_path_factory.mktemp("extraction")
    tokenizer = loading.load_tokenizer(base_folder)
    base = loading.load_hooked_transformer(base_folder, tokenizer, dtype=torch.float32, device="cpu")
    acts = extract_activations(base, tokenizer, testing.tiny_corpus(8, words_per_doc=10), root / "acts",
                               extract_config, base_model=str(base_folder), progress=False)
    save_explanations(label_activations(load_activations(acts), lambda r: "a token"), root / "labels.jsonl")
    return root


CASES: list[tuple[Callable[[_Call], None], tuple[str, ...]]] = [
    (_pair_of_two_stages, ("the AV is from training stage 'sft' and the AR from 'rl'",)),
    (_pair_of_two_bases, ("the AV's sidecar names base model 'tiny-qwen3' and the AR's 'another-base'",)),
    (_base_that_is_an_av, ("is an AV checkpoint, a fine-tuned copy of the base model",)),
    (_vector_file_with_list_columns, ("columns ['other'] are lists or structs",)),
    (_extraction_shard_of_another_base, ("was extracted from base 'tiny' and the AV trained from 'tiny-qwen3'",)),
    (_round_trip_file_without_a_baseline, ("no FVE",)),
    (_yaml_run_inside_its_warmup, ("warmup_steps=10 (the default) >= steps=5",)),
]
TRAINING_CASES: list[tuple[Callable[[_Call], None], tuple[str, ...]]] = [
    (_train_av_on_special_token_text, ("explanation of 192 hold special-token text",)),
    (_train_ar_on_special_token_text, ("explanation of 192 hold special-token text",)),
    (_init_av_from_an_av, ("is an AV checkpoint, a fine-tuned copy of the base model",)),
    (_train_av_resumed_before_later_checkpoints, ("which holds later checkpoints of another run (step-000002)",)),
    (_train_av_run_on_unrecorded_explanations, ("does not record which extraction it labels",)),
    (_train_av_run_on_another_base_folder, ("the activations were extracted from base model",)),
    (_train_ar_run_without_an_fve, ("AR SFT reports the held-out MSE but no FVE",)),
    (_train_rl_run, ("is not the one the AR", "rl.eval_vectors is 8, but the held-out split holds 6 vectors")),
]


@pytest.mark.parametrize(("case", "said"), [
    *(pytest.param(case, said, id=case.__name__.strip("_")) for case, said in CASES),
    *(pytest.param(case, said, id=case.__name__.strip("_"), marks=NEEDS_TL3) for case, said in TRAINING_CASES),
])
def test_a_public_calls_warning_points_at_the_callers_line(case, said, request, tmp_path, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(_Stop):
            case(_Call(request, tmp_path, monkeypatch))
    for text in said:
        found = [(w.filename, w.lineno) for w in caught if text in str(w.message)]
        assert found, (text, [str(w.message) for w in caught])
        assert {filename for filename, _ in found} == {__file__}, (text, found)
