"""Config-driven runs (what `nla-lens extract / train-av / train-ar / train-rl` call): load, train, export."""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nla_lens import backends, loading, metrics
from nla_lens.checks import blocks_phrase, jsonl_objects, warn_at_caller
from nla_lens.distributed import World, device_for, process_group
from nla_lens.errors import ConfigError, InputError
from nla_lens.nla import check_pair, check_vocabularies
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import NLAMeta, load_meta
from nla_lens.training import rl
from nla_lens.training.ar_sft import init_ar, train_ar
from nla_lens.training.av_sft import check_trainable_hook_point, init_av, train_av
from nla_lens.training.config import (
    ARRunConfig,
    AVRunConfig,
    ExtractRunConfig,
    RLRunConfig,
    SFTRunConfig,
    config_dtype,
)
from nla_lens.training.dataset import (
    LabelledActivations,
    check_fits,
    encoded_av_rows,
    label_activations,
    split_by_document,
)
from nla_lens.training.export import (
    check_export_folder,
    check_tokenizer_source,
    export_ar,
    export_av,
    export_pair,
)
from nla_lens.training.extraction import (
    Document,
    check_extraction_folder,
    check_resume_before_loading,
    extract_activations,
    load_activations,
)
from nla_lens.training.loop import (
    TrainResult,
    check_checkpoint_command,
    check_not_an_input_folder,
    check_resume,
    checkpoints,
)
from nla_lens.training.rl import train_rl
from nla_lens.vector_files import write_json
from nla_lens.verbalizer import ActivationVerbalizer

MODEL_DIR = "model"
RESULT_FILE = "train_result.json"


@dataclass(frozen=True)
class RunResult:
    """Where a run exported its model, and what training did."""

    model_dir: Path
    train: TrainResult


def read_corpus(path: str | Path) -> list[Document]:
    """A JSONL corpus: ``{"text": ...}`` per line, with an optional ``"id"`` (default, and for ``"id": null``: the line
    index counted from 0, blank lines included; ids are compared as text). Read whole and checked before the base
    model loads: a bad line found mid-extraction left a half-made out_dir."""
    docs = []
    first_line: dict[str, tuple[int, str | None]] = {}  # each id's first line, and its id as JSON there (None: absent)
    for line_no, row in jsonl_objects(path, "corpus", "write each line as {\"id\": ..., \"text\": ...}"):
        if "text" not in row:  # a KeyError's repr named neither the keys nor the fix
            raise InputError(f"{path}:{line_no}: expected a JSON object with a 'text' key, but its keys are "
                             f"{sorted(row)}; write each line as {{\"id\": ..., \"text\": ...}} (rename the key "
                             "that holds the document's text to 'text')")
        given = row.get("id")
        docs.append(Document(str(line_no - 1 if given is None else given), row["text"]))
        if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
            raise InputError(f"{path}:{line_no}: 'id' must be a string or an integer, got {json.dumps(given)}; ids "
                             "are compared as text, where 1.0, true or a list would stand for a string the corpus "
                             "never wrote (\"1.0\", \"True\", \"[1]\")")
        if not isinstance(docs[-1].text, str):  # else the tokenizer fails mid-extraction, shards later
            raise InputError(f"{path}:{line_no}: 'text' must be a string, got {docs[-1].text!r}; drop the line "
                             "or give it the document's text")
        written = json.dumps(given, ensure_ascii=False) if "id" in row else None
        if docs[-1].id in first_line:
            first = first_line[docs[-1].id]
            raise InputError(f"{path}:{line_no}: document id {docs[-1].id!r} is line {first[0]}'s too"
                             f"{_id_note(first, (line_no, written))}; give every document its own id (splits are "
                             "made by document)")
        first_line[docs[-1].id] = (line_no, written)
    return docs


