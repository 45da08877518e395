"""Config sections of the jobs: rollout, trainer, cluster, tracking, storage and the pipeline loop."""

from __future__ import annotations

from dataclasses import dataclass

from slotmem.config.checks import check_choice, check_float, check_int, check_name, check_sorted_frames
from slotmem.errors import ConfigError

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
            check_int(s, name, getattr(self, name), lo=1)
        check_int(s, "seed", self.seed, lo=0)
        check_int(s, "max_restarts", self.max_restarts, lo=0)
        check_float(s, "stall_timeout_s", self.stall_timeout_s, lo=1.0)
        check_choice(s, "switch_mode", self.switch_mode, ("random_choice", "fixed"))
        check_sorted_frames(s, "switch_frames", tuple(self.switch_frames), 1, self.num_frames - 1)
        if not self.switch_choices:
            raise ConfigError("rollout.switch_choices must not be empty")
        check_sorted_frames(s, "switch_choices", tuple(self.switch_choices), 1, self.num_frames - 1)


# Wan2.1's standard negative prompt (wan/configs/shared_config.py sample_neg_prompt; LongLive's and Self-Forcing's
# negative_prompt for the teacher's CFG).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                       "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
BACKBONE_MODES = ("full", "lora", "frozen")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Slot warm-up, DMD + critic + slot training under DeepSpeed ZeRO (DESIGN §5, Appendix A.1).

    Steps count training iterations as Self-Forcing / LongLive do: one iteration is one critic update, and every
    ``critic_updates_per_generator``-th iteration the generator updates first (LongLive's 3000 ``max_iters`` = the
    paper's Stage I 2000 + Stage II 1000 steps = 600 generator updates). A Stage 0 iteration is one update of the
    slot modules.
    """

    stage0_steps: int = 500
    """Stage 0 (slot warm-up) iterations: phi, slot attention, initialiser, dynamics predictor and the feature decoder
    trained on the frozen backbone's clean re-run features with L_con + feature reconstruction; 0 disables it."""
    stage1_steps: int = 2000
    """Stage I iterations (Appendix A.1)."""
    stage2_steps: int = 1000
    """Stage II iterations (Appendix A.1)."""
    stage0_warmup: float = 0.05
    """Stage 0: share of its iterations with a linear learning-rate warm-up (trainer/schedule.py stage0_lr_factor)."""
    stage0_decay: float = 0.3
    """Stage 0: share of its iterations, at the end, over which the rate decays (cosine) to stage0_final_lr_ratio,
    so the grouper Stage I freezes is a settled one, not the last large step's."""
    stage0_final_lr_ratio: float = 0.1
    """Stage 0: the rate at its last iteration, as a fraction of memory_lr."""
    stage0_rec_weight: float = 1.0
    """Stage 0: weight of the feature reconstruction next to L_con (SlotContrast weighs its two terms 1:1)."""
    backbone: str = "lora"
    """What trains in the generator's and the critic's backbone: 'full', 'lora' (peft, LongLive/MemFlow: rank 256 on
    every Linear of the transformer blocks, generator and critic) or 'frozen' (paper §4.1; the critic then trains
    in full)."""
    lora_rank: int = 256
    """LoRA rank (LongLive/MemFlow adapter.rank)."""
    lora_alpha: int = 256
    """LoRA alpha (LongLive/MemFlow adapter.alpha)."""
    lora_path: str = ""
    """Adapter weights to start from: a safetensors/.pt state dict of peft LoRA keys, or LongLive's lora.pt with
    'generator_lora' / 'critic_lora'; '' = fresh adapters (B = 0)."""
    lr: float = 1e-5
    """Generator backbone AdamW learning rate (Appendix A.1)."""
    critic_lr: float = 2e-6
    """Critic AdamW learning rate (Appendix A.1)."""
    memory_lr: float = 1e-4
    """Learning rate of the memory modules (phi, slot grouper, text projection P, feature decoder); no weight decay."""
    beta1: float = 0.0
    """AdamW beta1 (Appendix A.1)."""
    beta2: float = 0.999
    """AdamW beta2 (Appendix A.1)."""
    weight_decay: float = 0.01
    """AdamW weight decay of backbone parameters (Self-Forcing default); memory modules get none."""
    grad_clip: float = 10.0
    """Max grad norm for generator and critic (Self-Forcing)."""
    ema_weight: float = 0.99
    """EMA decay of the generator (Appendix A.1)."""
    ema_start_step: int = 200
    """First iteration of a DMD stage with EMA (Appendix A.1; Self-Forcing counts it in iterations)."""
    critic_updates_per_generator: int = 5
    """Critic updates per generator update (dfake_gen_update_ratio)."""
    same_exit_step: bool = True
    """One exit step for every chunk of a window (Self-Forcing same_step_across_blocks); false = one per chunk."""
    guidance_scale: float = 3.0
    """Teacher CFG scale against the negative prompt."""
    min_timestep: int = 20
    """DMD timestep clamp, low end (2% of 1000)."""
    max_timestep: int = 980
    """DMD timestep clamp, high end (98% of 1000)."""
    window_frames: int = 21
    """Latent frames the teacher and critic score (streaming_chunk_size 21); a window in the middle of a video
    starts with one chunk of context whose first frame is re-encoded as an image latent (LongLive)."""
    lambda_slot: float = 0.2
    """Weight of the slot loss in the generator objective (eq. 6, Table 6)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3)."""
    gradient_checkpointing: bool = True
    """Recompute each block in backward (generator and critic): at 1.3B a generator update's activations drop from
    ~133 GiB to ~21 GiB per rank (bench/memory_accounting.py), the price is one more forward per block."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay replicated (DeepSpeed's default); 0 partitions every parameter
    (the tiny preset, whose tensors are all smaller than the default)."""
    checkpoint_every: int = 100
    """Iterations between checkpoints (and at the end of every stage)."""
    publish_every: int = 10
    """Generator updates between published policy versions (policy_version counts generator updates)."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Teacher CFG negative prompt (Wan's standard one)."""
    critic_path: str = ""
    """The critic's start (the fake score): a local bidirectional base of the generator's architecture (Wan2.1-1.3B
    for Self-Forcing/LongLive), separate from the generator's few-step causal start; '' = the generator's init
    (only with model.allow_random_weights)."""
    seed: int = 0
    """Training seed."""

    def __post_init__(self):
        s = "trainer"
        for name in ("stage1_steps", "stage2_steps", "critic_updates_per_generator", "window_frames",
                     "checkpoint_every", "publish_every", "num_to_keep", "lora_rank", "lora_alpha"):
            check_int(s, name, getattr(self, name), lo=1)
        for name in ("stage0_steps", "ema_start_step", "seed"):
            check_int(s, name, getattr(self, name), lo=0)
        for name in ("lr", "critic_lr", "memory_lr"):
            check_float(s, name, getattr(self, name), lo=0.0, hi=1.0)
        check_float(s, "beta1", self.beta1, lo=0.0, hi=0.999999)
        check_float(s, "beta2", self.beta2, lo=0.0, hi=0.999999)
        check_float(s, "weight_decay", self.weight_decay, lo=0.0)
        check_float(s, "grad_clip", self.grad_clip, lo=1e-6)
        check_float(s, "ema_weight", self.ema_weight, lo=0.0, hi=1.0)
        check_float(s, "guidance_scale", self.guidance_scale, lo=0.0)
        check_float(s, "lambda_slot", self.lambda_slot, lo=0.0)
        check_float(s, "stage0_rec_weight", self.stage0_rec_weight, lo=0.0)
        check_float(s, "stage0_warmup", self.stage0_warmup, lo=0.0, hi=1.0)
        check_float(s, "stage0_decay", self.stage0_decay, lo=0.0, hi=1.0)
        if self.stage0_warmup + self.stage0_decay > 1.0:
            raise ConfigError(f"trainer.stage0_warmup + trainer.stage0_decay must be at most 1 (shares of Stage 0), "
                              f"got {self.stage0_warmup} + {self.stage0_decay}")
        check_float(s, "stage0_final_lr_ratio", self.stage0_final_lr_ratio, lo=0.0, hi=1.0)
        check_int(s, "min_timestep", self.min_timestep, lo=0, hi=999)
        check_int(s, "max_timestep", self.max_timestep, lo=self.min_timestep + 1, hi=1000)
        check_choice(s, "zero_stage", self.zero_stage, (1, 2, 3))
        check_choice(s, "backbone", self.backbone, BACKBONE_MODES)
        check_int(s, "zero3_param_persistence_threshold", self.zero3_param_persistence_threshold, lo=0)
        if self.lora_path and self.backbone != "lora":
            raise ConfigError(f"trainer.lora_path is set but trainer.backbone is {self.backbone!r}; adapters need "
                              "trainer.backbone=lora")


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
    resource_wait_s: float = 600.0
    """How long a job waits for the autoscaler to add what the cluster shape needs before it gives up (0 = check
    the resources the cluster has now, e.g. an embedded local cluster)."""
    pin_node_types: bool = False
    """Place rollout actors only on nodes advertising the custom resource `rollout_node` and trainer workers only on
    `trainer_node` nodes (ray_cluster.yaml, cluster/kuberay-rayjob.yaml); false = any node."""

    def __post_init__(self):
        s = "cluster"
        if not isinstance(self.address, str) or not self.address:
            raise ConfigError(f"cluster.address must be 'local', 'auto' or a Ray address, got {self.address!r}")
        check_int(s, "num_rollout_actors", self.num_rollout_actors, lo=1)
        check_int(s, "num_trainer_workers", self.num_trainer_workers, lo=1)
        check_int(s, "local_num_cpus", self.local_num_cpus, lo=1)
        check_int(s, "max_failures", self.max_failures, lo=0)
        check_float(s, "resource_wait_s", self.resource_wait_s, lo=0.0)
        for name in ("gpus_per_actor", "gpus_per_worker"):
            check_float(s, name, getattr(self, name), lo=0.0, hi=8.0)
        for name in ("cpus_per_actor", "cpus_per_worker"):
            check_float(s, name, getattr(self, name), lo=0.0, hi=256.0)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow tracking (DESIGN §6)."""

    enabled: bool = True
    """Log to MLflow."""
    tracking_uri: str = ""
    """MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite under the local storage root."""
    experiment: str = ""
    """MLflow experiment name; '' = storage.experiment (one name for storage and tracking; a different one is an
    error)."""
    system_metrics: bool = True
    """Log CPU/GPU/memory system metrics of every node that logs (GPU via nvidia-ml-py when present)."""
    queue_size: int = 10000
    """Tracking calls held for retry while the server is unreachable; beyond it the oldest are dropped (counted)."""
    retry_s: float = 600.0
    """How long a failing tracking call is retried (with backoff) before it is dropped (counted, one warning)."""

    def __post_init__(self):
        if self.experiment:
            check_name("tracking", "experiment", self.experiment)
        check_int("tracking", "queue_size", self.queue_size, lo=1)
        check_float("tracking", "retry_s", self.retry_s, lo=0.0)


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where shards, checkpoints, published weights and samples live (DESIGN §4)."""

    root: str = "runs"
    """Local directory, file:///abs/dir or s3://bucket/prefix."""
    experiment: str = "slotmem"
    """Experiment name: {root}/{experiment}/... and every run name derive from it (also the MLflow experiment)."""
    shared_filesystem: bool = False
    """A local root is a filesystem every node mounts at the same path (NFS, FSx, EFS); without it a local root is
    refused on a cluster of more than one node."""
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
        check_name("storage", "experiment", self.experiment)
        check_int("storage", "retries", self.retries, lo=1, hi=20)

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")


PIPELINE_JUDGES = ("none", "toyworld")
PIPELINE_MODES = ("continuous", "sequential")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The main job: one long-lived rollout fleet feeding Stage 0 -> I -> II, then a sample video (DESIGN §6)."""

    mode: str = "continuous"
    """'continuous': the fleet commits small rounds all the time while the trainer runs (veRL/OpenRLHF async with
    bounded staleness); 'sequential': roll out a round, train on it, repeat (the fleet idles while training)."""
    max_policy_lag: int = 20
    """A row is trained on only while trainer_version - row.policy_version <= this (in generator updates); the
    trainer waits for fresh rows otherwise."""
    max_row_reuse: int = 8
    """Times a row may be trained on (windows drawn from it), across all stages."""
    rows_ahead: int = 8
    """Back-pressure of the continuous loop: the fleet pauses while this many fresh rows are committed and not yet
    trained on (OpenRLHF's async queue size); 0 = never pause."""
    data_wait_timeout_s: float = 3600.0
    """The trainer fails if no eligible row arrives for this long."""
    sample_video: bool = True
    """End with an interactive 60 s sample video."""
    sample_prompts: str = ""
    """Interactive script of the sample video (JSONL, as `slotmem generate --prompts`); '' = built-in six prompts."""
    judge: str = "none"
    """'toyworld': render the sample script with the base policy and after every stage, judge each video with the
    toy world's procedural judge (toyworld/judge.py) and log its adherence / consistency to MLflow per stage;
    the sample prompts must be in the toy grammar. 'none': only the final sample, unjudged."""

    def __post_init__(self):
        check_choice("pipeline", "mode", self.mode, PIPELINE_MODES)
        check_choice("pipeline", "judge", self.judge, PIPELINE_JUDGES)
        if self.judge != "none" and not self.sample_video:
            raise ConfigError("pipeline.judge judges the sample video: it needs pipeline.sample_video=true")
        check_int("pipeline", "max_policy_lag", self.max_policy_lag, lo=0)
        check_int("pipeline", "max_row_reuse", self.max_row_reuse, lo=1)
        check_int("pipeline", "rows_ahead", self.rows_ahead, lo=0)
        check_float("pipeline", "data_wait_timeout_s", self.data_wait_timeout_s, lo=1.0)
