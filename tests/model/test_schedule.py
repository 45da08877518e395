"""Flow-matching schedule against Self-Forcing's table-lookup scheduler, re-derived here."""

from pathlib import Path

import pytest
import torch
import yaml

from model.schedule import FlowMatchScheduler, sampler_timesteps
from slotmem.config import build_section

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(**changes):
    data = yaml.safe_load((REPO / "configs/tiny-random.yaml").read_text())["model"]
    data.update(changes)
    return build_section("model", data)


def self_forcing_table(shift: float, n: int = 1000):
    """Self-Forcing's FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000):
    sigmas = shift(linspace(1, 0, n+1)[:-1]), timesteps = 1000 * sigmas."""
    sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * 1000


def test_warp_equals_self_forcing_warp_denoising_step():
    sched = FlowMatchScheduler(shift=5.0, num_train_timesteps=1000)
    _, timesteps = self_forcing_table(5.0)
    table = torch.cat([timesteps, torch.zeros(1, dtype=torch.float64)])
    steps = torch.tensor([1000, 750, 500, 250])
    expected = table[1000 - steps]  # Self-Forcing: timesteps[1000 - denoising_step_list]
    torch.testing.assert_close(sched.warp(steps).double(), expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(sched.warp(steps), torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))


def test_sigma_of_a_model_timestep_equals_the_table_lookup():
    """SF looks sigma up as the grid entry nearest the timestep; on the grid that is t / 1000."""
    sched = FlowMatchScheduler(shift=5.0)
    sigmas, timesteps = self_forcing_table(5.0)
    t = sched.warp([1000, 750, 500, 250]).double()
    looked_up = sigmas[torch.argmin((timesteps[None] - t[:, None]).abs(), dim=1)]
    torch.testing.assert_close(sched.sigma(t), looked_up, rtol=0, atol=1e-6)


def test_noise_and_flow_conversions_per_frame():
    sched = FlowMatchScheduler(shift=5.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    t = torch.tensor([[0.0, 500.0, 1000.0], [250.0, 937.5, 625.0]])  # [B, F]
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[0, 0], x0[0, 0])  # t = 0: clean
    torch.testing.assert_close(x_t[0, 2], eps[0, 2])  # t = 1000: pure noise
    torch.testing.assert_close(x_t[1, 1], 0.0625 * x0[1, 1] + 0.9375 * eps[1, 1])
    flow = sched.flow_target(x0, eps)
    torch.testing.assert_close(sched.flow_to_x0(x_t, flow, t), x0, rtol=1e-6, atol=1e-6)
    nonzero = t.clone()
    nonzero[0, 0] = 10.0  # x0_to_flow divides by sigma
    x_t = sched.add_noise(x0, eps, nonzero)
    torch.testing.assert_close(sched.x0_to_flow(x_t, x0, nonzero), flow, rtol=1e-5, atol=1e-5)


def test_scalar_and_batch_timesteps_broadcast():
    sched = FlowMatchScheduler(shift=3.0)
    x0, eps = torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3, 1, 2, 2)
    assert torch.all(sched.add_noise(x0, eps, 400.0) == 0.4)
    per_batch = sched.add_noise(x0, eps, torch.tensor([100.0, 900.0]))
    assert torch.all(per_batch[0] == 0.1) and torch.all(per_batch[1] == 0.9)


def test_sampler_timesteps_from_config():
    torch.testing.assert_close(sampler_timesteps(tiny_cfg()), torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    raw = sampler_timesteps(tiny_cfg(warp_denoising_step=False))
    torch.testing.assert_close(raw, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    # shift 1 is the identity map
    torch.testing.assert_close(sampler_timesteps(tiny_cfg(timestep_shift=1.0)), raw)


def test_shift_must_be_positive():
    with pytest.raises(ValueError, match="shift"):
        FlowMatchScheduler(shift=0.0)
