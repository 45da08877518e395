"""Config system: presets, overrides, and every validation error path."""

import dataclasses

import pytest

from slotmem.config import (
    INTERACTIVE_SWITCH_FRAMES,
    TRAIN_SWITCH_CHOICES,
    ConfigError,
    MemoryConfig,
    ModelConfig,
    RolloutConfig,
    TrainerConfig,
    build_config,
    dump_yaml,
    load_config,
    parse_override,
)
from slotmem.cli import main


def test_wan_preset_has_the_paper_defaults(repo_root):
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    m = cfg.model
    assert (m.num_layers, m.dim, m.num_heads, m.ffn_dim) == (30, 1536, 12, 8960)
    assert m.head_dim == 128 and m.tokens_per_frame == 1560
    assert (m.text_dim, m.text_len, m.in_channels) == (4096, 512, 16)
    assert (m.sink_size, m.local_attn_size, m.num_frame_per_block) == (3, 12, 3)
    assert m.denoising_steps == (1000, 750, 500, 250) and m.timestep_shift == 5.0
    mem = cfg.memory  # Table 6
    assert (mem.slot_dim, mem.num_slots_per_chunk, mem.tokens_per_slot) == (64, 7, 64)
    assert (mem.bank_size, mem.record_interval, mem.text_weight, mem.sma) == (6, 3, 0.7, False)
    assert mem.budget == 42
    t = cfg.trainer  # Appendix A.1
    assert (t.stage1_steps, t.stage2_steps, t.lr, t.critic_lr) == (2000, 1000, 1e-5, 2e-6)
    assert (t.beta1, t.beta2, t.ema_weight, t.ema_start_step) == (0.0, 0.999, 0.99, 200)
    assert (t.lambda_slot, t.guidance_scale, t.critic_updates_per_generator) == (0.2, 3.0, 5)
    r = cfg.rollout  # Appendix A.1 / A.3
    assert r.switch_choices == TRAIN_SWITCH_CHOICES == tuple(range(21, 202, 18))
    assert r.switch_frames == INTERACTIVE_SWITCH_FRAMES == (40, 80, 120, 160, 200)
    assert (r.num_frames, r.single_prompt_frames, r.fps) == (240, 120, 16)


def test_tiny_preset_loads_and_is_small(repo_root):
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml")
    assert cfg.model.dim <= 128 and cfg.model.num_layers <= 4
    assert cfg.cluster.gpus_per_actor == 0 and cfg.cluster.gpus_per_worker == 0


def test_overrides_apply_with_types(repo_root):
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml",
                      ["trainer.lr=1e-4", "memory.kind=none", "rollout.switch_frames=[12,24]", "trainer.zero_stage=3"])
    assert cfg.trainer.lr == 1e-4 and isinstance(cfg.trainer.lr, float)
    assert cfg.memory.kind == "none"
    assert cfg.rollout.switch_frames == (12, 24)
    assert cfg.trainer.zero_stage == 3


