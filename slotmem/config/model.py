"""Config sections of the networks: the causal backbone, the teacher, and the long-term memory."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from slotmem.config.checks import check_choice, check_float, check_int
from slotmem.errors import ConfigError

RECACHE_MODES = ("single", "causal")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Causal Wan2.1 DiT backbone (the generator), its text encoder and VAE (DESIGN §2)."""

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
    recache: str = "single"
    """Prompt-switch recache: 'single' re-commits the recent frames in one multi-frame call (they attend to each
    other bidirectionally, as LongLive/MemFlow do); 'causal' re-commits them chunk by chunk."""
    global_sink: bool = False
    """At a switch keep the sink computed under the first prompt (MemFlow training: true), or rebuild it from the
    recached frames (LongLive's interactive config and training: false)."""
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
    """The generator's start: a local few-step causal base (file or directory, Wan or diffusers layout), e.g.
    LongLive's base; '' = seeded random init (only with model.allow_random_weights)."""
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
    allow_random_weights: bool = False
    """Allow empty weight paths (model, teacher, critic, text encoder, VAE): seeded random networks, teacher and
    critic derived from the generator's init. Only for tests and the random-weight tiny preset; a real preset
    with an empty path refuses to start, naming every missing field."""

    def __post_init__(self):
        s = "model"
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len",
                     "in_channels", "latent_height", "latent_width", "rope_max_frames",
                     "num_frame_per_block", "local_attn_size", "num_train_timesteps",
                     "text_encoder_layers", "text_encoder_heads", "vae_base_dim"):
            check_int(s, name, getattr(self, name), lo=1)
        check_int(s, "sink_size", self.sink_size, lo=0)
        check_architecture(s, self)
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ConfigError(f"model.patch_size must be three positive integers, got {self.patch_size!r}")
        if self.latent_height % self.patch_size[1] or self.latent_width % self.patch_size[2]:
            raise ConfigError(f"model.latent_height/latent_width ({self.latent_height}x{self.latent_width}) "
                              f"must be divisible by model.patch_size {self.patch_size[1:]}")
        if self.patch_size[0] != 1:
            raise ConfigError(f"model.patch_size[0] must be 1 (one latent frame per token row), got {self.patch_size[0]}")
        check_hidden_holds_token("model", self.dim, self.in_channels, self.patch_size)
        if self.local_attn_size % self.num_frame_per_block or self.sink_size % self.num_frame_per_block:
            raise ConfigError(f"model.local_attn_size ({self.local_attn_size}) and model.sink_size ({self.sink_size}) "
                              f"must be multiples of model.num_frame_per_block ({self.num_frame_per_block})")
        if self.local_attn_size < self.sink_size + self.num_frame_per_block:
            raise ConfigError(f"model.local_attn_size ({self.local_attn_size}) must hold the sink ({self.sink_size}) "
                              f"plus one chunk ({self.num_frame_per_block})")
        check_choice(s, "recache", self.recache, RECACHE_MODES)
        check_float(s, "timestep_shift", self.timestep_shift, lo=1e-3)
        check_float(s, "eps", self.eps, lo=0.0, hi=1e-2)
        check_int(s, "context_noise", self.context_noise, lo=0, hi=self.num_train_timesteps - 1)
        if not self.denoising_steps:
            raise ConfigError("model.denoising_steps must not be empty")
        steps = list(self.denoising_steps)
        if steps != sorted(steps, reverse=True) or len(set(steps)) != len(steps):
            raise ConfigError(f"model.denoising_steps must be strictly decreasing, got {steps}")
        for t in steps:
            check_int(s, "denoising_steps", t, lo=1, hi=self.num_train_timesteps)
        check_choice(s, "dtype", self.dtype, ("float32", "bfloat16"))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def token_size(self) -> int:
        """Numbers in one patch token: in_channels * prod(patch_size) (Wan2.1: 16 * 2 * 2 = 64)."""
        return self.in_channels * math.prod(self.patch_size)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame after patching (1.3B at 480x832: 30*52 = 1560)."""
        return (self.latent_height // self.patch_size[1]) * (self.latent_width // self.patch_size[2])


def check_hidden_holds_token(section: str, dim: int, in_channels: int, patch_size: tuple[int, ...],
                             patch_field: str = "model.patch_size") -> None:
    """A backbone's hidden size must be at least its patch token's size. The head, Linear(dim, token), outputs flows
    in a dim-dimensional subspace of a patch; the noise in the other directions is never removed by the sampler and
    decodes as texture (the first toy world: 256-number tokens into 128/160 hidden, README "The toy world")."""
    token = in_channels * math.prod(patch_size)
    if dim < token:
        raise ConfigError(
            f"{section}.dim ({dim}) must be at least the patch token's size, model.in_channels x "
            f"prod({patch_field}) = {in_channels} x {math.prod(patch_size)} = "
            f"{token}: the head can only output flows in a {dim}-dimensional subspace of a token, and "
            "the noise outside it is never denoised (Wan2.1: 1536 >= 64)")


def check_architecture(section: str, cfg) -> None:
    """dim / num_heads / freq_dim constraints shared by the backbone and the teacher."""
    if cfg.dim % cfg.num_heads:
        raise ConfigError(f"{section}.dim ({cfg.dim}) must be divisible by {section}.num_heads ({cfg.num_heads})")
    head_dim = cfg.dim // cfg.num_heads
    if head_dim % 2 or head_dim < 6:
        raise ConfigError(f"{section}.dim / {section}.num_heads = {head_dim} must be even and >= 6 (3-D RoPE)")
    if cfg.freq_dim % 2:
        raise ConfigError(f"{section}.freq_dim must be even (sin/cos halves), got {cfg.freq_dim}")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """The frozen real score of DMD: its own architecture and weights (Self-Forcing / LongLive / MemFlow use
    Wan2.1-T2V-14B). Text, latent and schedule fields are the backbone's (model section); the patch is the
    backbone's unless patch_size says otherwise."""

    name: str = "wan2.1-t2v-14b"
    """Informational."""
    num_layers: int = 40
    """Wan2.1-T2V-14B: 40 blocks."""
    dim: int = 5120
    """Wan2.1-T2V-14B: hidden size 5120."""
    num_heads: int = 40
    """Wan2.1-T2V-14B: 40 heads (head_dim 128)."""
    ffn_dim: int = 13824
    """Wan2.1-T2V-14B: feed-forward 13824."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding size (Wan: 256)."""
    patch_size: tuple[int, ...] = ()
    """The teacher's (t, h, w) patch; () = the backbone's (Wan2.1 14B and 1.3B share (1, 2, 2)). The teacher sees
    the same latents as the student, so only its token grid differs: e.g. a (1, 2, 2) teacher on the toy world's
    16x16 latent under its (1, 4, 4) student, whose 16x16-pixel tokens draw colour fringes (README "The toy world")."""
    model_path: str = ""
    """Local weights of the teacher (file or directory, Wan or diffusers layout); '' = derive the teacher from the
    generator's initial backbone (only with model.allow_random_weights, and then the teacher must have the
    backbone's architecture)."""

    def __post_init__(self):
        s = "teacher"
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "freq_dim"):
            check_int(s, name, getattr(self, name), lo=1)
        check_architecture(s, self)
        if self.patch_size and (len(self.patch_size) != 3 or self.patch_size[0] != 1
                                or any(not isinstance(p, int) or p < 1 for p in self.patch_size)):
            raise ConfigError(f"teacher.patch_size must be [] (the backbone's) or three positive integers starting "
                              f"with 1, got {list(self.patch_size)!r}")

    def model_config(self, model_cfg: ModelConfig) -> ModelConfig:
        """The backbone config with the teacher's architecture, patch and weights path."""
        return dataclasses.replace(model_cfg, name=self.name, num_layers=self.num_layers, dim=self.dim,
                                   num_heads=self.num_heads, ffn_dim=self.ffn_dim, freq_dim=self.freq_dim,
                                   patch_size=self.patch_size or model_cfg.patch_size, model_path=self.model_path)

    def check_fits(self, model_cfg: ModelConfig) -> None:
        """The teacher's patch tiles the backbone's latent grid and its token fits its hidden size."""
        patch = self.patch_size or model_cfg.patch_size
        if model_cfg.latent_height % patch[1] or model_cfg.latent_width % patch[2]:
            raise ConfigError(f"teacher.patch_size {list(patch)} must divide the latent grid model.latent_height x "
                              f"model.latent_width = {model_cfg.latent_height} x {model_cfg.latent_width}")
        check_hidden_holds_token("teacher", self.dim, model_cfg.in_channels, patch,
                                 "teacher.patch_size" if self.patch_size else "model.patch_size")


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
    decoder_hidden: int = 128
    """Hidden width of the Stage 0 feature decoder (slots -> adapted features, SlotContrast/DINOSAUR style)."""
    frame_bank_frames: int = 3
    """frame_bank baseline: whole latent frames kept (MemFlow bank_size 3)."""
    sma: bool = False
    """frame_bank baseline: sparse memory activation (Table 6: False)."""

    def __post_init__(self):
        s = "memory"
        check_choice(s, "kind", self.kind, ("slot", "frame_bank", "none"))
        for name in ("slot_dim", "num_slots_per_chunk", "tokens_per_slot", "bank_size", "record_interval",
                     "retrieve_top_k", "slot_iters", "decoder_hidden", "frame_bank_frames"):
            check_int(s, name, getattr(self, name), lo=1)
        if self.retrieve_top_k > self.bank_size * self.num_slots_per_chunk:
            raise ConfigError(f"memory.retrieve_top_k ({self.retrieve_top_k}) must be <= bank_size * "
                              f"num_slots_per_chunk ({self.bank_size * self.num_slots_per_chunk})")
        check_float(s, "text_weight", self.text_weight, lo=0.0, hi=1.0)
        check_float(s, "con_temperature", self.con_temperature, lo=1e-4, hi=10.0)
        check_float(s, "rec_weight", self.rec_weight, lo=0.0)
        check_float(s, "rec_confidence", self.rec_confidence, lo=0.0, hi=1.0)

    @property
    def budget(self) -> int:
        """N_budget: items kept per layer."""
        return self.bank_size * self.num_slots_per_chunk
