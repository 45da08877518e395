"""Text encoder: Wan's zero-padded context, deterministic tiny build, local loading, Wan key mapping."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.text import TextEncoder, build_text_encoder, wan_t5_to_transformers
from slotmem.config import load_config
from slotmem.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(REPO / "configs" / "tiny-random-60s.yaml").model


@pytest.fixture(scope="module")
def encoder(tiny_cfg):
    return build_text_encoder(tiny_cfg, "cpu", torch.float32)


def test_encode_zeroes_padding_and_masks_real_tokens(encoder, tiny_cfg):
    prompts = ["a red fox", "the red fox leaps over a frozen stream and keeps running"]
    emb, mask = encoder.encode(prompts)
    assert emb.shape == (2, tiny_cfg.text_len, tiny_cfg.text_dim) and mask.dtype == torch.bool
    # ByT5 is byte-level: one id per byte plus EOS, truncated to text_len (EOS kept)
    assert mask.sum(1).tolist() == [len("a red fox") + 1, tiny_cfg.text_len]
    assert torch.all(emb[0, 10:] == 0) and torch.all(emb[0, :10].abs().sum(-1) > 0)


def test_real_positions_match_a_padded_masked_forward(encoder, tiny_cfg):
    # Wan runs the encoder on ids padded to text_len with an attention mask and then drops the
    # padded rows; encoding only the real tokens must give the same hidden states
    prompt = "snow falls"
    emb, mask = encoder.encode([prompt])
    tok = encoder.tokenizer([prompt], padding="max_length", max_length=tiny_cfg.text_len, return_tensors="pt")
    with torch.no_grad():
        ref = encoder.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    n = int(tok.attention_mask.sum())
    assert int(mask.sum()) == n
    torch.testing.assert_close(emb[0, :n], ref[0, :n], rtol=1e-5, atol=1e-5)


def test_batch_invariance_and_lru_cache(tiny_cfg):
    enc = build_text_encoder(tiny_cfg, "cpu", torch.float32, cache_size=2)
    alone, _ = enc.encode(["a cat"])
    enc.clear_cache()
    together, _ = enc.encode(["a dog on a beach", "a cat"])
    assert torch.equal(together[1], alone[0])
    # cache holds 2 prompts: encoding a third evicts the least recently used ("a dog on a beach")
    enc.encode(["a cat", "a bird"])
    assert list(enc._cache) == ["a cat", "a bird"]
    # whitespace / HTML cleaning (Wan's 'whitespace' clean) makes these the same cache entry
    again, _ = enc.encode(["  a   cat "])
    assert torch.equal(again[0], alone[0]) and len(enc._cache) == 2


def test_pooled_is_masked_mean(encoder):
    emb, mask = encoder.encode(["one", "a longer prompt here"])
    pooled = TextEncoder.pooled(emb, mask)
    for b in range(2):
        n = int(mask[b].sum())
        torch.testing.assert_close(pooled[b], emb[b, :n].mean(0))


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tiny_cfg):
    state = torch.random.get_rng_state()
    a = build_text_encoder(tiny_cfg, "cpu", torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # a different global stream must not change the tiny weights
    b = build_text_encoder(tiny_cfg, "cpu", torch.float32)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip(encoder, tiny_cfg, tmp_path):
    encoder.save_pretrained(tmp_path / "enc")
    cfg = dataclasses.replace(tiny_cfg, text_encoder_path=str(tmp_path / "enc"))
    prompts = ["a red fox walks through snow", "x"]
    expected = encoder.encode(prompts)[0]
    loaded = build_text_encoder(cfg, "cpu", torch.float32)  # tokenizer found next to the weights
    assert torch.equal(loaded.encode(prompts)[0], expected)
    encoder.tokenizer.save_pretrained(tmp_path / "tok")
    loaded = build_text_encoder(dataclasses.replace(cfg, tokenizer_path=str(tmp_path / "tok")))
    assert torch.equal(loaded.encode(prompts)[0], expected)


# ----------------------------------------------------------------------------------------------
# Wan2.1's original umT5 state dict: an independent reference forward of Wan's T5Encoder
# ----------------------------------------------------------------------------------------------


def _rel_bucket(rel: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    """T5 bidirectional relative-position bucket of (key - query)."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_part = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_dist / exact)
                        * (half - exact)).long()
    return bucket + torch.where(dist < exact, dist, log_part.clamp(max=half - 1))


