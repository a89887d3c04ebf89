"""Which TransformerLens model nla_lens builds, and the two things that differ between them.

* ``hooked``: `HookedTransformer` (TransformerLens 3.x), converted from the HF weights by
  `nla_lens.loading` with no weight processing.
* ``bridge``: `TransformerBridge` (TransformerLens 4.x; 3.9 ships an early one too), which wraps
  the HF model itself and keeps the 3.x hook names as aliases.

The default follows the installed TransformerLens major version (3 -> hooked, 4 -> bridge);
``NLA_LENS_BACKEND`` or the loaders' ``backend=`` argument overrides it. Everything else in
nla_lens uses only what both models offer: hook names, `run_with_hooks`, `hooks()`, `to_tokens`,
`cfg`. The differences live here: how a checkpoint folder becomes a model (`load_model`), how a
forward runs against a KV cache (`decoder`), the AR's last residual (`ar_forward`, which says why it
runs TL's own forward where it does), hook contexts that remove only their own hooks
(`hooks`, `run_with_hooks`, `cached_activation`: TL 3.x's remove every hook at their context level), the
attention mask HookedTransformer derives for a padded token tensor and the bridge does not
(`implicit_attention_mask`), the hook where a write reaches less on the bridge (`check_patchable`), and
the guard of the HookedTransformer-only training code (`require_hooked`). One thing alike on both lives here
too: the hook points TL computes only on request (`switch_needed`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module, metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from nla_lens.checks import resolve_device, resolve_dtype
from nla_lens.errors import BackendError, InputError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    TLModel: TypeAlias = HookedTransformer | TransformerBridge

BACKENDS = ("hooked", "bridge")
ENV_VAR = "NLA_LENS_BACKEND"


class ARForward(Protocol):
    """An AR model's residual after its last block, at the last position (left padding).
    `fallback_reason`: why it runs TL's own forward rather than a fast path (None: a fast path serves prompts within
    the model's context)."""

    @property
    def fallback_reason(self) -> str | None: ...

    def __call__(self, tokens: Int[Tensor, "batch pos"],
                 attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_model"]: ...


class Decoder(Protocol):
    """KV-cached decoding for `verbalize`: the prefill runs under `fwd_hooks` (the injection), each step
    under whatever hooks the caller installed; both return the last position's logits.
    `fallback_reason`: why this call runs TL's own forward rather than a fast path (None: it doesn't)."""

    @property
    def fallback_reason(self) -> str | None: ...

    def prefill(self, tokens: Int[Tensor, "batch pos"], fwd_hooks: list) -> Float[Tensor, "batch d_vocab"]: ...

    def step(self, ids: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]: ...


def transformer_lens_major() -> int:
    return int(metadata.version("transformer-lens").split(".")[0])


def default_backend() -> str:
    """``NLA_LENS_BACKEND`` if set, else ``hooked`` on TransformerLens 3.x and ``bridge`` on 4.x."""
    name = os.environ.get(ENV_VAR, "").strip()
    if name:
        return _check_name(name, f"${ENV_VAR}")
    return "hooked" if transformer_lens_major() < 4 else "bridge"


def resolve(backend: str | None = None) -> ModuleType:
    """The backend module for `backend` (default: `default_backend()`), checked against the install."""
    return import_module(f"nla_lens.backends.{resolve_name(backend)}")


def resolve_name(backend: str | None = None) -> str:
    """The name of the backend `resolve` picks ("hooked" / "bridge")."""
    name = default_backend() if backend is None else _check_name(backend, "backend")
    if name == "hooked" and transformer_lens_major() >= 4:
        # From the environment, no backend= was passed (the commands take none): the variable is what to change.
        fix = (f"${ENV_VAR} asks for it: unset it or set it to 'bridge'" if backend is None
               else "Use backend='bridge'")
        raise BackendError(
            f"backend 'hooked' needs HookedTransformer, which transformer-lens "
            f"{metadata.version('transformer-lens')} no longer has (removed in 4.0). {fix}, or install the 3.x "
            "flavour: pip install 'transformer-lens==3.9.0'"
        )
    return name


def load_model(folder: str | Path, tokenizer: PreTrainedTokenizerBase, *, backend: str | None = None,
               dtype: torch.dtype | str, device: str | torch.device, n_layers: int | None = None,
               trust_remote_code: bool = False) -> TLModel:
    """A TL model of the HF folder, unprocessed; with `n_layers`, only the first blocks and
    neither final norm nor unembed, so `model(tokens)` returns the residual after the last block.
    `dtype` may be a name ("bfloat16"), `folder` a string (as `loading.load_tokenizer` takes it)."""
    folder, dtype, device = Path(folder), resolve_dtype(dtype), resolve_device(device)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):  # None or the folder again: an AttributeError deep inside
        raise InputError(f"tokenizer must be a loaded tokenizer, got {type(tokenizer).__name__}; pass "
                         "loading.load_tokenizer(folder)")
    module = resolve(backend)
    with _no_hf_progress_bars():  # library calls stay quiet; transformers shows one bar per from_pretrained
        return module.load_model(folder, tokenizer, dtype=dtype, device=device, n_layers=n_layers,
                                 trust_remote_code=trust_remote_code)


@contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def backend_of(model: TLModel) -> str:
    """The backend a model belongs to, told from its class (no TransformerLens import needed)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "HookedTransformer" in names:
        return "hooked"
    if "TransformerBridge" in names:
        return "bridge"
    hint = "check the order of the arguments"
    if isinstance(model, (str, os.PathLike)):  # a folder where the loaded model goes
        hint += ", and load a model folder first: nl.load_base(path)"
    raise BackendError(
        f"expected a TransformerLens model (HookedTransformer or TransformerBridge), got {type(model).__name__}; {hint}"
    )


def input_module(model: TLModel) -> torch.nn.Module:
    """The module whose call receives a run's input (first argument) and its `attention_mask=`: the
    HookedTransformer itself, or the HF model a bridge wraps (the bridge calls its own `forward`
    directly from `run_with_hooks` / `run_with_cache`, so hooks on its `__call__` would miss those)."""
    return cast("TransformerBridge", model).original_model if backend_of(model) == "bridge" else model


def check_holds_weights(model: TLModel, role: str) -> None:
    """`InputError` for a model with weights on the meta device (`model.to("meta")`), which hold no values: its runs
    failed deep in torch (NotImplementedError from `nonzero`, "Cannot copy out of meta tensor")."""
    on_meta = [name for name, param in model.named_parameters() if param.is_meta]
    if on_meta:
        raise InputError(f"the {role} model's weights ({on_meta[0]}{' and more' if len(on_meta) > 1 else ''}) are on "
                         "the meta device, which holds no values, so it cannot run: load it again onto 'cpu' or "
                         "'cuda' (moving it off meta gives no weights back)")


def check_movable(model: TLModel, role: str, dtype: torch.dtype | None) -> None:
    """What `move` refuses, checked before anything moves: a model on the meta device, which has no values to move
    (torch raised a bare NotImplementedError), and a cast on the bridge (`bridge.check_castable`)."""
    check_holds_weights(model, role)
    if dtype is not None and backend_of(model) == "bridge":
        import_module("nla_lens.backends.bridge").check_castable(model, role, dtype)


def move(model: TLModel, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """`model` onto `device` and into `dtype` (None: where it is), in place, with `cfg.device` and `cfg.dtype` as a
    load there gives them, so TL's `to_tokens`, `generate` and KV caches follow. `check_movable` first."""
    if device is not None or dtype is not None:
        import_module(f"nla_lens.backends.{backend_of(model)}").move(model, device, dtype)


def check_dtype_current(model: TLModel, role: str) -> None:
    """`InputError` when a HookedTransformer's weights are no longer `cfg.dtype`: TL allocates its KV cache
    (and nla_lens its fast decoders' caches) in `cfg.dtype`, which `.half()` / `.bfloat16()` leave stale, so the
    run would fail deep in torch ("expected scalar type Float but found Half"). The bridge runs in any dtype but
    float64 (`check_bridge_dtype`)."""
    if backend_of(model) != "hooked":
        check_bridge_dtype(model, role)
        return
    if model.W_E.dtype != model.cfg.dtype:
        name = str(model.W_E.dtype).removeprefix("torch.")
        raise InputError(
            f"the {role} model's weights are {name} but its cfg.dtype is {str(model.cfg.dtype).removeprefix('torch.')}"
            f": .half() / .bfloat16() change the weights without telling TransformerLens; use "
            f"model.to(torch.{name}) (it updates cfg.dtype), or load with dtype=torch.{name}"
        )


def check_bridge_dtype(model: TLModel, role: str) -> None:
    """`BackendError` for a bridge cast to float64 after loading, which its load refuses: padded rows come out NaN
    (see `bridge.check_dtype`). Nothing to check on HookedTransformer."""
    if backend_of(model) == "bridge":
        import_module("nla_lens.backends.bridge").check_dtype(model, role)


def decoder(model: TLModel, batch_size: int, max_len: int, fwd_hooks: list) -> Decoder:
    """The backend's decoder for `batch_size` rows of at most `max_len` tokens."""
    return import_module(f"nla_lens.backends.{backend_of(model)}").decoder(model, batch_size, max_len, fwd_hooks)


def hooks(model: TLModel, fwd_hooks: list) -> contextlib.AbstractContextManager:
    """`model.hooks(fwd_hooks=...)` that removes exactly the hooks it added, on every exit path, and no
    hook the caller left (see `hooked.hooks`)."""
    return import_module(f"nla_lens.backends.{backend_of(model)}").hooks(model, fwd_hooks)


