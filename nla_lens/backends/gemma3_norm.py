"""Gemma-3's RMSNorm as HF computes it, for the `HookedTransformer` (TransformerLens 3.x only).

HF's `Gemma3RMSNorm` normalises in fp32, multiplies by ``1.0 + w.float()`` in fp32 and casts once. TL's
`RMSNorm` holds ``1 + w`` in the model's dtype and multiplies after casting the normalised activation to it: in
bf16 two more roundings per norm, compounded over Gemma-3-27B's 62 layers x 4 norms plus q/k norms (on the tiny
checkpoints the bf16 outputs sat 1.17-1.36x as far from fp32 as HF's own bf16 forward; with this norm
0.93-1.13x, as on the bridge, which runs HF's modules). `GemmaRMSNorm` moves only the multiply: TL's hook points
see what they saw (`hook_scale` the fp32 RMS, `hook_normalized` the fp32 ``x / scale``), and TL's division
stays, so fp32 results are TL's to the bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import RMSNorm
from transformer_lens.components.rms_norm import RMSNormInput

_NARROW = (torch.float16, torch.bfloat16)


class GemmaRMSNorm(RMSNorm):
    """TL's `RMSNorm` whose `w` holds ``1 + w`` in fp32 (HF's ``1.0 + weight.float()``), multiplied before the one
    cast. `model.to(dtype)`, `.half()`, `.bfloat16()` move `w` but never round it below fp32.

    The output has the dtype TL's `RMSNorm` gives: `cfg.dtype` promoted with the dtype TL would hold `w` in
    (`param_dtype`, the model's parameters'). The two differ only after a cast TL leaves out of `cfg`
    (`.float()`, `.half()`): there TL's promotion is what keeps the model running (a bf16 model after `.float()`).
    """

    def __init__(self, cfg: dict | HookedTransformerConfig, length: int | None = None) -> None:
        super().__init__(cfg, length)
        self.param_dtype = self.cfg.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.promote_types(self.cfg.dtype, self.param_dtype)

    def forward(self, x: RMSNormInput) -> RMSNormInput:
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        if x.device != self.w.device:
            self.to(x.device)
        return (x * self.w).to(self.out_dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GemmaRMSNorm:
        kept = self.w.detach()
        super()._apply(fn, recurse)
        self.param_dtype = fn(torch.empty(0, dtype=self.param_dtype, device=kept.device)).dtype
        if self.w.dtype in _NARROW:  # a cast of the model: keep the unrounded value, on the device `fn` chose
            self.w.data = kept.to(self.w.device)
        return self


def use_hf_norms(model: HookedTransformer) -> None:
    """Replace each TL `RMSNorm` of a Gemma-3 `model` (its `w` the checkpoint's weight in the model's dtype) by a
    `GemmaRMSNorm` holding HF's ``1.0 + w.float()``; refreshes the model's hook names."""
    for name, norm in list(model.named_modules()):
        if type(norm) is RMSNorm:
            hf_norm = GemmaRMSNorm(norm.cfg, norm.length)
            hf_norm.w = nn.Parameter(1.0 + norm.w.detach().float(), requires_grad=norm.w.requires_grad)
            hf_norm.param_dtype = norm.w.dtype
            _replace(model, name, hf_norm)
    model.setup()


def share_norms(target: HookedTransformer, source: HookedTransformer) -> None:
    """Where `source` has a `GemmaRMSNorm`, give `target` one sharing its weight: `target` a TL model built from
    `source`'s cfg and given its tensors (sae-lens's `HookedSAETransformer`), whose TL `RMSNorm` would multiply
    the fp32 weights into fp32 activations. Refreshes `target`'s hook names."""
    for name, norm in list(source.named_modules()):
        if isinstance(norm, GemmaRMSNorm):
            twin = GemmaRMSNorm(target.cfg, norm.length)
            twin.w, twin.param_dtype = norm.w, norm.param_dtype
            _replace(target, name, twin)
    target.setup()


def _replace(model: HookedTransformer, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
