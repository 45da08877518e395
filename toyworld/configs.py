"""The toy world's model sizes and where its trained artifacts live.

``student_model_config`` and ``student_memory_config`` are the tiny preset's ``model`` and ``memory``
sections (fixed by issue 11); the teacher and the VAE are this package's choice. Paths point at the
committed artifacts under toyworld/weights/ (a few MB, float16 safetensors + json configs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slotmem.config import build_section

PACKAGE = Path(__file__).resolve().parent
WEIGHTS = PACKAGE / "weights"
CACHE = PACKAGE / ".cache"  # git-ignored: rendered + encoded training data
PROMPTS = PACKAGE / "prompts"


@dataclass(frozen=True)
class Artifacts:
    """Where the trained artifacts of one run live (the committed ones: toyworld/weights/)."""

    root: Path = WEIGHTS

    @property
    def vae(self) -> Path:  # diffusers AutoencoderKLWan directory (model.vae_path)
        return self.root / "vae"

    @property
    def text_encoder(self) -> Path:  # transformers UMT5EncoderModel + word-level tokenizer (model.text_encoder_path)
        return self.root / "text_encoder"

    @property
    def teacher(self) -> Path:  # Wan layout, single file
        return self.root / "teacher.safetensors"

    @property
    def teacher_json(self) -> Path:  # its architecture: the tiny preset's teacher section
        return self.root / "teacher.json"

    @property
    def critic_base(self) -> Path:  # bidirectional student: the critic's init
        return self.root / "student_bidirectional.safetensors"

    @property
    def causal_base(self) -> Path:  # causal few-step base (model.model_path)
        return self.root / "student_causal.safetensors"

    @property
    def training_summary(self) -> Path:  # what `python -m toyworld.train` did (steps, losses, seconds)
        return self.root / "training.json"

    @property
    def metrics(self) -> Path:  # what `python -m toyworld.evaluate` measured
        return self.root / "metrics.json"


# The toy VAE (toyworld/train_vae.py): Wan's AutoencoderKLWan with one 2x spatial level fewer than Wan's
# (1,2,4,4): 4x spatial, 64x64 -> 16x16 latent, still 4x in time (both temporal downsamples kept), z_dim 4.
# z_dim 4, not Wan's 16: a (1, 4, 4) patch token then holds 4 * 16 = 64 numbers, below the backbones' hidden size
# (128 / 160). With 16 channels a token held 256, the head Linear(dim, 256) could output flows only in a 128- (160-)
# dimensional subspace of it, and the noise in the other directions was never denoised: samples were texture
# (README "The toy world"; slotmem/config/model.py check_hidden_holds_token). Held-out PSNR 30.6 dB vs 31.5 dB at 16.
VAE_BASE_DIM = 16  # channels at full resolution; x2, x4 deeper
VAE_DIM_MULT = (1, 2, 4)
VAE_TEMPORAL_DOWNSAMPLE = (True, True)
VAE_Z_DIM = 4
LATENT_SIZE = 64 // 2 ** (len(VAE_DIM_MULT) - 1)  # 16

# patch (1, 4, 4) on the 16x16 latent: 16 tokens per frame, the cost of the (1, 2, 2) patch on an 8x8 latent
# (64 tokens per frame would make the 240-frame causal passes ~4-16x dearer than the budget allows).
# text_len 32: the word tokenizer's longest grammar prompt is 18 tokens (toyworld/text.py); at 128, 110 identical
# zero keys per prompt diluted the colour words in cross-attention (README "The toy world", colour binding).
STUDENT_MODEL = {
    "name": "toyworld-student", "num_layers": 4, "dim": 128, "num_heads": 4, "ffn_dim": 384, "freq_dim": 64,
    "text_dim": 32, "text_len": 32, "in_channels": VAE_Z_DIM, "patch_size": [1, 4, 4],
    "latent_height": LATENT_SIZE, "latent_width": LATENT_SIZE, "num_frame_per_block": 3, "sink_size": 3,
    "local_attn_size": 12, "timestep_shift": 5.0, "denoising_steps": [1000, 750, 500, 250],
    "warp_denoising_step": True, "context_noise": 0,
    "text_encoder_layers": 2, "text_encoder_heads": 4, "vae_base_dim": VAE_BASE_DIM,
}
STUDENT_MEMORY = {
    "kind": "slot", "slot_dim": 16, "num_slots_per_chunk": 4, "tokens_per_slot": 4, "bank_size": 6,
    "record_interval": 3, "retrieve_top_k": 12,
}
# the teacher: 1.5x deeper and 1.25x wider than the student (head_dim 32 like the student's), on Wan's own (1, 2, 2)
# patch: 64 tokens per 16x16 latent frame, each 2x2 latent cell (8x8 pixels) its own token. On the student's
# (1, 4, 4) patch the teacher did not bind colour words to objects (colour-permuted / right prompt x0 error 1.02 on
# the entities at sigma 0.6 after 1000 steps); on (1, 2, 2) 1.09-1.10 and compact objects in the prompted colours
# (README "The toy world"). A token holds 2 * 2 * 4 = 16 numbers, well below dim 160.
TEACHER = {"name": "toyworld-teacher", "num_layers": 6, "dim": 160, "num_heads": 5, "ffn_dim": 480, "freq_dim": 64,
           "patch_size": [1, 2, 2]}


def student_model_config(**changes):
    """The tiny preset's model section (weights paths empty unless given)."""
    return build_section("model", {**STUDENT_MODEL, **changes})


def student_memory_config(**changes):
    return build_section("memory", {**STUDENT_MEMORY, **changes})


def teacher_model_config(**changes):
    """The backbone config with the teacher's architecture (TeacherConfig.model_config)."""
    return build_section("teacher", dict(TEACHER)).model_config(student_model_config(**changes))


def trained_teacher_config(artifacts: Artifacts = Artifacts(), **changes):
    """The backbone config of the teacher a run trained (its architecture from the run's teacher.json)."""
    if not artifacts.teacher_json.is_file():
        raise FileNotFoundError(f"{artifacts.teacher_json}: the teacher's architecture (written by the teacher stage "
                                "of `python -m toyworld.train`) is missing")
    arch = json.loads(artifacts.teacher_json.read_text())
    return build_section("teacher", arch).model_config(student_model_config(**changes))


def trained_model_config(artifacts: Artifacts = Artifacts(), **changes):
    """The student config pointing at a run's VAE and text encoder."""
    return student_model_config(vae_path=str(artifacts.vae), text_encoder_path=str(artifacts.text_encoder), **changes)
