"""The SFT loop both trainers share: AdamW, warmup + cosine, clipping, accumulation, checkpoints.

Everything that decides the trajectory is a pure function of (config, step): the learning rate and
the rows of each micro-batch (a seeded permutation per epoch). A checkpoint therefore only needs the
trainable weights and the optimizer's tensors, and resuming from one gives the same final weights as
an uninterrupted run. Checkpoints are safetensors + JSON, so loading one never unpickles anything.

Under `torchrun` the same loop runs data-parallel (`nla_lens.training.parallel`): the micro-batches
are still the global ones, split across ranks, so the world size changes float summation order only,
and checkpoints hold whole tensors that any world size can resume from.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Int
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from nla_lens.checks import blocks_phrase, counted, first_few, warn_at_caller
from nla_lens.display import format_number
from nla_lens.distributed import World
from nla_lens.errors import CheckpointError, ConfigError
from nla_lens.sidecar import SIDECAR_NAME
from nla_lens.training import parallel
from nla_lens.training.config import RLConfig, TrainConfig, check_training_dtypes
from nla_lens.training.extraction import COMPLETE, IN_PROGRESS
from nla_lens.training.recompute import activation_checkpointing
from nla_lens.vector_files import save_tensors

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that may change between a run and its resumption without changing the trajectory.
_RESUMABLE_CHANGES = {"eval_every", "save_every", "keep_checkpoints", "data_parallel", "activation_checkpointing"}
_STEPS_ARE_FIXED = (" steps cannot change on a resume, so a run cannot be extended: the cosine schedule decays the "
                    "learning rate over all steps (lr_at), and a run of another length takes every step after warmup "
                    "at another rate than these checkpoints did. Finish this run with steps: {steps}, or train longer "
                    "from step 0 in a new out_dir")


@dataclass
class TrainResult:
    """What one training run did: per-step losses, every evaluation, the last checkpoint."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr, grad_norm
    evals: list[dict[str, Any]] = field(default_factory=list)  # step + the trainer's metrics
    checkpoint: Path | None = None
    seconds: float = 0.0


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from `lr` down to `lr * min_lr_ratio`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def micro_batches(step: int, n_rows: int, config: TrainConfig) -> list[Int[Tensor, " batch"]]:
    """Row indices of each micro-batch of optimizer step `step` (seeded; independent of history)."""
    per_epoch = math.ceil(n_rows / config.batch_size)
    out = []
    for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
        epoch, k = divmod(micro, per_epoch)
        out.append(_epoch_order(n_rows, config.seed, epoch)[k * config.batch_size:(k + 1) * config.batch_size])
    return out


def blocks_outside(trainable_blocks: list[int] | None, n_layers: int) -> list[int]:
    """The `trainable_blocks` entries that index no block of an `n_layers`-block model: the one rule both
    `select_trainable` and the CLI's check from config.json (before the weights load) apply."""
    return [b for b in trainable_blocks or () if not 0 <= b < n_layers]


def select_trainable(modules: dict[str, nn.Module], trainable_blocks: list[int] | None) -> dict[str, nn.Parameter]:
    """Parameters to train, named `<module>.<param>`; frozen ones get `requires_grad=False`.

    With `trainable_blocks`, only those TransformerLens blocks of the `model` module train (other
    modules, e.g. the AR readout, always train). Parameters already frozen stay frozen.
    """
    n_layers = cast("HookedTransformer", modules["model"]).cfg.n_layers
    if blocks_outside(trainable_blocks, n_layers):
        raise ConfigError(f"trainable_blocks {trainable_blocks} must index the model's {blocks_phrase(n_layers)}")
    params = {}
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            block = re.match(r"blocks\.(\d+)\.", name)
            if module_name == "model" and trainable_blocks is not None and (
                    block is None or int(block.group(1)) not in trainable_blocks):
                param.requires_grad_(False)
            if param.requires_grad:
                params[f"{module_name}.{name}"] = param
    if not params:
        raise ConfigError("no parameter is left to train; check trainable_blocks")
    return params


