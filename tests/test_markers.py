"""Neighbour-anchored marker search on token tensors."""

from __future__ import annotations

import pytest
import torch

import nla_lens as nl
from nla_lens.markers import find_marker_sites

M, L, R, PAD = 9, 5, 6, 0


def test_sites_in_a_left_padded_batch():
    tokens = torch.tensor([
        [PAD, PAD, 1, L, M, R, 2],
        [1, 2, 3, L, M, R, 4],
        [PAD, L, M, R, 3, 4, 4],
    ])
    rows, positions = find_marker_sites(tokens, M, L, R, expected=3)
    assert rows.tolist() == [0, 1, 2] and positions.tolist() == [4, 4, 2]


def test_a_bare_marker_without_its_neighbours_is_not_a_site():
    tokens = torch.tensor([[M, L, M, R, 1, M, 2]])
    rows, positions = find_marker_sites(tokens, M, L, R)
    assert positions.tolist() == [2]


def test_count_mismatch_and_duplicates_raise_marker_error():
    tokens = torch.tensor([[L, M, R, L, M, R], [1, 2, 3, 4, 5, 6]])
    with pytest.raises(nl.MarkerError, match="found 2 neighbour-anchored"):
        find_marker_sites(tokens, M, L, R, expected=1)
    with pytest.raises(nl.MarkerError, match=r"\[batch, pos\]"):
        find_marker_sites(tokens[0], M, L, R)
    # counts of one in the singular: it said "1 neighbour-anchored marker site(s) ... but 2 vector(s)"
    with pytest.raises(nl.MarkerError, match=r"found 1 neighbour-anchored marker site \(.*; 1 bare marker id\) but 2 "
                                             r"vectors to inject"):
        find_marker_sites(tokens[:1, :3], M, L, R, expected=2)


def test_av_injection_checks_vector_count_against_sites(av_karvonen):
    tokens = av_karvonen.prompt_tokens(3)
    with pytest.raises(nl.MarkerError, match="3 neighbour-anchored marker site"):
        av_karvonen.injection(torch.randn(2, 64), tokens)
    no_marker = torch.full_like(tokens, av_karvonen.tokenizer.pad_token_id)
    with pytest.raises(nl.MarkerError, match="found 0"):
        av_karvonen.injection(torch.randn(3, 64), no_marker)


@pytest.mark.parametrize("tokens", [[[L, M, R]], torch.tensor([[L, M, R]], dtype=torch.float32)],
                         ids=["list", "float_tensor"])
def test_tokens_that_are_not_an_integer_tensor_raise_marker_error(tokens):
    with pytest.raises(nl.MarkerError, match="integer"):
        find_marker_sites(tokens, M, L, R, expected=1)


def test_an_injection_repr_names_its_sites_and_never_prints_the_vectors(av_karvonen):
    """`print(inj)` or a notebook cell ending in `av.injection(...)` printed every entry of every vector."""
    injection = av_karvonen.injection(torch.randn(6, 64), av_karvonen.prompt_tokens(6))
    shown, column = repr(injection), int(injection.positions[0])
    assert shown.startswith("Injection(karvonen at blocks.1.hook_resid_post: 6 vectors of d_model 64")
    assert f"(0, {column}), (1, {column})" in shown and "2 more" in shown
    assert "tensor" not in shown and len(shown) < 200
