"""The networks of a stage: teacher and critic from their own paths, what trains per trainer.backbone, LoRA through
peft (adapters only, merged for publishing), and every bad input as one error naming the field and the file."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.wan import CausalWanModel
from model.weights import save_checkpoint, save_state_dict_file
from slotmem.config import load_config
from slotmem.errors import ConfigError, InputError
from trainer.lora import merged_state_dict, read_adapter
from trainer.models import build_training_models, parameter_groups
from trainer.publish import policy_state


@pytest.fixture(scope="module")
def cfg(repo_root):
    return load_config(f"{repo_root}/configs/tiny-random.yaml")


def build(cfg, stage=1, **trainer):
    tcfg = dataclasses.replace(cfg.trainer, **trainer)
    return build_training_models(cfg.model, cfg.teacher, cfg.memory, tcfg, stage=stage)


def test_the_14b_teacher_builds_on_the_meta_device(repo_root):
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    teacher_cfg = cfg.teacher_model()
    assert (teacher_cfg.num_layers, teacher_cfg.dim, teacher_cfg.num_heads, teacher_cfg.ffn_dim) == (40, 5120, 40, 13824)
    assert (teacher_cfg.text_dim, teacher_cfg.in_channels, teacher_cfg.tokens_per_frame) == (4096, 16, 1560)
    with torch.device("meta"):
        teacher = CausalWanModel(teacher_cfg)
    params = sum(p.numel() for p in teacher.parameters())
    assert 13.5e9 < params < 14.5e9, params  # Wan2.1-T2V-14B


def test_teacher_and_critic_load_their_own_paths(cfg, tmp_path):
    torch.manual_seed(7)
    # its own patch too (teacher.patch_size): it reads the student's latents on a finer token grid
    big = dataclasses.replace(cfg.teacher, num_layers=3, dim=96, num_heads=4, ffn_dim=192, patch_size=(1, 1, 1))
    teacher = CausalWanModel(big.model_config(cfg.model))
    save_checkpoint(teacher, tmp_path / "teacher.safetensors")
    critic = CausalWanModel(cfg.model)
    save_checkpoint(critic, tmp_path / "critic", layout="diffusers")
    run = dataclasses.replace(cfg, teacher=dataclasses.replace(big, model_path=str(tmp_path / "teacher.safetensors")),
                              trainer=dataclasses.replace(cfg.trainer, critic_path=str(tmp_path / "critic")))
    m = build_training_models(run.model, run.teacher, run.memory, run.trainer, stage=1)
    assert len(m.teacher.blocks) == 3 and m.teacher.cfg.dim == 96 and m.teacher.cfg.patch_size == (1, 1, 1)
    latents = torch.randn(1, cfg.model.num_frame_per_block, cfg.model.in_channels, cfg.model.latent_height,
                          cfg.model.latent_width)
    text = m.teacher.encode_text(torch.randn(1, cfg.model.text_len, cfg.model.text_dim))
    flow = m.teacher(latents, torch.full(latents.shape[:2], 500.0), text, start_frame=0, causal=False)
    assert flow.shape == latents.shape  # the same latents in and out whatever the teacher's grid
    for key, value in teacher.state_dict().items():
        assert torch.equal(m.teacher.state_dict()[key], value)
    for key, value in critic.state_dict().items():  # the critic's own start, not the generator's
        assert torch.equal(m.critic.state_dict()[key], value)
    assert not torch.equal(m.critic.blocks[0].self_attn.q.weight, m.generator.backbone.blocks[0].self_attn.q.weight)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert not m.generator.backbone.gradient_checkpointing  # the tiny preset turns it off ...
    on = build(cfg, gradient_checkpointing=True)  # ... the 1.3B default recomputes generator and critic blocks
    assert on.generator.backbone.gradient_checkpointing and on.critic.gradient_checkpointing
    assert not on.teacher.gradient_checkpointing


def test_bad_teacher_and_critic_checkpoints_name_the_field_and_the_file(cfg, tmp_path):
    wrong = CausalWanModel(dataclasses.replace(cfg.model, num_layers=3))
    save_checkpoint(wrong, tmp_path / "three_layers.safetensors")
    bad_teacher = dataclasses.replace(cfg.teacher, model_path=str(tmp_path / "three_layers.safetensors"))
    with pytest.raises(InputError, match=r"teacher.model_path: checkpoint '.*three_layers.safetensors'.*missing|"
                                         r"teacher.model_path: checkpoint '.*three_layers.safetensors'.*unexpected"):
        build_training_models(cfg.model, bad_teacher, cfg.memory, cfg.trainer, stage=1)
    bad_critic = dataclasses.replace(cfg.trainer, critic_path=str(tmp_path / "three_layers.safetensors"))
    with pytest.raises(InputError, match=r"trainer.critic_path: checkpoint '.*three_layers.safetensors'"):
        build_training_models(cfg.model, cfg.teacher, cfg.memory, bad_critic, stage=1)
    real = dataclasses.replace(cfg.model, allow_random_weights=False)
    with pytest.raises(InputError, match="teacher.model_path is empty"):
        build_training_models(real, cfg.teacher, cfg.memory, cfg.trainer, stage=1)


def test_real_presets_refuse_empty_weight_paths_naming_every_one(repo_root):
    from slotmem.config import check_weights

    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    with pytest.raises(ConfigError) as err:
        check_weights(cfg, "pipeline")
    for name in ("model.model_path", "model.text_encoder_path", "model.vae_path", "teacher.model_path",
                 "trainer.critic_path"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="model.model_path, model.text_encoder_path are empty"):
        check_weights(cfg, "rollout")
    check_weights(load_config(f"{repo_root}/configs/tiny-random.yaml"), "pipeline")  # random weights allowed


@pytest.mark.parametrize("mode", ["full", "lora", "frozen"])
def test_what_trains_per_backbone_mode(cfg, mode):
    m = build(cfg, backbone=mode)
    trainable = {n for n, p in m.generator.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    memory = {n for n in trainable if n.startswith("memory.")}
    assert memory and not any(n.startswith("memory.decoder") for n in memory)  # the decoder is Stage 0's
    if mode == "full":
        assert backbone == {f"backbone.{n}" for n, _ in m.generator.backbone.named_parameters()}
    elif mode == "lora":
        assert backbone and all(".lora_A." in n or ".lora_B." in n for n in backbone)
        assert all(".lora_" in n for n, p in m.critic.named_parameters() if p.requires_grad)  # LongLive: critic too
        # every Linear of every block is adapted (attention q/k/v/o, cross-attention, FFN), nothing else
        adapted = {n.split(".lora_")[0] for n in backbone}
        assert len(adapted) == cfg.model.num_layers * 10
    else:
        assert not backbone
        assert all(p.requires_grad for p in m.critic.parameters())  # the critic must track the generator
    groups = {g["name"] for g in parameter_groups(m.generator, cfg.trainer, stage=1)}
    assert groups == ({"memory", "slot_grouper"} | ({"backbone"} if mode != "frozen" else set()))


def test_lora_merge_for_publishing_equals_the_adapted_forward(cfg):
    m = build(cfg, backbone="lora", lora_rank=4, lora_alpha=8)
    backbone = m.generator.backbone
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)  # trained adapters (B = 0 at init would make the merge trivially right)
    x = torch.randn(1, 3, 16, 8, 8)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim)
    with torch.no_grad():
        adapted = backbone(x, 500.0, backbone.encode_text(text))
    full = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    published = policy_state({**{f"memory.{k}": v for k, v in m.generator.memory.state_dict().items()}, **full},
                             model_cfg=cfg.model, trainer_cfg=dataclasses.replace(cfg.trainer, lora_alpha=8))
    assert not any(".lora_" in k or ".base_layer." in k for k in published)
    plain = CausalWanModel(cfg.model)
    plain.load_state_dict({k[len("backbone."):]: v for k, v in published.items() if k.startswith("backbone.")})
    with torch.no_grad():
        torch.testing.assert_close(plain(x, 500.0, plain.encode_text(text)), adapted, rtol=1e-5, atol=1e-5)
    assert merged_state_dict({"a.weight": torch.ones(1)}, alpha=1) == {"a.weight": torch.ones(1)}


def test_lora_path_loads_longlive_adapters_and_refuses_files_without_them(cfg, tmp_path):
    m = build(cfg, backbone="lora", lora_rank=4, lora_alpha=4)
    ours = {k: torch.randn_like(v) for k, v in m.generator.backbone.named_parameters() if ".lora_" in k}
    # LongLive saves peft's get_peft_model_state_dict: base_model.model. prefix, no adapter name
    longlive = {"generator_lora": {"base_model.model." + k.replace(".default.", "."): v for k, v in ours.items()},
                "critic_lora": {"base_model.model." + k.replace(".default.", "."): v for k, v in ours.items()}}
    torch.save(longlive, tmp_path / "lora.pt")
    loaded = build(cfg, backbone="lora", lora_rank=4, lora_alpha=4, lora_path=str(tmp_path / "lora.pt"))
    for k, v in ours.items():
        assert torch.equal(dict(loaded.generator.backbone.named_parameters())[k], v)
        assert torch.equal(dict(loaded.critic.named_parameters())[k], v)
    save_state_dict_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match=r"trainer.lora_path: '.*plain.safetensors' holds no LoRA adapter keys"):
        read_adapter(str(tmp_path / "plain.safetensors"), "generator")
    with pytest.raises(InputError, match=r"trainer.lora_path: '.*lora.pt' does not fit.*lora_rank"):
        build(cfg, backbone="lora", lora_rank=2, lora_alpha=2, lora_path=str(tmp_path / "lora.pt"))
    with pytest.raises(ConfigError, match="trainer.lora_path is set but trainer.backbone is 'full'"):
        dataclasses.replace(cfg.trainer, lora_path="x.pt")
