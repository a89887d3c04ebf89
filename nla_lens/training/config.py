"""Typed configs for extraction, SFT and RL, read from YAML (`safe_load_unique`, unknown and repeated keys rejected)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, cast

import torch
import yaml

from nla_lens.checks import dtype_names, resolve_dtype, warn_at_caller
from nla_lens.errors import ConfigError, InputError
from nla_lens.sidecar import DEFAULT_HOOK_POINT, DuplicateKeyError, safe_load_unique, template_problem

# The paper's critic prompt; the AV prompt puts the marker between '>' and '</' as nanoNLA's does.
DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
DEFAULT_AV_TEMPLATE = (
    "Describe what this activation from the model represents: <concept>{injection_char}</concept>"
)
DEFAULT_INJECTION_CHAR = "㈎"


@dataclass
class ExtractConfig:
    """Which base-model activations to take: `blocks.{layer}.hook_resid_post` at seeded positions."""

    layer: int
    positions_per_doc: int = 4
    min_context: int = 8  # positions before this index are never taken: too little context
    max_tokens: int = 256  # documents are cut to this many tokens
    batch_size: int = 8
    docs_per_shard: int = 256
    seed: int = 0
    injection_char: str = DEFAULT_INJECTION_CHAR
    av_template: str = DEFAULT_AV_TEMPLATE
    ar_template: str = DEFAULT_AR_TEMPLATE

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.docs_per_shard < 1:
            raise ConfigError(f"extract: need batch_size >= 1 and docs_per_shard >= 1 (got {self.batch_size}, "
                              f"{self.docs_per_shard})")
        # The model's own limits (layer < n_layers, max_tokens <= n_ctx) are checked once it has loaded.
        if self.layer < 0 or self.positions_per_doc < 1 or self.min_context < 0 or self.max_tokens <= self.min_context:
            raise ConfigError(f"extract: need layer >= 0, positions_per_doc >= 1, min_context >= 0 and max_tokens > "
                              f"min_context (got {self.layer}, {self.positions_per_doc}, {self.min_context}, "
                              f"{self.max_tokens})")
        # Here, not once the base has loaded, where the sidecar's parser named no key and said to restore a file.
        templates: tuple[tuple[str, Literal["AV", "AR"], str], ...] = (
            ("av_template", "AV", DEFAULT_AV_TEMPLATE), ("ar_template", "AR", DEFAULT_AR_TEMPLATE))
        for key, name, default in templates:
            template = getattr(self, key)
            if not isinstance(template, str):
                raise ConfigError(f"{key}: expected a string, got {template!r}; the default is {default!r}")
            problem = template_problem(name, template)
            if problem is not None:
                raise ConfigError(f"{key}: {problem}; write it exactly once in {key}, as the default does "
                                  f"({default!r})")


def _adam_betas(betas: Any) -> tuple[float, float]:
    """Adam's (beta1, beta2), checked here rather than by torch once the model has loaded."""
    numbers = isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    if not numbers:
        raise ConfigError(f"betas must be two numbers in [0, 1) (Adam's beta1, beta2), got {betas!r}; "
                          "the default is [0.9, 0.999]")
    return (float(betas[0]), float(betas[1]))


def config_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    """A config's dtype: any name the library takes (`checks.DTYPES`: "bf16", "float16", "float64", which the
    exact-equality tests train in, ...)."""
    try:
        return resolve_dtype(name)
    except InputError:
        dtype = getattr(torch, str(name), None)
    # float8: torch has no isfinite and no random init for them, a bare error after training
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize < 2:
        raise ConfigError(f"{field_name}: {name!r} is a float narrower than 16 bits, which nla_lens neither "
                          f"trains nor exports in; use one of {dtype_names()} (bfloat16 is the smallest)")
    raise ConfigError(f"{field_name}: {name!r} is not a dtype nla_lens knows; use one of {dtype_names()}")


def _check_dtypes(config: object, *names: str) -> None:
    """Checked as the config is built, before any model loads (the export dtype is read only after training)."""
    for name in names:
        config_dtype(getattr(config, name), name)


