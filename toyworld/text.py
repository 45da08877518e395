"""The toy world's text encoder: model/text.py's tiny umT5 (text_dim 32, 2 layers, 4 heads) with its fixed
seeded weights and a word-level tokenizer over the toy grammar's words, saved as a transformers directory so
``model.text_encoder_path`` names one file set that every process loads (nothing here is trained: the backbones
learn to read it).

Why words, not bytes: through ByT5's byte tokens and two random layers, prompts that differ in one word gave
embeddings at cosine 0.95, and a teacher trained 700 steps on them drew every palette colour whatever the prompt
asked. One token per word gives each colour, shape and background its own random embedding, which
cross-attention can pick out. Text outside the grammar's words (Wan's negative prompt) maps to <unk>.

The unconditional prompts of classifier-free guidance: the teachers train with the text dropped to
either the empty prompt or the trainer's default negative prompt (Wan's), so CFG against either works.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model.text import TextEncoder, build_text_encoder
from slotmem.config import build_section
from toyworld.configs import student_model_config
from toyworld.language import VOCABULARY

UNCONDITIONAL_PROMPTS = ("", build_section("trainer", {}).negative_prompt)
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: umT5's pad / eos / unk


def word_tokenizer():
    """A transformers fast tokenizer: one id per grammar word or punctuation mark, </s> appended."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation marks apart: "red circle," -> 3
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_text_encoder(out_dir: Path) -> TextEncoder:
    shutil.rmtree(out_dir, ignore_errors=True)  # a previous tokenizer's files (ByT5's added_tokens.json) would win
    encoder = build_text_encoder(student_model_config(), tokenizer=word_tokenizer())  # the seeded tiny umT5
    encoder.save_pretrained(out_dir)
    print(f"[text] tiny umT5 ({sum(p.numel() for p in encoder.model.parameters())} parameters, "
          f"{len(encoder.tokenizer)} word ids) saved to {out_dir}", flush=True)
    return encoder


def load_text_encoder(directory: Path) -> TextEncoder:
    return build_text_encoder(student_model_config(text_encoder_path=str(directory)), cache_size=4096)
