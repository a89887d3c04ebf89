"""`nla-lens extract`, `train-av`, `train-ar` and `train-rl`: each reads one YAML config and calls the pipeline."""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nla_lens import backends, loading
from nla_lens.checks import blocks_phrase, check_output_path, resolve_device
from nla_lens.display import format_number
from nla_lens.distributed import World
from nla_lens.errors import CheckpointError, ConfigError, InjectionError
from nla_lens.sidecar import SIDECAR_NAME, InjectionSpec, load_meta
from nla_lens.training import pipeline
from nla_lens.training.av_sft import check_trainable_hook_point
from nla_lens.training.config import (
    ARRunConfig,
    AVRunConfig,
    ExtractRunConfig,
    RLRunConfig,
    SFTRunConfig,
    load_config,
)
from nla_lens.training.loop import blocks_outside


def _command(subparsers: argparse._SubParsersAction, name: str, config_cls: type, run: Callable[[Any], str], *,
             help: str, description: str) -> None:
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("config", help=f"a YAML file whose keys are the fields of nla_lens.training."
                                       f"{config_cls.__name__} (nested sections included)")

    def main(args: argparse.Namespace) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        config = load_config_for(name, config_cls, args.config)
        # Before the inputs: a missing extraction's advice (run nla-lens extract) is moot on the bridge.
        backends.require_hooked("training")
        check_inputs(config, args.config)
        summary = run(config)
        if World.from_env().is_main:  # under torchrun, one summary for the job
            print(summary)

    parser.set_defaults(run=main)


# Most specific first: an AR's keys are a subset of an AV's, so a train-ar config also reads as train-av's.
_COMMAND_CONFIGS: dict[str, type] = {"extract": ExtractRunConfig, "train-ar": ARRunConfig, "train-av": AVRunConfig,
                                     "train-rl": RLRunConfig}


def load_config_for(command: str, config_cls: type, path: str) -> Any:
    """`load_config`, whose refusal of a config written for another of these commands (`nla-lens train-rl
    examples/train-av.yaml`) names that command: a list of unknown keys did not say the file was fine."""
    try:
        return load_config(config_cls, path)
    except ConfigError as exc:
        for other, other_cls in _COMMAND_CONFIGS.items():
            if other == command:
                continue
            try:
                with warnings.catch_warnings():  # a probe: what the file would warn of as that command's is moot
                    warnings.simplefilter("ignore")
                    load_config(other_cls, path)
            except ConfigError:
                continue
            raise ConfigError(f"{exc}. {path} reads as a config for nla-lens {other}: run nla-lens {other} {path}, "
                              f"or give nla-lens {command} its own config (examples/ has one for each command)"
                              ) from exc
        raise


def check_inputs(config: Any, path: str) -> None:
    """The config's input files and folders exist, its out_dir is not a file, its device can run and what the
    base model bounds fits it, before any model loads."""
    resolve_device(getattr(config, "device", "cpu"))
    for name in ("corpus", "activations", "explanations"):
        value = getattr(config, name, None)
        if value is not None and not Path(value).exists():
            hint = " (nla-lens extract writes it)" if name == "activations" else ""
            # A relative path is read from where the command runs, which is easy to mistake for the YAML's folder.
            where = "" if Path(value).is_absolute() else f" (relative to the current folder {Path.cwd()})"
            raise ConfigError(f"{path}: {name} {value} does not exist{where}{hint}; check the path")
    folder = None
    if getattr(config, "base_model", None) is not None:  # else found once the activations are read, unnamed
        try:
            folder = loading.resolve_checkpoint(config.base_model)
        except CheckpointError as exc:
            raise ConfigError(f"{path}: base_model: {exc}") from exc
    out_dir = getattr(config, "out_dir", None)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():  # else it fails once trained
        raise ConfigError(f"{path}: out_dir {out_dir} is a file; point out_dir at a folder (it is created if missing)")
    if folder is not None and isinstance(config, SFTRunConfig):
        check_base_bounds(config, folder, path)


def check_base_bounds(config: SFTRunConfig, folder: Path, path: str) -> None:
    """train-av's injection hook point (one training runs: `check_trainable_hook_point`) and `train.trainable_blocks`
    fit the base model, read from its config.json by the rules the trainers apply once the weights are in (those
    refused them only after a full load)."""
    try:
        n_layers = loading.load_hf_config(folder).get_text_config().num_hidden_layers
    except CheckpointError as exc:
        raise ConfigError(f"{path}: base_model: {exc}") from exc
    if isinstance(config, AVRunConfig):
        hook_point = InjectionSpec.of(config.injection, config.hook_point).hook_point  # as init_av resolves it
        key = "hook_point" if config.hook_point else f"injection (hook_point unset: {config.injection}'s default)"
        try:
            loading.check_hook_point(folder, hook_point, backend="hooked")
            check_trainable_hook_point(hook_point)
        except InjectionError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from exc
        trained = f"the AV trains the {blocks_phrase(n_layers)} of base_model {config.base_model}"
    else:
        # The AR is the first K+1 blocks, K from the extraction's sidecar (a small file, not the shards).
        dataset = load_meta(config.activations) if (Path(config.activations) / SIDECAR_NAME).is_file() else None
        if dataset is None or dataset.kind != "nla_dataset":  # not an extraction: reading the activations says so
            return
        n_layers = dataset.layer + 1
        trained = (f"the AR trains the first K+1 = {blocks_phrase(n_layers)} of base_model {config.base_model} (the "
                   f"activations are layer K = {dataset.layer}'s)")
    outside = blocks_outside(config.train.trainable_blocks, n_layers)
    if outside:
        raise ConfigError(f"{path}: train.trainable_blocks: {config.train.trainable_blocks} names block(s) {outside}, "
                          f"but {trained}; use indices among those (null: every block)")


