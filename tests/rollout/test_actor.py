"""RolloutActor in-process (no Ray): row contents against direct generation, retries, policy pickup."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.storage import fetch_weights, publish_weights, resolve_storage
from rollout.actor import RolloutActor, TrajectorySpec
from rollout.components import build_components
from rollout.shards import committed_rounds, table_to_rows
from rollout.streaming import encode_prompts, generate
from slotmem.config import load_config, replace
from slotmem.errors import InputError

PAIR = ("a red fox walks through deep snow", "the red fox leaps over a frozen stream")


@pytest.fixture(scope="module")
def cfg(repo_root):
    return load_config(f"{repo_root}/configs/tiny-random.yaml", [
        "rollout.num_frames=48", "rollout.switch_frames=[12,24,36]", "rollout.switch_choices=[21]"])


@pytest.fixture
def storage(cfg, tmp_path):
    return resolve_storage(replace(cfg.storage, root=str(tmp_path)))


def make_actor(cfg, storage) -> RolloutActor:
    return RolloutActor("a0", storage, model_cfg=cfg.model, memory_cfg=cfg.memory, rollout_cfg=cfg.rollout,
                        init_seed=cfg.trainer.seed, device="cpu")


def reference(cfg, spec: TrajectorySpec, policy_path=None):
    """Latents [F, C, h, w] and text embeddings of `spec` from a separately built generator."""
    comps = build_components(cfg.model, cfg.memory, device="cpu", seed=cfg.trainer.seed, policy_path=policy_path)
    prompts = encode_prompts(comps.text_encoder, list(spec.prompts))
    gen = comps.generator
    res = generate(gen.backbone, gen.memory, comps.scheduler, cfg.model, prompts, num_frames=cfg.rollout.num_frames,
                   switch_frames=list(spec.switch_frames), seed=spec.seed)
    return res.latents[0], prompts.embeddings


def read_shard(storage, out) -> tuple:
    path = f"{storage.round_dir(0)}/{out['shard']['name']}"
    data = storage.read_bytes(path)
    rows = table_to_rows(pq.read_table(pa.BufferReader(data)))
    assert len(rows) == 1
    return rows[0], data


def perturbed_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The initial generator weights with every float tensor moved a little (a 'trained' policy)."""
    gen = build_components(cfg.model, cfg.memory, device="cpu", seed=cfg.trainer.seed).generator
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in gen.state_dict().items()}


def test_trajectory_row_matches_direct_generation(cfg, storage):
    actor = make_actor(cfg, storage)
    spec = TrajectorySpec(round_index=0, traj_index=3, prompts=PAIR, switch_frames=(21,), seed=12345)
    out = actor.generate_trajectory(spec)
    row, data = read_shard(storage, out)

    assert out["shard"]["name"] == "part-a0-00003.parquet"
    assert out["shard"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert out["shard"]["num_bytes"] == len(data) and out["shard"]["num_rows"] == 1
    assert (row.trajectory_id, row.round, row.actor_id, row.policy_version, row.seed) == ("r0000-t00003", 0, "a0", 0,
                                                                                         12345)
    assert row.prompts == list(PAIR) and row.switch_frames == [21]
    ref_latents, ref_emb = reference(cfg, spec)
    assert row.latents.shape == (48, 16, cfg.model.latent_height, cfg.model.latent_width)
    assert row.latents.dtype == torch.float32
    assert torch.equal(row.latents, ref_latents)
    assert torch.equal(row.text_embeddings, ref_emb)
    assert set(out["timings"]) >= {"load_weights_s", "encode_s", "generate_s", "write_s", "total_s"}
    assert out["timings"]["total_s"] >= out["timings"]["generate_s"] > 0
    assert row.timings["generate_s"] > 0
    assert committed_rounds(storage) == []  # an actor writes shards, never a manifest


def test_redoing_a_trajectory_rewrites_the_same_file_with_the_same_latents(cfg, storage):
    spec = TrajectorySpec(round_index=0, traj_index=0, prompts=PAIR[:1], switch_frames=(), seed=7)
    first = make_actor(cfg, storage).generate_trajectory(spec)
    row1, _ = read_shard(storage, first)
    second = make_actor(cfg, storage).generate_trajectory(spec)  # e.g. after a restart
    row2, _ = read_shard(storage, second)
    assert first["shard"]["name"] == second["shard"]["name"]
    assert torch.equal(row1.latents, row2.latents)
    assert sorted(p.base_name for p in storage.list_dir(storage.round_dir(0))) == ["part-a0-00000.parquet"]


def test_actor_loads_newly_published_policy_between_trajectories(cfg, storage, tmp_path):
    actor = make_actor(cfg, storage)

    def run(i):
        # same seed and prompts every time: only the weights can change the latents
        out = actor.generate_trajectory(TrajectorySpec(0, i, PAIR, (21,), seed=99))
        return read_shard(storage, out)[0]

    v0 = run(0)
    assert v0.policy_version == 0
    publish_weights(storage, 1, perturbed_state(cfg, seed=1))
    v1 = run(1)
    assert v1.policy_version == 1
    ref_v1, _ = reference(cfg, TrajectorySpec(0, 1, PAIR, (21,), 99),
                          policy_path=fetch_weights(storage, 1, tmp_path / "ref"))
    assert torch.equal(v1.latents, ref_v1)
    assert not torch.allclose(v1.latents, v0.latents)

    publish_weights(storage, 2, perturbed_state(cfg, seed=2))
    v2 = run(2)
    assert v2.policy_version == 2 and not torch.allclose(v2.latents, v1.latents)
    assert torch.equal(run(3).latents, v2.latents)  # nothing new published: same weights, same video
    assert actor.loaded_version == 2


def test_a_superseded_version_is_reloaded(cfg, storage):
    """A trainer attempt restarted from a checkpoint re-publishes a version with other bytes (supersede): actors
    that loaded the old bytes load the new ones, although the version number did not change."""
    actor = make_actor(cfg, storage)

    def run(i):
        return read_shard(storage, actor.generate_trajectory(TrajectorySpec(0, i, PAIR, (21,), seed=99)))[0]

    publish_weights(storage, 1, perturbed_state(cfg, seed=1))
    old = run(0)
    publish_weights(storage, 1, perturbed_state(cfg, seed=2), supersede=True)
    new = run(1)
    assert old.policy_version == new.policy_version == 1 and not torch.allclose(old.latents, new.latents)
    assert torch.equal(run(2).latents, new.latents)  # loaded once: the same bytes stay loaded


def test_policy_that_does_not_fit_the_generator_is_rejected(cfg, storage):
    actor = make_actor(cfg, storage)
    state = perturbed_state(cfg, seed=3)
    state.pop(next(iter(state)))
    publish_weights(storage, 1, state)
    with pytest.raises(InputError, match="published policy version 1 .* does not match the generator: 1 missing"):
        actor.generate_trajectory(TrajectorySpec(0, 0, PAIR, (21,), seed=1))
