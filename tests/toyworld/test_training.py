"""The training pieces on tiny budgets, and the committed artifacts through the pipeline's loaders."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from model.text import build_text_encoder
from model.vae import build_vae
from model.wan import CausalWanModel
from model.weights import load_checkpoint, read_checkpoint
from rollout.components import build_generator
from rollout.streaming import StreamState
from slotmem.config import build_section
from toyworld import train_causal as tc
from toyworld.configs import (LATENT_SIZE, TEACHER, VAE_Z_DIM, Artifacts, student_memory_config,
                              student_model_config, teacher_model_config, trained_model_config,
                              trained_teacher_config)
from toyworld.data import LatentDataset, window_starts
from toyworld.palette import pixel_frames
from toyworld.sampling import euler_sample, stream_sample, student_generator
from toyworld.scripts import Script, interactive_script, memory_script, training_script
from toyworld.text import UNCONDITIONAL_PROMPTS, load_text_encoder, save_text_encoder, word_tokenizer
from toyworld.train_flow import Phase, text_batch, train_bidirectional
from toyworld.train_vae import train_vae
from toyworld.world import render


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    save_text_encoder(path)
    return path


@pytest.fixture(scope="module")
def dataset():
    scripts = [training_script(s) for s in range(3)]
    latents = torch.randn(3, 2, 30, VAE_Z_DIM, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    return LatentDataset(scripts, latents.half())


def test_saved_text_encoder_is_the_tiny_seeded_one_with_one_token_per_word(text_dir):
    prompt = "the red circle leaves, a blue square remains on a grey background"
    loaded = build_text_encoder(student_model_config(text_encoder_path=str(text_dir)))
    fresh = build_text_encoder(student_model_config(), tokenizer=word_tokenizer())
    a, mask = loaded.encode([prompt])
    b, _ = fresh.encode([prompt])
    assert a.shape == (1, 32, 32) and torch.equal(a, b)
    assert int(mask.sum()) == len(prompt.replace(",", " ,").split()) + 1  # words and the comma, plus EOS
    # a one-word change gives a different token there, not a nearly equal byte sequence
    c, _ = loaded.encode([prompt.replace("red", "green")])
    assert torch.cosine_similarity(a[0, 1], c[0, 1], dim=0) < 0.8


@pytest.mark.parametrize("make", [training_script, interactive_script, memory_script])
def test_the_word_tokenizer_knows_every_word_the_grammar_writes(make):
    """... and every prompt fits the preset's text_len (the encoder truncates silently)."""
    tok = word_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    text_len = student_model_config().text_len
    for seed in range(40):
        for prompt in make(seed).prompts:
            ids = tok(prompt).input_ids
            assert unk not in ids and len(ids) <= text_len, prompt


def test_vae_stats_are_the_measured_latent_statistics(tmp_path):
    out = tmp_path / "vae"
    first = train_vae(out, steps=1, batch=1, measure=False)  # the 5-frame stage, then the 9-frame fine-tune from it
    assert "latents_std" not in first
    summary = train_vae(out, steps=1, batch=1, frames=9, init=out, stats_videos=1, stats_frames=3, psnr_clips=0)
    model = AutoencoderKLWan.from_pretrained(str(out), torch_dtype=torch.float32)
    world = training_script(0).world(0)
    video = torch.from_numpy(render(world, 0, pixel_frames(3))).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = model.encode(video).latent_dist.mode()[0].flatten(1)  # [C, F*h*w], independent of model/vae.py
    assert np.allclose(model.config.latents_mean, z.mean(1).numpy(), atol=2e-3)
    assert np.allclose(model.config.latents_std, z.std(1).numpy(), rtol=2e-2)
    vae = build_vae(student_model_config(vae_path=str(out)))
    normalised = vae.encode(torch.from_numpy(render(world, 0, pixel_frames(3)))[None])[0]  # [F, C, h, w]
    per_channel = normalised.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(VAE_Z_DIM), atol=0.02)
    assert torch.allclose(per_channel.std(1), torch.ones(VAE_Z_DIM), atol=0.03)
    assert summary["latents_std"] == pytest.approx(list(model.config.latents_std))