def add_extract(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "extract", ExtractRunConfig, _extract,
             help="take base-model activations at layer K from a JSONL corpus",
             description="Run a base model over a JSONL corpus ({\"text\": ...} per line, \"id\" optional: a line "
                         "whose id is absent or null takes its line index, from 0) and store "
                         "blocks.K.hook_resid_post at seeded positions, with provenance, in resumable safetensors "
                         "shards plus an nla_dataset sidecar.")


def add_train_av(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "train-av", AVRunConfig, _train_av,
             help="supervised fine-tuning of an activation verbalizer, then export",
             description="Pair an extraction with explanations (JSONL), split by document, fine-tune the base "
                         "model as an AV with the injection hook in every forward, and export an HF folder + "
                         "nla_meta.yaml under out_dir/model.")


def add_train_ar(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "train-ar", ARRunConfig, _train_ar,
             help="supervised fine-tuning of an activation reconstructor, then export",
             description="Pair an extraction with explanations (JSONL), split by document, fine-tune the base's "
                         "first K+1 blocks and an identity-initialised readout, report held-out FVE, and export "
                         "a truncated HF folder + value_head.safetensors under out_dir/model.")


def add_train_rl(subparsers: argparse._SubParsersAction) -> None:
    _command(subparsers, "train-rl", RLRunConfig, _train_rl,
             help="GRPO on an SFT'd AV with the AR as reward (the AR trained alongside), then export both",
             description="Start from an SFT AV and AR; each step sample G explanations per training vector, "
                         "reward each with -MSE of the AR's reconstruction, update the AV with the PPO-clipped "
                         "group-relative objective plus k3 KL to the frozen SFT AV, and the AR with one MSE "
                         "step on the same explanations. Exports out_dir/av and out_dir/ar (sidecars: stage rl).")


def add_curve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "curve", help="print a training run's curve (finished or still going); --html draws it",
        description="Read what nla-lens train-av, train-ar or train-rl recorded in OUT_DIR (its train_result.json, "
                    "or while the run goes, its newest checkpoint) and print how far it got, what moved, and its "
                    "main columns at a dozen steps spread over the run (nla_lens.training.read_training_run).")
    parser.add_argument("out_dir", help="a training run's out_dir, or one of the step folders in its checkpoints/")
    parser.add_argument("--html", help="also write the run's view (its curves and table) to this .html page")
    parser.add_argument("--output", help="also write every logged column, one row per step, to this .parquet or "
                                         ".jsonl file (nl.read_result reads it back)")
    parser.set_defaults(run=_curve)


def _curve(args: argparse.Namespace) -> None:
    from nla_lens.training.runs import read_training_run
    from nla_lens.vector_files import OUTPUT_SUFFIXES

    files = [(Path(path).expanduser(), flag, suffixes) for path, flag, suffixes in
             ((args.html, "--html", (".html",)), (args.output, "--output", OUTPUT_SUFFIXES)) if path is not None]
    for path, flag, suffixes in files:  # before the run is read
        check_output_path(path, suffixes, flag)
    run = read_training_run(args.out_dir)
    print(run.curve_text())
    for path, _, _ in files:
        print(f"wrote {run.save(path)}")


def _extract(config: ExtractRunConfig) -> str:
    return f"activations written to {pipeline.run_extract(config)}"


def _train_av(config: AVRunConfig) -> str:
    run = pipeline.run_train_av(config)
    first, last = run.train.evals[0], run.train.evals[-1]
    return f"eval loss {_change(first['eval_loss'], last['eval_loss'], 4)}; AV exported to {run.model_dir}"


def _train_ar(config: ARRunConfig) -> str:
    run = pipeline.run_train_ar(config)
    first, last = run.train.evals[0], run.train.evals[-1]
    if last["fve"] is None:
        score = f"held-out MSE {_change(first['eval_mse'], last['eval_mse'], 4)} (no FVE: too few held-out vectors)"
    else:
        score = f"held-out FVE {_change(first['fve'], last['fve'], 3)} (baseline: {last['baseline_source']})"
    return f"{score}; AR exported to {run.model_dir}"


def _train_rl(config: RLRunConfig) -> str:
    run = pipeline.run_train_rl(config)
    history = run.train.history
    first, last = history[0], history[-1]
    line = (f"reward {_change(first['reward'], last['reward'], 4)}, rollout FVE {_change(first['fve'], last['fve'], 3)}"
            f", KL {format_number(last['kl'], 4)}")
    fves = [evaluation["eval_fve"] for evaluation in run.train.evals]
    if None in fves:
        line += "; no held-out FVE (no trustworthy baseline: see the log)"
    elif fves:
        line += f"; held-out FVE {_change(fves[0], fves[-1], 3)}"
    else:
        line += "; no held-out evaluation (it needs rl.eval_vectors >= 2 and as many held-out vectors)"
    return f"{line}; AV exported to {run.av_dir}, AR to {run.ar_dir}"


def _change(first: float, last: float, decimals: int) -> str:
    """"first -> last" as a table cell writes numbers (`display.format_number`): a diverged 1e20 in e notation, not
    21 digits."""
    return f"{format_number(first, decimals)} -> {format_number(last, decimals)}"