def run_with_hooks(model: TLModel, *args: Any, fwd_hooks: list, **kwargs: Any) -> Any:
    """`model.run_with_hooks(*args, fwd_hooks=fwd_hooks, **kwargs)` that leaves the caller's hooks in place (see
    `hooked.hooks`)."""
    return import_module(f"nla_lens.backends.{backend_of(model)}").run_with_hooks(model, *args, fwd_hooks=fwd_hooks,
                                                                                   **kwargs)


def cached_activation(model: TLModel, hook_name: str, *args: Any, **kwargs: Any) -> Tensor | None:
    """`model.run_with_cache(*args, names_filter=hook_name, **kwargs)`'s activation at `hook_name` (None: it did
    not fire), leaving the caller's hooks in place (see `hooked.hooks`)."""
    return import_module(f"nla_lens.backends.{backend_of(model)}").cached_activation(model, hook_name, *args, **kwargs)


def ar_forward(model: TLModel) -> ARForward:
    """The AR model's forward to its last residual, for one `reconstruct` call with `model`'s hooks as they
    stand now."""
    return import_module(f"nla_lens.backends.{backend_of(model)}").ARForward(model)


def implicit_attention_mask(model: TLModel, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"] | None:
    """The mask HookedTransformer derives for a token tensor run without one, where the bridge
    derives none: leading pads masked when the tokenizer pads on the left. None where the model
    already does this itself (hooked) or there is nothing to derive."""
    tokenizer = model.tokenizer
    if backend_of(model) == "hooked" or tokenizer is None or tokenizer.padding_side != "left":
        return None
    from transformer_lens.utilities import get_attention_mask

    return get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos).to(tokens.device)


def check_patchable(model: TLModel, hook_name: str) -> None:
    """Raise `BackendError` where a value written at `hook_name` reaches less of `model` than of a
    HookedTransformer. TransformerLens 4.3's bridge aliases `blocks.L.hook_resid_mid` to `ln2.hook_in`,
    the MLP norm's input: a write there feeds the MLP, but the residual add after it reads the unwritten
    tensor (measured: +d at resid_mid moves resid_post by d on hooked, by 0 plus the MLP's change on the bridge).
    The bridge's own name of that hook point (`blocks.L.ln2.hook_in`) is refused too."""
    block = re.match(r"blocks\.(\d+)\.", hook_name)
    if block is not None:
        resid_mid = f"blocks.{block[1]}.hook_resid_mid"
        hook_point = model.hook_dict.get(hook_name)
        if hook_point is not None and hook_point is model.hook_dict.get(resid_mid):
            hook_name = resid_mid
    check_patchable_on(backend_of(model), hook_name)


# Hook points TransformerLens computes only after a `set_use_*` switch, by name suffix, and the cfg flag each
# reads (both backends gate the same points on the same flags).
_SWITCHED_POINTS = {"attn.hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
                    "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
                    "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in"}


def switch_needed(model: TLModel, hook_name: str) -> str | None:
    """The `set_use_*` method to call before `hook_name` fires on `model`, or None where it fires already. A
    hook attached to a switched-off point never runs: TL's `add_hook` refuses it, but a write that skipped that
    check would do nothing, silently. The bridge judges a point by its own name (an alias may reach one that
    always fires), so this does too."""
    point = model.hook_dict.get(hook_name)
    name = point.name if point is not None and point.name else hook_name
    flag = next((flag for suffix, flag in _SWITCHED_POINTS.items() if name.endswith(suffix)), None)
    return None if flag is None or getattr(model.cfg, flag) else f"set_{flag}"


def check_patchable_on(backend: str, hook_name: str) -> None:
    """`check_patchable` by the backend's name, before a model exists (the AV loader asks before its weights)."""
    if backend == "bridge" and hook_name.endswith(".hook_resid_mid"):
        raise BackendError(
            f"on the bridge backend {hook_name} is the MLP norm's input (TransformerBridge's alias of ln2.hook_in): "
            "a patch or injection written there reaches the MLP but not the residual stream around it, unlike "
            "HookedTransformer's resid_mid. Patch 'resid_pre', 'attn_out' or 'resid_post' instead, or use the "
            "hooked backend: pip install 'nla_lens[tl3]' (transformer-lens 3.9)"
        )


def require_hooked(feature: str, model: TLModel | None = None) -> None:
    """Raise `BackendError` unless `feature` (HookedTransformer-only code) can run: on `model` if
    given, else with the default backend."""
    backend = default_backend() if model is None else backend_of(model)
    if backend != "hooked" or transformer_lens_major() >= 4:
        raise BackendError(
            f"{feature} needs the TL 3.x backend: pip install 'nla_lens[tl3]' (transformer-lens 3.9, "
            f"HookedTransformer), and leave ${ENV_VAR} unset or 'hooked'; this "
            f"{'model is a ' + type(model).__name__ if model is not None else 'run uses ' + repr(backend)}"
        )


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"{source} is {name!r}; pick one of {BACKENDS}")
    return name
