"""Typed, validated configuration: one frozen dataclass per section.

Every default is the paper's (SlotMemory Table 6 and Appendix A.1/A.3) or the anchor codebases'
(Self-Forcing / LongLive / MemFlow) unless a comment says otherwise. Presets live in ``configs/``
as YAML; ``load_config(path, overrides)`` reads one, applies ``section.field=value`` overrides and
builds the sections, each of which validates itself at construction with an error naming the
field. Unknown sections or keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from slotmem.errors import InputError


class ConfigError(InputError):
    """A config value, key or file is invalid; the message names it."""


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _check_int(section: str, name: str, value: Any, lo: int | None = None, hi: int | None = None):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be an integer, got {value!r}")
    _check_range(section, name, value, lo, hi)


def _check_float(section: str, name: str, value: Any, lo: float | None = None, hi: float | None = None):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be a number, got {value!r}")
    _check_range(section, name, value, lo, hi)


def _check_range(section, name, value, lo, hi):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"{section}.{name} must be in [{lo_s}, {hi_s}], got {value!r}")


def _check_choice(section: str, name: str, value: Any, choices: tuple):
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_sorted_frames(section: str, name: str, values: tuple, lo: int, hi: int):
    if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise ConfigError(f"{section}.{name} must be a list of integers, got {list(values)!r}")
    if list(values) != sorted(set(values)):
        raise ConfigError(f"{section}.{name} must be strictly increasing, got {list(values)!r}")
    for v in values:
        _check_range(section, name, v, lo, hi)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Causal Wan2.1 DiT backbone, its text encoder and VAE (DESIGN §2)."""

    name: str = "wan2.1-1.3b"
    """Preset name, informational."""
    num_layers: int = 30
    """Transformer blocks (Wan2.1-T2V-1.3B: 30)."""
    dim: int = 1536
    """Hidden size (1.3B: 1536)."""
    num_heads: int = 12
    """Attention heads; head_dim = dim / num_heads (1.3B: 128)."""
    ffn_dim: int = 8960
    """Feed-forward hidden size (1.3B: 8960)."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding size."""
    text_dim: int = 4096
    """Text-encoder hidden size fed to the text projection (umT5-XXL: 4096)."""
    text_len: int = 512
    """Text tokens per prompt, padded with zeros (Wan2.1: 512)."""
    in_channels: int = 16
    """Latent channels (Wan VAE z_dim 16)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the Conv3d embedding."""
    latent_height: int = 60
    """Latent frame height (480 px / 8)."""
    latent_width: int = 104
    """Latent frame width (832 px / 8)."""
    eps: float = 1e-6
    """RMSNorm / LayerNorm epsilon."""
    rope_max_frames: int = 1024
    """Length of the RoPE tables; absolute latent frame indices must stay below it."""
    num_frame_per_block: int = 3
    """Latent frames per autoregressive chunk (Appendix A.1)."""
    sink_size: int = 3
    """Frames at the start of the cache that are never evicted (Table 6)."""
    local_attn_size: int = 12
    """Rolling attention window in frames, sink included (Table 6)."""
    timestep_shift: float = 5.0
    """Flow-matching timestep shift (Self-Forcing/LongLive)."""
    num_train_timesteps: int = 1000
    """Discrete training timesteps of the flow-matching schedule."""
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """Few-step sampler timesteps before warping (Appendix A.1)."""
    warp_denoising_step: bool = True
    """Map denoising_steps through the shifted schedule (Appendix A.1)."""
    context_noise: int = 0
    """Timestep of the clean re-run that commits a chunk to the cache (Appendix A.1)."""
    dtype: str = "float32"
    """Compute dtype: float32 on CPU, bfloat16 on GPU."""
    model_path: str = ""
    """Local Wan2.1 checkpoint (file or directory, original or diffusers layout); '' = random init."""
    text_encoder_path: str = ""
    """Local umT5 encoder (transformers layout, or Wan's .pth); '' = tiny encoder built from text_encoder_*."""
    tokenizer_path: str = ""
    """Local tokenizer directory; '' = byte-level ByT5 tokenizer (no files needed)."""
    vae_path: str = ""
    """Local Wan VAE (diffusers AutoencoderKLWan directory); '' = tiny VAE built from vae_*."""
    text_encoder_layers: int = 2
    """Tiny text encoder: layers (used only when text_encoder_path is empty)."""
    text_encoder_heads: int = 4
    """Tiny text encoder: heads."""
    vae_base_dim: int = 8
    """Tiny VAE: base channels (used only when vae_path is empty)."""

    def __post_init__(self):
        s = "model"
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len",
                     "in_channels", "latent_height", "latent_width", "rope_max_frames",
                     "num_frame_per_block", "local_attn_size", "num_train_timesteps",
                     "text_encoder_layers", "text_encoder_heads", "vae_base_dim"):
            _check_int(s, name, getattr(self, name), lo=1)
        _check_int(s, "sink_size", self.sink_size, lo=0)
        if self.dim % self.num_heads:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ConfigError(f"model.dim / model.num_heads = {head_dim} must be even and >= 6 (3-D RoPE)")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ConfigError(f"model.patch_size must be three positive integers, got {self.patch_size!r}")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ConfigError(f"model.latent_height/latent_width ({self.latent_height}x{self.latent_width}) "
                              f"must be divisible by model.patch_size {self.patch_size[1:]}")
        if self.patch_size[0] != 1:
            raise ConfigError(f"model.patch_size[0] must be 1 (one latent frame per token row), got {self.patch_size[0]}")
        if self.local_attn_size % self.num_frame_per_block or self.sink_size % self.num_frame_per_block:
            raise ConfigError(f"model.local_attn_size ({self.local_attn_size}) and model.sink_size ({self.sink_size}) "
                              f"must be multiples of model.num_frame_per_block ({self.num_frame_per_block})")
        if self.local_attn_size < self.sink_size + self.num_frame_per_block:
            raise ConfigError(f"model.local_attn_size ({self.local_attn_size}) must hold the sink ({self.sink_size}) "
                              f"plus one chunk ({self.num_frame_per_block})")
        _check_float(s, "timestep_shift", self.timestep_shift, lo=1e-3)
        _check_float(s, "eps", self.eps, lo=0.0, hi=1e-2)
        _check_int(s, "context_noise", self.context_noise, lo=0, hi=self.num_train_timesteps - 1)
        if not self.denoising_steps:
            raise ConfigError("model.denoising_steps must not be empty")
        steps = list(self.denoising_steps)
        if steps != sorted(steps, reverse=True) or len(set(steps)) != len(steps):
            raise ConfigError(f"model.denoising_steps must be strictly decreasing, got {steps}")
        for t in steps:
            _check_int(s, "denoising_steps", t, lo=1, hi=self.num_train_timesteps)
        _check_choice(s, "dtype", self.dtype, ("float32", "bfloat16"))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame after patching (1.3B at 480x832: 30*52 = 1560)."""
        return (self.latent_height // self.patch_size[1]) * (self.latent_width // self.patch_size[2])


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Long-term memory (paper §3.3-3.5, Table 6; DESIGN §3 for choices where the paper is silent)."""

    kind: str = "slot"
    """'slot' (SlotMemory), 'frame_bank' (MemFlow NAM baseline) or 'none' (LongLive: sink + local)."""
    slot_dim: int = 64
    """Slot embedding size d_s (Table 6)."""
    num_slots_per_chunk: int = 7
    """Slots S per chunk and layer (Table 6)."""
    tokens_per_slot: int = 64
    """R, tokens copied into one memory item (Table 6)."""
    bank_size: int = 6
    """Bank capacity in blocks; N_budget = bank_size * num_slots_per_chunk items per layer (Table 6)."""
    record_interval: int = 3
    """Write to the bank every this many chunks (Table 6)."""
    retrieve_top_k: int = 21
    """Items read per layer before each chunk (paper silent; 3 blocks x 7 slots)."""
    text_weight: float = 0.7
    """gamma in eq. 4: weight of text relevance against visual relevance (Table 6: 0.7/0.3)."""
    slot_iters: int = 3
    """Slot Attention refinement iterations (Locatello et al. default)."""
    con_temperature: float = 0.1
    """tau of L_con (eq. 8); paper silent."""
    rec_weight: float = 1.0
    """alpha of L_rec in eq. 7; paper silent."""
    rec_confidence: float = 0.5
    """Confidence threshold of the L_rec mask (eq. 9)."""
    frame_bank_frames: int = 3
    """frame_bank baseline: whole latent frames kept (MemFlow bank_size 3)."""
    sma: bool = False
    """frame_bank baseline: sparse memory activation (Table 6: False)."""

    def __post_init__(self):
        s = "memory"
        _check_choice(s, "kind", self.kind, ("slot", "frame_bank", "none"))
        for name in ("slot_dim", "num_slots_per_chunk", "tokens_per_slot", "bank_size", "record_interval",
                     "retrieve_top_k", "slot_iters", "frame_bank_frames"):
            _check_int(s, name, getattr(self, name), lo=1)
        if self.retrieve_top_k > self.bank_size * self.num_slots_per_chunk:
            raise ConfigError(f"memory.retrieve_top_k ({self.retrieve_top_k}) must be <= bank_size * "
                              f"num_slots_per_chunk ({self.bank_size * self.num_slots_per_chunk})")
        _check_float(s, "text_weight", self.text_weight, lo=0.0, hi=1.0)
        _check_float(s, "con_temperature", self.con_temperature, lo=1e-4, hi=10.0)
        _check_float(s, "rec_weight", self.rec_weight, lo=0.0)
        _check_float(s, "rec_confidence", self.rec_confidence, lo=0.0, hi=1.0)

    @property
    def budget(self) -> int:
        """N_budget: items kept per layer."""
        return self.bank_size * self.num_slots_per_chunk


