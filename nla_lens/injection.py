"""Injection hooks: put activation vectors into the AV's forward pass at the marker sites.

Two methods, both plain TransformerLens hooks `(activation, hook) -> activation`:

* Karvonen (nanoNLA, Activation Oracles): ``h'_p = h_p + ||h_p|| * v / ||v||`` at the output of
  decoder layer 1 (``blocks.1.hook_resid_post``). Scale-free: only v's direction matters.
* Embedding replacement (the paper's checkpoints): the marker's embedding becomes
  ``v * injection_scale / ||v||`` at ``hook_embed``.

The hooks know the token shape they were built for and do nothing on single-token decode steps,
so they can stay installed around a KV-cached generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from nla_lens.errors import InjectionError, VectorError
from nla_lens.sidecar import InjectionSpec

HookFn = Callable[[Tensor, HookPoint], Tensor | None]


def check_vectors(vectors: Tensor, d_model: int) -> Float[Tensor, "n d_model"]:
    """Validate activation vectors; a single `[d_model]` vector becomes a batch of one."""
    if not isinstance(vectors, Tensor):
        raise VectorError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != d_model:
        raise VectorError(
            f"vectors must have shape [n, {d_model}] (d_model of this NLA), got "
            f"{tuple(vectors.shape)}. Take them from blocks.K.hook_resid_post of the base model."
        )
    if vectors.device.type == "meta":
        raise VectorError("vectors are on the meta device and hold no values; pass real tensors")
    if vectors.shape[0] == 0:
        raise VectorError("no vectors given: pass at least one [d_model] vector")
    if not vectors.is_floating_point():
        raise VectorError(f"vectors must be floating point, got {vectors.dtype}; call .float()")
    if not torch.isfinite(vectors).all():
        bad = (~torch.isfinite(vectors)).any(dim=1).nonzero().flatten().tolist()
        raise VectorError(f"vectors at rows {bad[:8]} hold NaN or Inf; check how they were computed")
    zero = (vectors.norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise VectorError(f"vectors at rows {zero[:8]} are zero; a zero vector has no direction to inject")
    return vectors


def unit(vectors: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def karvonen_add(
    resid: Float[Tensor, "n d_model"], vectors: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_model"]:
    """``h + ||h|| * v / ||v||``, in the residual's dtype (as the reference forward hook does).

    `v` is first scaled by a power of two to a norm in [0.5, 1): exact in binary floating point, so
    the bits match the reference's cast-then-normalise, but a norm past fp16's range (or entries
    below it) no longer makes ``v / ||v||`` zero or NaN.
    """
    wide = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()
    _, exponent = torch.frexp(wide.double().norm(dim=-1, keepdim=True))
    vectors = torch.ldexp(wide, -exponent.to(wide.dtype)).to(resid.dtype)
    return resid + resid.norm(dim=-1, keepdim=True) * unit(vectors)


def embedding_replacement(
    vectors: Float[Tensor, "n d_model"], injection_scale: float
) -> Float[Tensor, "n d_model"]:
    """``v * injection_scale / ||v||``, the norm taken in fp32 as the paper's training code does."""
    vectors = vectors.float()
    return vectors / (vectors.norm(dim=-1, keepdim=True) / injection_scale)


@dataclass(frozen=True)
class Injection:
    """Vectors bound to the marker sites of one token batch; `fwd_hooks()` composes with any hooks."""

    spec: InjectionSpec
    vectors: Float[Tensor, "n d_model"]
    rows: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    token_shape: tuple[int, int]
    injection_scale: float | None = None

    def __post_init__(self) -> None:
        if self.spec.method == "embedding" and self.injection_scale is None:
            raise InjectionError(
                "embedding replacement needs an injection_scale; the sidecar has none. Pass "
                "injection='karvonen' if this checkpoint was trained with the additive injection."
            )

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        return [(self.spec.hook_point, self.hook)]

    def hook(self, activation: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor | None:
        if activation.ndim != 3 or activation.shape[-1] != self.vectors.shape[-1]:
            raise InjectionError(
                f"{self.spec.hook_point} carries activations of shape {list(activation.shape)}, not [batch, pos, "
                f"{self.vectors.shape[-1]}]: inject at a residual-stream or embedding hook point (e.g. "
                "blocks.1.hook_resid_post or hook_embed)"
            )
        batch, pos = activation.shape[:2]
        if pos == 1 and self.token_shape[1] > 1:
            return None  # a KV-cached decode step: the prompt was injected at prefill
        if (batch, pos) != self.token_shape:
            raise InjectionError(
                f"{self.spec.hook_point}: activation has [batch, pos] = {[batch, pos]}, but this injection "
                f"was built for tokens of shape {list(self.token_shape)}. Build it with "
                "av.injection(vectors, tokens) for the tokens you run."
            )
        rows = self.rows.to(activation.device)
        positions = self.positions.to(activation.device)
        vectors = self.vectors.to(activation.device)
        if self.spec.method == "karvonen":
            new = karvonen_add(activation[rows, positions], vectors)
        else:
            new = embedding_replacement(vectors, self.injection_scale).to(activation.dtype)  # type: ignore[arg-type]
        return activation.index_put((rows, positions), new)