def check_training_dtypes(dtypes: Iterable[torch.dtype], where: str) -> None:
    """Refuse float16 weights to train: Adam's eps (1e-8) rounds to 0 in float16, so the first step divides 0 by 0
    wherever a gradient is 0, and the run turned every weight NaN and exported them (RL: a raw torch error)."""
    if torch.float16 in set(dtypes):
        raise ConfigError(f"{where}: float16 weights cannot train here: Adam's eps (1e-8) rounds to 0 in float16, so "
                          "the first step turns them NaN. Load and train in float32 or bfloat16; export_dtype: float16 "
                          "still exports half-precision weights")


def _block_indices(blocks: Any) -> list[int] | None:
    """`trainable_blocks`: a list of block indices or None, checked here rather than once the model has loaded
    (the range: by `nla-lens` from the base's config.json, else against the model's blocks once it has loaded)."""
    if blocks is None:
        return None
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ConfigError(f"trainable_blocks must be a list of block indices, e.g. [2, 3] (null: every block), "
                          f"got {blocks!r}")
    return list(blocks)


def _check_ranges(config: object, **rules: tuple[Callable[[Any], bool], str]) -> None:
    """Name each field out of its range with the value given, so a combined rule does not leave the user to
    guess which of its fields was wrong."""
    bad = [f"{name} {need} (got {getattr(config, name)!r})" for name, (ok, need) in rules.items()
           if not ok(getattr(config, name))]
    if bad:
        raise ConfigError(f"need {'; '.join(bad)}")


def _check_finite(config: object) -> None:
    """Refuse NaN and infinities (YAML's .nan, .inf) in a float setting before any range: NaN passes every check
    written as `v < 0`. Measured: `lr: .inf` and `weight_decay: .nan` trained the run, then refused to export its
    NaN weights; `rl.sft_coef: .nan` skipped every AV update (a non-finite gradient), `rl.temperature: .inf` sampled
    uniformly."""
    bad = [f"{f.name} (got {getattr(config, f.name)!r})" for f in dataclasses.fields(cast(Any, config))
           if isinstance(getattr(config, f.name), float) and not math.isfinite(getattr(config, f.name))]
    if bad:
        clip = " (grad_clip: 1.0e6 clips nothing)" if any(b.startswith("grad_clip ") for b in bad) else ""
        raise ConfigError(f"need a finite number for {'; '.join(bad)}; write one{clip}")


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 < v < 1, "in (0, 1): the share of documents held out")  # else found once data is read


_DEFAULT_WARMUP_STEPS = 10


@dataclass
class TrainConfig:
    """The SFT loop's settings, shared by the AV and AR trainers."""

    steps: int = 200
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = _DEFAULT_WARMUP_STEPS
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # applied to matrices only, never to norms or biases
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    seed: int = 0
    trainable_blocks: list[int] | None = None  # None: every block, embeddings and head
    eval_every: int = 0  # 0: evaluate at the start and the end only
    save_every: int = 0  # 0: checkpoint at the end only (when an out_dir is given)
    keep_checkpoints: int = 2
    bf16: bool = True  # autocast on CUDA only; CPU runs stay fp32 and deterministic
    data_parallel: str = "ddp"  # under torchrun: "ddp" replicates the model on each rank, "fsdp" shards it
    activation_checkpointing: bool = False  # recompute each block in backward (hooks replayed)

    def __post_init__(self) -> None:
        _check_finite(self)
        self.betas = _adam_betas(self.betas)
        self.trainable_blocks = _block_indices(self.trainable_blocks)
        _check_ranges(self, steps=_AT_LEAST_1, batch_size=_AT_LEAST_1, grad_accum=_AT_LEAST_1, lr=_POSITIVE)
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0 (0: none), got {self.weight_decay}")
        _check_ranges(self, min_lr_ratio=(lambda v: 0 <= v <= 1, "in [0, 1]"), warmup_steps=_NON_NEGATIVE,
                      grad_clip=_POSITIVE)
        if self.data_parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"data_parallel must be 'ddp' or 'fsdp', got {self.data_parallel!r}")
        _check_ranges(self, eval_every=_NON_NEGATIVE, save_every=_NON_NEGATIVE, keep_checkpoints=_AT_LEAST_1)
        _warn_warmup_spans_run(self)


