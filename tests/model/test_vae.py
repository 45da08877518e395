"""VAE wrapper: Wan latent normalisation, 4x8x8 strides, streamed decode == diffusers single-shot decode."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

from model.vae import VAE, build_vae, tiny_vae_model
from slotmem.config import load_config
from slotmem.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(REPO / "configs" / "tiny-random-60s.yaml").model


@pytest.fixture(scope="module")
def vae(tiny_cfg):
    return build_vae(tiny_cfg, "cpu", torch.float32)


@pytest.fixture(scope="module")
def stats_vae(tiny_cfg):
    """A tiny VAE with non-trivial per-channel latent statistics, so un-normalisation is visible."""
    c = tiny_cfg.in_channels
    g = torch.Generator().manual_seed(1)
    mean = (torch.randn(c, generator=g) * 0.5).tolist()
    std = (torch.rand(c, generator=g) + 0.5).tolist()
    return VAE(tiny_vae_model(tiny_cfg, latents_mean=mean, latents_std=std))


def _reference_decode(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """Single-shot diffusers decode of the un-normalised latents, converted to uint8 independently."""
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 1, -1, 1, 1)
    z = (latents * std + mean).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
    with torch.no_grad():
        x = vae.model.decode(z).sample  # [B, 3, T, H, W] in [-1, 1]
    return torch.round((x.clamp(-1, 1) + 1) * 255 / 2).to(torch.uint8).permute(0, 2, 3, 4, 1)


def test_decode_shapes_follow_wan_strides(vae, tiny_cfg):
    latents = torch.randn(2, 4, tiny_cfg.in_channels, tiny_cfg.latent_height, tiny_cfg.latent_width)
    video = vae.decode(latents)
    # 4 latent frames -> 4*(4-1)+1 = 13 pixel frames; 8x8 latent -> 64x64 px
    assert video.shape == (2, 13, 64, 64, 3) and video.dtype == torch.uint8
    assert vae.num_pixel_frames(240) == 957
    assert video.float().std() > 1  # not a constant image


def test_streamed_decode_equals_single_shot_decode(stats_vae, tiny_cfg):
    latents = torch.randn(1, 4, tiny_cfg.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    pieces = list(stats_vae.decode_iter(latents))
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 4]  # causal: first latent frame -> 1 pixel frame
    streamed = torch.cat(pieces, dim=1)
    assert torch.equal(streamed, _reference_decode(stats_vae, latents))
    assert torch.equal(stats_vae.decode(latents), streamed)


def test_decode_applies_the_latent_statistics(stats_vae, tiny_cfg):
    latents = torch.randn(1, 2, tiny_cfg.in_channels, 8, 8)
    plain = VAE(stats_vae.model)  # same weights, but pretend the stats were identity
    plain.latents_mean.zero_()
    plain.latents_std.fill_(1.0)
    assert not torch.equal(plain.decode(latents), stats_vae.decode(latents))


def test_encode_normalises_the_posterior_mean(stats_vae):
    video = torch.randint(0, 256, (1, 9, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    latents = stats_vae.encode(video)
    assert latents.shape == (1, 3, 16, 8, 8)  # 9 = 4*2+1 pixel frames -> 3 latent frames
    x = video.permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1
    with torch.no_grad():
        mu = stats_vae.model.encode(x).latent_dist.mean.permute(0, 2, 1, 3, 4)
    mean = torch.tensor(stats_vae.model.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(stats_vae.model.config.latents_std).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(latents, (mu - mean) / std)
    with pytest.raises(InputError, match="T = 4k\\+1"):
        stats_vae.encode(video[:, :8])


def test_progress_bar_option(vae, capsys):
    vae.decode(torch.randn(1, 2, 16, 8, 8), progress=True)
    assert "VAE decode" in capsys.readouterr().err


def test_tiny_build_is_deterministic(tiny_cfg):
    state = torch.random.get_rng_state()
    a = build_vae(tiny_cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    b = build_vae(tiny_cfg)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_and_pipeline_layout(stats_vae, tiny_cfg, tmp_path):
    stats_vae.save_pretrained(tmp_path / "pipe" / "vae")
    latents = torch.randn(1, 2, tiny_cfg.in_channels, 8, 8)
    expected = stats_vae.decode(latents)
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # VAE dir, or a pipeline dir with vae/
        loaded = build_vae(dataclasses.replace(tiny_cfg, vae_path=str(path)))
        assert torch.equal(loaded.latents_std, stats_vae.latents_std)
        assert torch.equal(loaded.decode(latents), expected)


def test_errors_name_the_field(vae, tiny_cfg, tmp_path):
    with pytest.raises(InputError, match="model.vae_path.*does not exist"):
        build_vae(dataclasses.replace(tiny_cfg, vae_path=str(tmp_path / "nope")))
    (tmp_path / "file.pth").write_bytes(b"x")
    with pytest.raises(InputError, match="model.vae_path.*not a file"):
        build_vae(dataclasses.replace(tiny_cfg, vae_path=str(tmp_path / "file.pth")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="model.vae_path: cannot load"):
        build_vae(dataclasses.replace(tiny_cfg, vae_path=str(tmp_path / "empty")))
    vae.save_pretrained(tmp_path / "v16")
    with pytest.raises(InputError, match="model.in_channels is 4 .* z_dim 16"):
        build_vae(dataclasses.replace(tiny_cfg, in_channels=4, vae_path=str(tmp_path / "v16")))
    with pytest.raises(InputError, match="latents must be"):
        vae.decode(torch.randn(1, 2, 4, 8, 8))


def _frame_local_copy(model):
    """A copy of ``model`` with the past-frame taps of its stride-1 temporal convolutions zeroed (what
    toyworld/train_vae.py trains), built here independently of model/vae.py."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    local = copy.deepcopy(model)
    with torch.no_grad():
        for m in local.modules():
            if isinstance(m, WanCausalConv3d) and m.kernel_size[0] == 3 and m.stride[0] == 1:
                m.weight[:, :, :2] = 0
    return local