# Training switch candidates {21, 39, ..., 201} (Appendix A.1).
TRAIN_SWITCH_CHOICES = tuple(range(21, 202, 18))
# Interactive inference switches every 10 s of a 60 s video (Appendix A.3).
INTERACTIVE_SWITCH_FRAMES = (40, 80, 120, 160, 200)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Streaming generation and self-rollout actors (DESIGN §4, Appendix A.3)."""

    num_frames: int = 240
    """Latent frames of a training self-rollout and of interactive inference (60 s)."""
    single_prompt_frames: int = 120
    """Latent frames of single-prompt inference (Appendix A.3)."""
    switch_frames: tuple[int, ...] = INTERACTIVE_SWITCH_FRAMES
    """Interactive inference switch frames (Appendix A.3)."""
    switch_mode: str = "random_choice"
    """Training rollouts: how the switch frame is chosen ('random_choice' or 'fixed')."""
    switch_choices: tuple[int, ...] = TRAIN_SWITCH_CHOICES
    """Training rollouts: candidate switch frames (Appendix A.1)."""
    prompt_file: str = ""
    """Prompts for training rollouts: lines 'prompt' or 'prompt_a || prompt_b', or JSONL {"prompts": [...]}; '' = built-in."""
    trajectories_per_round: int = 4
    """Trajectories written per rollout round (all actors together)."""
    seed: int = 0
    """Base seed; trajectory i of round k uses a seed derived from (seed, k, i)."""
    fps: int = 16
    """Output video frame rate (Wan2.1: 16)."""
    max_restarts: int = 2
    """Ray max_restarts of a rollout actor."""
    max_in_flight: int = 2
    """Trajectories queued per actor at once (back-pressure)."""
    stall_timeout_s: float = 1800.0
    """Seconds the round driver waits for actors to start, or for the next trajectory to finish, before it gives
    up on the round (a hung actor); covers an actor restart with a model load."""

    def __post_init__(self):
        s = "rollout"
        for name in ("num_frames", "single_prompt_frames", "trajectories_per_round", "fps", "max_in_flight"):
            _check_int(s, name, getattr(self, name), lo=1)
        _check_int(s, "seed", self.seed, lo=0)
        _check_int(s, "max_restarts", self.max_restarts, lo=0)
        _check_float(s, "stall_timeout_s", self.stall_timeout_s, lo=1.0)
        _check_choice(s, "switch_mode", self.switch_mode, ("random_choice", "fixed"))
        _check_sorted_frames(s, "switch_frames", tuple(self.switch_frames), 1, self.num_frames - 1)
        if not self.switch_choices:
            raise ConfigError("rollout.switch_choices must not be empty")
        _check_sorted_frames(s, "switch_choices", tuple(self.switch_choices), 1, self.num_frames - 1)


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """DMD + critic + slot training under DeepSpeed ZeRO (DESIGN §5, Appendix A.1)."""

    stage1_steps: int = 2000
    """Stage I generator steps (Appendix A.1)."""
    stage2_steps: int = 1000
    """Stage II generator steps (Appendix A.1)."""
    lr: float = 1e-5
    """Generator (and slot adapter) AdamW learning rate (Appendix A.1)."""
    critic_lr: float = 2e-6
    """Critic AdamW learning rate (Appendix A.1)."""
    beta1: float = 0.0
    """AdamW beta1 (Appendix A.1)."""
    beta2: float = 0.999
    """AdamW beta2 (Appendix A.1)."""
    weight_decay: float = 0.01
    """AdamW weight decay (Self-Forcing default)."""
    grad_clip: float = 10.0
    """Max grad norm for generator and critic (Self-Forcing)."""
    ema_weight: float = 0.99
    """EMA decay of the generator (Appendix A.1)."""
    ema_start_step: int = 200
    """First generator step with EMA (Appendix A.1)."""
    critic_updates_per_generator: int = 5
    """Critic updates per generator update (dfake_gen_update_ratio)."""
    guidance_scale: float = 3.0
    """Teacher CFG scale against the negative prompt."""
    min_timestep: int = 20
    """DMD timestep clamp, low end (2% of 1000)."""
    max_timestep: int = 980
    """DMD timestep clamp, high end (98% of 1000)."""
    window_frames: int = 21
    """Latent frames of a training window (7 chunks; streaming_chunk_size 21)."""
    lambda_slot: float = 0.2
    """Weight of the slot loss in the generator objective (eq. 6, Table 6)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay replicated (DeepSpeed's default); 0 partitions every parameter
    (the tiny preset, whose tensors are all smaller than the default)."""
    checkpoint_every: int = 100
    """Generator steps between checkpoints."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train."""
    negative_prompt: str = "static, blurry, low quality, distorted"
    """Teacher CFG negative prompt."""
    teacher_path: str = ""
    """Frozen teacher weights; '' = the generator's initial weights."""
    seed: int = 0
    """Training seed."""

    def __post_init__(self):
        s = "trainer"
        for name in ("stage1_steps", "stage2_steps", "critic_updates_per_generator", "window_frames",
                     "checkpoint_every", "num_to_keep"):
            _check_int(s, name, getattr(self, name), lo=1)
        _check_int(s, "ema_start_step", self.ema_start_step, lo=0)
        _check_int(s, "seed", self.seed, lo=0)
        for name in ("lr", "critic_lr"):
            _check_float(s, name, getattr(self, name), lo=0.0, hi=1.0)
        _check_float(s, "beta1", self.beta1, lo=0.0, hi=0.999999)
        _check_float(s, "beta2", self.beta2, lo=0.0, hi=0.999999)
        _check_float(s, "weight_decay", self.weight_decay, lo=0.0)
        _check_float(s, "grad_clip", self.grad_clip, lo=1e-6)
        _check_float(s, "ema_weight", self.ema_weight, lo=0.0, hi=1.0)
        _check_float(s, "guidance_scale", self.guidance_scale, lo=0.0)
        _check_float(s, "lambda_slot", self.lambda_slot, lo=0.0)
        _check_int(s, "min_timestep", self.min_timestep, lo=0, hi=999)
        _check_int(s, "max_timestep", self.max_timestep, lo=self.min_timestep + 1, hi=1000)
        _check_choice(s, "zero_stage", self.zero_stage, (1, 2, 3))
        _check_int(s, "zero3_param_persistence_threshold", self.zero3_param_persistence_threshold, lo=0)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the jobs run and with how many processes (DESIGN §6)."""

    address: str = "local"
    """Ray address: 'local' starts an embedded cluster, 'auto' joins a running one, or ray://HOST:PORT."""
    num_rollout_actors: int = 2
    """Rollout actors (one GPU each unless gpus_per_actor says otherwise)."""
    gpus_per_actor: float = 1.0
    """GPUs per rollout actor (0 = CPU)."""
    cpus_per_actor: float = 1.0
    """CPUs per rollout actor."""
    num_trainer_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    gpus_per_worker: float = 1.0
    """GPUs per trainer worker (0 = CPU, gloo backend)."""
    cpus_per_worker: float = 1.0
    """CPUs per trainer worker."""
    local_num_cpus: int = 4
    """Logical CPUs of the embedded local cluster (more than physical cores so Ray Data tasks can run next to Train workers)."""
    max_failures: int = 2
    """Ray Train FailureConfig.max_failures."""
    pin_node_types: bool = False
    """Place rollout actors only on nodes advertising the custom resource `rollout_node` and trainer workers only on
    `trainer_node` nodes (ray_cluster.yaml, cluster/kuberay-rayjob.yaml); false = any node."""

    def __post_init__(self):
        s = "cluster"
        if not isinstance(self.address, str) or not self.address:
            raise ConfigError(f"cluster.address must be 'local', 'auto' or a Ray address, got {self.address!r}")
        _check_int(s, "num_rollout_actors", self.num_rollout_actors, lo=1)
        _check_int(s, "num_trainer_workers", self.num_trainer_workers, lo=1)
        _check_int(s, "local_num_cpus", self.local_num_cpus, lo=1)
        _check_int(s, "max_failures", self.max_failures, lo=0)
        for name in ("gpus_per_actor", "gpus_per_worker"):
            _check_float(s, name, getattr(self, name), lo=0.0, hi=8.0)
        for name in ("cpus_per_actor", "cpus_per_worker"):
            _check_float(s, name, getattr(self, name), lo=0.0, hi=256.0)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow tracking (DESIGN §6)."""

    enabled: bool = True
    """Log to MLflow."""
    tracking_uri: str = ""
    """MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite under the local storage root."""
    experiment: str = "slotmem"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Log CPU/GPU/memory system metrics."""

    def __post_init__(self):
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ConfigError(f"tracking.experiment must be a non-empty string, got {self.experiment!r}")


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where shards, checkpoints and published weights live (DESIGN §4)."""

    root: str = "runs"
    """Local directory, file:///abs/dir or s3://bucket/prefix."""
    experiment: str = "slotmem"
    """Experiment name: {root}/{experiment}/rollouts/round_{k}/ and run names derive from it."""
    s3_endpoint: str = ""
    """S3 endpoint override (host:port or URL); '' = $AWS_ENDPOINT_URL or AWS."""
    s3_region: str = ""
    """S3 region; '' = $AWS_DEFAULT_REGION or us-east-1."""
    retries: int = 3
    """Attempts for a storage operation that fails transiently."""

    def __post_init__(self):
        if not isinstance(self.root, str) or not self.root:
            raise ConfigError(f"storage.root must be a path, file:// or s3:// URI, got {self.root!r}")
        if "://" in self.root and not self.root.startswith(("file://", "s3://")):
            raise ConfigError(f"storage.root must be a local path, file:// or s3:// URI, got {self.root!r}")
        if not isinstance(self.experiment, str) or not self.experiment or "/" in self.experiment:
            raise ConfigError(f"storage.experiment must be a non-empty name without '/', got {self.experiment!r}")
        _check_int("storage", "retries", self.retries, lo=1, hi=20)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The main job: rollout rounds alternating with training stages (DESIGN §6)."""

    overlap: bool = False
    """Roll out round k+1 while stage k trains, bounded by max_policy_lag."""
    max_policy_lag: int = 1
    """Largest trainer_version - row.policy_version allowed in a batch."""
    sample_video: bool = True
    """End with an interactive 60 s sample video."""

    def __post_init__(self):
        _check_int("pipeline", "max_policy_lag", self.max_policy_lag, lo=0)


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        # Cross-section checks.
        if self.trainer.window_frames % self.model.num_frame_per_block:
            raise ConfigError(f"trainer.window_frames ({self.trainer.window_frames}) must be a multiple of "
                              f"model.num_frame_per_block ({self.model.num_frame_per_block})")
        if self.rollout.num_frames % self.model.num_frame_per_block:
            raise ConfigError(f"rollout.num_frames ({self.rollout.num_frames}) must be a multiple of "
                              f"model.num_frame_per_block ({self.model.num_frame_per_block})")
        chunk_tokens = self.model.num_frame_per_block * self.model.tokens_per_frame
        if self.memory.tokens_per_slot > chunk_tokens:
            raise ConfigError(f"memory.tokens_per_slot ({self.memory.tokens_per_slot}) must be <= the tokens of one "
                              f"chunk (model.num_frame_per_block * tokens per frame = {chunk_tokens})")
        if self.rollout.num_frames >= self.model.rope_max_frames:
            raise ConfigError(f"rollout.num_frames ({self.rollout.num_frames}) must be below "
                              f"model.rope_max_frames ({self.model.rope_max_frames})")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in fields(self)}

    def flat(self) -> dict[str, Any]:
        """'section.field' -> value, for MLflow params."""
        return {f"{sec}.{k}": v for sec, d in self.to_dict().items() for k, v in d.items()}


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Config)}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}


def _section_to_dict(section) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        v = getattr(section, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------------------------
# building sections from plain data
# ----------------------------------------------------------------------------------------------


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Convert YAML/CLI values to the field's declared type (lists -> tuples, ints -> floats)."""
    origin = get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{name} must be a list, got {value!r}")
        args = get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(section, name, elem, v) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{section}.{name} must be a string, got {value!r}")
    return value


def build_section(name: str, data: dict[str, Any]):
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; valid sections: {sorted(SECTIONS)}")
    cls = SECTIONS[name]
    if not isinstance(data, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys of {name!r}: {valid}")
    kwargs = {k: _coerce(name, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def build_config(data: dict[str, Any]) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    return Config(**{name: build_section(name, data.get(name) or {}) for name in SECTIONS})


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.field=value' -> (section, field, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.field (e.g. trainer.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads '1e-4' as a string
    return parts[0], parts[1], value


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (or the built-in defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    data = json.loads(json.dumps(data))  # deep copy
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"override {text!r}: unknown section {section!r}; valid sections: {sorted(SECTIONS)}")
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value
    return build_config(data)


def replace(section, **changes):
    """dataclasses.replace that re-validates (frozen sections validate in __post_init__)."""
    return dataclasses.replace(section, **changes)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