def _warn_warmup_spans_run(config: TrainConfig) -> None:
    """Warn when the run ends inside its warmup (`loop.lr_at`): its cosine never starts, and a run shorter than its
    warmup never reaches `lr`. The default warmup of 10 did this to every run of up to 10 steps without a word. Not
    an error: a smoke run of a few steps is legitimate. warmup_steps = steps = 1 passes: its one step runs at `lr`,
    as without warmup."""
    if config.warmup_steps < max(config.steps, 2):
        return
    if config.warmup_steps > config.steps:
        reach = (f"the learning rate peaks at {config.lr * config.steps / config.warmup_steps:.3g} (lr * steps / "
                 f"warmup_steps), short of lr={config.lr:g}")
    else:
        reach = f"the learning rate reaches lr={config.lr:g} only on the last step"
    default = " (the default)" if config.warmup_steps == _DEFAULT_WARMUP_STEPS else ""
    warn_at_caller(f"warmup_steps={config.warmup_steps}{default} >= steps={config.steps}: the run ends inside its "
                   f"warmup, so {reach}, and the cosine decay to lr * min_lr_ratio never starts. Set warmup_steps "
                   "below steps (0: no warmup)")


# The nla-lens training commands, each with the section of its config that holds save_every (the CLI's hint on
# an interrupted run names it), and every command that reads a config.
CHECKPOINT_SECTIONS = {"train-ar": "train", "train-av": "train", "train-rl": "rl"}
COMMANDS = ("extract", *CHECKPOINT_SECTIONS)


def check_command(command: Any, expected: str | None) -> None:
    """A config's optional `command:`, the nla-lens command it was written for (the shipped examples carry it),
    against the command reading it (`expected`; None: any). Without it `nla-lens train-av` took the AR's YAML for
    its own, an AR's keys being a subset of an AV's, and trained an AV into the AR's out_dir."""
    if command is None:
        return
    if command not in COMMANDS:
        raise ConfigError(f"command: {command!r} is no nla-lens command with a config; set one of {list(COMMANDS)} "
                          "(the command this config is for), or leave it out")
    if expected is not None and command != expected:
        raise ConfigError(f"command: this config is for nla-lens {command}, not {expected} (if it is {expected}'s, "
                          f"set command: {expected})")


@dataclass
class ExtractRunConfig:
    """`nla-lens extract`: a base HF folder, a JSONL corpus ({"text"} per line, "id" optional: absent or null, the
    line index), an out_dir."""

    COMMAND: ClassVar[str] = "extract"
    base_model: str
    corpus: str
    out_dir: str
    extract: ExtractConfig
    device: str = "cpu"
    dtype: str = "float32"  # a name checks.DTYPES holds ("bf16", ...) or a torch floating-point dtype
    command: str | None = None  # optional: "extract", refused by the other commands

    def __post_init__(self) -> None:
        check_command(self.command, self.COMMAND)
        _check_dtypes(self, "dtype")


@dataclass
class SFTRunConfig:
    """Fields both `nla-lens train-av` and `train-ar` read."""

    COMMAND: ClassVar[str | None] = None
    base_model: str  # HF folder the AV / AR is initialised from (the base model itself)
    activations: str  # an extraction folder
    explanations: str  # JSONL: {"doc_id", "position", "explanation"} per line
    out_dir: str  # checkpoints/ and the exported model/ go here
    eval_fraction: float = 0.1
    split_seed: int = 0
    device: str = "cpu"  # under torchrun, "cuda" means each rank's own GPU
    dtype: str = "float32"  # the dtype the model is trained in
    resume: str | None = None  # "latest" or a checkpoint folder
    export_dtype: str = "float32"
    train: TrainConfig = field(default_factory=TrainConfig)
    command: str | None = None  # optional: "train-av" or "train-ar", refused by the other commands

    def __post_init__(self) -> None:
        check_command(self.command, self.COMMAND)
        _check_dtypes(self, "dtype", "export_dtype")
        check_training_dtypes([config_dtype(self.dtype)], "dtype")
        _check_ranges(self, eval_fraction=_FRACTION)


