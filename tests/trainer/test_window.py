"""Training windows of committed trajectories: context rebuild, self-roll, losses and their gradients."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from cluster.storage import resolve_storage
from model.text import build_text_encoder
from rollout.shards import read_round, table_to_rows
from slotmem.config import load_config
from slotmem.errors import InputError
from tests.fixtures_data import make_committed_round
from trainer.models import build_training_models
from trainer.window import (RankSync, TrajectoryWindow, critic_loss, draw_exit_steps, generator_loss, new_state,
                            prefill, prompts_from_embeddings, rollout_window, sample_window_start, self_roll,
                            slot_loss_parts, window_from_row)

NUM_FRAMES = 48
WINDOW = 21
CHUNK = 3
STEPS = 4  # few-step sampler (Appendix A.1)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("window")
    return load_config("configs/tiny.yaml", [f"storage.root={root}", f"rollout.num_frames={NUM_FRAMES}",
                                             "rollout.switch_frames=[24]", "rollout.switch_choices=[21]"])


@pytest.fixture(scope="module")
def rows(cfg):
    """Two committed two-prompt trajectories (switches at frames 15 and 30), read back from their shards."""
    storage = resolve_storage(cfg.storage)
    make_committed_round(cfg, storage, 0, 2, NUM_FRAMES)
    out = table_to_rows(read_round(storage, 0))
    assert [r.switch_frames for r in out] == [[15], [30]]
    return out


def as_batch(row) -> dict:
    """A one-row batch in rollout.shards.batch_to_torch's layout."""
    return {"latents": row.latents[None], "text_embeddings": [row.text_embeddings],
            "switch_frames": [row.switch_frames], "policy_version": torch.tensor([row.policy_version]),
            "trajectory_id": [row.trajectory_id]}


def window_at(row, start: int) -> TrajectoryWindow:
    return TrajectoryWindow(latents=row.latents, text_embeddings=row.text_embeddings, switch_starts=row.switch_frames,
                            start=start, num_frames=WINDOW, policy_version=row.policy_version)


def models(cfg, stage: int):
    return build_training_models(cfg.model, cfg.memory, cfg.trainer, stage=stage)


# ----------------------------------------------------------------------------------------------
# rebuilding the rollout's context
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("traj,start", [(0, 0), (0, 9), (0, 27), (1, 12)],
                         ids=["switch-in-window", "switch-in-window-after-prefill", "switch-in-prefill",
                              "late-switch-in-window"])
