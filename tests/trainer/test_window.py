"""Training windows of committed trajectories: context rebuild, self-roll, losses and their gradients."""

from __future__ import annotations

import contextlib
from dataclasses import replace
import threading

import pytest
import torch

from cluster.storage import resolve_storage
from model.text import build_text_encoder
from rollout.shards import read_round, table_to_rows
from slotmem.config import load_config
from slotmem.errors import InputError
from tests.fixtures_data import make_committed_round
from model.vae import build_vae
from trainer.models import apply_group_settings, build_training_models, parameter_groups
from trainer.objectives import critic_loss, generator_loss, warmup_loss
from trainer.schedule import stage0_lr_factor
from trainer.window import (RankSync, TrajectoryWindow, draw_exit_steps, new_state, prefill, prompts_from_embeddings,
                            roll, rollout_window, sample_window_start, scored_clip, window_from_row, window_starts)

NUM_FRAMES = 48
STAGE0_STEPS = 40
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
    return load_config("configs/tiny-random.yaml", [f"storage.root={root}", f"rollout.num_frames={NUM_FRAMES}",
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
                            start=start, num_frames=WINDOW, context=CHUNK if start else 0,
                            policy_version=row.policy_version)


def models(cfg, stage: int):
    return build_training_models(cfg.model, cfg.teacher, cfg.memory, cfg.trainer, stage=stage)


@pytest.fixture(scope="module")
def first_frame(cfg):
    return build_vae(cfg.model).reencode_first_frame


# ----------------------------------------------------------------------------------------------
# rebuilding the rollout's context
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("traj,start", [(0, 0), (0, 9), (0, 27), (1, 15)],
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
        x = roll(state, window, exit_steps=[STEPS - 1] * (window.num_new // CHUNK), noise_generator=noise)
    # a window at frame 0 generates all 21 frames, one further in generates 18 after a chunk of context
    assert x.shape == (1, window.num_new, mc.in_channels, mc.latent_height, mc.latent_width)
    assert window.num_new == (WINDOW if start == 0 else WINDOW - CHUNK)
    assert torch.equal(x[0], row.latents[start:start + window.num_new])
    switched = [e.frame for e in state.events]
    assert switched == row.switch_frames  # the switch happened once, in the prefill or in the window


def test_prompts_from_stored_embeddings_pool_like_the_encoder(cfg, rows):
    encoder = build_text_encoder(cfg.model)
    emb, mask = encoder.encode(rows[0].prompts)
    prompts = prompts_from_embeddings(rows[0].text_embeddings)
    assert torch.equal(prompts.embeddings, emb)
    assert torch.equal(prompts.pooled, encoder.pooled(emb, mask))


def test_mid_video_window_scores_a_clip_that_starts_with_a_reencoded_image_latent(cfg, rows, first_frame):
    """LongLive's streaming long tuning: [one chunk of context | new frames], the context's first latent decoded
    alone and re-encoded; only the new frames carry the loss."""
    row = rows[0]
    window = window_at(row, 12)
    new = torch.randn(1, window.num_new, *row.latents.shape[1:])
    clip = scored_clip(window, new, first_frame)
    assert clip.shape[1] == WINDOW
    torch.testing.assert_close(clip[:, :1], first_frame(row.latents[None, 9:10]))
    assert not torch.allclose(clip[:, :1], row.latents[None, 9:10])  # not scored as if it were frame 0 of a clip
    assert torch.equal(clip[:, 1:CHUNK], row.latents[None, 10:12]) and torch.equal(clip[:, CHUNK:], new)
    assert window.loss_frames().tolist() == [[False] * CHUNK + [True] * (WINDOW - CHUNK)]
    start = window_at(row, 0)
    assert scored_clip(start, new[:, :0].new_zeros(1, WINDOW, *row.latents.shape[1:]), first_frame).shape[1] == WINDOW
    assert start.loss_frames() is None


# ----------------------------------------------------------------------------------------------
# window layout: start and exit steps, identical on every rank
# ----------------------------------------------------------------------------------------------


def test_window_starts_are_chunk_aligned_and_cover_the_range():
    g = torch.Generator().manual_seed(0)
    starts = {sample_window_start(NUM_FRAMES, WINDOW, CHUNK, g) for _ in range(400)}
    # frame 0 (21 new frames), or a later chunk start whose 18 new frames fit
    assert starts == set(window_starts(NUM_FRAMES, WINDOW, CHUNK)) == {0, *range(CHUNK, NUM_FRAMES - 18 + 1, CHUNK)}
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


@pytest.mark.parametrize("same", [True, False], ids=["one-exit-per-window", "one-exit-per-chunk"])
def test_exit_steps_and_window_start_agree_across_ranks(same):
    rngs = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    frames = [NUM_FRAMES, 30]  # rank 1 holds a shorter trajectory
    chunks = (WINDOW - CHUNK) // CHUNK

    def draw(rank, sync):
        start = sample_window_start(frames[rank], WINDOW, CHUNK, rngs[rank], sync)
        return start, draw_exit_steps(chunks, STEPS, rngs[rank], same=same, broadcast=sync.broadcast)

    drawn = ThreadGroup(2).run(draw)
    assert drawn[0] == drawn[1]
    start, exits = drawn[0]
    allowed = window_starts(30, WINDOW, CHUNK)  # within the shortest trajectory of all ranks
    assert start in allowed
    assert len(exits) == chunks and all(0 <= e < STEPS for e in exits)
    assert (len(set(exits)) == 1) if same else True  # Self-Forcing same_step_across_blocks
    # what rank 0 drew is what everyone got
    ref = torch.Generator().manual_seed(1)
    assert start == allowed[int(torch.randint(len(allowed), (1,), generator=ref))]
    expected = torch.randint(STEPS, (1 if same else chunks,), generator=ref).expand(chunks).tolist()
    assert exits == expected
    # rank 1 consumed its own stream alike: its next draws equal those of a fresh stream advanced equally
    ref1 = torch.Generator().manual_seed(2)
    torch.randint(len(allowed), (1,), generator=ref1)
    torch.randint(STEPS, (1 if same else chunks,), generator=ref1)
    assert torch.equal(torch.rand(3, generator=rngs[1]), torch.rand(3, generator=ref1))


def test_every_rank_enters_local_mode_where_any_rank_switches(cfg, rows):
    """Rank 1's trajectory switches inside the window (frame 30), rank 0's does not (its switch at 15 is in the
    prefill of a window generating from 18): both ranks enter `local` at that chunk, and entering it changes
    nothing for rank 0."""
    row = rows[0]
    m = models(cfg, 1)
    entered = []

    @contextlib.contextmanager
    def local():
        entered.append(True)
        yield

    window = window_at(row, 18)
    other_rank_switch = [torch.tensor([0.0, 0, 0, 0, 1, 0])]  # rank 1's switch chunk (30 = 18 + 4 * 3)
    sync = RankSync(reduce_max=lambda t: torch.maximum(t, other_rank_switch[0]), local=local)
    exits = [STEPS - 1] * (window.num_new // CHUNK)
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


def _total(grads) -> float:
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def _step_inputs(cfg, row, seed):
    window = window_from_row(as_batch(row), window_frames=WINDOW, chunk=CHUNK,
                             generator=torch.Generator().manual_seed(seed))
    negative = build_text_encoder(cfg.model).encode([cfg.trainer.negative_prompt])[0][0]
    return window, negative


@pytest.mark.parametrize("stage", [1, 2])
def test_generator_loss_reaches_backbone_memory_and_grouper(cfg, rows, first_frame, stage):
    m = models(cfg, stage)
    window, negative = _step_inputs(cfg, rows[0], 3)
    assert window.start > 0  # a mid-video window: the context chunk is scored but carries no loss
    g = torch.Generator().manual_seed(0)
    loss, stats = generator_loss(window, generator=m.generator, teacher=m.teacher, critic=m.critic,
                                 scheduler=m.scheduler, model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                                 negative_embedding=negative, stage=stage, exit_steps=[0, 1, 2, 3, 0, 1][
                                     :window.num_new // CHUNK], first_frame=first_frame, generator_rng=g, noise_rng=g)
    assert torch.isfinite(loss) and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["slot"] > 0 and stats["dmd"] > 0
    assert 0 <= stats["slot_mask_coverage"] <= 1 and -1 <= stats["slot_cosine"] <= 1
    # eq. 6 with the parts the memory reports
    assert loss.item() == pytest.approx(stats["dmd"] + cfg.trainer.lambda_slot * stats["slot"], rel=1e-6)
    loss.backward()
    memory = m.generator.memory
    for name, module in (("backbone", m.generator.backbone), ("adapters", memory.writer.adapters),
                         ("text projection", memory.text_proj), ("slot attention", memory.writer.grouper.slot_attention),
                         ("dynamics", memory.writer.grouper.dynamics)):
        grads = _grads(module)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert _total(grads) > 0, name
    # a mid-video window's first chunk starts from the prefill's slots: the learned initialiser is not in the graph
    assert memory.writer.grouper.initializer.slots.grad is None
    assert all(g is None for g in _grads(memory.decoder))  # Stage 0 only
    assert all(g is None for g in _grads(m.teacher)) and all(g is None for g in _grads(m.critic))
    # Stage I freezes the grouper by a zero learning rate (kept in the optimizer so Stage II resumes it)
    groups = {grp["name"]: grp for grp in parameter_groups(m.generator, cfg.trainer, stage=stage)}
    assert groups["slot_grouper"]["lr"] == (0.0 if stage == 1 else cfg.trainer.memory_lr)
    assert (groups["memory"]["lr"], groups["memory"]["weight_decay"]) == (cfg.trainer.memory_lr, 0.0)
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (cfg.trainer.lr, cfg.trainer.weight_decay)


def test_critic_loss_trains_only_the_critic(cfg, rows, first_frame):
    m = models(cfg, 1)
    window, _ = _step_inputs(cfg, rows[1], 5)
    g = torch.Generator().manual_seed(1)
    loss, _ = critic_loss(window, generator=m.generator, critic=m.critic, scheduler=m.scheduler, model_cfg=cfg.model,
                          trainer_cfg=cfg.trainer, exit_steps=[3] * (window.num_new // CHUNK),
                          first_frame=first_frame, generator_rng=g, noise_rng=g)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(m.critic))
    assert all(g is None for g in _grads(m.generator)) and all(g is None for g in _grads(m.teacher))


def test_stage0_trains_only_the_slot_modules_on_the_windows_own_frames(cfg, rows):
    m = models(cfg, 0)
    assert m.teacher is None and m.critic is None
    window = window_at(rows[0], 12)
    loss, stats = warmup_loss(window, generator=m.generator, scheduler=m.scheduler, model_cfg=cfg.model,
                              trainer_cfg=cfg.trainer, noise_rng=torch.Generator().manual_seed(2))
    assert {"slot_con", "slot_feat", "slot_rec", "slot_cosine", "slot_mask_coverage"} <= set(stats)
    assert loss.item() == pytest.approx(stats["slot_con"] + cfg.trainer.stage0_rec_weight * stats["slot_feat"],
                                        rel=1e-5)
    loss.backward()
    memory = m.generator.memory
    for module in (memory.writer, memory.decoder):
        assert _total(_grads(module)) > 0
    assert not any(p.requires_grad for p in (*m.generator.backbone.parameters(), *memory.text_proj.parameters()))
    groups = parameter_groups(m.generator, cfg.trainer, stage=0)
    assert {grp["name"] for grp in groups} == {"memory", "slot_grouper"}


def test_stage0_takes_the_grouper_out_of_collapse_on_long_chains(cfg, rows):
    """Stage 0's objective and schedule, on the windows' own chains (restarted at the window), give a grouper
    whose slots stay apart on the long chains of rollouts and Stages I/II (no restart, the full prefill); an
    untrained one repeats one slot there. A broken warm-up objective, schedule or restart fails this."""
    tcfg = replace(cfg.trainer, memory_lr=3e-3, stage0_steps=STAGE0_STEPS)
    m = build_training_models(cfg.model, cfg.teacher, cfg.memory, tcfg, stage=0)
    opt = torch.optim.AdamW(parameter_groups(m.generator, tcfg, stage=0), betas=(tcfg.beta1, tcfg.beta2))
    rng = torch.Generator().manual_seed(3)

    def health(train: bool, start: int, row) -> dict:
        window = window_at(row, start)
        if train:
            loss, stats = warmup_loss(window, generator=m.generator, scheduler=m.scheduler, model_cfg=cfg.model,
                                      trainer_cfg=tcfg, noise_rng=rng)
            return {"loss": loss, **stats}
        # the long chain: prefill through every earlier chunk, no restart (with autograd, so the health is
        # collected; nothing steps)
        rollout_window(m.generator, m.scheduler, cfg.model, window, exit_steps=None, noise_generator=rng)
        return m.generator.memory.slot_loss(0).health

    late = NUM_FRAMES - WINDOW
    before = [health(False, late, row) for row in rows]
    for step in range(STAGE0_STEPS):
        out = health(True, CHUNK * int(torch.randint(late // CHUNK + 1, (1,), generator=rng)), rows[step % 2])
        apply_group_settings(opt, tcfg, stage=0, lr_scale=stage0_lr_factor(step, tcfg))  # as the worker does
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = [health(False, late, row) for row in rows]
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)  # noqa: E731
    # measured: cosine 0.94 / 0.76 -> 0.04 / 0.07, mask coverage 0.01 / 0.04 -> 0.49 / 0.50
    assert mean(before, "cosine") > 0.7 and mean(before, "mask_coverage") < 0.1
    assert mean(after, "cosine") < 0.5 and mean(after, "mask_coverage") >= 0.3
