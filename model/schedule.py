"""Flow-matching noise schedule with timestep shift (Wan2.1 / Self-Forcing convention).

Two kinds of "timestep" appear and must not be confused:

* a *model timestep* ``t`` in [0, T] (T = num_train_timesteps = 1000) is what the backbone's time
  embedding sees and what the noise level is read from: ``sigma(t) = t / T``. Self-Forcing's
  scheduler stores ``timesteps = sigmas * T`` and looks the sigma of a timestep up in that table,
  so the relation is linear once a timestep is in model units.
* an *unshifted step* ``u`` in [0, T] (the few-step list {1000, 750, 500, 250}, or a uniform draw
  for training) becomes a model timestep through the shift:
  ``shift_timestep(u) = T * shift*s / (1 + (shift-1)*s)``, s = u / T. Self-Forcing's
  ``warp_denoising_step`` is this map; with shift 5 it sends {1000,750,500,250} to
  {1000, 937.5, 833.3, 625}.

Noisy sample x_t = (1 - sigma) x0 + sigma * eps, and the model predicts the flow eps - x0, so
x0 = x_t - sigma * flow. Timesteps are per frame: ``t`` of shape [B, F] (or [B], or a scalar)
broadcasts against latents [B, F, C, H, W].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slotmem.config import ModelConfig


class FlowMatchScheduler:
    def __init__(self, shift: float, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)

    # -- timestep maps ----------------------------------------------------------------------

    def shift_timestep(self, u: Tensor | float | Sequence[float]) -> Tensor:
        """Unshifted step(s) u in [0, T] -> model timestep(s) in [0, T] (float32)."""
        s = torch.as_tensor(u, dtype=torch.float64) / self.num_train_timesteps
        shifted = self.shift * s / (1 + (self.shift - 1) * s)
        return (shifted * self.num_train_timesteps).float()

    def warp(self, steps: Sequence[int] | Tensor) -> Tensor:
        """Self-Forcing's warp_denoising_step: the few-step list through the shifted schedule."""
        return self.shift_timestep(steps)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise level of model timestep(s) t (float64, for exact conversions)."""
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    # -- conversions ------------------------------------------------------------------------

    def _sigma_like(self, t: Tensor | float, x: Tensor) -> Tensor:
        # [B, F] -> [B, F, 1, 1, 1] for latents [B, F, C, H, W]; [B] -> [B, 1, 1, 1, 1]; scalar as is.
        sigma = self.sigma(t).to(x.device)
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma * noise, in x0's dtype (computed in float64)."""
        sigma = self._sigma_like(t, x0)
        return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)

    def flow_to_x0(self, x_t: Tensor, flow: Tensor, t: Tensor | float) -> Tensor:
        """x0 = x_t - sigma * flow (float64 like Self-Forcing's wrapper, returned in flow's dtype)."""
        sigma = self._sigma_like(t, x_t)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """flow = (x_t - x0) / sigma; undefined at sigma = 0 (t = 0)."""
        sigma = self._sigma_like(t, x_t)
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)

    @staticmethod
    def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
        """The flow the model should predict for x_t built from (x0, noise): noise - x0."""
        return noise - x0


def build_scheduler(model_cfg: ModelConfig) -> FlowMatchScheduler:
    return FlowMatchScheduler(model_cfg.timestep_shift, model_cfg.num_train_timesteps)


def sampler_timesteps(model_cfg: ModelConfig) -> Tensor:
    """The few-step sampler's model timesteps (Appendix A.1): denoising_steps, warped if configured."""
    if model_cfg.warp_denoising_step:
        return build_scheduler(model_cfg).warp(model_cfg.denoising_steps)
    return torch.tensor(model_cfg.denoising_steps, dtype=torch.float32)
