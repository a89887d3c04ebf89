"""Activation checkpointing replays the injection hook (and any user hook) in backward's recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import NEEDS_TL3
from torch.utils.checkpoint import CheckpointError, checkpoint

from nla_lens.training import av_loss, av_rows, init_av
from nla_lens.training.recompute import activation_checkpointing

pytestmark = NEEDS_TL3


@pytest.fixture(scope="module")
def av_and_rows(base_folder, dataset_meta, label_split):
    av = init_av(base_folder, dataset_meta)
    return av, av_rows(label_split[0], av.meta, av.tokenizer)


def _gradients(av, rows, block_runs: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the AV loss; backward runs after `av_loss` has removed its injection hook.

    `block_runs` records each run of block 1 (its first hook point): in the forward, or in a recompute."""
    av.model.zero_grad(set_to_none=True)
    steer = torch.linspace(-1, 1, av.meta.d_model)
    runs = block_runs if block_runs is not None else []
    loss_done = False
    hooks = [("blocks.2.hook_resid_mid", lambda x, hook: x + steer),
             ("blocks.1.hook_resid_pre", lambda x, hook: runs.append("backward" if loss_done else "forward"))]
    with av.model.hooks(fwd_hooks=hooks):
        loss = av_loss(av, rows, torch.tensor([0, 3, 7]))
    loss_done = True
    loss.backward()
    return {name: p.grad.clone() for name, p in av.model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_gradients_as_plain_ones(av_and_rows):
    av, rows = av_and_rows
    plain_runs, checkpointed_runs = [], []
    plain = _gradients(av, rows, plain_runs)
    with activation_checkpointing(av.model):
        checkpointed = _gradients(av, rows, checkpointed_runs)
    # Checkpointing really happened: block 1 ran once more, in backward, with the forward's hooks put back.
    assert plain_runs == ["forward"]
    assert checkpointed_runs == ["forward", "backward"]
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)
    assert all("forward" not in vars(block) for block in av.model.blocks)  # the class forward is back


def test_a_recompute_without_the_replayed_hooks_is_not_the_forward(av_and_rows):
    """The control: torch's own checkpoint recomputes block 1 without the injection (gone by
    backward) and notices only because the hook saved tensors; replaying the hooks is what is needed."""
    av, rows = av_and_rows
    try:
        for block in av.model.blocks:
            block.forward = lambda *args, _f=block.forward, **kwargs: checkpoint(_f, *args, use_reentrant=False,
                                                                                 **kwargs)
        with pytest.raises(CheckpointError):
            _gradients(av, rows)
    finally:
        for block in av.model.blocks:
            del block.forward