def test_prefill_and_self_roll_reproduce_the_rollout(cfg, rows, traj, start):
    """With the rollout's weights and noise, prefill + self-roll regenerate the committed frames exactly.

    The rollout drew 4 noise tensors per chunk (initial noise + one per later step) from one generator
    seeded with the row's seed; advancing a copy past the prefix chunks and exiting at the last step
    makes the self-roll consume the same noise. Equality then holds only if the prefill rebuilt the KV
    cache, the memory bank and the active prompt (switch and recache included) exactly as the rollout had.
    """
    row = rows[traj]
    m = models(cfg, 1)
    mc = cfg.model
    shape = (1, CHUNK, mc.in_channels, mc.latent_height, mc.latent_width)
    noise = torch.Generator().manual_seed(row.seed)
    for _ in range(STEPS * start // CHUNK):
        torch.randn(shape, generator=noise)
    window = window_at(row, start)
    with torch.no_grad():
        state = new_state(m.generator, m.scheduler, mc, window)
        prefill(state, window)
        assert state.next_frame == start
        x = self_roll(state, window, exit_steps=[STEPS - 1] * (WINDOW // CHUNK), noise_generator=noise)
    assert x.shape == (1, WINDOW, mc.in_channels, mc.latent_height, mc.latent_width)
    assert torch.equal(x[0], row.latents[start:start + WINDOW])
    switched = [e.frame for e in state.events]
    assert switched == row.switch_frames  # the switch happened once, in the prefill or in the window


def test_prompts_from_stored_embeddings_pool_like_the_encoder(cfg, rows):
    encoder = build_text_encoder(cfg.model)
    emb, mask = encoder.encode(rows[0].prompts)
    prompts = prompts_from_embeddings(rows[0].text_embeddings)
    assert torch.equal(prompts.embeddings, emb)
    assert torch.equal(prompts.pooled, encoder.pooled(emb, mask))


# ----------------------------------------------------------------------------------------------
# window layout: start and exit steps, identical on every rank
# ----------------------------------------------------------------------------------------------


def test_window_starts_are_chunk_aligned_and_cover_the_range():
    g = torch.Generator().manual_seed(0)
    starts = {sample_window_start(NUM_FRAMES, WINDOW, CHUNK, g) for _ in range(400)}
    assert starts == set(range(0, NUM_FRAMES - WINDOW + 1, CHUNK))
    with pytest.raises(InputError, match="window_frames"):
        sample_window_start(18, WINDOW, CHUNK, g)


class ThreadGroup:
    """`size` ranks as threads of this process: every collective exchanges all ranks' tensors."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return values

    def sync(self, rank: int) -> RankSync:
        return RankSync(broadcast=lambda t: self._exchange(rank, t)[0].clone(),
                        reduce_max=lambda t: torch.stack(self._exchange(rank, t)).amax(0))

    def run(self, fn) -> list:
        results: list = [None] * len(self.slots)

        def target(rank):
            results[rank] = fn(rank, self.sync(rank))

        threads = [threading.Thread(target=target, args=(r,)) for r in range(len(self.slots))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


def test_exit_steps_and_window_start_agree_across_ranks():
    rngs = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    frames = [NUM_FRAMES, 30]  # rank 1 holds a shorter trajectory

    def draw(rank, sync):
        start = sample_window_start(frames[rank], WINDOW, CHUNK, rngs[rank], sync)
        return start, draw_exit_steps(WINDOW // CHUNK, STEPS, rngs[rank], broadcast=sync.broadcast)

    drawn = ThreadGroup(2).run(draw)
    assert drawn[0] == drawn[1]
    start, exits = drawn[0]
    assert start <= 30 - WINDOW and start % CHUNK == 0  # within the shortest trajectory of all ranks
    assert len(exits) == WINDOW // CHUNK and all(0 <= e < STEPS for e in exits)
    # what rank 0 drew is what everyone got
    ref = torch.Generator().manual_seed(1)
    assert start == int(torch.randint((30 - WINDOW) // CHUNK + 1, (1,), generator=ref)) * CHUNK
    assert exits == torch.randint(STEPS, (WINDOW // CHUNK,), generator=ref).tolist()
    # rank 1 consumed its own stream alike: its next draws equal those of a fresh stream advanced equally
    ref1 = torch.Generator().manual_seed(2)
    torch.randint((30 - WINDOW) // CHUNK + 1, (1,), generator=ref1)
    torch.randint(STEPS, (WINDOW // CHUNK,), generator=ref1)
    assert torch.equal(torch.rand(3, generator=rngs[1]), torch.rand(3, generator=ref1))


def test_every_rank_enters_local_mode_where_any_rank_switches(cfg, rows):
    """Rank 1's trajectory switches inside the window (chunk 6, frame 30), rank 0's does not (start 18):
    both ranks enter `local` at that chunk, and entering it changes nothing for rank 0."""
    row = rows[0]  # switch at 15: in the prefill of a window starting at 18
    m = models(cfg, 1)
    entered = []

    @contextlib.contextmanager
    def local():
        entered.append(True)
        yield

    window = window_at(row, 18)
    other_rank_switch = [torch.tensor([0.0, 0, 0, 0, 1, 0, 0])]  # rank 1's switch chunk (30 = 18 + 4 * 3)
    sync = RankSync(reduce_max=lambda t: torch.maximum(t, other_rank_switch[0]), local=local)
    exits = [STEPS - 1] * (WINDOW // CHUNK)
    with torch.no_grad():
        x_sync = rollout_window(m.generator, m.scheduler, cfg.model, window, exit_steps=exits,
                                noise_generator=torch.Generator().manual_seed(5), sync=sync)
        x_alone = rollout_window(m.generator, m.scheduler, cfg.model, window, exit_steps=exits,
                                 noise_generator=torch.Generator().manual_seed(5))
    assert len(entered) == 2  # the prefill and rank 1's switch chunk
    assert torch.equal(x_sync, x_alone)


# ----------------------------------------------------------------------------------------------
# losses and where their gradients go
# ----------------------------------------------------------------------------------------------


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _step_inputs(cfg, row, start):
    window = window_from_row(as_batch(row), window_frames=WINDOW, chunk=CHUNK,
                             generator=torch.Generator().manual_seed(start))
    negative = build_text_encoder(cfg.model).encode([cfg.trainer.negative_prompt])[0][0]
    return window, negative


@pytest.mark.parametrize("stage", [1, 2])
def test_generator_loss_reaches_backbone_and_adapter_and_the_grouper_only_in_stage_2(cfg, rows, stage):
    m = models(cfg, stage)
    window, negative = _step_inputs(cfg, rows[0], 3)
    g = torch.Generator().manual_seed(0)
    loss, stats = generator_loss(window, generator=m.generator, teacher=m.teacher, critic=m.critic,
                                 scheduler=m.scheduler, model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                                 negative_embedding=negative, stage=stage, exit_steps=[0, 1, 2, 3, 0, 1, 2],
                                 generator_rng=g, noise_rng=g)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["slot"] > 0 and stats["dmd"] > 0
    # eq. 6 with the parts the memory reports
    assert loss.item() == pytest.approx(stats["dmd"] + cfg.trainer.lambda_slot * stats["slot"], rel=1e-6)
    loss.backward()
    memory = m.generator.memory
    for name, module in (("backbone", m.generator.backbone), ("adapters", memory.writer.adapters),
                         ("text projection", memory.text_proj)):
        grads = _grads(module)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    grouper = _grads(memory.writer.grouper)
    if stage == 1:
        assert all(g is None for g in grouper)
        assert not any(p.requires_grad for p in memory.writer.grouper.parameters())
    else:
        assert sum(float(g.abs().sum()) for g in grouper if g is not None) > 0
    assert all(g is None for g in _grads(m.teacher)) and all(g is None for g in _grads(m.critic))


def test_critic_loss_trains_only_the_critic(cfg, rows):
    m = models(cfg, 1)
    window, _ = _step_inputs(cfg, rows[1], 5)
    g = torch.Generator().manual_seed(1)
    loss, _ = critic_loss(window, generator=m.generator, critic=m.critic, scheduler=m.scheduler, model_cfg=cfg.model,
                          trainer_cfg=cfg.trainer, exit_steps=[3] * 7, generator_rng=g, noise_rng=g)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(m.critic))
    assert all(g is None for g in _grads(m.generator)) and all(g is None for g in _grads(m.teacher))


@pytest.mark.parametrize("stage", [1, 2])
def test_slot_loss_parts_add_up_to_eq_7(cfg, rows, stage):
    m = models(cfg, stage)
    window = window_at(rows[0], 6)
    rollout_window(m.generator, m.scheduler, cfg.model, window, exit_steps=[3] * 7,
                   noise_generator=torch.Generator().manual_seed(2))
    total, parts = slot_loss_parts(m.generator.memory, stage)
    expected = parts["slot_con"] + (cfg.memory.rec_weight * parts["slot_rec"] if stage == 2 else 0.0)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["slot_con"] > 0
    assert len(m.generator.memory.losses) == 0  # consumed
