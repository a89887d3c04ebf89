"""`nla-lens extract`, `train-av` and `train-ar`: each reads one YAML config and calls the pipeline."""

from __future__ import annotations

import argparse
import logging

from nla_lens.training import pipeline
from nla_lens.training.config import ARRunConfig, AVRunConfig, ExtractRunConfig, load_config

_CONFIG_HELP = "a YAML file whose keys are the fields of {} (nested `{}:` section included)"


def add_extract(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract", help="take base-model activations at layer K from a JSONL corpus",
        description="Run a base model over a JSONL corpus ({\"id\", \"text\"} per line) and store "
                    "blocks.K.hook_resid_post at seeded positions, with provenance, in resumable "
                    "safetensors shards plus an nla_dataset sidecar.")
    parser.add_argument("config", help=_CONFIG_HELP.format("ExtractRunConfig", "extract"))
    parser.set_defaults(run=_run_extract)


def add_train_av(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-av", help="supervised fine-tuning of an activation verbalizer, then export",
        description="Pair an extraction with explanations (JSONL), split by document, fine-tune the "
                    "base model as an AV with the injection hook in every forward, and export an HF "
                    "folder + nla_meta.yaml under out_dir/model.")
    parser.add_argument("config", help=_CONFIG_HELP.format("AVRunConfig", "train"))
    parser.set_defaults(run=_run_train_av)


def add_train_ar(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-ar", help="supervised fine-tuning of an activation reconstructor, then export",
        description="Pair an extraction with explanations (JSONL), split by document, fine-tune the "
                    "base's first K+1 blocks and an identity-initialised readout, report held-out FVE, "
                    "and export a truncated HF folder + value_head.safetensors under out_dir/model.")
    parser.add_argument("config", help=_CONFIG_HELP.format("ARRunConfig", "train"))
    parser.set_defaults(run=_run_train_ar)


def _run_extract(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = pipeline.run_extract(load_config(ExtractRunConfig, args.config))
    print(f"activations written to {folder}")


def _run_train_av(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = pipeline.run_train_av(load_config(AVRunConfig, args.config))
    first, last = run.train.evals[0], run.train.evals[-1]
    print(f"eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f}; AV exported to {run.model_dir}")


def _run_train_ar(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = pipeline.run_train_ar(load_config(ARRunConfig, args.config))
    first, last = run.train.evals[0], run.train.evals[-1]
    print(f"held-out FVE {first['fve']:.3f} -> {last['fve']:.3f} (baseline: {last['baseline_source']}); "
          f"AR exported to {run.model_dir}")