def make_optimizer(params: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def train(
    *,
    modules: dict[str, nn.Module],
    n_rows: int,
    loss_sum: Callable[[Int[Tensor, " batch"]], Tensor],
    units: Callable[[Int[Tensor, " batch"]], int],
    evaluate: Callable[[], dict[str, Any]],
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    desc: str = "train",
    progress: bool = True,
    data: str | None = None,
    settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Run `config.steps` optimizer steps; a step's loss is `loss_sum(rows) / units(rows)` over the rows of
    all its micro-batches.

    `loss_sum` sums the per-unit losses of some rows (tokens, vectors) and `units` counts those
    units: each micro-batch (split across ranks or not) is normalised by the step's global count, so
    `grad_accum` micro-batches of `batch_size` rows give the gradient of one batch of all those rows.
    `modules["model"]` is the TransformerLens model. `evaluate()` runs (on every rank) at the start,
    every `eval_every` steps and at the end; checkpoints go to `out_dir/checkpoints/step-NNNNNN`.
    `resume` is a checkpoint folder or "latest" (the newest under `out_dir`; step 0 before the first).
    `data` (`dataset.data_fingerprint` of the rows) is kept in each checkpoint and must match on resume; so must
    `settings`, the trainer's own settings outside `config` that shape the trajectory (the AV's injection), named.
    """
    check_resume(out_dir, resume)
    started = time.perf_counter()
    world = parallel.current_world()
    params = select_trainable(modules, config.trainable_blocks)
    check_training_dtypes((p.dtype for p in params.values()), "the weights to train")  # a float16 model from Python
    device = next(iter(params.values())).device
    with contextlib.ExitStack() as stack:
        stack.enter_context(deterministic_algorithms())
        if config.activation_checkpointing:
            stack.enter_context(activation_checkpointing(modules["model"]))
        if config.data_parallel == "fsdp" and world.is_distributed:
            stack.enter_context(warnings.catch_warnings())
            # FSDP2 warns that the TL model returns views; the losses never modify them in place, and
            # the gradients are tested against one process (tests/test_distributed_training.py).
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            parallel.shard_modules(modules, device, bf16=config.bf16)
            params = select_trainable(modules, config.trainable_blocks)  # FSDP replaced the parameters
        step_loss = parallel.wrap(parallel.LossModule(modules, loss_sum), config.data_parallel, device)
        optimizer = make_optimizer(params, config)
        result = TrainResult(steps=config.steps)
        folder = resume_folder(resume, out_dir)
        if folder is not None:
            result = load_checkpoint(folder, params, optimizer, config, data=data, settings=settings)
            log_resumed(folder, out_dir, len(result.history))
        _run_steps(modules, step_loss, params, optimizer, n_rows, units, evaluate, config, result, world,
                   out_dir=out_dir, desc=desc, progress=progress, data=data, settings=settings, started=started)
    result.seconds += time.perf_counter() - started
    return result


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic kernels for a training run, then the caller's setting back.

    Without them a seeded AV SFT run on two CPU threads gave other weights on every rerun (measured:
    20 steps of the toy AV, two runs, two hashes; identical with this on, and on one thread).
    `warn_only`: an op with no deterministic kernel (some CUDA ones) warns instead of failing.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _run_steps(modules: dict[str, nn.Module], step_loss: nn.Module, params: dict[str, nn.Parameter],
               optimizer: torch.optim.Optimizer, n_rows: int, units: Callable[[Tensor], int],
               evaluate: Callable[[], dict[str, Any]], config: TrainConfig, result: TrainResult,
               world: World, *, out_dir: str | Path | None, desc: str, progress: bool, data: str | None,
               settings: dict[str, Any] | None, started: float) -> None:
    start = len(result.history)
    device = next(iter(params.values())).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 and device.type == "cuda"
                else contextlib.nullcontext())

    def run_eval(step: int) -> None:
        for module in modules.values():
            module.eval()
        with autocast:
            metrics = {"step": step, **evaluate()}
        result.evals.append(metrics)
        if world.is_main:
            logger.info("%s step %d: %s", desc, step,
                        {k: v for k, v in metrics.items() if not isinstance(v, list)})
            for sample in metrics.get("samples", []):
                logger.info("  %s", sample)

    if start == 0:
        run_eval(0)
    bar = tqdm(range(start, config.steps), desc=desc, unit="step", initial=start, total=config.steps,
               disable=not progress or not world.is_main)
    for step in bar:
        for module in modules.values():
            module.train()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local_total = _accumulate_gradients(step_loss, micro_batches(step, n_rows, config), units, world, autocast)
        total = parallel.all_reduce_sum(local_total, device) / world.world_size  # one collective per step
        grad_norm = float(parallel.whole(torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)))
        if math.isfinite(grad_norm):
            optimizer.step()
        elif world.is_main:  # one NaN or inf would spread through every weight through the clip and Adam
            logger.warning("%s step %d: non-finite gradient norm; the update is skipped", desc, step + 1)
        optimizer.zero_grad(set_to_none=True)
        result.history.append({"step": step + 1, "loss": total, "lr": lr, "grad_norm": grad_norm})
        bar.set_postfix(loss=format_number(total, 4))
        done = step + 1
        if is_due(done, config.steps, config.eval_every):
            run_eval(done)
        if out_dir is not None and is_due(done, config.steps, config.save_every):
            result.checkpoint = save_checkpoint(Path(out_dir), done, params, optimizer, config, result, data=data,
                                                settings=settings,
                                                seconds=result.seconds + time.perf_counter() - started)
    for module in modules.values():
        module.eval()


def is_due(done: int, steps: int, every: int) -> bool:
    """Evaluate or save after `done` steps: every `every` steps (0: never) and after the last one."""
    return done == steps or (every > 0 and done % every == 0)


def _accumulate_gradients(step_loss: nn.Module, batches: list[Int[Tensor, " batch"]], units: Callable[[Tensor], int],
                          world: World, autocast: contextlib.AbstractContextManager) -> float:
    """Backward through one optimizer step's micro-batches; this rank's summed loss.

    Every micro-batch is normalised by the step's count (all micro-batches, all ranks), so accumulation
    equals one big batch; the ranks' gradients are averaged, hence the world size. DDP syncs on the last one.
    """
    divisor = sum(units(index) for index in batches) / world.world_size
    local_total = 0.0
    for k, index in enumerate(batches):
        share, counts = parallel.rank_share(index, world)
        last = k == len(batches) - 1
        no_sync = (cast(DistributedDataParallel, step_loss).no_sync() if hasattr(step_loss, "no_sync") and not last
                   else contextlib.nullcontext())
        with no_sync:
            with autocast:
                loss = step_loss(share, divisor)
            if not counts:
                loss = loss * 0.0
            loss.backward()
        local_total += float(loss.detach())
    return local_total


def save_checkpoint(out_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    config: TrainConfig | RLConfig, result: TrainResult, *, data: str | None = None,
                    settings: dict[str, Any] | None = None, seconds: float) -> Path:
    """Write `checkpoints/step-NNNNNN` atomically and keep the newest `keep_checkpoints` of them; `data`
    is the run's `dataset.data_fingerprint`, `seconds` the run's time up to this step (earlier stretches of a
    resumed run included): `result.seconds` counts only the stretches before this process's.

    Tensors are saved whole (FSDP shards are gathered; every rank must call this), rank 0 writes.
    """
    root = out_dir / CHECKPOINT_DIR
    folder = root / f"step-{step:06d}"
    weights = parallel.gathered_on_main(params.items())
    state = optimizer.state_dict()
    entries = [(f"{index}.{key}", value) for index, entry in state["state"].items() for key, value in entry.items()]
    tensors = parallel.gathered_on_main((k, v) for k, v in entries if isinstance(v, Tensor))
    scalars = {k: v for k, v in entries if not isinstance(v, Tensor)}
    if not parallel.current_world().is_main:
        return folder
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(weights, tmp / "params.safetensors")
    save_tensors(tensors, tmp / "optimizer.safetensors")
    trainer_state = {
        "step": step, "param_names": list(params), "param_groups": state["param_groups"],
        "optimizer_scalars": scalars, "config": asdict(config),
        "history": result.history, "evals": result.evals, "seconds": seconds, "data": data,
        "settings": settings,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in _checkpoints(root)[:-config.keep_checkpoints]:
        shutil.rmtree(old)
    return folder


def _defaults_as_saved(config_type: type) -> dict[str, Any]:
    """The defaults of a config dataclass's fields, as a checkpoint's JSON would hold them."""
    defaults = {f.name: f.default for f in fields(config_type) if f.default is not MISSING}
    return json.loads(json.dumps(defaults))


def load_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    config: TrainConfig | RLConfig, resumable: frozenset[str] | set[str] = frozenset(), *,
                    data: str | None = None, settings: dict[str, Any] | None = None) -> TrainResult:
    """Restore weights and optimizer state from `folder`; the config must match the saved one, except
    for settings that leave the trajectory alone (`_RESUMABLE_CHANGES`, plus `resumable`), and so must
    the `data` fingerprint and the `settings` where both the checkpoint and the caller have them.

    The saved tensors are whole, so the run may resume on another number of ranks.
    """
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint (no trainer_state.json)")
    state = read_trainer_state(state_path)
    check_checkpoint_command(folder, checkpoint_command(asdict(config), params), state)
    saved = state["config"]
    requested = json.loads(json.dumps(asdict(config)))  # tuples as the JSON lists the checkpoint holds
    # A setting added after the checkpoint was written ran at the default it has now.
    saved = {**_defaults_as_saved(type(config)), **saved}
    changed = sorted(k for k, v in requested.items() if k not in _RESUMABLE_CHANGES | resumable and v != saved.get(k))
    values = [f"{k}: {saved.get(k)!r} in the checkpoint, {requested[k]!r} now" for k in changed]
    values += _other_settings(state.get("settings"), settings)
    if values:
        raise ConfigError(f"resuming from {folder} with other settings ({'; '.join(values)}); an exact resume needs "
                          "the config the run started with, so set them back."
                          + (_STEPS_ARE_FIXED.format(steps=saved["steps"]) if "steps" in changed else ""))
    if state["step"] > config.steps:  # only where steps may change (RL): it ran no step and exported step N's weights
        raise ConfigError(f"resuming from {folder}, at step {state['step']}, with steps: {config.steps}: a resume "
                          f"cannot go back, so the run would take no step and record step {state['step']}'s weights "
                          f"as a {config.steps}-step run. Set steps to {state['step']} or more (its run set "
                          f"{saved['steps']}), or resume from a checkpoint at step {config.steps} or before")
    if data is not None and state.get("data") not in (None, data):
        raise ConfigError(f"resuming from {folder} on other data than the run started with (another activations "
                          "or explanations file, eval_fraction or split_seed), or from other starting weights "
                          "(another av / ar / base_model folder or dtype); an exact resume needs the same rows and "
                          "the same start")
    if state["param_names"] != list(params):
        raise CheckpointError(f"{folder} holds other trainable parameters than this model; resume with "
                              "the same base model and trainable_blocks")
    weights = _read_saved(folder / "params.safetensors", load_file)
    saved_moments = _read_saved(folder / "optimizer.safetensors", load_file)  # both read before any weight changes
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    _check_saved_weights(folder / "params.safetensors", weights, params)
    _check_saved_dtypes(folder, weights, params)
    _check_saved_moments(folder / "optimizer.safetensors", saved_moments, ordered)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(parallel.like(weights[name], param))
    moments: dict[int, dict[str, Any]] = {}
    for key, value in saved_moments.items():
        index, name = key.split(".", 1)
        param = ordered[int(index)]
        moments.setdefault(int(index), {})[name] = parallel.like(value, param) if value.shape == param.shape else value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    return TrainResult(steps=config.steps, history=state["history"], evals=state["evals"],
                       checkpoint=folder, seconds=state["seconds"])


def _other_settings(saved: Any, settings: dict[str, Any] | None) -> list[str]:
    """Each of `settings` that differs from the checkpoint's, with both values. A checkpoint written before
    checkpoints kept them has none to compare."""
    if not isinstance(saved, dict) or settings is None:
        return []
    now = json.loads(json.dumps(settings))  # as the checkpoint's JSON holds them
    return [f"{k}: {saved[k]!r} in the checkpoint, {v!r} now" for k, v in sorted(now.items())
            if k in saved and saved[k] != v]


def _read_saved(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)` for one file of a training checkpoint; a damaged or missing file (a copy, a download or a
    write cut short) is named with the way on, instead of safetensors' or json's bare error."""
    try:
        return read(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc


def _check_saved_weights(path: Path, weights: dict[str, Tensor], params: dict[str, nn.Parameter]) -> None:
    """Refuse a readable params.safetensors that lacks one of `params` or holds one of another shape (a file cut
    down or edited, or of another base model with the same parameter names): restoring it ended in a bare KeyError
    or RuntimeError, the weights before it already overwritten."""
    missing = [name for name in params if name not in weights]
    # A sharded (FSDP) parameter's shape is the whole tensor's, as saved.
    other = [f"{name} as {list(weights[name].shape)} where this model's is {list(param.shape)}"
             for name, param in params.items() if name in weights and weights[name].shape != param.shape]
    problems = ([f"lacks {counted(len(missing), 'trainable parameter')} ({first_few(missing)})"] if missing else [])
    problems += [f"holds {counted(len(other), 'parameter')} of another shape ({first_few(other)}; if the run "
                 "trained another base model, resume with that one)"] if other else []
    if problems:
        raise _damaged(path, "; ".join(problems))


def _check_saved_dtypes(folder: Path, weights: dict[str, Tensor], params: dict[str, nn.Parameter]) -> None:
    """Refuse a resume in another dtype than the run trained in (its checkpoint saves the weights in it). The data
    fingerprint samples weights as float32, so a base stored in bfloat16 (as released bases are) fingerprinted alike
    loaded in either, and the run went on at another precision, its saved weights rounded or widened, without a word."""
    pairs = {(weights[name].dtype, param.dtype) for name, param in params.items() if weights[name].dtype != param.dtype}
    if pairs:
        saved, now = (", ".join(sorted({str(pair[i]).removeprefix("torch.") for pair in pairs})) for i in (0, 1))
        raise ConfigError(f"resuming from {folder}, whose run trained in {saved}, with weights in {now}: an exact "
                          f"resume needs the dtype the run started with; set dtype: {saved} back (dtype= from "
                          "Python), or start a new run in a new out_dir")


def _check_saved_moments(path: Path, moments: dict[str, Tensor], ordered: list[Tensor]) -> None:
    """Refuse optimizer moments of a parameter the optimizer lacks, or of another shape than it (a bare IndexError
    on restore, or a RuntimeError at the first step after it). Adam's step count is a scalar of any parameter."""
    problems = []
    for key, value in moments.items():
        index = int(key.split(".", 1)[0])
        if index >= len(ordered):
            problems.append(f"{key} is of parameter {index}, but the optimizer has {len(ordered)}")
        elif value.dim() > 0 and value.shape != ordered[index].shape:
            problems.append(f"{key} is {list(value.shape)} where its parameter is {list(ordered[index].shape)}")
    if problems:
        raise _damaged(path, f"holds optimizer moments that fit no parameter ({first_few(problems)})")


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} {problem}: this training checkpoint is damaged or incomplete. Resume from an earlier checkpoint of "
        f"the run (delete {path.parent.name} and resume: latest picks the one before it, if the run kept one), or "
        "start the run again")


