"""Distillation losses: DMD for the generator, flow matching for the critic, and eq. 6.

Self-Forcing's recipe (DMD, Yin et al.): the generator output x is noised to a random timestep,
the frozen teacher ("real score", CFG) and the trainable critic ("fake score", no CFG) both
predict x0 from it, and their difference is the gradient pushed into x. The critic is trained
meanwhile to match the generator's own distribution with the flow-matching objective.

Models enter as callables ``(x_t [B,F,C,H,W], t [B,F]) -> x0 [B,F,C,H,W]`` with the prompt (or
the negative prompt) already bound, so nothing here knows the backbone. The noise schedule is any
object with ``add_noise(x0, noise, t)`` and ``x0_to_flow(x_t, x0, t)`` (model/schedule.py's
FlowMatchScheduler), or a plain callable ``sigma(t)`` for the rectified-flow path
x_t = (1 - sigma) x0 + sigma * noise.

Shapes: B batch, F latent frames, C latent channels, H x W latent grid.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------------------------
# timesteps
# ----------------------------------------------------------------------------------------------


def shift_timestep(t: torch.Tensor, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Warp t in [0, T) towards high noise: u = t/T, u' = shift*u / (1 + (shift-1)*u), t' = u'*T."""
    u = t / num_train_timesteps
    return shift * u / (1 + (shift - 1) * u) * num_train_timesteps


def sample_dmd_timestep(batch: int, generator: torch.Generator | None, *, shift: float, num_frames: int = 1,
                        min_t: int = 20, max_t: int = 980,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Timesteps for the DMD and the critic loss, shape [batch, num_frames] (float32, CPU).

    As Self-Forcing: an integer t ~ U{0, ..., T-1} per sample (the same for every frame of the
    sample), warped by the shift (5 for Wan) and clamped to [min_t, max_t] (2 % / 98 % of T) so the
    scores are never queried at the degenerate ends. The critic loss draws its own t the same way.
    """
    t = torch.randint(0, num_train_timesteps, (batch, 1), generator=generator).float()
    t = shift_timestep(t, shift, num_train_timesteps).clamp(min_t, max_t)
    return t.expand(batch, num_frames).contiguous()


# ----------------------------------------------------------------------------------------------
# noise schedule adapter
# ----------------------------------------------------------------------------------------------


class _SigmaSchedule:
    """Rectified-flow schedule from a plain ``sigma(t)`` callable."""

    def __init__(self, sigma: Callable[[torch.Tensor], torch.Tensor]):
        self.sigma = sigma

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(self.sigma(t), dtype=like.dtype, device=like.device)
        return s.reshape(*s.shape, *([1] * (like.ndim - s.ndim)))  # [B,F] -> [B,F,1,1,1]

    def add_noise(self, x0, noise, t):
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def x0_to_flow(self, x_t, x0, t):
        return (x_t - x0) / self._sigma(t, x_t)


def _schedule(scheduler: Any):
    if hasattr(scheduler, "add_noise") and hasattr(scheduler, "x0_to_flow"):
        return scheduler
    if callable(scheduler):
        return _SigmaSchedule(scheduler)
    raise TypeError(f"scheduler must have add_noise and x0_to_flow, or be a sigma(t) callable; got {scheduler!r}")


def _per_frame(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as [B, F] on x's device: a per-sample [B] timestep is repeated over the frames."""
    t = t.to(x.device)
    if t.ndim == 1:
        t = t[:, None].expand(x.shape[0], x.shape[1])
    if t.shape != x.shape[:2]:
        raise ValueError(f"timestep shape {tuple(t.shape)} does not match latents [B,F]={tuple(x.shape[:2])}")
    return t


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def _masked_mean(sq: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """Mean of sq [B, F, C, H, W] over the frames where `frames` [B, F] is True (all frames when None)."""
    if frames is None:
        return sq.mean()
    return sq[frames.to(sq.device)].mean()


def dmd_loss(x: torch.Tensor, *, teacher_cond: X0Model, teacher_uncond: X0Model, critic: X0Model,
             scheduler: Any, guidance_scale: float, t: torch.Tensor, noise: torch.Tensor,
             frames: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Distribution-matching loss of generator output x [B,F,C,H,W] (Self-Forcing ``dmd.py``).

    x_t     = add_noise(x, noise, t), detached: no gradient flows through the scores
    fake_x0 = critic(x_t, t)                                 (critic CFG scale 0)
    real_x0 = cond + s * (cond - uncond)                     (teacher CFG, s = guidance_scale)
    g       = (fake_x0 - real_x0) / mean_{F,C,H,W} |x - real_x0|   per sample; NaN -> 0
    loss    = 0.5 * mean((x - sg(x - g))^2)  computed in float64

    So loss = 0.5 * mean(g^2) and d loss / d x = g / N with N = x.numel() = B*F*C*H*W: the
    generator is pushed along -g, away from the critic's (its own) distribution and towards the
    teacher's; the per-sample normaliser makes the step size independent of how far x is from
    the teacher's prediction.

    frames [B, F] bool: the frames the loss covers (LongLive's gradient_mask: a mid-video window's context
    chunk is scored with the rest but carries no loss); the scores and the normaliser still see the whole clip.
    """
    t = _per_frame(t, x)
    sched = _schedule(scheduler)
    with torch.no_grad():
        x_t = sched.add_noise(x.detach(), noise, t)
        # Scores may run in bf16; the guidance and the gradient are formed in fp32.
        fake_x0 = critic(x_t, t).float()
        cond_x0 = teacher_cond(x_t, t).float()
        uncond_x0 = teacher_uncond(x_t, t).float()
        real_x0 = cond_x0 + guidance_scale * (cond_x0 - uncond_x0)
        normaliser = (x.detach().float() - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # [B,1,1,1,1]
        g = torch.nan_to_num((fake_x0 - real_x0) / normaliser)
    x64 = x.double()
    loss = 0.5 * _masked_mean((x64 - (x64 - g.double()).detach()) ** 2, frames)
    stats = {
        "dmd_grad_norm": g.double().norm().item(),
        "dmd_grad_mean_abs": g.double().abs().mean().item(),
        "dmd_timestep": t.float().mean().item(),
    }
    return loss, stats


def critic_flow_loss(x_gen_detached: torch.Tensor, *, critic: X0Model, scheduler: Any, t: torch.Tensor,
                     noise: torch.Tensor, frames: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching loss of the critic on generator samples (Self-Forcing ``FlowPredLoss``).

    x_t = add_noise(x, noise, t); the critic predicts x0, converted to a flow
    v = (x_t - x0_hat) / sigma_t by the schedule; target flow noise - x; loss = mean((v - target)^2) over
    `frames` [B, F] (LongLive masks a mid-video window's context chunk out of the critic loss too).
    """
    x = x_gen_detached.detach()
    t = _per_frame(t, x)
    sched = _schedule(scheduler)
    x_t = sched.add_noise(x, noise, t)
    flow = sched.x0_to_flow(x_t, critic(x_t, t), t)
    loss = _masked_mean((flow.float() - (noise - x).float()) ** 2, frames)
    return loss, {"critic_timestep": t.float().mean().item()}


def generator_objective(dmd: torch.Tensor, slot_loss: torch.Tensor | float, lambda_slot: float) -> torch.Tensor:
    """Eq. 6: L = L_DMD + lambda_slot * L_slot (L_slot = L_con [+ alpha L_rec in Stage II])."""
    return dmd + lambda_slot * slot_loss
