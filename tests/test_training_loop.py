"""The shared SFT loop's pure parts: the learning-rate schedule and the seeded data order."""

from __future__ import annotations

import math

import pytest
import torch

import nla_lens as nl
from nla_lens.training import TrainConfig
from nla_lens.training.loop import lr_at, micro_batches


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(110, config) == pytest.approx(1e-4)
    lrs = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_micro_batches_visit_every_row_once_per_epoch_in_a_seeded_order():
    config = TrainConfig(steps=10, batch_size=4, grad_accum=2, seed=3)
    first_epoch = torch.cat([i for step in range(2) for i in micro_batches(step, 13, config)])
    assert sorted(first_epoch.tolist()) == list(range(13))  # 4 micro-batches of 4, 4, 4, 1
    assert [len(i) for i in micro_batches(1, 13, config)] == [4, 1]
    second_epoch = torch.cat([i for step in range(2, 4) for i in micro_batches(step, 13, config)])
    assert sorted(second_epoch.tolist()) == list(range(13)) and not torch.equal(first_epoch, second_epoch)
    assert all(torch.equal(a, b) for a, b in zip(micro_batches(5, 13, config), micro_batches(5, 13, config),
                                                 strict=True))


def test_config_rejects_settings_that_cannot_train():
    with pytest.raises(nl.ConfigError):
        TrainConfig(steps=0)
    with pytest.raises(nl.ConfigError):
        TrainConfig(min_lr_ratio=2.0)