def _id_note(first: tuple[int, str | None], second: tuple[int, str | None]) -> str:
    """Why two lines' ids, each given as its line number and its id as JSON (None: absent), are one where the lines
    do not show it: a line without an id takes its index, which an id given elsewhere can repeat (line 2 none,
    line 3 1), and ids compare as text (1 and "1")."""
    for line_no, written in (first, second):
        if written in (None, "null"):
            has = "no 'id'" if written is None else "'id': null"
            return (f" (line {line_no} has {has}, so its id is its line index counted from 0, and ids compare as "
                    "text: 1 and \"1\" are one id)")
    if first[1] != second[1]:
        return f" (ids compare as text: line {first[0]}'s {first[1]} and line {second[0]}'s {second[1]} are one id)"
    return ""


def run_extract(config: ExtractRunConfig, *, progress: bool = True) -> Path:
    backends.require_hooked("training")
    check_not_an_input_folder(config.out_dir, itself=False, writes="extract would write its shards")
    check_writable_out_dir(config.out_dir)  # before the model loads, as the training commands check theirs
    check_result_file(config.out_dir, "extract")
    check_extraction_folder(Path(config.out_dir))
    folder = loading.resolve_checkpoint(config.base_model)
    loading.check_base_folder(folder, f"base_model {config.base_model}")  # an AR: else "an incomplete download"
    n_layers = getattr(loading.load_hf_config(folder).get_text_config(), "num_hidden_layers", None)
    if n_layers is not None and config.extract.layer >= n_layers:  # from config.json: before the weights load
        raise ConfigError(f"extract.layer {config.extract.layer} is outside base_model {config.base_model}'s "
                          f"{blocks_phrase(n_layers)}; set it to one of those indices")
    check_resume_before_loading(Path(config.out_dir), config_dtype(config.dtype), config.base_model)
    documents = read_corpus(config.corpus)
    tokenizer = loading.load_tokenizer(folder)
    model = loading.load_hooked_transformer(folder, tokenizer, dtype=config_dtype(config.dtype), device=config.device)
    return extract_activations(model, tokenizer, documents, config.out_dir, config.extract,
                               base_model=config.base_model, progress=progress)


def _split(config: SFTRunConfig | RLRunConfig) -> tuple[NLAMeta, LabelledActivations, LabelledActivations]:
    """The same (activations, explanations, eval_fraction, split_seed) give the AV and AR one split."""
    activations = load_activations(config.activations)
    data = label_activations(activations, config.explanations)
    return (activations.meta, *split_by_document(data, config.eval_fraction, config.split_seed))


def run_command(config: dict) -> str:
    """Which command wrote a `train_result.json`, told by its recorded config's keys."""
    return "train-rl" if "rl" in config else "train-av" if "injection" in config else "train-ar"


def check_out_dir(out_dir: str | Path, command: str, resume: str | Path | None) -> None:
    """What each training command checks of its `out_dir` (and `resume`) before any model loads."""
    check_writable_out_dir(out_dir)
    check_result_file(out_dir, command)
    if command == "train-rl":
        check_resume(out_dir, resume, rl.RESUMABLE, written=("av", "ar", RESULT_FILE))  # its exports and record
    else:
        check_resume(out_dir, resume, written=(MODEL_DIR, RESULT_FILE))
    folder = _resumed_checkpoint(out_dir, resume)
    if folder is not None:  # from its trainer_state.json: `load_checkpoint` refused it only once the models loaded
        check_checkpoint_command(folder, command)


def _resumed_checkpoint(out_dir: str | Path, resume: str | Path | None) -> Path | None:
    """The checkpoint a run with `resume` continues (`resume_folder`'s pick, without its warning and log), or None
    where it starts at step 0. Called after `check_resume`, so a named folder holds a trainer_state.json."""
    if resume != "latest":
        return None if resume is None else Path(resume)
    found = checkpoints(out_dir)
    return found[-1] if found else None


def check_writable_out_dir(out_dir: str | Path) -> None:
    """Create `out_dir` and a file in it before any model loads, then remove what the probe made: an unwritable
    one (under a file, on a read-only mount) failed at the first checkpoint, after the training it should keep."""
    folder = Path(out_dir).absolute()
    # Under torchrun every rank probes: removing the folder there could pull it from under another rank's probe.
    first_new = (None if World.from_env().is_distributed
                 else next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"out_dir {str(out_dir)!r} cannot be written ({exc.strerror or exc}); set out_dir to a "
                          "folder this process can create and write") from exc
    finally:
        if first_new is not None and first_new.is_dir():
            shutil.rmtree(first_new)


