"""Record base-model activations (layer K, chosen positions) inside the user's own runs.

`capture` is a context manager: whatever the user runs inside it (`run_with_hooks`,
`run_with_cache`, `generate`, a plain forward), with whatever hooks, it keeps the residual stream
``blocks.{K}.hook_resid_post`` at the chosen positions, as float32 rows with their provenance.

Positions (one spec, resolved per row of the batch that runs):

* an int ``p >= 0`` or a list of them: those columns of every row (row-major order);
* a negative int ``-k``: the k-th last *real* token of each row, so ``-1`` is the last real token
  whether the batch is unpadded, left-padded (the last column) or right-padded (from the mask);
* a ``[batch]`` integer tensor: one position per row (negative values as above);
* a ``[batch, pos]`` boolean tensor: every True entry (e.g. ``attention_mask.bool()``).

Which tokens are real comes from ``attention_mask`` if given, else from ``tokens``: runs of pad
tokens at either end are padding (TransformerLens's ``utils.get_attention_mask`` rule, from both
sides), else every column is real. Pass the mask when a real token at either end of a row can share
the pad id (e.g. pad == EOS and a row ends in EOS). When `capture` is given neither, it reads them
from each model call (the token tensor or strings it runs, its ``attention_mask=``), so
``with capture(model, K) as cap: model(tokens, attention_mask=mask)`` needs them only once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import transformer_lens
import transformers
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import get_attention_mask

from nla_lens import backends
from nla_lens.checks import blocks_phrase, counted, is_integer, warn_at_caller
from nla_lens.errors import InputError, PromptTooLongError

if TYPE_CHECKING:
    from nla_lens.backends import TLModel

PositionSpec = int | Sequence[int] | Int[Tensor, " batch"] | Bool[Tensor, "batch pos"]
Calls = Literal["first", "all"]
_INT64_MIN, _INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
# The code that runs between the user's call of the model and a torch hook on one of its blocks.
_MODEL_CODE = (torch, transformers, transformer_lens)


@dataclass(frozen=True)
class CapturedRow:
    """Where one captured vector came from: batch row, column, its token and which forward pass.

    Attributes:
        batch: the row of that call's input.
        position: column of that call's input: a KV-cached decode step has one column, so 0.
        token: the token there, decoded; None when the tokens are unknown: neither given to `capture` (for a call
            of their shape) nor in the model call, nor embedded by HookedTransformer's `generate` for it.
        call: which forward pass inside the context, 0 for the first.
    """

    batch: int
    position: int
    token: str | None
    call: int


def last_real_positions(real: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Column of the last real token of each row (padding on either side)."""
    empty = (~real.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"rows {empty[:8]} have no real token (an attention mask of zeros, or only pad tokens): "
                         "drop those rows or pass the mask of their real tokens")
    return real.shape[1] - 1 - real.flip(1).int().argmax(dim=1)


def resolve_positions(
    positions: PositionSpec, real: Bool[Tensor, "batch pos"], *, name: str = "positions", use: str = "read"
) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """(row, column) of every selected token, row-major; raise on columns outside the row or on padding. The
    errors name the argument (`name`) and, for a mask that selects nothing, what its tokens are for (`use`)."""
    batch, width = real.shape
    if isinstance(positions, Tensor) and positions.is_meta:  # reading its columns raised a bare NotImplementedError
        raise InputError(f"{name}: on the meta device, which holds no values; pass a tensor on a real device")
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape != real.shape:
            raise InputError(
                f"a boolean {name} mask must have the [batch, pos] shape of the run, "
                f"{[batch, width]}; got {list(positions.shape)}"
            )
        rows, cols = positions.to(real.device).nonzero(as_tuple=True)
        if rows.numel() == 0:  # else the experiments' later "no vectors given" names no mask
            raise InputError(f"the boolean {name} mask selects no token (every entry is False); set True at "
                             f"the real tokens to {use}")
    else:
        wanted = _per_row(positions, batch, name).to(real.device)
        last = last_real_positions(real)[:, None]
        cols = torch.where(wanted < 0, last + 1 + wanted, wanted)
        outside = (cols < 0) | (cols >= width)
        if outside.any():
            row, k = (int(i) for i in outside.nonzero()[0])
            raise InputError(
                f"{name}: position {int(wanted[row, k])} is outside row {row} (columns 0..{width - 1}, last real "
                f"token at {int(last[row])}); pick positions inside the sequence"
            )
        rows = torch.arange(batch, device=real.device)[:, None].expand_as(cols).flatten()
        cols = cols.flatten()
    padding = ~real[rows, cols]
    if padding.any():
        i = int(padding.nonzero()[0])
        raise InputError(
            f"{name}: position {int(cols[i])} of row {int(rows[i])} is padding; use negative positions "
            "(counted back from each row's last real token) or a boolean mask of real tokens"
        )
    return rows, cols


