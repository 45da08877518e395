"""Shared helpers for the memory tests: a LayerState stand-in and a random clean re-run."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass
class State:
    """Satisfies memory.base.LayerStateLike (the backbone's LayerState has the same three fields)."""

    x: torch.Tensor  # (B, L, dim)
    k: torch.Tensor  # (B, L, H, D)
    v: torch.Tensor  # (B, L, H, D)


def random_states(*, num_layers: int, batch: int, tokens: int, dim: int, heads: int, head_dim: int,
                  generator: torch.Generator, dtype=torch.float32) -> list[State]:
    return [State(x=torch.randn(batch, tokens, dim, generator=generator),
                  k=torch.randn(batch, tokens, heads, head_dim, generator=generator).to(dtype),
                  v=torch.randn(batch, tokens, heads, head_dim, generator=generator).to(dtype))
            for _ in range(num_layers)]


@pytest.fixture
def make_states():
    return random_states


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine
    (measured 100x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
