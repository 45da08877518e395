"""DeepSpeed engines on CPU: ZeRO 1/2/3 in-process (world size 1) and ZeRO 2/3 across 2 processes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from slotmem.config import TrainerConfig
from trainer.deepspeed_setup import (
    base_optimizer,
    ds_config,
    gather_full_state_dict,
    init_distributed_cpu_safe,
    local_dist_env,
    make_engine,
    ensure_single_process_group,
    zero_partition_stats,
)
from trainer.ema import iter_gathered, unwrap

BETAS = (0.0, 0.999)  # Appendix A.1


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def _data(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :1] * 2 - x[:, 1:2]).sin()


def _engine(stage: int, *, batch: int, grad_clip: float = 10.0, lr: float = 1e-2, weight_decay: float = 0.0,
            module: nn.Module | None = None):
    cfg = ds_config(TrainerConfig(), zero_stage=stage, use_bf16=False, train_batch_size=batch,
                    grad_clip=grad_clip, param_persistence_threshold=0)
    module = module if module is not None else _mlp()
    return make_engine(module, param_groups=[{"params": list(module.parameters()), "lr": lr,
                                              "weight_decay": weight_decay}], betas=BETAS, ds_config=cfg)


def _train_step(engine, x, y) -> float:
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.fixture(scope="module")
def world1():
    ensure_single_process_group("gloo")


def test_ds_config_shape():
    cfg = ds_config(TrainerConfig(zero_stage=3, grad_clip=7.0), use_bf16=True, train_batch_size=8)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 7.0
    assert cfg["bf16"] == {"enabled": True} and cfg["train_batch_size"] == 8
    assert "optimizer" not in cfg  # client optimizer only: a config optimizer JIT-builds FusedAdam
    cfg = ds_config(TrainerConfig(), zero_stage=1, use_bf16=False, train_batch_size=2, grad_clip=1.0)
    assert cfg["zero_optimization"] == {"stage": 1} and cfg["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="zero_stage"):
        ds_config(TrainerConfig(), zero_stage=4, use_bf16=False, train_batch_size=2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engine_trains_with_client_adamw(world1, stage):
    engine = _engine(stage, batch=16)
    opt = base_optimizer(engine)
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == BETAS
    x, y = _data(0)
    losses = [_train_step(engine, x, y) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses

    shapes = {k: v.shape for k, v in _mlp().state_dict().items()}
    full = gather_full_state_dict(engine)
    assert {k: v.shape for k, v in full.items()} == shapes
    assert all(v.dtype == torch.float32 for v in full.values())
    plain = _mlp()
    plain.load_state_dict(full)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), engine(x))


@pytest.mark.parametrize("stage", [2, 3])
def test_step_matches_clipped_torch_adamw(world1, stage):
    """One engine step equals clip_grad_norm_ + torch AdamW(betas=(0, 0.999)) done by hand.

    The clip norm is tiny so that clipping matters even under Adam's scale invariance: the clipped
    gradient falls far below eps and the update shrinks by orders of magnitude.
    """
    clip, lr, wd = 1e-9, 1e-2, 0.01
    x, y = _data(1)
    reference = _mlp()
    engine = _engine(stage, batch=16, grad_clip=clip, lr=lr, weight_decay=wd, module=copy.deepcopy(reference))
    _train_step(engine, x, y)

    nn.functional.mse_loss(reference(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    assert norm > 1e3 * clip
    torch.optim.AdamW(reference.parameters(), lr=lr, betas=BETAS, weight_decay=wd).step()

    full = gather_full_state_dict(engine)
    before = _mlp().state_dict()
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(full[name], p, rtol=1e-5, atol=1e-7)
    moved = max((full[n] - before[n]).abs().max().item() for n in full)
    assert moved < 0.1 * lr  # an unclipped Adam step would move weights by ~lr


# ----------------------------------------------------------------------------------------------
# two processes (torch.multiprocessing, gloo)
# ----------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(local_dist_env(rank=rank, world_size=2, port=port))
    init_distributed_cpu_safe("gloo")
    for stage in (2, 3):
        engine = _engine(stage, batch=16)  # 8 rows per rank
        x, y = _data(seed=10 + rank, n=8)  # different data on each rank
        losses = [_train_step(engine, x, y) for _ in range(5)]
        params = [p.detach().clone() for group in iter_gathered(list(unwrap(engine).named_parameters()))
                  for _, p in group]
        torch.save({"stats": zero_partition_stats(engine).__dict__, "params": params, "losses": losses},
                   os.path.join(out_dir, f"stage{stage}_rank{rank}.pt"))
    torch.distributed.barrier()  # no rank tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()


def test_two_ranks_partition_state_and_stay_in_sync(tmp_path):
    port = int(local_dist_env()["MASTER_PORT"])
    torch.multiprocessing.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    total = sum(p.numel() for p in _mlp().parameters())
    for stage in (2, 3):
        r0, r1 = (torch.load(tmp_path / f"stage{stage}_rank{r}.pt") for r in (0, 1))
        for a, b in zip(r0["params"], r1["params"], strict=True):
            assert torch.equal(a, b), f"ZeRO-{stage}: parameters differ across ranks"
        assert r0["losses"][-1] < r0["losses"][0]
        for r in (r0, r1):
            s = r["stats"]
            assert s["world_size"] == 2 and s["zero_stage"] == stage and s["param_elements_total"] == total
            # AdamW keeps exp_avg and exp_avg_sq of this rank's half (plus a few elements of padding).
            assert abs(s["master_param_elements"] - total / 2) <= 8
            assert abs(s["optimizer_state_elements"] - total) <= 16
            if stage == 3:
                assert abs(s["param_elements"] - total / 2) <= 8
            else:
                assert s["param_elements"] == total