def test_text_dropout_uses_the_unconditional_prompts(text_dir):
    text = load_text_encoder(text_dir)
    rng = np.random.default_rng(0)
    prompts = ["a red circle on a grey background"] * 8
    kept = text_batch(text, prompts, rng, dropout=0.0)
    dropped = text_batch(text, prompts, rng, dropout=1.0)
    assert torch.equal(kept, text.encode(prompts)[0])
    uncond = text.encode(list(UNCONDITIONAL_PROMPTS))[0]
    for row in dropped:
        assert any(torch.equal(row, u) for u in uncond)


def test_windows_are_labelled_by_the_prompt_that_describes_them(dataset):
    x0, prompts = dataset.clip_batch(np.random.default_rng(0), 6)
    assert x0.shape == (6, 21, VAE_Z_DIM, LATENT_SIZE, LATENT_SIZE)
    for s, script in enumerate(dataset.scripts):
        starts = window_starts(script)
        for ev in script.events:  # no window starts while an earlier segment's event is still going on
            seg_end = next((f for f in script.switch_frames if f > ev.frame), script.num_frames)
            assert not any(ev.frame <= a < ev.frame + 10 and a + 20 >= seg_end for a in starts)


def test_bidirectional_training_saves_a_wan_checkpoint(tmp_path, text_dir, dataset):
    out = tmp_path / "teacher.safetensors"
    phases = [Phase(steps=2, batch=2, frames=6), Phase(steps=1, batch=1)]  # short windows, then 21-frame ones
    ema, summary = train_bidirectional("teacher", teacher_model_config(), dataset, load_text_encoder(text_dir), out,
                                       phases=phases, lr=1e-3, log_every=1)
    model = CausalWanModel(teacher_model_config())
    assert load_checkpoint(model, out) == "wan"
    for name, p in model.state_dict().items():
        assert torch.equal(p, ema.state_dict()[name].half().float()), name
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert summary["phases"] == [{"steps": 2, "batch": 2, "frames": 6}, {"steps": 1, "batch": 1, "frames": 21}]


def test_clip_batch_skips_scripts_without_a_window_of_the_length(dataset):
    short = LatentDataset(dataset.scripts, dataset.latents[:, :, :22])  # 22 frames: few 21-frame windows
    x0, _ = short.clip_batch(np.random.default_rng(0), 8, frames=21)
    assert x0.shape[:2] == (8, 21)
    with pytest.raises(ValueError, match="no script has a 23-frame window"):
        short.clip_batch(np.random.default_rng(0), 1, frames=23)


def test_causal_training_streams_with_memory(monkeypatch, tmp_path, text_dir, dataset):
    reads = []
    original = StreamState.read_memory

    def spy(self, *args, **kwargs):
        kv = original(self, *args, **kwargs)
        if not args and not kwargs:  # the chunk's read (the recache reads with explicit frames)
            reads.append(kv is not None)
        return kv

    monkeypatch.setattr(StreamState, "read_memory", spy)
    init = CausalWanModel(student_model_config()).state_dict()
    out = tmp_path / "causal.safetensors"
    backbone, summary = tc.train_causal(dataset, load_text_encoder(text_dir), init, out, passes=1, lr=1e-3,
                                        num_frames=24)
    # the 60 s stream's 8 chunks: items are read once they are out of the sink and the recent window
    # (rollout/streaming.py read_memory); then the short fresh streams, whose memory is still empty
    long, cold = reads[:8], reads[8:]
    assert not long[0] and long[-1] and sum(long) >= 2
    assert len(cold) == tc.COLD_STARTS * tc.COLD_CHUNKS and not any(cold)
    trained = read_checkpoint(out)
    assert any(not torch.equal(trained[k].float(), init[k].half().float()) for k in init)
    gen = build_generator(student_model_config(), student_memory_config(), seed=tc.MEMORY_SEED)
    load_checkpoint(gen.backbone, out)