def test_frame_local_convolutions_give_the_same_video_and_forget_the_past(tiny_cfg):
    model = tiny_vae_model(tiny_cfg)
    assert VAE(model).frame_local_convs == 0  # a VAE with temporal taps (Wan's own) keeps diffusers' forward
    reference = SimpleNamespace(model=_frame_local_copy(model))  # diffusers' own forward, never wrapped by VAE
    vae = VAE(_frame_local_copy(model))
    # every stride-1 3-tap conv: conv_in/out and the residual convs of both sides, the decoder's time_convs
    assert vae.frame_local_convs > 10
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 5, tiny_cfg.in_channels, 8, 8, generator=g)
    video = vae.decode(latents)
    # the same sums in another order: at most one uint8 step apart, on a few pixels
    diff = (video.int() - _reference_decode(reference, latents).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    # the decoder is stateless past its first latent frame: frames 2..4 decode the same after another past
    other = latents.clone()
    other[:, 1] = torch.randn(other[:, 1].shape, generator=g)
    assert torch.equal(vae.decode(other)[:, 5:], video[:, 5:])
    assert not torch.equal(vae.decode(other)[:, 1:5], video[:, 1:5])
    # encoding goes through the same convolutions: the fast path equals diffusers' forward there too
    x = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [B, 3, T, H, W]
    with torch.no_grad():
        z = reference.model.encode(x).latent_dist.mode().permute(0, 2, 1, 3, 4)  # mean 0 / std 1: normalised
    assert torch.allclose(vae.encode(video), z, atol=1e-5)


def test_a_stateless_decoder_decodes_blocks_of_frames_as_a_batch(tiny_cfg):
    """Past latent frame 0 a frame-local decoder has no state: blocks of DECODE_BATCH frames decoded as one batch
    give the video the frame-by-frame loop gives (a 60 s toy-world video: 18 s -> 8 s on one core)."""
    from model.vae import DECODE_BATCH

    model = tiny_vae_model(tiny_cfg)
    assert not VAE(model).stateless_decoder  # Wan's temporal taps: frame by frame, through the causal cache
    vae = VAE(_frame_local_copy(model))
    assert vae.stateless_decoder
    frames = DECODE_BATCH + 4  # frame 0, one full block, one partial block
    latents = torch.randn(2, frames, tiny_cfg.in_channels, 8, 8, generator=torch.Generator().manual_seed(4))
    pieces = list(vae.decode_iter(latents))
    assert [p.shape[1] for p in pieces] == [1, 4 * DECODE_BATCH, 4 * 3]
    batched = torch.cat(pieces, dim=1)
    vae.stateless_decoder = False  # the same model, frame by frame
    looped = vae.decode(latents)
    diff = (batched.int() - looped.int()).abs()
    assert batched.shape == looped.shape == (2, 4 * (frames - 1) + 1, 64, 64, 3)
    assert diff.max() <= 1 and diff.float().mean() < 0.01


def test_the_fast_rms_norm_equals_diffusers_norm(vae):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = next(m for m in vae.model.modules() if isinstance(m, WanRMS_norm))
    with torch.no_grad():
        norm.gamma.copy_(torch.rand_like(norm.gamma) + 0.5)
        x = torch.randn(2, norm.gamma.shape[0], 3, 5, 5)
        x[0, :, 0, 0, 0] = 0  # an all-zero position: F.normalize's eps, no division by zero
        assert torch.allclose(norm(x), norm._library_forward(x), atol=1e-6)
        assert torch.equal(norm(x.double()), norm._library_forward(x.double()))  # other dtypes: diffusers' own