def test_config_is_frozen():
    cfg = build_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, needle", [
    ("model.nope=1", "unknown key(s) ['model.nope']"),
    ("nosection.x=1", "unknown section 'nosection'"),
    ("model.dim", "section.field=value"),
    ("dim=3", "must be section.field"),
    ("model.num_layers=0", "model.num_layers must be in [1, inf]"),
    ("model.num_layers=2.5", "model.num_layers must be an integer"),
    ("model.dim=66", "model.dim (66) must be divisible by model.num_heads"),
    ("model.dim=100", "model.dim / model.num_heads = 25 must be even"),
    ("model.dtype=float16", "model.dtype must be one of ['float32', 'bfloat16']"),
    ("model.denoising_steps=[250,500]", "model.denoising_steps must be strictly decreasing"),
    ("model.denoising_steps=[1200,500]", "model.denoising_steps must be in [1, 1000]"),
    ("model.local_attn_size=13", "must be multiples of model.num_frame_per_block"),
    ("model.local_attn_size=3", "must hold the sink"),
    ("model.latent_height=7", "must be divisible by model.patch_size"),
    ("model.patch_size=[2,2,2]", "model.patch_size[0] must be 1"),
    ("model.in_channels=32", "model.dim (64) must be at least the patch token's size, model.in_channels x "
                             "prod(model.patch_size) = 32 x 4 = 128"),
    ("teacher.dim=32", "teacher.dim (32) must be at least the patch token's size"),
    ("teacher.patch_size=[2,2,2]", "teacher.patch_size must be [] (the backbone's) or three positive integers"),
    ("teacher.patch_size=[1,3,3]", "teacher.patch_size [1, 3, 3] must divide the latent grid"),
    ("teacher.patch_size=[1,4,4]", "teacher.dim (64) must be at least the patch token's size, model.in_channels x "
                                   "prod(teacher.patch_size) = 16 x 16 = 256"),
    ("model.context_noise=-1", "model.context_noise must be in [0, 999]"),
    ("model.warp_denoising_step=3", "model.warp_denoising_step must be true or false"),
    ("memory.kind=frames", "memory.kind must be one of ['slot', 'frame_bank', 'none']"),
    ("memory.text_weight=1.5", "memory.text_weight must be in [0.0, 1.0]"),
    ("memory.retrieve_top_k=100", "memory.retrieve_top_k (100) must be <="),
    ("memory.tokens_per_slot=4096", "memory.tokens_per_slot (4096) must be <= the tokens of one chunk"),
    ("memory.con_temperature=0", "memory.con_temperature must be in"),
    ("rollout.switch_frames=[30,12]", "rollout.switch_frames must be strictly increasing"),
    ("rollout.switch_frames=[12,400]", "rollout.switch_frames must be in [1, 47]"),
    ("rollout.switch_choices=[]", "rollout.switch_choices must not be empty"),
    ("rollout.switch_mode=sometimes", "rollout.switch_mode must be one of"),
    ("rollout.num_frames=241", "rollout.num_frames (241) must be a multiple"),
    ("trainer.zero_stage=4", "trainer.zero_stage must be one of [1, 2, 3]"),
    ("trainer.max_timestep=10", "trainer.max_timestep must be in"),
    ("trainer.window_frames=20", "trainer.window_frames (20) must be a multiple"),
    ("trainer.lr=-1", "trainer.lr must be in [0.0, 1.0]"),
    ("trainer.stage0_decay=0.99", "trainer.stage0_warmup + trainer.stage0_decay must be at most 1"),
    ("cluster.num_trainer_workers=0", "cluster.num_trainer_workers must be in [1, inf]"),
    ("cluster.address=", "cluster.address must be"),
    ("storage.root=http://x", "storage.root must be a local path, file:// or s3:// URI"),
    ("storage.experiment=a/b", "storage.experiment must be a non-empty name without '/'"),
    ("tracking.experiment=a/b", "tracking.experiment must be a non-empty name without"),
    ("tracking.experiment=other", "tracking.experiment ('other') differs from storage.experiment"),
    ("pipeline.max_policy_lag=-1", "pipeline.max_policy_lag must be in [0, inf]"),
])
def test_validation_errors_name_the_field(repo_root, override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(f"{repo_root}/configs/tiny-random.yaml", [override])
    assert needle in str(e.value)


def test_teacher_patch_defaults_to_the_backbones(repo_root):
    """An empty teacher.patch_size keeps the backbone's grid; a set one changes only the teacher's tokens."""
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml")
    assert cfg.teacher.model_config(cfg.model).patch_size == cfg.model.patch_size == (1, 2, 2)
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml", ["teacher.patch_size=[1,1,1]"])
    teacher = cfg.teacher.model_config(cfg.model)
    assert teacher.patch_size == (1, 1, 1) and teacher.tokens_per_frame == 64 and cfg.model.patch_size == (1, 2, 2)


def test_unknown_section_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section"):
        build_config({"modle": {}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(bad)


def test_sections_validate_standalone():
    with pytest.raises(ConfigError, match="memory.slot_dim"):
        MemoryConfig(slot_dim=0)
    with pytest.raises(ConfigError, match="trainer.beta2"):
        TrainerConfig(beta2=1.5)
    with pytest.raises(ConfigError, match="rollout.seed"):
        RolloutConfig(seed=-3)
    with pytest.raises(ConfigError, match="model.num_heads"):
        ModelConfig(num_heads=0)


def test_parse_override_yaml_values():
    assert parse_override("trainer.lr=1e-4") == ("trainer", "lr", 1e-4)
    assert parse_override("memory.sma=true") == ("memory", "sma", True)
    assert parse_override("storage.root=s3://b/p") == ("storage", "root", "s3://b/p")


def test_dump_round_trips(tmp_path, repo_root):
    cfg = load_config(f"{repo_root}/configs/wan2.1-1.3b.yaml")
    p = tmp_path / "dump.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg
    assert cfg.flat()["model.dim"] == 1536


def test_cli_config_show_prints_the_13b_shapes(repo_root, capsys):
    assert main(["config", "show", "--config", f"{repo_root}/configs/wan2.1-1.3b.yaml"]) == 0
    out = capsys.readouterr().out
    for line in ("num_layers: 30", "dim: 1536", "num_heads: 12", "ffn_dim: 8960"):
        assert line in out


def test_cli_config_error_is_one_line(repo_root, capsys):
    assert main(["config", "show", "--config", f"{repo_root}/configs/tiny-random.yaml", "--set", "memory.kind=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memory.kind" in err


def test_relative_weight_paths_become_absolute_where_the_config_is_read(repo_root, tmp_path, monkeypatch):
    # Ray Train runs its workers in a trial directory: a path relative to the launch directory must not reach them
    monkeypatch.chdir(tmp_path)
    cfg = load_config(f"{repo_root}/configs/tiny-random-60s.yaml",
                      ["model.vae_path=w/vae", "teacher.model_path=s3://bucket/teacher", "trainer.critic_path=/abs/c"])
    assert cfg.model.vae_path == str(tmp_path / "w" / "vae")
    assert cfg.teacher.model_path == "s3://bucket/teacher" and cfg.trainer.critic_path == "/abs/c"
    assert cfg.model.model_path == ""  # empty stays empty: random weights