@dataclass
class AVRunConfig(SFTRunConfig):
    """`nla-lens train-av`: AV SFT from the base model, with the injection it will be served with (`injection`,
    `hook_point`; `injection_scale` for embedding replacement). Each evaluation also verbalizes the first `n_samples`
    held-out vectors greedily and logs them beside their targets: a first look at what the AV says."""

    COMMAND: ClassVar[str | None] = "train-av"
    injection: str = "karvonen"
    hook_point: str | None = None
    injection_scale: float | None = None  # embedding replacement only
    n_samples: int = 4
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.injection not in DEFAULT_HOOK_POINT:  # else an InputError without the file, once the data is read
            raise ConfigError(f"injection: {self.injection!r} is no injection method; set one of "
                              f"{sorted(DEFAULT_HOOK_POINT)}")
        if self.n_samples < 0 or self.sample_max_new_tokens < 1:
            raise ConfigError(f"need n_samples >= 0 (0: no sample verbalizations) and sample_max_new_tokens >= 1 "
                              f"(got {self.n_samples}, {self.sample_max_new_tokens})")


@dataclass
class ARRunConfig(SFTRunConfig):
    """`nla-lens train-ar`: AR SFT (the base model's first K+1 blocks and a readout) on the AV's extraction and
    explanations; the same `eval_fraction` and `split_seed` hold out the same documents."""

    COMMAND: ClassVar[str | None] = "train-ar"


@dataclass
class RLConfig:
    """GRPO on the AV with the AR as reward, the AR trained alongside (the paper's and nanoNLA's recipe).

    Each step: `prompts_per_step` vectors x `group_size` samples; reward -MSE at `mse_scale`, a
    miss (failed parse, truncated at `max_new_tokens`, non-finite MSE) scores -2.0 at sqrt(d);
    advantages normalised per group; PPO-clipped surrogate + `kl_coef` x k3 KL to the frozen SFT
    AV; then one AR MSE step on the same explanations (misses dropped). Learning rates are constant.
    `ppo_epochs` > 1 (PPO's epochs, verl's `ppo_epochs`) takes that many AV updates on each rollout,
    the clip measured against the sampling policy; the AR still takes one step per rollout.

    `sft_coef` > 0 goes beyond that recipe: it adds `sft_coef` x the SFT loss (mean token
    cross-entropy) of `sft_batch` supervised rows per step to the AV's loss, anchoring the AV to its
    labels where the reward does not look (InstructGPT's "PPO-ptx"). 0, the default, is the recipe.
    `self_imitation` > 0 (also beyond it) adds that x the mean token cross-entropy of each group's best scored
    sample (a bonus on its advantage, exact while the ratio is 1: `grpo.best_sample_bonus`).
    """

    steps: int = 100
    prompts_per_step: int = 16  # B: vectors per step (under torchrun, split over the ranks)
    group_size: int = 8  # G: samples per vector
    temperature: float = 1.0
    top_p: float = 1.0  # sampling only: log-probs always come from the raw (pre top-p) distribution
    max_new_tokens: int = 150
    clip_eps: float = 0.2
    ppo_epochs: int = 1  # AV updates per rollout (the recipe: 1, where the ratio is 1 and the clip never binds)
    kl_coef: float = 0.01  # 0 drops the reference model
    lr: float = 1e-5
    ar_lr: float = 5e-5
    train_ar: bool = True  # False: the AR is a frozen reward model
    sft_coef: float = 0.0  # > 0: add this x the SFT loss of `sft_batch` labelled rows per step (not the recipe)
    sft_batch: int = 32
    self_imitation: float = 0.0  # > 0: add this x the CE of each group's best scored sample (not the recipe)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch: int = 64  # samples per forward in the AV and AR updates (memory only, not the result)
    seed: int = 0
    eval_every: int = 0  # 0: greedy held-out round trip at the start and the end only
    # held-out vectors in that round trip (0 or 1: no evaluation); under 32, FVE uses the AR sidecar's baseline.
    # A held-out split of fewer is scored whole, with a warning naming both counts
    eval_vectors: int = 64
    save_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _check_finite(self)
        self.betas = _adam_betas(self.betas)
        _check_ranges(self, steps=_AT_LEAST_1, prompts_per_step=_AT_LEAST_1, max_new_tokens=_AT_LEAST_1,
                      micro_batch=_AT_LEAST_1, ppo_epochs=_AT_LEAST_1)
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2: advantages are relative to the group (got {self.group_size})")
        _check_ranges(self, temperature=_POSITIVE, top_p=(lambda v: 0 < v <= 1, "in (0, 1]"), lr=_POSITIVE,
                      ar_lr=_POSITIVE, grad_clip=_POSITIVE, kl_coef=_NON_NEGATIVE, self_imitation=_NON_NEGATIVE)
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1): the ratio is clipped to [1 - clip_eps, 1 + clip_eps] "
                              f"(the recipe: 0.2), got {self.clip_eps}")
        if self.sft_coef < 0 or self.sft_batch < 1:
            raise ConfigError(f"need sft_coef >= 0 and sft_batch >= 1 (got {self.sft_coef}, {self.sft_batch})")
        _check_ranges(self, eval_every=_NON_NEGATIVE, eval_vectors=_NON_NEGATIVE, save_every=_NON_NEGATIVE,
                      keep_checkpoints=_AT_LEAST_1)
        if self.eval_every > 0 and self.eval_vectors < 2:  # else accepted, and no evaluation ever ran
            raise ConfigError(f"eval_every={self.eval_every} asks for a held-out round trip every {self.eval_every} "
                              f"steps, but eval_vectors={self.eval_vectors} runs none (FVE needs >= 2 vectors); set "
                              "eval_vectors >= 2 (the default is 64), or eval_every: 0")