def check_result_file(out_dir: str | Path, command: str) -> None:
    """Refuse an `out_dir` that holds another command's run (its `train_result.json`): this run would overwrite
    that record and mix its checkpoints with the other run's (RL pointed at the SFT AV's out_dir), or, for
    `extract`, write its shards among that run's files."""
    path = Path(out_dir) / RESULT_FILE
    try:
        found = run_command(json.loads(path.read_text(encoding="utf-8")).get("config", {}))
    except (OSError, ValueError, AttributeError):  # no record (a new folder), or not one of ours: nothing to keep
        return
    if found != command:
        raise ConfigError(f"{out_dir} holds a {found} run ({path}); {command} would overwrite or mix with that "
                          "run's files. Point out_dir at a new folder, or, if this config is that run's, run it "
                          f"with nla-lens {found}")


def _save_result(config: SFTRunConfig | RLRunConfig, model_dir: Path, result: TrainResult, world: World) -> RunResult:
    if world.is_main:
        summary = {"model_dir": model_dir, "config": asdict(config), "world_size": world.world_size,
                   **asdict(result)}
        write_json(Path(config.out_dir) / RESULT_FILE, summary, indent=1)  # never half-written
    return RunResult(model_dir, result)


def _record_remover(out_dir: str | Path) -> Callable[[], None]:
    """What an export runs just before its swap: remove the earlier run's `train_result.json` (a finished run resumed
    or extended), written again only after the export, which a crash between the two left beside the new model as its
    record. Without it, the newest checkpoint says the export was cut short (`read_training_run`)."""
    return functools.partial(Path.unlink, Path(out_dir) / RESULT_FILE, missing_ok=True)


def _run_sft(config: SFTRunConfig, train_and_export: Callable[..., tuple[TrainResult, Path]],
             progress: bool) -> RunResult:
    meta, train, evaluation = _split(config)
    with process_group(config.device) as world:
        result, model_dir = train_and_export(config, meta, train, evaluation, device_for(world, config.device),
                                             progress)
        return _save_result(config, model_dir, result, world)


def run_train_av(config: AVRunConfig, *, progress: bool = True) -> RunResult:
    """Extraction folder + explanations -> a trained, exported AV under `out_dir/model`.

    Under `torchrun` every rank runs this: data-parallel SFT (`config.train.data_parallel`), rank 0 writes.
    """
    backends.require_hooked("training")  # before the activations are read
    check_export_folder(Path(config.out_dir) / MODEL_DIR, "av")  # before training, not after it
    check_out_dir(config.out_dir, "train-av", config.resume)
    return _run_sft(config, _train_and_export_av, progress)


def _train_and_export_av(config: AVRunConfig, meta: NLAMeta, train: LabelledActivations,
                         evaluation: LabelledActivations, device: torch.device,
                         progress: bool) -> tuple[TrainResult, Path]:
    # The model lives in this frame only, so it is gone before the process group is destroyed.
    av = init_av(config.base_model, meta, injection=config.injection, hook_point=config.hook_point,
                 injection_scale=config.injection_scale, device=device, dtype=config_dtype(config.dtype),
                 train_on=(train, evaluation))
    result = train_av(av, train, evaluation, config.train, out_dir=config.out_dir, resume=config.resume,
                      n_samples=config.n_samples, sample_max_new_tokens=config.sample_max_new_tokens,
                      progress=progress)
    return result, export_av(av, Path(config.out_dir) / MODEL_DIR, config.base_model,
                             dtype=config_dtype(config.export_dtype), before_swap=_record_remover(config.out_dir))


def run_train_ar(config: ARRunConfig, *, progress: bool = True) -> RunResult:
    """Extraction folder + explanations -> a trained, exported AR under `out_dir/model`.

    Under `torchrun` every rank runs this: data-parallel SFT (`config.train.data_parallel`), rank 0 writes.
    """
    backends.require_hooked("training")  # before the activations are read
    check_export_folder(Path(config.out_dir) / MODEL_DIR, "ar")  # before training, not after it
    check_out_dir(config.out_dir, "train-ar", config.resume)
    return _run_sft(config, _train_and_export_ar, progress)


