"""Injection hooks: put activation vectors into the AV's forward pass at the marker sites.

Two methods, both plain TransformerLens hooks `(activation, hook) -> activation`:

* Karvonen (nanoNLA, Activation Oracles): ``h'_p = h_p + ||h_p|| * v / ||v||`` at the output of
  decoder layer 1 (``blocks.1.hook_resid_post``). Scale-free: only v's direction matters.
* Embedding replacement (the paper's checkpoints): the marker's embedding becomes
  ``v * injection_scale / ||v||`` at ``hook_embed``.

The hooks know the token shape they were built for and do nothing on single-token decode steps,
so they can stay installed around a KV-cached generation (TL 3.x's `generate` skips `hook_embed`:
see `Injection.fwd_hooks`). A longer run of the same batch is those
tokens followed by more (generation without a KV cache, a teacher-forced explanation): the marker
sites are the same columns, and the vectors go in there again, as the reference hook does on every
forward longer than one token. Both methods are differentiable in `vectors` (only through
``v / ||v||``), so a `vectors` tensor that requires grad gets gradients from a forward under the hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from nla_lens.checks import counted
from nla_lens.errors import InjectionError, VectorError
from nla_lens.sidecar import InjectionSpec

HookFn = Callable[[Tensor, HookPoint], Tensor | None]


def check_vectors(vectors: Tensor, d_model: int, name: str = "vectors", *, zero_ok: bool = False,
                  as_float32: bool = False) -> Float[Tensor, "n d_model"]:
    """Validate activation vectors; a single `[d_model]` vector becomes a batch of one. `name` is the argument
    the user passed them as, which the messages name; `zero_ok` lets zero rows through, for vectors that are only
    an operand (the `b` of a - b), not the direction injected. `as_float32` returns them in float32, for callers
    that compute in it, refusing the float64 rows it cannot hold (`check_float32_range`)."""
    if not isinstance(vectors, Tensor):
        raise VectorError(f"{name} must be a torch.Tensor, got {type(vectors).__name__}{_tensor_hint(vectors)}")
    if vectors.layout != torch.strided:  # sparse: raised NotImplementedError in the checks below
        raise VectorError(f"{name} must be a dense tensor, got a {vectors.layout} one; call .to_dense()")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != d_model:
        raise VectorError(
            f"{name} must have shape [n, {d_model}] (d_model of this NLA), got "
            f"{tuple(vectors.shape)}. Take them from blocks.K.hook_resid_post of the base model."
        )
    if vectors.device.type == "meta":
        raise VectorError(f"{name}: on the meta device, which holds no values; pass real tensors")
    if vectors.shape[0] == 0:
        raise VectorError(f"no {name} given: pass at least one [d_model] vector")
    if not vectors.is_floating_point():
        raise VectorError(f"{name} must be floating point, got {vectors.dtype}; call .float()")
    if vectors.dtype.itemsize == 1:  # float8: torch has no isfinite for it, which raised NotImplementedError here
        raise VectorError(f"{name} are {vectors.dtype}, in which torch cannot test for NaN or Inf; call .float()")
    non_finite, zero = directionless_rows(vectors)
    if non_finite:
        raise VectorError(f"{name} at rows {non_finite[:8]} hold NaN or Inf; check how they were computed")
    if zero and not zero_ok:
        raise VectorError(f"{name} at rows {zero[:8]} are zero; a zero vector has no direction to inject")
    if as_float32:
        check_float32_range(vectors, name)
        return vectors.float()
    return vectors


def check_float32_range(vectors: Float[Tensor, "n d_model"], name: str = "vectors") -> None:
    """Refuse the float64 rows whose largest entry lies past float32's normal range: `.float()` makes them inf, zero
    or a few coarse steps, then refused as holding NaN or Inf or as zero, or read as another direction. A zero row
    is zero in float32 too. (The injection itself takes float64 rows as they are: it scales them first, exactly.)"""
    rows = past_float32_rows(vectors)
    if rows:
        peak = vectors.abs().amax(dim=1)
        limits = torch.finfo(torch.float32)
        raise VectorError(
            f"{name} at rows {rows[:8]}{' ...' if len(rows) > 8 else ''} are float64 past float32's range, in which "
            f"nla_lens computes them: row {rows[0]}'s largest entry is {float(peak[rows[0]]):.3g} in magnitude, where "
            f"float32 holds {limits.tiny:.3g} to {limits.max:.3g}, so the row would become inf, zero or a few coarse "
            "steps. Rescale such rows into that range (e.g. v / v.abs().amax(dim=1, keepdim=True), which keeps each "
            "row's direction, all that reaches the AV and a round trip's MSE)")


def past_float32_rows(vectors: Float[Tensor, "n d_model"]) -> list[int]:
    """The finite float64 rows whose largest entry lies past float32's normal range (above its max, or nonzero below
    its smallest normal number); NaN, Inf and zero rows are left to `directionless_rows`."""
    if vectors.dtype != torch.float64:
        return []
    peak = vectors.abs().amax(dim=1)
    limits = torch.finfo(torch.float32)
    past = peak.isfinite() & ((peak > limits.max) | ((peak > 0) & (peak < limits.tiny)))
    return past.nonzero().flatten().tolist()


def directionless_rows(vectors: Float[Tensor, "n d_model"]) -> tuple[list[int], list[int]]:
    """(rows holding NaN or Inf, rows that are exactly zero): the rows no injection can scale to a direction."""
    non_finite = (~torch.isfinite(vectors)).any(dim=1)
    zero = (vectors == 0).all(dim=1)  # not the norm: it underflows for tiny entries
    return non_finite.nonzero().flatten().tolist(), zero.nonzero().flatten().tolist()


def _tensor_hint(value: object) -> str:
    """How to turn what a newcomer passed (an array, a list, a file name, a loaded file) into the tensor."""
    if isinstance(value, (str, Path)):
        return ": load the file first, e.g. safetensors.torch.load_file(path)['vectors']"
    if isinstance(value, dict):
        return f" (a loaded file?): pass one of its tensors, e.g. loaded[{next(iter(value), 'vectors')!r}]"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        return ": stack the rows with torch.stack(vectors)"
    if hasattr(value, "__array__") or isinstance(value, (list, tuple)):
        return ": convert it with torch.as_tensor(vectors, dtype=torch.float32)"
    return ""


def unit(vectors: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def prescaled(vectors: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """`vectors` in fp32 (fp64 kept) times the power of two that brings each row's largest entry into [0.5, 1).

    Exact in binary floating point, so the bits of ``v / ||v||`` match the reference's, but a norm
    whose square leaves the float range (or the residual's dtype) can no longer make it zero or NaN.
    Applied in two halves: `torch.ldexp` multiplies by ``2**e``, which is inf for a row of subnormals
    (largest entry below 2**-126 in fp32).
    """
    wide = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()
    _, exponent = torch.frexp(wide.abs().amax(dim=-1, keepdim=True))
    half = -exponent.to(wide.dtype) / 2
    return torch.ldexp(torch.ldexp(wide, half.floor()), half.ceil())


def karvonen_add(
    resid: Float[Tensor, "n d_model"], vectors: Float[Tensor, "n d_model"]
) -> Float[Tensor, "n d_model"]:
    """``h + ||h|| * v / ||v||``, in the residual's dtype (as the reference forward hook does)."""
    return resid + resid.norm(dim=-1, keepdim=True) * unit(prescaled(vectors).to(resid.dtype))


def embedding_replacement(
    vectors: Float[Tensor, "n d_model"], injection_scale: float
) -> Float[Tensor, "n d_model"]:
    """``v * injection_scale / ||v||``, the norm taken in fp32 as the paper's training code does."""
    vectors = prescaled(vectors).float()
    return vectors / (vectors.norm(dim=-1, keepdim=True) / injection_scale)


BLOCK_0_INPUT = "blocks.0.hook_resid_pre"
# Points that carry [batch, pos, d_model] on every TL model: an activation of another width there comes from a model
# of another d_model than the injection's vectors.
_D_MODEL_POINT = re.compile(r"^hook_embed$|\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


def is_injection_hook(fn: object) -> bool:
    """Whether `fn` is one of the hooks an `Injection` hands out (`hook`, or the pair `fwd_hooks()` builds at
    `hook_embed`), told by where it was defined: an `Injection` holds no state to mark them with."""
    return getattr(fn, "__module__", None) == __name__ and getattr(fn, "__qualname__", "").startswith("Injection.")


class NotingItRan:
    """Hooks that note whether one of them ran. A forward that never reached the injection's point (a hook of the
    caller's removed it first, a `stop_at_layer` short of it, a name bound to a HookPoint off the forward's path) read
    the prompt without the vectors, and nothing in its output tells."""

    def __init__(self, fwd_hooks: list[tuple[str, HookFn]]) -> None:
        self.ran = False
        self.fwd_hooks = [(name, self._noting(fn)) for name, fn in fwd_hooks]

    def _noting(self, fn: HookFn) -> HookFn:
        def noted(activation: Tensor, hook: HookPoint) -> Tensor | None:
            self.ran = True
            return fn(activation, hook)
        return noted


@dataclass(frozen=True)
class Injection:
    """Vectors bound to the marker sites of one token batch; `fwd_hooks()` composes with any hooks."""

    spec: InjectionSpec
    vectors: Float[Tensor, "n d_model"]
    rows: Int[Tensor, " n"]  # batch row of each vector's marker site
    positions: Int[Tensor, " n"]  # its column
    token_shape: tuple[int, int]  # [batch, pos] of the tokens it was built for
    injection_scale: float | None = None
    # Block 0's input is hook_embed's output (a rotary model adds no position embedding between them).
    embed_is_block_input: bool = False

    def __post_init__(self) -> None:
        if self.spec.method == "embedding" and self.injection_scale is None:
            raise InjectionError(
                "embedding replacement needs an injection_scale; the sidecar has none. Pass "
                "injection='karvonen' if this checkpoint was trained with the additive injection."
            )

    def __repr__(self) -> str:
        """Where the vectors go, never the vectors themselves (the dataclass repr printed every entry)."""
        sites = ", ".join(f"({r}, {p})" for r, p in zip(self.rows[:4].tolist(), self.positions[:4].tolist(),
                                                          strict=True))
        more = f", ... {len(self.rows) - 4} more" if len(self.rows) > 4 else ""
        return (f"Injection({self.spec.method} at {self.spec.hook_point}: {counted(len(self.rows), 'vector')} of "
                f"d_model {self.vectors.shape[-1]} at (row, column) {sites}{more}; tokens {list(self.token_shape)})")

    def fwd_hooks(self) -> list[tuple[str, HookFn]]:
        """The hooks to compose with yours. An injection at `hook_embed` is also written at
        `blocks.0.hook_resid_pre`, the same tensor here: TransformerLens 3.x's `generate` embeds the tokens
        outside its forward, so `hook_embed` never fires there. An embedding replacement is idempotent, so where
        both fire the second write changes nothing; a Karvonen add is not, so its second write runs only in a
        forward where `hook_embed` did not fire."""
        if self.spec.hook_point != "hook_embed" or not self.embed_is_block_input:
            return self.site_hooks()
        if self.spec.method == "embedding":
            return [*self.site_hooks(), (BLOCK_0_INPUT, self.hook)]
        return self._add_once_hooks()

    def _add_once_hooks(self) -> list[tuple[str, HookFn]]:
        """The Karvonen add at `hook_embed`, and at block 0's input in a forward that skipped `hook_embed`. Block 0's
        hook tells the two apart by the marker rows, which `hook_embed`'s add changed if it ran in the forward under
        way: a flag set there alone stayed set when a forward never reached block 0 (a later hook raised,
        `stop_at_layer=0`), and the next forward that skipped `hook_embed` (TL 3.x's `generate`) ran without the
        vectors. The state is this pair's own (one per `fwd_hooks()` call), so `site_hooks()` used elsewhere never
        leaves any."""
        given: list[Tensor | None] = [None]  # the marker rows hook_embed last added to, as it was given them

        def at_embed(activation: Tensor, hook: HookPoint) -> Tensor | None:
            injected = self.hook(activation, hook)
            if injected is not None:
                given[0] = self._marker_rows(activation)
            return injected

        def at_block_0(activation: Tensor, hook: HookPoint) -> Tensor | None:
            before, given[0] = given[0], None
            if before is not None:
                now = self._marker_rows(activation)
                if now is not None and not torch.equal(now, before):
                    return None  # hook_embed added the vectors in this forward
            return self.hook(activation, hook)

        return [(self.spec.hook_point, at_embed), (BLOCK_0_INPUT, at_block_0)]

    def _check_width(self, activation: Tensor) -> None:
        """Refuse an activation that is not `[batch, pos, d_model]` of the vectors' d_model, saying why: a point
        outside the residual stream, or a model of another d_model than the AV that built this injection."""
        d_model = self.vectors.shape[-1]
        if activation.ndim == 3 and activation.shape[-1] == d_model:
            return
        if activation.ndim == 3 and _D_MODEL_POINT.search(self.spec.hook_point):
            raise InjectionError(
                f"{self.spec.hook_point} carries activations of d_model {activation.shape[-1]}, but this injection's "
                f"vectors have d_model {d_model}: another model's AV built it. Build the injection for the model you "
                "run with that model's AV: av.injection(vectors, tokens)"
            )
        raise InjectionError(
            f"{self.spec.hook_point} carries activations of shape {list(activation.shape)}, not [batch, pos, "
            f"{d_model}]: inject at a residual-stream or embedding hook point (e.g. blocks.1.hook_resid_post or "
            "hook_embed)"
        )

    def _marker_rows(self, activation: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "n d_model"] | None:
        """A copy of the rows at the marker sites of a run of the built token shape (or longer), else None."""
        batch, pos = self.token_shape
        if activation.ndim != 3 or activation.shape[0] != batch or activation.shape[1] < pos:
            return None
        return activation[self.rows.to(activation.device), self.positions.to(activation.device)]

    def site_hooks(self) -> list[tuple[str, HookFn]]:
        """The one hook at the injection's point: what nla_lens's own decoders install (their forwards
        always pass through `hook_embed`)."""
        return [(self.spec.hook_point, self.hook)]

    def hook(self, activation: Float[Tensor, "batch pos d_model"],
             hook: HookPoint) -> Float[Tensor, "batch pos d_model"] | None:
        """The TL hook function itself: writes the vectors at their marker sites on a run of the built token shape
        (or longer), leaves a one-token KV-cached decode step alone, and refuses any other shape."""
        self._check_width(activation)
        batch, pos = activation.shape[:2]
        if pos == 1 and self.token_shape[1] > 1:
            return None  # a KV-cached decode step: the prompt was injected at prefill
        if batch != self.token_shape[0] or pos < self.token_shape[1]:
            raise InjectionError(
                f"{self.spec.hook_point}: activation has [batch, pos] = {[batch, pos]}, but this injection "
                f"was built for tokens of shape {list(self.token_shape)} (a run may extend them). Build it "
                "with av.injection(vectors, tokens) for the tokens you run."
            )
        rows = self.rows.to(activation.device)
        positions = self.positions.to(activation.device)
        vectors = self.vectors.to(activation.device)
        if self.spec.method == "karvonen":
            new = karvonen_add(activation[rows, positions], vectors)
        else:
            new = embedding_replacement(vectors, self.injection_scale).to(activation.dtype)  # type: ignore[arg-type]
        return activation.index_put((rows, positions), new)