@dataclass
class RLRunConfig:
    """`nla-lens train-rl`: an SFT AV and AR, the extraction + explanations they were trained on.

    The split is SFT's (the same explanations, `eval_fraction` and `split_seed` give the same rows: rows
    without an explanation are left out before the split), so RL trains on SFT's training vectors and
    evaluates on its held-out ones; `rl.sft_coef` > 0 also trains on the explanations (its SFT term).
    """

    COMMAND: ClassVar[str] = "train-rl"
    av: str  # SFT AV folder: the policy's start and the frozen KL reference
    ar: str  # SFT AR folder: the reward model (trained on unless rl.train_ar is false)
    activations: str
    explanations: str
    out_dir: str  # checkpoints/, av/ and ar/ (exported, sidecars say stage: rl) go here
    eval_fraction: float = 0.1
    split_seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    resume: str | None = None
    export_dtype: str = "float32"
    rl: RLConfig = field(default_factory=RLConfig)
    command: str | None = None  # optional: "train-rl", refused by the other commands

    def __post_init__(self) -> None:
        check_command(self.command, self.COMMAND)
        _check_dtypes(self, "dtype", "export_dtype")
        check_training_dtypes([config_dtype(self.dtype)], "dtype")
        _check_ranges(self, eval_fraction=_FRACTION)


# Keys a config file may write that the run then never reads: per section class, each key with why it is unread
# (given the loaded section and its prefix in the file, "rl."), or None where it is read.
_INERT_KEYS: dict[type, tuple[tuple[str, Callable[[Any, str], str | None]], ...]] = {
    RLConfig: (
        ("sft_batch", lambda rl, at: None if rl.sft_coef > 0 else
         f"{at}sft_coef is 0, so RL adds no SFT term (set {at}sft_coef > 0 to add one)"),
        ("ar_lr", lambda rl, at: None if rl.train_ar else
         f"{at}train_ar is false, so the AR is a frozen reward model (set {at}train_ar: true to train it)"),
    ),
    AVRunConfig: (
        ("sample_max_new_tokens", lambda av, at: None if av.n_samples > 0 else
         f"{at}n_samples is 0, so no held-out vector is verbalized at evaluation (set {at}n_samples > 0 to log "
         "some)"),
    ),
}


