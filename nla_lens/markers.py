"""Find the injection marker: a token id whose left and right neighbours are the sidecar's ids.

Anchoring on the neighbours (as the training code does) keeps a marker char that happens to occur
elsewhere in a prompt from being mistaken for the injection site.
"""

from __future__ import annotations

from jaxtyping import Int
from torch import Tensor

from nla_lens.checks import counted
from nla_lens.errors import MarkerError


def find_marker_sites(
    tokens: Int[Tensor, "batch pos"],
    marker_id: int,
    left_id: int,
    right_id: int,
    *,
    expected: int | None = None,
) -> tuple[Int[Tensor, " n_sites"], Int[Tensor, " n_sites"]]:
    """Return (batch index, position) of every valid marker site, in row-major order.

    Left padding is fine: pad ids never equal the marker's neighbours. With `expected`, the number
    of sites must match (one per injected vector), else [`MarkerError`][nla_lens.errors.MarkerError].
    """
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex():
        raise MarkerError(f"tokens must be an integer tensor of token ids (e.g. av.prompt_tokens(n)), got "
                          f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 2:
        raise MarkerError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    is_marker = tokens[:, 1:-1] == marker_id
    anchored = is_marker & (tokens[:, :-2] == left_id) & (tokens[:, 2:] == right_id)
    rows, cols = anchored.nonzero(as_tuple=True)
    positions = cols + 1
    if expected is not None and rows.numel() != expected:
        loose = int((tokens == marker_id).sum())
        raise MarkerError(
            f"found {counted(rows.numel(), 'neighbour-anchored marker site')} (id {marker_id} between "
            f"{left_id} and {right_id}; {counted(loose, 'bare marker id')}) but {counted(expected, 'vector')} to "
            "inject. Build prompts with av.prompt_tokens(n), or pass one vector per marker site."
        )
    return rows, positions