def test_cold_starts_are_chunk_aligned_clips_under_one_prompt(text_dir, dataset):
    text, cache, rng = load_text_encoder(text_dir), {}, np.random.default_rng(0)
    chunk, length, frames = 3, tc.COLD_CHUNKS * 3, 24
    seen = set()
    for _ in range(30):
        prompt, clip = tc.cold_start(dataset, text, cache, chunk, frames, rng)
        s, start = next((s, a) for s in range(len(dataset.scripts)) for a in range(frames - length + 1)
                        if torch.equal(dataset.latents[s, :, a:a + length].float(), clip))
        k = next(k for k, (a, b) in enumerate(dataset.scripts[s].segments()) if a <= start < b)
        assert start % chunk == 0 and start + length <= min(dataset.scripts[s].segments()[k][1], frames)
        assert prompt.texts == [dataset.scripts[s].prompts[k]]
        seen.add((s, start))
    assert len(seen) > 5  # random cuts, not one clip
    assert tc.cold_start(dataset, text, cache, chunk, length - 1, rng) is None  # no segment fits: no cold start


def test_samplers_are_deterministic(text_dir):
    text = load_text_encoder(text_dir)
    teacher = CausalWanModel(teacher_model_config()).eval()
    emb = text.encode(["a red circle on a grey background"])[0]
    a = euler_sample(teacher, emb, text.encode([""])[0], seed=1, frames=3, steps=3)
    assert a.shape == (1, 3, VAE_Z_DIM, LATENT_SIZE, LATENT_SIZE)
    assert torch.equal(a, euler_sample(teacher, emb, text.encode([""])[0], seed=1, frames=3, steps=3))
    script = Script(background="grey", kinds=(("red", "circle"),), initial=(0,), events=(),
                    prompts=("a red circle on a grey background",), switch_frames=(), num_frames=6)
    gen = student_generator(None)
    x = stream_sample(gen, text, script, seed=2, batch=2)
    assert x.shape == (2, 6, VAE_Z_DIM, LATENT_SIZE, LATENT_SIZE)
    assert torch.equal(x, stream_sample(gen, text, script, seed=2, batch=2))


def test_committed_artifacts_load_through_the_pipeline_paths():
    artifacts = Artifacts()
    if not artifacts.causal_base.is_file():
        pytest.skip("no trained artifacts under toyworld/weights (run `make toyworld`)")
    cfg = trained_model_config(artifacts, model_path=str(artifacts.causal_base))
    assert build_vae(cfg).z_dim == VAE_Z_DIM
    assert build_text_encoder(cfg).text_dim == 32
    gen = build_generator(cfg, student_memory_config())
    critic = CausalWanModel(cfg)
    load_checkpoint(critic, artifacts.critic_base)
    teacher_section = build_section("teacher", {**json.loads(artifacts.teacher_json.read_text()),
                                                "model_path": str(artifacts.teacher)})
    teacher = CausalWanModel(teacher_section.model_config(cfg))
    load_checkpoint(teacher, artifacts.teacher)
    # the architecture the bench and evaluate read from the run's teacher.json (paths aside)
    assert trained_teacher_config(artifacts) == dataclasses.replace(teacher.cfg, model_path="", vae_path="",
                                                                    text_encoder_path="")
    assert gen.backbone.cfg.num_layers == 4 and teacher.cfg.num_layers == teacher_section.num_layers
    size = sum(f.stat().st_size for f in artifacts.root.rglob("*") if f.is_file())
    assert size < 16 * 2**20  # a few MB, committed


def test_a_run_without_teacher_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher.json"):
        trained_teacher_config(Artifacts(root=tmp_path))
    (tmp_path / "teacher.json").write_text(json.dumps({**TEACHER, "patch_size": [1, 2, 2]}))
    assert trained_teacher_config(Artifacts(root=tmp_path)).patch_size == (1, 2, 2)


