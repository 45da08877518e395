"""The stage's DeepSpeed engines in one process (world size 1, gloo, CPU): what an update changes under LoRA and
ZeRO-3, that published weights are the fp32 masters (DeepSpeed's own zero_to_fp32 consolidation of the same
checkpoint), and that Stage II starts from Stage I's optimizer state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rollout.components import build_components
from rollout.streaming import encode_prompts, generate
from slotmem.config import load_config
from trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from trainer.deepspeed_setup import ensure_single_process_group, gather_full_state_dict
from trainer.ema import EMA
from trainer.engines import build_engines
from trainer.objectives import critic_loss, generator_loss
from trainer.publish import policy_state
from trainer.window import TrajectoryWindow

FRAMES = 24


@pytest.fixture(scope="module")
def cfg(repo_root):
    ensure_single_process_group("gloo")
    return load_config(f"{repo_root}/configs/tiny-random.yaml", ["trainer.lora_rank=4", "trainer.lora_alpha=4",
                                                                 "trainer.zero3_param_persistence_threshold=0"])


@pytest.fixture(scope="module")
def window(cfg):
    comps = build_components(cfg.model, cfg.memory, seed=0)
    prompts = encode_prompts(comps.text_encoder, ["a fox in the snow", "the fox jumps"])
    with torch.no_grad():
        res = generate(comps.generator.backbone, comps.generator.memory, comps.scheduler, cfg.model, prompts,
                       num_frames=FRAMES, switch_frames=[12], seed=1)
    negative = comps.text_encoder.encode([cfg.trainer.negative_prompt])[0][0]
    win = TrajectoryWindow(latents=res.latents[0], text_embeddings=prompts.embeddings, switch_starts=[12], start=0,
                           num_frames=cfg.trainer.window_frames, context=0, policy_version=0)
    return win, negative


def _update(engines, cfg, window, stage: int):
    win, negative = window
    g = torch.Generator().manual_seed(0)
    exits = [3] * (win.num_new // cfg.model.num_frame_per_block)
    gen, critic = engines.generator, engines.critic
    loss, _ = generator_loss(win, generator=gen.module, teacher=engines.teacher, critic=critic.module,
                             scheduler=engines.scheduler, model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                             negative_embedding=negative, stage=stage, exit_steps=exits, first_frame=lambda x: x,
                             generator_rng=g, noise_rng=g)
    gen.backward(loss)
    gen.step()
    loss, _ = critic_loss(win, generator=gen.module, critic=critic.module, scheduler=engines.scheduler,
                          model_cfg=cfg.model, trainer_cfg=cfg.trainer, exit_steps=exits, first_frame=lambda x: x,
                          generator_rng=g, noise_rng=g)
    critic.backward(loss)
    critic.step()


def _changed(before: dict, after: dict, prefix: str) -> tuple[set, set]:
    keys = [k for k in before if k.startswith(prefix)]
    moved = {k for k in keys if not torch.equal(before[k], after[k])}
    return moved, set(keys) - moved


def test_lora_under_zero3_trains_only_the_adapters_and_the_memory(cfg, window):
    run = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, backbone="lora", zero_stage=3))
    engines = build_engines(run, 1, world_size=1, device=torch.device("cpu"), use_bf16=False)
    assert all(hasattr(p, "ds_id") for p in engines.generator.module.parameters())  # partitioned
    before = gather_full_state_dict(engines.generator)
    _update(engines, run, window, stage=1)
    after = gather_full_state_dict(engines.generator)
    moved, kept = _changed(before, after, "backbone.")
    assert moved and all(".lora_" in k for k in moved)  # lora_A / lora_B only
    assert all(".lora_" not in k for k in kept if k.endswith((".lora_B.default.weight",)))
    assert all(k in kept for k in before if k.startswith("backbone.") and ".lora_" not in k)  # base frozen
    mem_moved, _ = _changed(before, after, "memory.")
    assert any(k.startswith("memory.writer.adapters") for k in mem_moved)
    assert any(k.startswith("memory.text_proj") for k in mem_moved)
    # Stage I: the grouper is in the optimizer at learning rate 0, so it does not move
    assert not any(k.startswith("memory.writer.grouper") for k in mem_moved)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_published_weights_are_the_fp32_masters_deepspeed_consolidates(cfg, window, tmp_path, zero_stage):
    """bf16 compute on the CPU: the module holds rounded copies; what is published (and what the EMA folds in)
    equals DeepSpeed's zero_to_fp32 consolidation of the checkpoint, not the bf16 copy."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, backbone="full", zero_stage=zero_stage))
    engines = build_engines(run, 1, world_size=1, device=torch.device("cpu"), use_bf16=True)
    _update(engines, run, window, stage=1)
    masters = gather_full_state_dict(engines.generator)
    state = TrainerState(stage=1, world_size=1, step=1)
    save_checkpoint(tmp_path, engines=engines.trained, state=state, rank=0, generators={}, ema=None)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "generator"), tag="step00000000")
    trained = [k for k, p in engines.generator.module.named_parameters() if p.requires_grad]
    assert trained
    for key in trained:
        torch.testing.assert_close(masters[key], consolidated[key].float(), rtol=0, atol=0)
    compute = dict(engines.generator.module.named_parameters())
    assert any(not torch.equal(compute[k].detach().float(), masters[k]) for k in trained)  # bf16 rounding
    published = policy_state(masters, model_cfg=dataclasses.replace(run.model, dtype="float32"),
                             trainer_cfg=run.trainer)
    for key in trained:
        assert torch.equal(published[key], consolidated[key].float())
    ema = EMA(decay=0.5, start_step=0)
    ema.update(engines.generator, 0)
    for key in trained:
        assert torch.equal(ema.shadow[key], masters[key])


def test_stage2_resumes_stage1s_optimizer_state_and_unfreezes_the_grouper(cfg, window, tmp_path):
    run = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, backbone="full", zero_stage=2))
    stage1 = build_engines(run, 1, world_size=1, device=torch.device("cpu"), use_bf16=False)
    _update(stage1, run, window, stage=1)
    save_checkpoint(tmp_path, engines=stage1.trained, state=TrainerState(stage=1, world_size=1, step=1), rank=0,
                    generators={}, ema=None)
    stage2 = build_engines(run, 2, world_size=1, device=torch.device("cpu"), use_bf16=False)
    load_checkpoint(tmp_path, engines=stage2.trained, rank=0, world_size=1, generators=None, ema=None,
                    trainer_cfg=run.trainer, stage=2)
    for name in ("generator", "critic"):
        one = stage1.trained[name].optimizer.state_dict()
        two = stage2.trained[name].optimizer.state_dict()
        state1 = one["base_optimizer_state"]["state"] if "base_optimizer_state" in one else one["state"]
        state2 = two["base_optimizer_state"]["state"] if "base_optimizer_state" in two else two["state"]
        for i, moments in state1.items():
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state2[i][k], moments[k], rtol=0, atol=0)
    lrs = {g["name"]: g["lr"] for g in stage2.generator.optimizer.param_groups}
    assert lrs["slot_grouper"] == run.trainer.memory_lr  # Stage II's own learning rates after the load
    assert {g["name"]: g["lr"] for g in stage1.generator.optimizer.param_groups}["slot_grouper"] == 0.0
