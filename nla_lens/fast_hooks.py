"""Which attached hooks the fast paths (`nla_lens.decoding`) honour, decided once per call.

The fast paths compute what a TransformerLens block computes. At every hook point they can
produce with TL's exact shape and meaning (`COVERED_BLOCK_POINTS`, plus `hook_embed`) they call
the `HookPoint` module itself when it has hooks, so `hook.name`, `hook.ctx`, `hook.layer()`,
in-place edits and returned values behave as under TL's forward, and continue from what it
returned. A hook anywhere else (attention scores and patterns, norms, logits), a backward hook,
or a torch hook on a module that is not a `HookPoint` makes the call run TL's own forward;
`HookPlan.fallback_reason` says which and why.

A hookless point costs nothing per token: which points have hooks is read here, once per call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules import module as torch_modules
from transformer_lens.hook_points import HookPoint

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# Block hook points in the order TL's `TransformerBlock` fires them, each named by the field of
# `BlockHooks` that holds it.
COVERED_BLOCK_POINTS = {
    "hook_resid_pre": "resid_pre", "attn.hook_q": "q", "attn.hook_k": "k", "attn.hook_v": "v",
    "attn.hook_z": "z", "hook_attn_out": "attn_out", "hook_resid_mid": "resid_mid", "mlp.hook_pre": "pre",
    "mlp.hook_pre_linear": "pre_linear", "mlp.hook_post": "post", "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
_BLOCK_POINT = re.compile(r"^blocks\.(\d+)\.(.+)$")
# torch's hooks on every module's call (private names, stable since torch 1.13; a missing one reads as empty)
_GLOBAL_HOOK_REGISTRIES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                           "_global_backward_pre_hooks")


@dataclass(frozen=True)
class BlockHooks:
    """One block's hooked points (None: no hook there, so nothing to call)."""

    resid_pre: HookPoint | None = None
    q: HookPoint | None = None
    k: HookPoint | None = None
    v: HookPoint | None = None
    z: HookPoint | None = None
    attn_out: HookPoint | None = None
    resid_mid: HookPoint | None = None
    pre: HookPoint | None = None
    pre_linear: HookPoint | None = None
    post: HookPoint | None = None
    mlp_out: HookPoint | None = None
    resid_post: HookPoint | None = None


NO_BLOCK_HOOKS = BlockHooks()


@dataclass(frozen=True)
class HookPlan:
    """The hooked points of one call: `embed`, one `BlockHooks` per block, or why the fast path can't run."""

    embed: HookPoint | None
    blocks: tuple[BlockHooks, ...]
    fallback_reason: str | None = None

    @property
    def any_hooked(self) -> bool:
        return self.embed is not None or any(b is not NO_BLOCK_HOOKS for b in self.blocks)

    @classmethod
    def of(cls, model: HookedTransformer, extra: Iterable[str] = ()) -> HookPlan:
        """The plan for `model`'s hooks as attached now, plus hooks about to go on the points in `extra`."""
        n_layers = model.cfg.n_layers
        reason = torch_hook_reason(model)
        hooked = set(extra)
        for name, point in model.hook_dict.items():
            if point._backward_hooks or point._backward_pre_hooks:
                reason = reason or f"backward hook at {name} (only TL's forward runs backward hooks)"
            if point._forward_hooks or point._forward_pre_hooks:
                hooked.add(name)
        per_block: list[dict[str, HookPoint]] = [{} for _ in range(n_layers)]
        embed = None
        for name in sorted(hooked):
            match = _BLOCK_POINT.match(name)
            if name == "hook_embed":
                embed = model.hook_dict[name]
            elif match and match.group(2) in COVERED_BLOCK_POINTS and int(match.group(1)) < n_layers:
                per_block[int(match.group(1))][COVERED_BLOCK_POINTS[match.group(2)]] = model.hook_dict[name]
            elif name in model.hook_dict:
                reason = reason or (f"hook at {name}, which the fast path does not compute (it covers "
                                    f"hook_embed and blocks.i.{{{', '.join(COVERED_BLOCK_POINTS)}}})")
            else:
                reason = reason or f"hook at {name}, which is not a hook point of this model"
        blocks = tuple(BlockHooks(**points) if points else NO_BLOCK_HOOKS for points in per_block)
        return cls(embed, blocks, reason)


def torch_hook_reason(model: nn.Module) -> str | None:
    """A torch hook on a module the fast path never calls (anything but a `HookPoint`), or a global one
    (`torch.nn.modules.module.register_module_forward_hook` and kin), which every module's call runs."""
    if any(getattr(torch_modules, registry, None) for registry in _GLOBAL_HOOK_REGISTRIES):
        return ("global torch module hook (register_module_forward_hook and kin), which would see only the "
                "HookPoints the fast path calls")
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            continue
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return f"torch hook on module {name or '<root>'} ({type(module).__name__}), which the fast path never calls"
    return None