def checkpoint_command(config: dict[str, Any], param_names: Iterable[str]) -> str:
    """The nla-lens command whose run trains with `config` and `param_names` (a checkpoint's `trainer_state.json`
    holds both): RL's config has a group_size, and of the SFT runs only the AR trains a readout."""
    return ("train-rl" if "group_size" in config
            else "train-ar" if any(name.startswith("readout.") for name in param_names) else "train-av")


def check_checkpoint_command(folder: Path, wanted: str, state: dict[str, Any] | None = None) -> None:
    """Refuse a resume from a checkpoint of another command's run (`state`: its `trainer_state.json`, read here if
    not given): else its settings read as "other settings" to set back, which no setting could match."""
    state = read_trainer_state(folder / "trainer_state.json") if state is None else state
    found = checkpoint_command(state["config"], state["param_names"])
    if found != wanted:
        raise ConfigError(f"{folder} is a checkpoint of a {found} run, and this is {wanted}: a resume continues a "
                          f"run of the same command. Point resume at a checkpoints/step-NNNNNN folder of a {wanted} "
                          "run (or at latest in that run's out_dir), or leave resume out to start from step 0")


# The JSON type of each key of trainer_state.json that load_checkpoint reads (`data` may be null or absent).
_TRAINER_STATE_TYPES = {"step": "an integer", "config": "an object", "param_names": "an array",
                        "param_groups": "an array", "optimizer_scalars": "an object", "history": "an array",
                        "evals": "an array", "seconds": "a number"}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """`trainer_state.json`, checked to have the shape `save_checkpoint` writes before any weight is restored:
    valid JSON of another shape (edited by hand, cut to a list) ended in a bare KeyError or TypeError."""
    state = _read_saved(path, lambda path: json.loads(path.read_text(encoding="utf-8")))
    if not isinstance(state, dict):
        raise _damaged(path, f"holds {_json_type(state)}, not a JSON object")
    problems = [f"{key} is missing" if key not in state else f"{key} is {_json_type(state[key])}, not {kind}"
                for key, kind in _TRAINER_STATE_TYPES.items()  # an integer is a number too
                if key not in state or _json_type(state[key]) not in (kind, kind.replace("a number", "an integer"))]
    if not problems:
        problems = [f"param_groups[{k}] is not an object with a betas array" for k, group in
                    enumerate(state["param_groups"]) if not isinstance(group, dict) or
                    not isinstance(group.get("betas"), list)]
        problems += [f"optimizer_scalars key {key!r} is not <index>.<name>" for key in state["optimizer_scalars"]
                     if not re.fullmatch(r"\d+\..+", key)]
    if problems:
        raise _damaged(path, f"is not a training checkpoint's state ({'; '.join(problems)})")
    return state


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return names.get(type(value), "null")


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=_step)


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoints a run wrote under `out_dir`, oldest first."""
    return _checkpoints(Path(out_dir) / CHECKPOINT_DIR)


def resume_folder(resume: str | Path | None, out_dir: str | Path | None) -> Path | None:
    """The checkpoint `resume` names ("latest": the newest under `out_dir`), or None to start at step 0: no
    `resume`, or "latest" before the first checkpoint, so one config launches a preemptible job and relaunches it.
    Checkpoints in `out_dir` past it are an abandoned run's: a warning, since `resume: latest` picks them until
    this run overwrites them."""
    if resume is None:
        return None
    if resume == "latest":
        if out_dir is None:
            raise ConfigError("resume: latest picks the newest checkpoint under out_dir; give out_dir too")
        found = checkpoints(out_dir)
        if not found:
            logger.info("resume: latest found no checkpoint under %s; starting at step 0", out_dir)
            return None
        folder = found[-1]
    else:
        folder = Path(resume)
    if out_dir is not None and _STEP_DIR.match(folder.name):
        later = [p.name for p in checkpoints(out_dir) if _step(p) > _step(folder)]
        if later:
            warn_at_caller(f"resuming from {folder} into {out_dir}, which holds later checkpoints of another run "
                           f"({', '.join(later)}): until this run overwrites them, resume: latest picks them. Move "
                           "them away, or resume into a new out_dir")
    return folder


def log_resumed(folder: Path, out_dir: str | Path | None, step: int) -> None:
    """Say where a resumed run continues; a checkpoint of another run's `out_dir` starts a branch of that run here,
    which is easy to miss when it was meant as a continuation (`resume: latest` in that run's own `out_dir`)."""
    source_run = folder.parent.parent
    if out_dir is None or not _STEP_DIR.match(folder.name) or source_run.resolve() == Path(out_dir).resolve():
        logger.info("resumed from %s at step %d", folder, step)
    else:
        logger.info("resumed from %s at step %d: a branch of the run in %s, continued in %s (that run's folder is "
                    "left as it is)", folder, step, source_run, out_dir)


def check_resume(out_dir: str | Path | None, resume: str | Path | None,
                 resumable: frozenset[str] | set[str] = frozenset(), written: Collection[str] = ()) -> None:
    """What `out_dir` and `resume` need, checked before any step (by the CLI, before any model loads). `out_dir`
    must not be a run's input (`check_not_an_input_folder`). A checkpoint folder must be one. Without `resume`,
    `out_dir` must hold no checkpoint: the run would start at step 0 over an interrupted run's checkpoints
    (keep_checkpoints pruning them), or leave a longer run's newest for `resume: latest` to pick. `resumable`: the
    settings `load_checkpoint` lets a resume change (RL's `steps`); `written`: the names the caller's run writes in
    `out_dir` beside the checkpoints (its export, its record), which a finished run's refusal names where found."""
    if out_dir is not None:  # every trainer and training command passes here, so none writes into its inputs
        check_not_an_input_folder(out_dir)
    if resume is None:
        if out_dir is None:
            return
        found = checkpoints(out_dir)
        if found and is_last_step(found[-1]):
            raise ConfigError(_finished_run(Path(out_dir), found[-1], written, extendable="steps" in resumable))
        if found:
            raise ConfigError(f"{out_dir} holds checkpoints up to step {_step(found[-1])} "
                              f"({', '.join(p.name for p in found)}): a run without resume would start at step 0 "
                              "over them. Set resume: latest (resume=\"latest\" from Python) to continue that run, "
                              f"or point out_dir at a new folder (or remove {Path(out_dir) / CHECKPOINT_DIR})")
    elif resume != "latest" and not (Path(resume) / "trainer_state.json").is_file():
        what = "holds no trainer_state.json" if Path(resume).is_dir() else "does not exist"
        raise CheckpointError(f"resume: {resume} {what}, so it is no training checkpoint; set resume to a "
                              f"{CHECKPOINT_DIR}/step-NNNNNN folder of the run, or to latest")


_TRAINING_WRITES = "training would write its checkpoints (and nla-lens its exports and train_result.json)"


def check_not_an_input_folder(out_dir: str | Path, *, itself: bool = True, writes: str = _TRAINING_WRITES) -> None:
    """Refuse an `out_dir` that is an extraction or a model folder (the activations, an SFT export, the base), or lies
    inside one (`activations/run`): a run wrote its checkpoints (and, from the CLI, its exports and record) among
    their files, and deleting it would take them along (an SFT export then refused to be written again over them).
    `itself=False` checks only the folders above it (`extract`, whose out_dir is an extraction it may resume);
    `writes` says what the run would write there."""
    folder = Path(out_dir)
    for candidate in ([folder] if itself else []) + list(folder.absolute().parents):
        what = _input_folder_kind(candidate, nested=candidate != folder)
        if what is None:
            continue
        where = f"is {what}" if candidate == folder else f"lies inside {candidate}, {what}"
        raise ConfigError(f"out_dir {out_dir} {where}, an input of runs, not a run's out_dir: {writes} among its "
                          "files. Point out_dir at a new folder" + ("" if candidate == folder else " outside it"))


def _input_folder_kind(folder: Path, *, nested: bool) -> str | None:
    """What input of runs `folder` is, in words, or None. A folder above out_dir (`nested`) is a model folder only
    with weights beside its config.json: a project folder may hold a config.json of its own."""
    if (folder / COMPLETE).exists() or (folder / IN_PROGRESS).exists():
        return "an extraction (nla-lens extract's out_dir)"
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if (folder / SIDECAR_NAME).is_file() or ((folder / "config.json").is_file() and (weights or not nested)):
        return "a model folder (an NLA export or a base model: it holds config.json or nla_meta.yaml)"
    return None


def is_last_step(folder: Path) -> bool:
    """Whether checkpoint `folder` holds its run's last step, i.e. that run's training finished. A checkpoint whose
    state cannot be read says no: resuming from it reports the damage."""
    try:
        return _step(folder) == read_trainer_state(folder / "trainer_state.json")["config"].get("steps")
    except CheckpointError:
        return False


def _finished_run(out_dir: Path, last: Path, written: Collection[str], *, extendable: bool) -> str:
    """The refusal of a rerun without `resume` over a finished run, where "continue that run" misleads: measured on
    train-av / train-ar / train-rl, `resume: latest` runs no step, exports the same weights again and rewrites
    train_result.json. Of the rest of `out_dir` it names only what the run wrote: other files there are the user's."""
    outputs = sorted(name for name in written if (out_dir / name).exists())
    beside = f", and beside them: {', '.join(outputs)}" if outputs else ""
    return (f"{out_dir} holds a finished run: its checkpoints reach its last step, {_step(last)} ({last.name})"
            f"{beside}. A run without resume would start at step 0 over it. To train again, point out_dir at a new "
            f"folder (or remove {out_dir / CHECKPOINT_DIR}). resume: latest (resume=\"latest\" from Python) runs no "
            "further step: it restores the finished weights, which the nla-lens commands export again"
            + (", unless you raise steps: then it extends the run" if extendable else ""))


def _step(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))  # type: ignore[union-attr]