def _inert_keys(config: object, data: dict, at: str = "") -> list[str]:
    """Each key `data` (the file's mapping) writes where the rest of it leaves that key no effect, said with why: a
    setting that does nothing reads as one in use. Python callers building the dataclasses wrote no such key."""
    notes = []
    for cls, rules in _INERT_KEYS.items():
        if not isinstance(config, cls):
            continue
        for key, unread in rules:
            reason = unread(config, at) if key in data else None
            if reason is not None:
                notes.append(f"{at}{key} has no effect: {reason}, or delete {at}{key}")
    for f in dataclasses.fields(cast(Any, config)):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section) and isinstance(data.get(f.name), dict):
            notes += _inert_keys(section, data[f.name], f"{at}{f.name}.")
    return notes


Config = TypeVar("Config")


def load_config(cls: type[Config], path: str | Path) -> Config:
    """Read a YAML file into the dataclass `cls`, nested sections included; warn of each key the rest of the file
    leaves without effect (`_INERT_KEYS`)."""
    try:
        data = safe_load_unique(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, DuplicateKeyError):
            raise ConfigError(f"{path}: {exc.problem}{at}; delete one of the two (YAML would keep the last "
                              "silently)") from exc
        raise ConfigError(f"{path} is not a YAML config ({getattr(exc, 'problem', None) or 'unreadable'}{at}); "
                          "pass the run's .yaml file, as in examples/") from exc
    if data is None:  # else "expected a mapping, got NoneType", which does not say the file is empty
        raise ConfigError(f"config {path} is empty (or only comments); write the run's keys in it (examples/ has a "
                          "config for each command)")
    try:
        if isinstance(data, dict):  # before the keys: another command's keys read as unknown ones
            check_command(data.get("command"), getattr(cls, "COMMAND", None))
        config = from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for note in _inert_keys(config, data):
        warnings.warn(f"{path}: {note}", UserWarning, stacklevel=2)
    return config


def from_dict(cls: type[Config], data: Any, *, where: str = "") -> Config:
    """Build dataclass `cls` from a mapping; unknown keys and missing required keys are errors. `where`
    names the section in messages ("rl"; empty at the top level)."""
    at = f"{where}: " if where else ""
    if data is None and where:
        raise ConfigError(f"{at}expected a mapping for {cls.__name__}, got an empty section (YAML reads a key with "
                          "nothing under it as null); give its keys, or leave it out where it has defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"{at}expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{at}unknown key(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:  # named as keys: the dataclass's own TypeError speaks of positional arguments
        raise ConfigError(f"{at}missing key(s) {missing} for {cls.__name__}; add them (examples/ has a config "
                          "for each command)")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        child = f"{where}.{name}" if where else name
        if nested and (value is not None or hints[name] is nested):  # a section that is not optional
            value = from_dict(nested, value, where=child)
        else:
            _check_scalar(value, hints[name], child)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ConfigError) as exc:  # a section's own range checks: name the section too
        raise ConfigError(f"{at}{exc}") from exc


def _required(field: dataclasses.Field) -> bool:
    """A field the YAML must give: it has no default."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_scalar(value: Any, hint: Any, where: str) -> None:
    """A YAML value of the wrong kind for an int / float / bool / str field (optional ones too) is
    named here, not left to fail inside a comparison in the dataclass's own checks."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return
    wanted = [kind for kind in kinds if kind in _SCALARS]
    if len(wanted) != 1:
        return  # not a plain scalar field (tuples, dicts, unions of scalars): the dataclass checks it
    kind = wanted[0]
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return
    note = " (YAML reads 1e-5 as text: write 1.0e-5)" if kind is float and _number_text(value) else ""
    if where == "resume":  # `resume: true` reads as the switch it is not
        note = " (resume: latest, or a checkpoints/step-NNNNNN folder; leave it out to start at step 0)"
    raise ConfigError(f"{where}: expected {_SCALARS[kind]}, got {value!r}{note}")


def _number_text(value: Any) -> bool:
    """A string Python reads as a number (YAML 1.1 needs a dot in `1.0e-5`, so `1e-5` stays text)."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds, seeing through `X | None`."""
    if dataclasses.is_dataclass(hint):
        return cast(type, hint)  # a field's hint: the class, never an instance
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((cast(type, a) for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None