def _train_and_export_ar(config: ARRunConfig, meta: NLAMeta, train: LabelledActivations,
                         evaluation: LabelledActivations, device: torch.device,
                         progress: bool) -> tuple[TrainResult, Path]:
    # The model lives in this frame only, so it is gone before the process group is destroyed.
    ar = init_ar(config.base_model, meta, device=device, dtype=config_dtype(config.dtype), train_on=(train, evaluation))
    result = train_ar(ar, train, evaluation, config.train, out_dir=config.out_dir, resume=config.resume,
                      progress=progress)
    return result, export_ar(ar, Path(config.out_dir) / MODEL_DIR, config.base_model,
                             dtype=config_dtype(config.export_dtype), heldout=evaluation.vectors,
                             before_swap=_record_remover(config.out_dir))


@dataclass(frozen=True)
class RLRunResult:
    """Where an RL run exported its AV and AR, and what training did."""

    av_dir: Path
    ar_dir: Path
    train: TrainResult


def run_train_rl(config: RLRunConfig, *, progress: bool = True) -> RLRunResult:
    """An SFT AV + AR -> GRPO on the AV, the AR trained alongside -> `out_dir/av` and `out_dir/ar`.

    Under `torchrun` every rank runs this (each samples whole groups, DDP averages the gradients),
    and rank 0 writes.
    """
    backends.require_hooked("training")  # before the activations are read
    for role in ("av", "ar"):  # before training, not after it
        check_export_folder(Path(config.out_dir) / role, role)
    check_out_dir(config.out_dir, "train-rl", config.resume)
    activations, train, evaluation = _split(config)
    check_rl_layers(config, activations)
    # The tokenizer files the exports will copy: before the run, not after it.
    check_tokenizer_source(loading.resolve_checkpoint(config.av), "av")
    check_tokenizer_source(loading.resolve_checkpoint(config.ar), "ar")
    rl.check_prompts_fit(len(train), config.rl.prompts_per_step)
    check_anchor_rows_fit(config, train)
    check_rl_split(config, evaluation)
    with process_group(config.device) as world:
        result, av_dir, ar_dir = _train_and_export_rl(config, train, evaluation, device_for(world, config.device),
                                                      progress)
        _save_result(config, Path(config.out_dir) / "av", result, world)
        return RLRunResult(av_dir, ar_dir, result)


def check_rl_layers(config: RLRunConfig, activations: NLAMeta) -> None:
    """`av` holds an AV and `ar` an AR; the two and the activations read one layer of one d_model; the AV and AR
    share a vocabulary. Checked from the sidecars and tokenizers, before any weights load: RL on another layer's
    vectors would export sidecars claiming the AV's. Activations of another base model than the AV's warn."""
    folders = [loading.resolve_checkpoint(path) for path in (config.av, config.ar)]
    av, ar = (load_meta(folder) for folder in folders)
    for key, folder, meta in zip(("av", "ar"), folders, (av, ar), strict=True):
        # None: a sidecar without a role and no AR readout beside it, so an AV. Checked here, else the AV's
        # weights load before the AR's loader refuses an AV.
        role = loading.checkpoint_role(folder, meta) or "av"
        if role != key:
            raise ConfigError(f"{key}: {getattr(config, key)} is an {role.upper()} checkpoint, not an {key.upper()}; "
                              f"point {key} at the SFT {key.upper()} (nla-lens train-{key}'s out_dir/model)")
    if av.injection is not None:  # else refused at the first step's forward, once three models had loaded
        check_trainable_hook_point(av.injection.hook_point)
    check_pair(av, ar)
    check_vocabularies(*(loading.load_tokenizer(folder) for folder in folders))
    for name in ("layer", "d_model"):
        if getattr(activations, name) != getattr(av, name):
            raise ConfigError(
                f"activations {config.activations} hold {name} {getattr(activations, name)}, but the AV "
                f"{config.av} and AR {config.ar} were trained on {name} {getattr(av, name)}; point activations "
                "at the extraction the SFT pair was trained on (or extract that layer with nla-lens extract)"
            )
    if _other_bases(activations.base_model, av.base_model):  # as SFT warns of another base (check_base_fits)
        warnings.warn(f"the activations {config.activations} were extracted from base model {activations.base_model}, "
                      f"but the AV {config.av} was trained on {av.base_model}'s: RL would train the pair on another "
                      "model's activations. Point activations at the extraction the SFT pair was trained on, or "
                      "ignore this if the two names are one model", stacklevel=3)