def _per_row(positions: Any, batch: int, name: str = "positions") -> Int[Tensor, "batch k"]:
    """Every non-mask spec as a `[batch, k]` integer tensor of requested columns; the errors name the argument."""
    if isinstance(positions, Tensor) and positions.ndim == 0:
        positions = positions.item()
    if is_integer(positions):
        positions = [positions]
    if isinstance(positions, Tensor):
        if (positions.ndim != 1 or positions.shape[0] != batch or positions.is_floating_point()
                or positions.is_complex()):  # a complex tensor's .long() drops its imaginary part
            raise InputError(
                f"a {name} tensor must be [batch] integers (one per row, batch={batch}) or a "
                f"[batch, pos] boolean mask; got {positions.dtype} of shape {list(positions.shape)}"
            )
        return positions.long()[:, None]
    if (isinstance(positions, Sequence) and not isinstance(positions, str) and positions
            and all(is_integer(p) for p in positions)):
        columns = [int(p) for p in positions]
        beyond = [p for p in columns if not _INT64_MIN <= p <= _INT64_MAX]
        if beyond:  # torch's OverflowError, untyped, where a smaller one is "outside row ..."
            raise InputError(f"{name}: position {beyond[0]} is outside every row (past int64); pick positions "
                             "inside the sequence")
        return torch.tensor(columns).expand(batch, -1)
    raise InputError(
        f"{name} must be an int, a non-empty list of ints, a [batch] integer tensor or a "
        f"[batch, pos] boolean mask; got {positions!r}"
    )


