"""Activation checkpointing for TL blocks that replays the forward's hooks in the recompute.

TL hooks usually live for one forward (a `hooks(...)` context; the AV trainer installs the injection
in one), so they are gone when backward recomputes a checkpointed block. A recompute without the
injection would rebuild other activations than the forward used, and torch's checkpoint compares
only their shapes: the gradients would be silently wrong. Each checkpointed block therefore records
its hook points' forward hooks when it runs and puts exactly those back for its recompute.

Blocks are patched in place (an instance `forward`), not wrapped, so parameter names, `hook_dict`
and state dicts stay exactly TL's.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformer_lens.hook_points import HookPoint


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module) -> Iterator[None]:
    """Checkpoint every block of `model` (`model.blocks`) while the context is open."""
    patched = []
    try:
        for block in cast(nn.ModuleList, model.blocks):
            block.forward = _checkpointed(block, block.forward)
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward


def _checkpointed(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    hook_points = [m for m in block.modules() if isinstance(m, HookPoint)]

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        recorded = [OrderedDict(hp._forward_hooks) for hp in hook_points]  # the hooks this forward runs
        return contextlib.nullcontext(), _forward_hooks_as(hook_points, recorded)

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextlib.contextmanager
def _forward_hooks_as(hook_points: list[HookPoint], recorded: list[OrderedDict]) -> Iterator[None]:
    current = [hp._forward_hooks for hp in hook_points]
    try:
        for hp, hooks in zip(hook_points, recorded, strict=True):
            hp._forward_hooks = OrderedDict(hooks)
        yield
    finally:
        for hp, original in zip(hook_points, current, strict=True):
            hp._forward_hooks = original