def check_anchor_rows_fit(config: RLRunConfig, train: LabelledActivations) -> None:
    """The `sft_coef` term's rows (the training split) fit the AV's context, checked from its config.json before the
    weights load, as SFT's rows are (`init_av(train_on=)`): a row too long was refused only after the AV, the AR and
    the reference had loaded (`train_rl` checks them again there)."""
    if config.rl.sft_coef == 0:
        return
    folder = loading.resolve_checkpoint(config.av)
    n_ctx = loading.context_length(loading.load_hf_config(folder))
    if n_ctx is not None:
        check_fits(n_ctx, encoded_av_rows(train, load_meta(folder), loading.load_tokenizer(folder)))


def _other_bases(first: str | None, second: str | None) -> bool:
    """Whether two recorded base models surely differ: two names that are no local paths (hub ids), or two folders
    on this machine that resolve apart. A hub id beside a folder (a local copy of it?), or a folder not on this
    machine, cannot be compared."""
    if first is None or second is None or first == second:
        return False
    paths = [Path(first), Path(second)]
    if not any(path.is_absolute() for path in paths):
        return True
    if all(path.is_absolute() and path.is_dir() for path in paths):
        return paths[0].resolve() != paths[1].resolve()
    return False


def check_rl_split(config: RLRunConfig, evaluation: LabelledActivations) -> None:
    """Warn when the held-out split is not the one the AR was exported with (its sidecar's `fve_baseline`
    records that split's count and baseline, for a split of at least 32 vectors): RL would train on vectors SFT
    held out and report an FVE on vectors SFT trained on. A warning, not an error: RL on another extraction is a
    run one may mean."""
    ar = load_meta(loading.resolve_checkpoint(config.ar))
    if ar.fve_baseline is None:  # released ARs record no split
        return
    baseline = metrics.paper_baseline(evaluation.vectors.float(), ar.mse_scale)
    if ar.fve_baseline_n != len(evaluation) or not math.isclose(baseline, ar.fve_baseline, rel_tol=1e-4):
        warn_at_caller(f"the held-out split ({len(evaluation)} vectors, baseline {baseline:.6g}) is not the one the AR "
                       f"{config.ar} was exported with ({ar.fve_baseline_n} vectors, baseline {ar.fve_baseline:.6g}): "
                       "RL would train on vectors SFT held out. Give train-rl the SFT runs' activations, explanations, "
                       "eval_fraction and split_seed")


def _train_and_export_rl(config: RLRunConfig, train: LabelledActivations, evaluation: LabelledActivations,
                         device: torch.device, progress: bool) -> tuple[TrainResult, Path, Path]:
    dtype = config_dtype(config.dtype)
    av = ActivationVerbalizer.from_pretrained(config.av, device=device, dtype=dtype, backend="hooked")
    ar = ActivationReconstructor.from_pretrained(config.ar, device=device, dtype=dtype, backend="hooked")
    reference = None
    if config.rl.kl_coef > 0:
        reference = ActivationVerbalizer.from_pretrained(config.av, device=device, dtype=dtype, backend="hooked")
    result = train_rl(av, ar, reference, train.vectors, evaluation.vectors, config.rl, out_dir=config.out_dir,
                      resume=config.resume, sft_data=train, progress=progress)
    out = Path(config.out_dir)
    av_dir, ar_dir = export_pair(av, ar, (out / "av", out / "ar"), (config.av, config.ar),
                                 dtype=config_dtype(config.export_dtype), heldout=evaluation.vectors, stage="rl",
                                 before_swap=_record_remover(out))
    return result, av_dir, ar_dir
