import dataclasses

import numpy as np
import pytest
import torch

from toyworld import judge
from toyworld.configs import Artifacts, trained_model_config
from toyworld.palette import BACKGROUNDS, SIZES, first_pixel_frame, pixel_frames
from toyworld.scripts import interactive_script, memory_script
from toyworld.world import WorldSpec, render, simulate


def blur_and_noise(video: np.ndarray, sigma: float = 1.0, noise: float = 8.0, seed: int = 0) -> np.ndarray:
    """Separable Gaussian blur over H and W, then Gaussian pixel noise; an imperfect decoder's look."""
    r = int(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = video.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        x = sum(w * np.take(xp, range(i, i + video.shape[axis]), axis=axis) for i, w in enumerate(k))
    x += np.random.default_rng(seed).normal(0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _mean_adherence(video_or_reports, script):
    reports = video_or_reports if isinstance(video_or_reports, list) else judge.detect(video_or_reports)
    return float(np.mean(judge.segment_adherence(reports, script.prompts, script.switch_frames, script.num_frames)))


@pytest.fixture(scope="module")
def truth():
    """(script, world, video, reports) of two held-in interactive scripts, rendered and detected once."""
    out = []
    for seed in (0, 3):
        script = interactive_script(seed)
        world = script.world(seed)
        video = render(world)
        out.append((script, world, video, judge.detect(video)))
    return out


def test_detector_reads_the_ground_truth(truth):
    """Per frame, against the simulator: presence of every wholly visible entity, its shape and size."""
    script, world, video, reports = truth[1]
    trace = simulate(world)
    checked = correct = 0
    for p in range(0, world.num_pixel_frames, 7):
        for i, e in enumerate(world.entities):
            others = [j for j in range(len(world.entities)) if j != i and trace.visible[p, j]]
            apart = all(np.abs(trace.centre[p, i] - trace.centre[p, j]).max() > SIZES["large"] + 2 for j in others)
            if not (trace.full[p, i] and apart):
                continue
            det = reports[p].entities.get(e.colour)
            checked += 1
            centroid = trace.centre[p, i] + (0, SIZES[e.size] / 6 if e.shape == "triangle" else 0)  # y + h/3
            correct += det is not None and det.shape == e.shape and det.size == e.size and \
                np.abs(np.array(det.centre) - centroid).max() < 1.0
        assert reports[p].background == world.background
        assert set(reports[p].entities) <= {e.colour for e in world.entities}
    assert checked > 100 and correct / checked > 0.97


def test_adherence_is_high_on_truth_and_low_on_mismatch_and_noise(truth):
    for k, (script, world, video, reports) in enumerate(truth):
        assert _mean_adherence(reports, script) > 0.95
        assert _mean_adherence(reports, interactive_script(50 + k)) < 0.5
    script, _, video, _ = truth[0]
    noise = np.random.default_rng(0).integers(0, 256, video.shape, dtype=np.uint8)
    assert _mean_adherence(noise, script) < 0.05
    crowded = memory_script(0)  # never an empty scene
    blank = np.broadcast_to(np.array(BACKGROUNDS[crowded.background], dtype=np.uint8), video.shape).copy()
    assert _mean_adherence(blank, crowded) < 0.6


def test_adherence_survives_blur_and_noise(truth):
    script, _, video, _ = truth[1]
    assert _mean_adherence(blur_and_noise(video), script) > 0.9


def test_frame_adherence_counts_each_check(truth):
    script, _, _, reports = truth[0]
    report = reports[0]
    prompt = script.prompts[0]
    assert judge.frame_adherence(report, prompt) == 1.0
    wrong_bg = dataclasses.replace(report, background="navy" if report.background != "navy" else "grey")
    assert judge.frame_adherence(wrong_bg, prompt) == 0.0
    missing = dataclasses.replace(report, entities={})
    n_present = len(judge.parse(prompt).present)
    assert judge.frame_adherence(missing, prompt) == pytest.approx(1 / (n_present + 1))


def _swap_size_after(world: WorldSpec, entity: int, latent_frame: int) -> np.ndarray:
    """The video with the entity drawn at the other size from latent_frame on (same script and motion)."""
    e = world.entities[entity]
    other = dataclasses.replace(e, size="small" if e.size == "large" else "large")
    changed = dataclasses.replace(world, entities=tuple(other if i == entity else x for i, x in enumerate(world.entities)))
    cut = first_pixel_frame(latent_frame)
    return np.concatenate([render(world, 0, cut), render(changed, cut)])


@pytest.fixture(scope="module")
def memory_truth():
    script = memory_script(1)
    world = script.world(1)
    video = render(world)
    return script, world, video, judge.detect(video)


def test_return_match_on_truth_and_on_a_changed_attribute(memory_truth):
    script, world, video, reports = memory_truth
    results = judge.return_matches(reports, script)
    assert results and all(r["match"] is True for r in results)
    ret = next(ev for ev in script.events if ev.kind == "return")
    swapped = judge.return_matches(judge.detect(_swap_size_after(world, ret.entity, ret.frame)), script)
    assert swapped[0]["match"] is False


def test_consistency_is_one_on_truth_and_drops_when_the_size_flickers(memory_truth):
    script, world, video, reports = memory_truth
    stable = judge.consistency(reports)
    assert stable["identity_stability"] > 0.97 and stable["attribute_stability"] > 0.97
    flicker = video.copy()
    e = world.entities[0]
    other = dataclasses.replace(e, size="small" if e.size == "large" else "large")
    alt = render(dataclasses.replace(world, entities=(other, *world.entities[1:])))
    flicker[::2] = alt[::2]
    assert judge.consistency(judge.detect(flicker))["per_colour"][e.colour]["attribute"] < 0.8


def test_vae_roundtrip_keeps_adherence():
    artifacts = Artifacts()
    if not (artifacts.vae / "config.json").is_file():
        pytest.skip("no trained VAE under toyworld/weights (run `make toyworld`)")
    from model.vae import build_vae

    vae = build_vae(trained_model_config(artifacts))
    script = interactive_script(4)
    clip = render(script.world(4), 0, pixel_frames(21))
    rec = vae.decode(vae.encode(torch.from_numpy(clip)[None]))[0].numpy()
    reports = judge.detect(rec)
    score = judge.segment_adherence(reports, script.prompts[:1], [], 21)[0]
    assert score > 0.8


def test_a_written_video_is_judged_against_its_sidecar(tmp_path):
    """judge_video (the pipeline's per-stage judge, toyworld.evaluate --video): the judge reads an mp4 as the
    pipeline writes it (H.264, the json beside it); a prompt outside the grammar is an error naming it."""
    from rollout.video import write_mp4, write_sidecar
    from toyworld.evaluate import prefix
    from toyworld.judge import judge_video

    script = prefix(interactive_script(5), 2)
    video = write_mp4(tmp_path / "sample.mp4", render(script.world(5)))
    meta = {"prompts": list(script.prompts), "switch_frames": list(script.switch_frames),
            "num_latent_frames": script.num_frames}
    write_sidecar(video, meta)
    result = judge_video(video)
    assert len(result["per_segment"]) == 2 and result["adherence"] > 0.9, result
    write_sidecar(video, {**meta, "prompts": list(prefix(interactive_script(6), 2).prompts)})
    assert judge_video(video)["adherence"] < result["adherence"] - 0.3
    assert result["identity_stability"] > 0.9, result
    write_sidecar(video, {**meta, "prompts": ["a cat on a mat", *meta["prompts"][1:]]})
    with pytest.raises(ValueError, match="a cat on a mat"):
        judge_video(video)