def _wan_t5_reference(sd: dict, ids: torch.Tensor, num_layers: int, num_heads: int) -> torch.Tensor:
    """Wan T5Encoder on one unpadded sequence: pre-RMSNorm blocks, unscaled attention + relative bias,
    gated tanh-GELU FFN fc2(fc1(x) * gelu(gate(x))), final RMSNorm."""

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = sd["token_embedding.weight"][ids]  # [L, D]
    length = x.shape[0]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    for i in range(num_layers):
        p = f"blocks.{i}."
        emb = sd[p + "pos_embedding.embedding.weight"]  # [buckets, H]
        bias = emb[_rel_bucket(rel, emb.shape[0])].permute(2, 0, 1)  # [H, L, L]
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (
            (h @ sd[p + f"attn.{n}.weight"].T).view(length, num_heads, -1).transpose(0, 1) for n in "qkv"
        )  # [H, L, dh]
        att = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)
        x = x + (att @ v).transpose(0, 1).reshape(length, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def _wan_state_dict(vocab=384, dim=32, dim_attn=48, ffn=40, heads=4, layers=2, buckets=32):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    sd = {"token_embedding.weight": rnd(vocab, dim, std=1.0), "norm.weight": 1 + rnd(dim, std=0.1)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + rnd(dim, std=0.1), p + "norm2.weight": 1 + rnd(dim, std=0.1),
               p + "attn.q.weight": rnd(dim_attn, dim), p + "attn.k.weight": rnd(dim_attn, dim),
               p + "attn.v.weight": rnd(dim_attn, dim), p + "attn.o.weight": rnd(dim, dim_attn),
               p + "ffn.gate.0.weight": rnd(ffn, dim), p + "ffn.fc1.weight": rnd(ffn, dim),
               p + "ffn.fc2.weight": rnd(dim, ffn), p + "pos_embedding.embedding.weight": rnd(buckets, heads)}
    return sd


def test_wan_original_state_dict_matches_reference_forward(tiny_cfg, tmp_path):
    sd = _wan_state_dict()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(sd, path)
    # text_len 64 so relative distances reach the logarithmic buckets (>= 8)
    cfg = dataclasses.replace(tiny_cfg, text_len=64, text_encoder_path=str(path))
    enc = build_text_encoder(cfg, "cpu", torch.float32)
    prompt = "a wizard raises a staff while a dragon circles the tower at dusk"
    emb, mask = enc.encode([prompt])
    ids = enc.tokenizer(prompt, truncation=True, max_length=64).input_ids
    n = len(ids)
    assert int(mask.sum()) == n and n > 40
    ref = _wan_t5_reference(sd, torch.tensor(ids), num_layers=2, num_heads=4)
    torch.testing.assert_close(emb[0, :n], ref, rtol=1e-4, atol=1e-4)
    assert torch.all(emb[0, n:] == 0)


def test_wan_bf16_checkpoint_loads_into_float32(tiny_cfg, tmp_path):
    # Wan ships the encoder in bf16; bf16 -> fp32 is exact, so the reference runs on the rounded weights
    sd = {k: v.to(torch.bfloat16) for k, v in _wan_state_dict().items()}
    path = tmp_path / "enc-bf16.pth"
    torch.save(sd, path)
    enc = build_text_encoder(dataclasses.replace(tiny_cfg, text_encoder_path=str(path)), "cpu", torch.float32)
    assert enc.dtype == torch.float32
    emb, mask = enc.encode(["a fox"])
    ids = enc.tokenizer("a fox").input_ids
    ref = _wan_t5_reference({k: v.float() for k, v in sd.items()}, torch.tensor(ids), num_layers=2, num_heads=4)
    torch.testing.assert_close(emb[0, : len(ids)], ref, rtol=1e-4, atol=1e-4)


def test_wan_key_mapping_rejects_unknown_keys():
    sd = _wan_state_dict(layers=1)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="unexpected key 'blocks.0.attn.extra.weight'"):
        wan_t5_to_transformers(sd)


# ----------------------------------------------------------------------------------------------
# errors name the field
# ----------------------------------------------------------------------------------------------


def test_missing_paths_name_the_field(tiny_cfg, tmp_path):
    with pytest.raises(InputError, match="model.text_encoder_path.*does not exist"):
        build_text_encoder(dataclasses.replace(tiny_cfg, text_encoder_path=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="model.tokenizer_path.*does not exist"):
        build_text_encoder(dataclasses.replace(tiny_cfg, tokenizer_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="model.text_encoder_path: cannot load"):
        build_text_encoder(dataclasses.replace(tiny_cfg, text_encoder_path=str(tmp_path / "empty")))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="model.text_encoder_path.*not Wan's umT5"):
        build_text_encoder(dataclasses.replace(tiny_cfg, text_encoder_path=str(tmp_path / "other.pth")))


def test_text_dim_mismatch_is_reported(encoder, tiny_cfg, tmp_path):
    encoder.save_pretrained(tmp_path / "enc")
    cfg = dataclasses.replace(tiny_cfg, text_dim=64, text_encoder_path=str(tmp_path / "enc"))
    with pytest.raises(InputError, match="model.text_dim is 64 .* hidden size 32"):
        build_text_encoder(cfg)
