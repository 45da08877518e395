"""DMD and critic losses against closed forms; the shifted, clamped timestep sampler; eq. 6."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.schedule import FlowMatchScheduler
from trainer.losses import critic_flow_loss, dmd_loss, generator_objective, sample_dmd_timestep

B, F, C, H, W = 2, 3, 2, 2, 2


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow sigma of an already shifted timestep in [0, 1000]."""
    return t / 1000.0


class RefScheduler:
    """x_t = (1 - s) x0 + s eps; flow = eps - x0, recovered from x0 as (x_t - x0) / s."""

    def add_noise(self, x0, noise, t):
        s = sigma_of(t)[..., None, None, None]
        return (1 - s) * x0 + s * noise

    def x0_to_flow(self, x_t, x0, t):
        return (x_t - x0) / sigma_of(t)[..., None, None, None]


def _latents(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, C, H, W, generator=g), torch.randn(B, F, C, H, W, generator=g)


@pytest.mark.parametrize("scheduler", [RefScheduler(), sigma_of, FlowMatchScheduler(shift=5.0)],
                         ids=["object", "sigma-callable", "FlowMatchScheduler"])
def test_dmd_gradient_equals_closed_form(scheduler):
    x0, noise = _latents(0)
    x = x0.clone().requires_grad_(True)
    t = torch.tensor([300.0, 850.0])  # per sample: repeated over frames
    a, b, c, d, s = 0.8, 0.3, 0.5, 1.2, 3.0
    loss, stats = dmd_loss(x, teacher_cond=lambda xt, tt: a * xt + b, teacher_uncond=lambda xt, tt: c * xt,
                           critic=lambda xt, tt: d * xt, scheduler=scheduler, guidance_scale=s, t=t, noise=noise)
    loss.backward()

    # Closed form: with linear scores, fake - real = (d - (1+s) a + s c) x_t - (1+s) b.
    sig = (t / 1000.0).view(B, 1, 1, 1, 1)
    x_t = (1 - sig) * x0 + sig * noise
    real = (1 + s) * (a * x_t + b) - s * c * x_t
    diff = (d - (1 + s) * a + s * c) * x_t - (1 + s) * b
    normaliser = (x0 - real).abs().flatten(1).mean(1).view(B, 1, 1, 1, 1)
    g = diff / normaliser
    n = x0.numel()
    torch.testing.assert_close(x.grad, (g / n).to(x.grad.dtype), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss.item(), 0.5 * g.square().mean().item(), rtol=1e-5, atol=0)
    assert math.isclose(stats["dmd_grad_norm"], g.norm().item(), rel_tol=1e-5)
    assert math.isclose(stats["dmd_timestep"], 575.0)


def test_dmd_scores_get_no_gradient_and_nan_becomes_zero():
    x0, noise = _latents(1)
    x = x0.clone().requires_grad_(True)
    critic = nn.Linear(H * W, H * W)

    def critic_fn(xt, tt):
        return critic(xt.flatten(-2)).view_as(xt)

    dmd_loss(x, teacher_cond=lambda xt, tt: xt, teacher_uncond=lambda xt, tt: xt, critic=critic_fn,
             scheduler=RefScheduler(), guidance_scale=3.0, t=torch.full((B, F), 500.0), noise=noise)[0].backward()
    assert critic.weight.grad is None  # the critic is trained only by its own loss

    # Teacher and critic both return x itself: g = 0 / 0 -> NaN, which must become a zero gradient.
    y = x0.clone().requires_grad_(True)
    same = lambda xt, tt: y.detach()  # noqa: E731
    loss, _ = dmd_loss(y, teacher_cond=same, teacher_uncond=same, critic=same, scheduler=RefScheduler(),
                       guidance_scale=3.0, t=torch.full((B,), 500.0), noise=noise)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(y.grad, torch.zeros_like(y))


def test_critic_flow_loss_matches_reference_and_trains_only_the_critic():
    x0, noise = _latents(2)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(0)
    critic = nn.Linear(C, C)

    def critic_fn(xt, tt):  # mixes channels and depends on t so the test sees both
        return critic(xt.movedim(2, -1)).movedim(-1, 2) * (1 + tt[..., None, None, None] / 1000)

    t = torch.tensor([[100.0] * F, [900.0] * F])
    loss, _ = critic_flow_loss(x, critic=critic_fn, scheduler=RefScheduler(), t=t, noise=noise)
    loss.backward()

    sig = (t / 1000).view(B, F, 1, 1, 1)
    x_t = (1 - sig) * x0 + sig * noise
    x0_hat = critic_fn(x_t, t)
    v_hat = (x_t - x0_hat) / sig
    reference = ((v_hat - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, reference)
    assert x.grad is None  # generator samples enter detached
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0

    for scheduler in (sigma_of, FlowMatchScheduler(shift=5.0)):  # t is already a model timestep
        same, _ = critic_flow_loss(x0, critic=critic_fn, scheduler=scheduler, t=t, noise=noise)
        torch.testing.assert_close(same, reference)


def test_perfect_critic_has_zero_flow_loss():
    x0, noise = _latents(3)
    loss, _ = critic_flow_loss(x0, critic=lambda xt, tt: x0, scheduler=RefScheduler(),
                               t=torch.full((B,), 640.0), noise=noise)
    assert loss.item() < 1e-10


def test_timestep_sampler_shift_and_clamp():
    n, shift = 40_000, 5.0
    t = sample_dmd_timestep(n, torch.Generator().manual_seed(0), shift=shift, num_frames=F, min_t=20, max_t=980)
    assert t.shape == (n, F) and torch.equal(t, t[:, :1].expand(n, F))  # one t per sample
    t = t[:, 0]
    assert t.min() >= 20 and t.max() <= 980

    def cdf(tau: float) -> float:
        """P(t <= tau) for integer k ~ U{0..999}, t = 1000 * shift*u / (1 + (shift-1) u), u = k/1000."""
        v = tau / 1000
        u = v / (shift - (shift - 1) * v)  # inverse of the shift
        return (math.floor(1000 * u + 1e-9) + 1) / 1000

    for tau in (100.0, 500.0, 833.0, 950.0):
        assert abs((t <= tau).float().mean().item() - cdf(tau)) < 0.01, tau
    # Clamp masses: k < 4.07 maps below 20, k >= 908 maps above 980.
    assert abs((t == 20).float().mean().item() - 5 / 1000) < 0.003
    assert abs((t == 980).float().mean().item() - 92 / 1000) < 0.01
    # The shift pushes mass to high noise: the median is near 1000 * 5*0.5/(1+4*0.5) = 833.
    assert abs(t.median().item() - 833.3) < 10
    unshifted = sample_dmd_timestep(n, torch.Generator().manual_seed(0), shift=1.0)[:, 0]
    assert abs(unshifted.median().item() - 500) < 15


def test_generator_objective_is_eq6():
    dmd = torch.tensor(2.0, requires_grad=True)
    slot = torch.tensor(0.5, requires_grad=True)
    total = generator_objective(dmd, slot, 0.2)
    total.backward()
    assert total.item() == pytest.approx(2.1)
    assert dmd.grad.item() == 1.0 and slot.grad.item() == pytest.approx(0.2)