def test_toyworld_preset_is_the_trained_architecture(monkeypatch):
    """configs/tiny.yaml runs the models `make toyworld` trains: its sections are toyworld/configs.py's, its
    paths the committed artifacts (relative to the checkout, made absolute where the config is read)."""
    from pathlib import Path

    from slotmem.config import load_config

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    cfg = load_config("configs/tiny.yaml")
    artifacts = Artifacts()  # toyworld/weights/ of this checkout
    paths = dict(model_path=str(artifacts.causal_base), vae_path=str(artifacts.vae),
                 text_encoder_path=str(artifacts.text_encoder))
    assert cfg.model == dataclasses.replace(student_model_config(**paths), dtype=cfg.model.dtype)
    assert cfg.memory == student_memory_config()
    assert cfg.teacher == build_section("teacher", {**TEACHER, "model_path": str(artifacts.teacher)})
    assert cfg.trainer.critic_path == str(artifacts.critic_base)


def test_latent_cache_is_keyed_by_the_world_it_encodes(monkeypatch, tmp_path):
    """A changed world (here: the hidden sizes) must re-encode, not reuse the old world's cached latents."""
    from toyworld import data as toy_data
    from toyworld import world

    vae = build_vae(trained_model_config(Artifacts()))
    logs = []
    first = toy_data.load_or_build(vae, 1, 1, 3, cache_dir=tmp_path, log=logs.append)
    again = toy_data.load_or_build(vae, 1, 1, 3, cache_dir=tmp_path, log=logs.append)
    assert "from the cache" in logs[-1] and torch.equal(first.latents, again.latents)
    monkeypatch.setattr(world, "SIZES", {name: px + 6 for name, px in world.SIZES.items()})
    changed = toy_data.load_or_build(vae, 1, 1, 3, cache_dir=tmp_path, log=logs.append)
    assert "from the cache" not in logs[-1]
    assert len(list(tmp_path.glob("latents-*.pt"))) == 2
    assert not torch.equal(first.latents, changed.latents)


def test_make_toyworld_chain_runs_on_smoke_budgets_with_an_override(tmp_path, capsys):
    """Every stage of `make toyworld` in order on --quick budgets, into a fresh run directory, with one budget
    changed by --budget; the summary records what ran."""
    from toyworld import train

    out = tmp_path / "run"
    train.main(["all", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--budget", "teacher_steps=3"])
    summary = json.loads((out / "training.json").read_text())
    assert set(summary["stage_seconds"]) == set(train.STAGES)
    assert summary["teacher"]["steps"] == 3 + train.QUICK["teacher_tail_steps"]
    assert summary["student"]["steps"] == train.QUICK["student_steps"]
    assert summary["data"]["teacher_scripts"] == train.QUICK["teacher_scripts"]
    artifacts = Artifacts(root=out)
    for path in (artifacts.teacher, artifacts.critic_base, artifacts.causal_base, artifacts.vae / "config.json"):
        assert path.is_file(), path
    assert "[train] finished vae, vae_temporal, text, data, teacher, student, causal" in capsys.readouterr().out


@pytest.mark.parametrize("item, message", [
    ("teacher_step=3", "expected KEY=N with KEY one of"),
    ("teacher_steps", "expected KEY=N"),
    ("teacher_steps=many", "--budget teacher_steps: 'many' is not a whole number"),
    ("causal_passes=0", "--budget causal_passes: must be >= 1"),
])
def test_budget_overrides_name_the_bad_key(item, message):
    from toyworld.train import FULL, with_overrides

    with pytest.raises(SystemExit, match=message):
        with_overrides(FULL, [item])
    assert with_overrides(FULL, ["data_frames=none", "teacher_steps=1400"]) == {**FULL, "teacher_steps": 1400}
