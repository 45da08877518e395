"""The toy world's text encoder: model/text.py's tiny umT5 (text_dim 32, 2 layers, 4 heads, ByT5 bytes)
with its fixed seeded weights, saved as a transformers directory so ``model.text_encoder_path`` names
one file set that every process loads (nothing here is trained: the backbones learn to read it).

The unconditional prompts of classifier-free guidance: the teachers train with the text dropped to
either the empty prompt or the trainer's default negative prompt (Wan's), so CFG against either works.
"""

from __future__ import annotations

from pathlib import Path

from model.text import TextEncoder, build_text_encoder
from slotmem.config import build_section
from toyworld.configs import student_model_config

UNCONDITIONAL_PROMPTS = ("", build_section("trainer", {}).negative_prompt)


def save_text_encoder(out_dir: Path) -> TextEncoder:
    encoder = build_text_encoder(student_model_config())  # text_encoder_path '' -> the seeded tiny umT5
    encoder.save_pretrained(out_dir)
    print(f"[text] tiny umT5 ({sum(p.numel() for p in encoder.model.parameters())} parameters) saved to {out_dir}",
          flush=True)
    return encoder


def load_text_encoder(directory: Path) -> TextEncoder:
    return build_text_encoder(student_model_config(text_encoder_path=str(directory)), cache_size=4096)