class Capture:
    """Records `blocks.{layer}.hook_resid_post` at `positions` while the model runs inside `with`.

    The record is taken from the output of block `layer` (a plain torch forward hook on
    `model.blocks[layer]`: a `TransformerBlock`, or on the bridge a `BlockBridge` whose output has
    passed its `hook_out`, alias `hook_resid_post`), i.e. after *every* hook on
    `blocks.{layer}.hook_resid_post` has run,
    however it was installed. A TL hook added on entry would instead run before hooks the user adds
    later at the same point (TL calls hooks in the order they were added), and so would miss a
    steering hook at layer K itself. What is captured is what block K+1 reads, and what
    `run_with_cache` stores when called inside the user's hooks. The hook is removed on every exit
    path; TL's own hook contexts (`run_with_hooks`, `hooks()`, `reset_hooks`) are left untouched.

    Several forward passes inside one context: by default (`calls="first"`) only the first one is
    recorded, which for `generate` is the prefill over the whole prompt; later passes are counted
    in `n_calls` and ignored. With `calls="all"` every pass is recorded and the rows concatenated
    (`row.call` tells them apart); positions are resolved against each pass's own shape and the
    mask / tokens apply to passes of their shape only, so with a KV-cached `generate` and
    `positions=-1` you get the prompt's last token followed by each generated token.

    Attributes:
        model: the TL model recorded.
        layer: the block whose output is recorded.
        positions: which columns of each row are recorded (an int, ints, a [batch] tensor or a boolean mask).
        calls: "first" (record the first forward pass only) or "all".
        tokens: the tokens given, to name each row's token and tell padding; None when not given.
        rows: where each recorded vector came from, in the order of `vectors`.
        n_calls: forward passes inside the context that reached block K (the layer read), recorded or not.
    """

    def __init__(self, model: TLModel, layer: int, positions: PositionSpec = -1, *,
                 attention_mask: Int[Tensor, "batch pos"] | None = None,
                 tokens: Int[Tensor, "batch pos"] | None = None, calls: Calls = "first") -> None:
        backends.backend_of(model)  # an NLA or an AV here fell through to an AttributeError on .cfg
        backends.check_holds_weights(model, "base")
        layer = check_block(model, layer)
        if calls not in ("first", "all"):
            raise InputError(f"calls must be 'first' or 'all', got {calls!r}")
        self.model = model
        self.layer = layer
        self.positions = positions
        self.calls = calls
        self.tokens = tokens
        if tokens is not None:  # here, not in real_tokens, which also reads the tokens of every call the model ran
            check_token_ids(model, tokens)
        self._real = real_tokens(model, attention_mask, tokens)
        if self._real is not None:
            resolve_positions(positions, self._real)  # fail before the user's run, not inside it
        elif not isinstance(positions, Tensor):  # its columns need the run's tokens, its kind does not
            _per_row(positions, 1)
        self.rows: list[CapturedRow] = []
        self.n_calls = 0
        self._chunks: list[Tensor] = []
        self._handle: Any = None
        self._input_handle: Any = None
        self._generate_handles: list[Any] = []
        self._seen: tuple[Tensor | None, Tensor | None] = (None, None)  # the last call's tokens and mask
        self._generated: list[Tensor] | None = None  # ids HookedTransformer's generate embedded; None outside it

    @property
    def hook_name(self) -> str:
        """The hook point recorded: `blocks.{layer}.hook_resid_post`."""
        return resid_post_name(self.layer)

    def __repr__(self) -> str:
        """What a notebook shows for `cap`: where and what it records, and how much it has."""
        positions = (f"<{self.positions.dtype} tensor {list(self.positions.shape)}>"
                     if isinstance(self.positions, Tensor) else repr(self.positions))
        passes = f"{self.n_calls} forward pass{'' if self.n_calls == 1 else 'es'}"
        if self.calls == "first" and self.n_calls > 1:
            passes += ", the first recorded"
        state = " (recording)" if self._handle is not None else ""
        return (f"Capture({self.hook_name}, positions={positions}, calls={self.calls!r}){state}: "
                f"{len(self.rows)} vector{'' if len(self.rows) == 1 else 's'} from {passes}")

    @property
    def vectors(self) -> Float[Tensor, "n d_model"]:
        """The captured residuals, float32, one row per entry of `rows`."""
        if self.n_calls == 0:
            raise InputError(
                f"nothing was captured: no forward pass reached block {self.layer} inside the "
                "`with capture(...)` block. Run the model inside it (stop_at_layer must exceed the layer)."
            )
        return torch.cat(self._chunks)

    def __enter__(self) -> Capture:
        if self._handle is not None:
            raise InputError("this capture is already recording; nest a new nl.capture(...) instead of "
                             "entering the same one twice")
        backends.check_bridge_dtype(self.model, "base")
        self.rows, self.n_calls, self._chunks = [], 0, []
        self._seen = (None, None)
        # The block's output is blocks.{layer}.hook_resid_post after all of its hooks (see above).
        self._handle = self.model.blocks[self.layer].register_forward_hook(self._record)
        self._input_handle = watch_inputs(self.model, self._see_input)
        self._generate_handles = [_MethodWatch(self.model, "generate", self._start_generating, self._stop_generating)]
        if backends.backend_of(self.model) == "hooked":
            self._generate_handles.append(self.model.embed.register_forward_pre_hook(self._see_embedded))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()
        self._input_handle.remove()
        for handle in self._generate_handles:
            handle.remove()
        self._handle = self._input_handle = None
        self._generate_handles = []

    def _see_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the tokens and mask of each model call, for when `capture` was not given them."""
        given = args[0] if args else kwargs.get("input")
        if isinstance(given, (str, list)) and given and all(isinstance(t, str) for t in
                                                            ([given] if isinstance(given, str) else given)):
            # What the model will tokenize; only used if its shape matches the run.
            given = self.model.to_tokens(given, prepend_bos=kwargs.get("prepend_bos"),
                                         padding_side=kwargs.get("padding_side"))
        tokens = given if isinstance(given, Tensor) and given.ndim == 2 and not given.is_floating_point() else None
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        if mask is not None and self._real is None and (self.calls == "all" or self.n_calls == 0):
            check_mask_values(mask)  # as `_record` would, but before HookedTransformer's own IndexError on a float one
        self._seen = (tokens, mask)

    # Inside `generate` a token it fed back may share the pad id (Qwen pads with its EOS): only the prompt's leading
    # pads are padding there. HookedTransformer's generate (TL 3.9) embeds the prompt and each new token itself and
    # runs forward on the embeddings, so no call holds the tokens: the ids it embeds inside one call name its rows.
    def _start_generating(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._generated = []

    def _stop_generating(self) -> None:
        self._generated = None

    def _see_embedded(self, module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if self._generated is not None and isinstance(ids, Tensor) and ids.ndim == 2 and not ids.is_floating_point():
            self._generated.append(ids)

    def _generated_ids(self, batch: int, width: int) -> Int[Tensor, "batch width"] | None:
        """The ids of a pass of `generate` over `width` positions: the last `width` embedded so far (the prompt then
        each new token, of which a KV-cached step runs the last); None outside generate."""
        pieces, n_columns = [], 0
        for piece in reversed(self._generated or []):  # the last pieces only: a KV-cached step reads one column
            if n_columns >= width:
                break
            pieces.append(piece)
            n_columns += piece.shape[1]
        if n_columns < width or pieces[0].shape[0] != batch:
            return None
        return torch.cat(pieces[::-1], dim=1)[:, -width:]

    def _record(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        # A bridge block returns whatever its HF decoder layer returns: a tensor, or a tuple on older HF.
        output = output[0] if isinstance(output, tuple) else output
        call = self.n_calls
        self.n_calls += 1
        if call > 0 and self.calls == "first":
            return
        batch, width = output.shape[:2]
        real = self._real
        if real is not None and tuple(real.shape) != (batch, width):
            if call == 0:
                raise InputError(
                    f"capture was given attention_mask / tokens of shape {list(real.shape)}, but the "
                    f"model ran [batch, pos] = {[batch, width]}; pass the ones you run"
                )
            real = None
        seen_tokens, seen_mask = (t if t is not None and tuple(t.shape) == (batch, width) else None
                                  for t in self._seen)
        # Inferred from this call's own input; never from the one token of a decode step, which may share the pad
        # id (Qwen pads with its EOS, which generate feeds back once a row ends) and is never padding.
        inferable = seen_mask is not None or (seen_tokens is not None and width > 1)
        if real is None and self._real is None and inferable:
            real = real_tokens(self.model, seen_mask, seen_tokens, trailing_pads_real=self._generated is not None)
        if real is None:
            real = torch.ones(batch, width, dtype=torch.bool, device=output.device)
        if seen_mask is None and width > 1 and backends.backend_of(self.model) == "bridge":
            _warn_pads_attended(real)
        try:
            rows, cols = resolve_positions(self.positions, real.to(output.device))
        except InputError as exc:
            if call == 0:
                raise
            # The prompt's positions, say, in a KV-cached decode step: "outside row 0 (columns 0..0)" alone
            # read as a claim about the prompt, which has them.
            step = (" (a KV-cached step of generate runs its new token alone: positions=-1 fits every pass, or "
                    "calls='first' records the prompt alone)" if width == 1 else "")
            raise InputError(f"pass {call} inside the capture (calls='all') ran {counted(width, 'column')}{step}: "
                             f"{exc}") from exc
        self._chunks.append(output[rows, cols].detach().float())
        tokens = self.tokens if self.tokens is not None and tuple(self.tokens.shape) == (batch, width) else None
        if tokens is None:  # the call's own: a decode step of generate is not the shape of the tokens given
            tokens = seen_tokens if seen_tokens is not None else self._generated_ids(batch, width)
        for b, p in zip(rows.tolist(), cols.tolist(), strict=True):
            self.rows.append(CapturedRow(b, p, self._token(tokens, b, p), call))

    def _token(self, tokens: Tensor | None, row: int, col: int) -> str | None:
        if tokens is None or self.model.tokenizer is None:
            return None
        # As TL's to_str_tokens decodes each token.
        return cast(str, self.model.tokenizer.decode([int(tokens[row, col])], clean_up_tokenization_spaces=False))


def _warn_pads_attended(real: Bool[Tensor, "batch pos"]) -> None:
    """Warn where a bridge run without `attention_mask=` had leading padding: the bridge attends to it
    (HookedTransformer masks it itself), so every real token of those rows differs from its unpadded run (by up to
    11 in the tiny test model's residual) while capture takes those columns for padding. Raised inside the block's
    torch hook, it points past torch's and the model's frames at the user's line that ran the model."""
    padded = (~real[:, 0]).nonzero().flatten().tolist()
    if padded:
        warn_at_caller(f"the bridge (TransformerLens 4.x) ran a left-padded batch without attention_mask=, so the real "
                       f"tokens of rows {padded[:8]} attended to their pads and what capture records differs from "
                       "their unpadded runs. Pass the mask to the run: model(tokens, attention_mask=mask), or "
                       "generate(tokens, padding_side='left')", through=_MODEL_CODE)


class _MethodWatch:
    """Calls `see(module, args, kwargs)` before each call of the model's method `name` (and `done()` after it, if
    given), until `remove()`.

    HookedTransformer's `run_with_hooks` calls `self.forward(...)` directly, so a torch pre-hook on the
    module (which fires on `model(...)` only) misses those runs' tokens and mask. Wrapping the bound
    method on the instance sees both paths; `remove()` restores it, or leaves a pass-through where a
    later wrapper (a nested capture still recording) sits on top of this one. That wrapper's `remove()`
    then restores past every pass-through below it, so no wrapper outlives the captures (a leftover one
    made `copy.deepcopy(model)` run the original's forward and `torch.save(model)` fail). Around `generate`,
    `see` and `done` bracket each call (see `Capture._start_generating`).
    """

    def __init__(self, model: nn.Module, name: str, see: Any, done: Any = None) -> None:
        self.model = model
        self.name = name
        self.active = True
        self.previous = model.__dict__.get(name)  # None: the class's own method
        inner = getattr(model, name)

        def method(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return inner(*args, **kwargs)
            see(model, args, kwargs)
            try:
                return inner(*args, **kwargs)
            finally:
                if done is not None:
                    done()

        method.watch = self  # type: ignore[attr-defined]
        self.wrapper = method
        setattr(model, name, method)

    def remove(self) -> None:
        self.active = False
        if self.model.__dict__.get(self.name) is self.wrapper:
            previous = self.previous
            while isinstance(watch := getattr(previous, "watch", None), _MethodWatch) and not watch.active:
                previous = watch.previous  # a capture closed before this one
            if previous is None:
                delattr(self.model, self.name)
            else:
                setattr(self.model, self.name, previous)


def watch_inputs(model: TLModel, see: Any) -> Any:
    """A handle with `remove()` that calls `see(module, args, kwargs)` with each run's input: on the bridge
    a pre-hook on the HF model it wraps, on HookedTransformer around its `forward` (see `_MethodWatch`)."""
    if backends.backend_of(model) == "bridge":
        return backends.input_module(model).register_forward_pre_hook(see, with_kwargs=True)
    return _MethodWatch(model, "forward", see)


def capture(model: TLModel, layer: int, positions: PositionSpec = -1, *,
            attention_mask: Int[Tensor, "batch pos"] | None = None,
            tokens: Int[Tensor, "batch pos"] | None = None, calls: Calls = "first") -> Capture:
    """Record `blocks.{layer}.hook_resid_post` at `positions` while you run `model` in a `with` block.

    >>> with capture(base_model, layer=24, positions=-1, attention_mask=mask, tokens=tokens) as cap:
    ...     base_model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, steer)])
    >>> cap.vectors, cap.rows    # [n, d_model] float32, provenance of each row

    `positions`: an int column or a list of them (every row), a negative int `-k` (each row's k-th last real
    token, whatever the padding), a `[batch]` integer tensor (one position per row) or a `[batch, pos]` boolean
    mask (every True entry).

    `tokens` (token strings in `cap.rows`, padding-aware negative positions) and `attention_mask` (it wins
    over the pad tokens) are read from each model call when not given; pass them to check `positions` before
    the run, or where the call does not hold them (a forward from embeddings, blocks called directly).
    See [`Capture`][nla_lens.capture.Capture] for what is recorded when the model runs several times inside
    the block.
    """
    return Capture(model, layer, positions, attention_mask=attention_mask, tokens=tokens, calls=calls)


def resid_post(model: TLModel, tokens: Int[Tensor, "batch pos"], layer: int, *,
               attention_mask: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos d_model"]:
    """`blocks.{layer}.hook_resid_post` of one run of `tokens` that runs no block after `layer`."""
    return activation_at(model, tokens, resid_post_name(check_block(model, layer)), attention_mask=attention_mask)


def resid_post_name(layer: int) -> str:
    """The TL hook of the residual stream after block `layer`: where NLA vectors are read and steered."""
    return f"blocks.{layer}.hook_resid_post"


def activation_at(model: TLModel, tokens: Int[Tensor, "batch pos"], hook_name: str, *,
                  attention_mask: Int[Tensor, "batch pos"] | None = None) -> Tensor:
    """`hook_name`'s activation in one run of `tokens` that runs no block after the hook's own.

    Read from the hook rather than from what `stop_at_layer` returns: for the last block HookedTransformer
    returns the residual but the bridge, which stops only in front of an existing block, runs on and
    returns logits. Without `attention_mask`, leading pads are masked on both backends, as HookedTransformer
    does itself (the bridge would attend to them).
    """
    check_token_ids(model, tokens)
    if attention_mask is not None:  # TL's IndexError (a float mask) or AssertionError (another shape) otherwise
        check_attention_mask(attention_mask, tokens)
    check_no_sae_at(model, hook_name)
    if not isinstance(hook_name, str) or hook_name not in model.hook_dict:
        raise InputError(f"{hook_name!r} is not a hook point of this model; pass a name in model.hook_dict, e.g. "
                         f"{resid_post_name(0)!r}")
    backends.check_bridge_dtype(model, "base")
    block = re.match(r"blocks\.(\d+)\.", hook_name)
    stop = None if block is None else int(block[1]) + 1
    if attention_mask is None:
        attention_mask = backends.implicit_attention_mask(model, tokens)
    kept: list[Tensor] = []
    backends.run_with_hooks(model, tokens, attention_mask=attention_mask, stop_at_layer=stop,
                            fwd_hooks=[(hook_name, lambda activation, hook: kept.append(activation))])
    if not kept:
        raise InputError(f"{hook_name} did not fire in a forward pass of this model: TransformerLens computes some "
                         "hook points only after their set_use_* switch")
    return kept[0]


def check_no_sae_at(model: TLModel, hook_name: object) -> None:
    """`hook_name` is not where sae-lens's `HookedSAETransformer.add_sae` put an SAE: the SAE takes the hook point's
    place in the model, so reading it was "not a hook point of this model", which the model's own name says it is."""
    attached = getattr(model, "acts_to_saes", {})
    if isinstance(hook_name, str) and hook_name in attached:
        raise InputError(f"an SAE is attached to this model at {hook_name!r} (HookedSAETransformer.add_sae), in that "
                         "hook point's place, so it cannot be read there; pass the model without SAEs (the one "
                         "nl.hooked_sae_transformer was built from shares its weights), or call model.reset_saes() "
                         "first")


def text_resid_post(model: TLModel, tokens: Int[Tensor, "1 pos"], layer: int) -> Float[Tensor, "pos d_model"]:
    """`resid_post` of one unpadded text, every token of it real: HookedTransformer would take a leading
    pad-id token for left padding, and Qwen's pad token is `<|endoftext|>`, which ends documents."""
    return resid_post(model, tokens, layer, attention_mask=torch.ones_like(tokens))[0]


def check_block(model: TLModel, layer: int, name: str = "layer") -> int:
    """`layer` indexes one of the model's blocks; returned as a Python int (a NumPy one is taken, not a bool)."""
    n_layers = model.cfg.n_layers
    if not is_integer(layer) or not 0 <= int(layer) < n_layers:
        raise InputError(f"{name} must be an int indexing the model's {blocks_phrase(n_layers)}, got {layer!r}")
    return int(layer)


def check_token_tensor(value: object, name: str = "tokens") -> None:
    """`value` is a `[batch, pos]` tensor, as a run's tokens and attention mask are."""
    if not isinstance(value, Tensor):
        raise InputError(f"{name} must be a [batch, pos] tensor (e.g. model.to_tokens(text)), "
                         f"got {type(value).__name__}")
    if value.ndim != 2:
        raise InputError(f"{name} must be [batch, pos], got shape {list(value.shape)}")
    if value.device.type == "meta":  # reading them (pads, ids, a mask's values) raised a bare NotImplementedError
        raise InputError(f"{name}: on the meta device, which holds no values; pass them on a real device, as "
                         "model.to_tokens(text) gives them")


def check_token_ids(model: TLModel, tokens: Tensor, name: str = "tokens") -> None:
    """`tokens` are a run `model` can take: integer ids in 0..d_vocab-1, at least one row and column, at most n_ctx
    columns. TransformerLens indexes its embedding with the ids and its rotary table with the columns, so a float
    tensor, an id past the vocabulary (tokens of another tokenizer) or a row past the context fails deep in its
    forward, and on HookedTransformer a negative id silently embeds a row counted from the end. The bridge cannot
    run an empty batch (a RuntimeError from a reshape)."""
    check_token_tensor(tokens, name)
    if tokens.numel() == 0:
        raise InputError(f"{name} are empty (shape {list(tokens.shape)}); pass at least one row of at least one token")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"{name} must hold integer token ids, got dtype {tokens.dtype}; tokenize with "
                         "model.to_tokens(text), or pass the ids as .long()")
    d_vocab = model.cfg.d_vocab
    outside = tokens[(tokens < 0) | (tokens >= d_vocab)]
    if outside.numel():
        raise InputError(f"{name} hold id {int(outside[0])}, outside this model's vocabulary (0..{d_vocab - 1}): "
                         "were they made by another model's tokenizer? Tokenize with the base model's own, "
                         "model.to_tokens(text)")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise PromptTooLongError(f"{name} have {tokens.shape[1]} columns, over the base model's context of "
                                 f"{model.cfg.n_ctx}; pass shorter texts")


def check_mask_values(attention_mask: Tensor) -> None:
    """A mask holds 0/1 integers or booleans, as HF's: TransformerLens indexes with a float mask (IndexError)
    and takes positions from its cumulative sum, so a mask of 2s or -1s runs silently with wrong positions."""
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise InputError(f"attention_mask must hold 0/1 integers or booleans, got dtype {attention_mask.dtype}; "
                         "pass mask.long() (1 for real tokens, 0 for padding)")
    if not torch.isin(attention_mask.long(), torch.tensor([0, 1], device=attention_mask.device)).all():
        raise InputError(f"attention_mask must hold only 0 and 1, got values {attention_mask.unique().tolist()[:8]}; "
                         "pass (mask != 0).long() (1 for real tokens, 0 for padding)")


def check_attention_mask(attention_mask: Tensor, tokens: Tensor | None = None) -> None:
    """`attention_mask` is a `[batch, pos]` tensor of 0/1 (`check_mask_values`), of `tokens`' shape if given."""
    check_token_tensor(attention_mask, "attention_mask")
    check_mask_values(attention_mask)
    if tokens is not None and tokens.shape != attention_mask.shape:
        raise InputError(
            f"tokens {list(tokens.shape)} and attention_mask {list(attention_mask.shape)} must have the same shape"
        )


def real_tokens(model: TLModel, attention_mask: Tensor | None, tokens: Tensor | None, *,
                trailing_pads_real: bool = False) -> Bool[Tensor, "batch pos"] | None:
    """Which columns hold real tokens: the mask if given, else inferred from pads in `tokens`; None
    when nothing marks padding (every column is real). `trailing_pads_real`: only leading pads are padding (a pass
    of `generate`, whose fed-back tokens may share the pad id)."""
    if tokens is not None:
        check_token_tensor(tokens)
    if attention_mask is not None:
        check_attention_mask(attention_mask, tokens)
        return attention_mask.bool()
    if tokens is None or model.tokenizer is None or model.tokenizer.pad_token_id is None:
        return None
    # TL's rule (leading pads, a BOS that shares the pad id kept), applied from both ends so that
    # left- and right-padded batches both work without a mask.
    prepend_bos = model.cfg.default_prepend_bos
    real = get_attention_mask(model.tokenizer, tokens, prepend_bos, padding_side="left").bool()
    if trailing_pads_real:
        return real
    return real & get_attention_mask(model.tokenizer, tokens, prepend_bos, padding_side="right").bool()


def decoded_prompts(model: TLModel, tokens: Int[Tensor, "batch pos"],
                    real: Bool[Tensor, "batch pos"] | None) -> list[str | None]:
    """Each row's real tokens (`real`, as `real_tokens` gives it: None, every column) decoded with the model's
    tokenizer into one text, padding left out and special tokens kept (a BOS is part of what the row ran): the prompt
    a result's rows name, so that a saved file says which prompt its `batch` was. None per row without a tokenizer."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        return [None] * tokens.shape[0]
    kept = torch.ones(tokens.shape, dtype=torch.bool) if real is None else real.bool().cpu()
    # As TL's to_str_tokens decodes each token: spaces as the tokens hold them.
    return [cast(str, tokenizer.decode(row[keep].tolist(), clean_up_tokenization_spaces=False))
            for row, keep in zip(tokens.cpu(), kept, strict=True)]
