"""Tiny NLA checkpoints written as real HF folders once per session, loaded through the public API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nla_lens as nl
from nla_lens.testing import make_tiny_nla

D_MODEL = 64
LAYER = 2


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """torch on one thread: for d_model=64 the OpenMP hand-off costs more than the matmuls
    (measured on 2 cores: the tiny-model suites ran up to 4x slower on 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_nla(tmp_path_factory.mktemp("tiny_nla"), layer=LAYER, d_model=D_MODEL)


@pytest.fixture(scope="session")
def av_karvonen(tiny_paths) -> nl.ActivationVerbalizer:
    return nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_karvonen"])


@pytest.fixture(scope="session")
def av_embedding(tiny_paths) -> nl.ActivationVerbalizer:
    return nl.ActivationVerbalizer.from_pretrained(tiny_paths["av_embedding"])


@pytest.fixture(scope="session")
def ar_nanonla(tiny_paths) -> nl.ActivationReconstructor:
    return nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_nanonla"])


@pytest.fixture(scope="session")
def ar_paper(tiny_paths) -> nl.ActivationReconstructor:
    return nl.ActivationReconstructor.from_pretrained(tiny_paths["ar_paper"])


@pytest.fixture()
def vectors() -> torch.Tensor:
    return torch.randn(4, D_MODEL, generator=torch.Generator().manual_seed(1234)) * 3.0
