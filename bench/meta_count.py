"""Counting on the meta device for bench/flops.py and bench/memory_accounting.py: FLOPs by phase and kind, live
tensor bytes, and the replay of repeated calls.

* ``flash_sdpa``: SDPA falls back to its math decomposition on meta (two bmm, the L x L scores materialised). A GPU
  runs flash attention for the model's unmasked bf16 calls (README Performance), so unmasked meta calls are routed
  to aten._scaled_dot_product_flash_attention: the same forward FLOPs, the backward counted as flash does it (the
  scores recomputed: 2.5x the forward, FlopCounterMode's formula) and the bytes flash keeps (output + logsumexp).
* ``PhaseFlopCounter``: torch.utils.flop_counter.FlopCounterMode, its counts also kept per (phase, mode, kind).
* ``LiveBytes``: bytes of the storages created inside it that are still alive, and their peak.
* ``Traffic``: bytes every op reads and writes, by op class (eager PyTorch's device-memory traffic, unfused).
* ``Meter`` / ``MemoForward``: a meta forward of the 1.3B model still takes ~1 s (meta elementwise kernels run in
  Python), so a no-grad cached forward whose shapes were counted before is replayed: its FLOPs, its transient peak
  bytes, the cache commit and outputs of the right shapes.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections import Counter
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from model.wan import CausalWanModel, LayerState

# ----------------------------------------------------------------------------------------------
# attention on meta
# ----------------------------------------------------------------------------------------------

_SDPA = F.scaled_dot_product_attention


def _flash_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if q.device.type == "meta" and attn_mask is None and not is_causal and dropout_p == 0.0 and not enable_gqa:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


@contextlib.contextmanager
def flash_sdpa():
    """Unmasked meta SDPA calls run as flash attention (module docstring); masked ones keep the math path."""
    F.scaled_dot_product_attention = _flash_like  # model/wan.py and nn.MultiheadAttention look it up per call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------

LINEAR_OPS = {"aten.mm", "aten.addmm", "aten.convolution", "aten._convolution", "aten.convolution_backward"}
_SDPA_OPS = ("aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
             "aten._scaled_dot_product_cudnn_attention")
ATTENTION_FWD = set(_SDPA_OPS)
ATTENTION_BWD = {f"{name}_backward" for name in _SDPA_OPS}


class _NoModuleTracker:
    """FlopCounterMode's per-module attribution is not needed, and its hooks trip over views made under no_grad
    (slot_attention.SlotInitializer's expand: 'Expected gradient function to be set')."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class PhaseFlopCounter(FlopCounterMode):
    """FlopCounterMode whose counts are also kept per (phase, mode, kind).

    phase: the '/'-joined stack of ``phase(name)`` blocks; mode: fwd (no grad), fwd_grad or bwd (inside an
    autograd backward); kind: linear (mm/addmm/conv), self_attn, cross_attn (an SDPA call whose keys are the
    text_len text tokens) or other (e.g. the einsums of slot attention and relevance scoring).
    """

    def __init__(self, text_len: int):
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracker()
        self.text_len = text_len
        self.flops: Counter = Counter()
        self._phases: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        self._phases.append(name)
        try:
            yield
        finally:
            self._phases.pop()

    @property
    def current(self) -> str:
        return "/".join(self._phases) or "other"

    def _kind(self, name: str, args) -> str:
        if name in LINEAR_OPS:
            return "linear"
        if name in ATTENTION_FWD or name in ATTENTION_BWD:
            key = args[2] if name in ATTENTION_BWD else args[1]  # backward: (grad_out, q, k, v, ...)
            return "cross_attn" if key.shape[-2] == self.text_len else "self_attn"
        return "other"

    @staticmethod
    def _mode() -> str:
        if torch._C._current_graph_task_id() >= 0:
            return "bwd"
        return "fwd_grad" if torch.is_grad_enabled() else "fwd"

    def _count_flops(self, func_packet, out, args, kwargs):
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            n = formula(*args, **kwargs, out_val=out)
            self.flops[(self.current, self._mode(), self._kind(str(func_packet), args))] += n
        return super()._count_flops(func_packet, out, args, kwargs)

    def add(self, by_mode_kind: Counter) -> None:
        """Replayed FLOPs {(mode, kind): n} under the current phase."""
        for (mode, kind), n in by_mode_kind.items():
            self.flops[(self.current, mode, kind)] += n

    def take(self) -> Counter:
        out, self.flops = self.flops, Counter()
        return out


def select(flops: Counter, phase: str | None = None, mode: str | None = None, kind: str | None = None) -> int:
    """Sum of the counts whose phase path contains `phase` (a component), and whose mode / kind match."""
    return sum(n for (p, m, k), n in flops.items()
               if (phase is None or phase in p.split("/")) and (mode is None or m == mode)
               and (kind is None or k == kind))


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode that are still alive, and their peak.

    Storages are tracked through weak references (freed = the storage object is gone); tensors made outside the
    mode (parameters, inputs) are not counted. No allocator rounding or fragmentation: a lower bound of what a
    CUDA caching allocator would hold.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int, _ref) -> None:
        if self._alive.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive[key] = weakref.ref(storage, functools.partial(self._free, key, nbytes))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def bump(self, transient: int) -> None:
        """A replayed call's transient peak on top of what is alive now."""
        self.peak = max(self.peak, self.current + transient)

    @contextlib.contextmanager
    def window(self):
        """Yields a record whose .peak becomes the transient peak above the bytes alive at entry."""
        saved, start = self.peak, self.current
        self.peak = start
        record = SimpleNamespace(peak=0)
        try:
            yield record
        finally:
            record.peak = self.peak - start
            self.peak = max(saved, self.peak)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a view or in-place result of an input (a weight's transpose, say) allocates nothing
        inputs = set()
        tree_map_only(torch.Tensor, lambda t: inputs.add(t.untyped_storage()._cdata), (args, kwargs))
        tree_map_only(torch.Tensor, lambda t: None if t.untyped_storage()._cdata in inputs else self._track(t), out)
        return out


class Traffic(TorchDispatchMode):
    """Bytes each op reads and writes (its tensor inputs + outputs), by class: what eager PyTorch moves through
    device memory when nothing is fused and no cache is reused (an upper bound; views move nothing)."""

    VIEWS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.unsqueeze", "aten.squeeze",
             "aten.expand", "aten.slice", "aten.select", "aten.permute", "aten.alias", "aten.unbind", "aten.split",
             "aten.split_with_sizes", "aten.detach", "aten.as_strided", "aten.unflatten", "aten.flatten"}
    COPIES = {"aten.cat", "aten.stack", "aten.copy_", "aten.clone", "aten._to_copy"}

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()

    def _class(self, name: str) -> str | None:
        if name in self.VIEWS:
            return None
        if name in LINEAR_OPS or name in ATTENTION_FWD or name in ATTENTION_BWD or name == "aten.bmm":
            return "matmul/attention"
        return "copies/casts/cat" if name in self.COPIES else "elementwise/norms"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = self._class(str(func.overloadpacket))
        if kind is not None:
            tensors = []
            tree_map_only(torch.Tensor, tensors.append, (args, kwargs, out))
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
        return out


# ----------------------------------------------------------------------------------------------
# one run's meters, and replaying repeated calls
# ----------------------------------------------------------------------------------------------


class Meter:
    """The FLOP counter and the byte tracker of one run (either may be None) and the replay memo they share.

    ``replay(key, run, fake)``: the first call with a key runs (and records the FLOPs and the transient peak
    bytes it took); later calls with the key add those FLOPs, bump the tracker's peak by that transient and return
    ``fake()``, outputs of the same shapes. Only for calls whose FLOPs and bytes depend on shapes alone.
    """

    def __init__(self, counter: PhaseFlopCounter | None = None, tracker: LiveBytes | None = None):
        self.counter, self.tracker = counter, tracker
        self.seen: dict[tuple, tuple[Counter, int]] = {}
        self.calls = Counter()

    def phase(self, name: str):
        return self.counter.phase(name) if self.counter is not None else contextlib.nullcontext()

    def _flops(self) -> Counter:
        return Counter() if self.counter is None else Counter(self.counter.flops)

    def replay(self, key: tuple, run, fake):
        if key in self.seen:
            self.calls["replayed"] += 1
            flops, peak = self.seen[key]
            if self.counter is not None:
                self.counter.add(flops)
            if self.tracker is not None:
                self.tracker.bump(peak)
            return fake()
        self.calls["run"] += 1
        before = self._flops()
        window = self.tracker.window() if self.tracker is not None else contextlib.nullcontext(SimpleNamespace())
        with window as record:
            out = run()
        by_mode_kind = Counter()
        for (_, mode, kind), n in (self._flops() - before).items():
            by_mode_kind[(mode, kind)] += n
        self.seen[key] = (by_mode_kind, getattr(record, "peak", 0))
        return out


class MemoForward:
    """Stands in for model.forward while entered: no-grad cached calls go through ``Meter.replay`` keyed by their
    shapes (chunk, visible cache, memory tokens, commit, states); grad and bidirectional calls always run."""

    def __init__(self, model: CausalWanModel, meter: Meter):
        self.model, self.meter = model, meter

    def __enter__(self):
        self.real = self.model.forward
        self.model.forward = self  # nn.Module.__call__ finds the instance attribute first
        return self

    def __exit__(self, *exc):
        del self.model.forward

    def __call__(self, x, t, text, **kw):
        if kw.get("cache") is None or torch.is_grad_enabled():
            self.meter.calls["run"] += 1
            return self.real(x, t, text, **kw)
        sink_k, _, local_k, _ = kw["cache"][0].window(x.shape[1])
        memory = kw.get("memory_kv") or []
        key = ("forward", id(self.model), tuple(x.shape), x.dtype, sink_k.shape[1], local_k.shape[1],
               tuple(0 if m is None else m[0].shape[1] for m in memory), bool(kw.get("commit")),
               bool(kw.get("return_states")))
        return self.meter.replay(key, lambda: self.real(x, t, text, **kw), lambda: self._fake(x, kw))

    def _fake(self, x, kw):
        cfg, dtype = self.model.cfg, self.model.dtype
        _, ph, pw = cfg.patch_size
        B, frames = x.shape[:2]
        L = frames * (x.shape[3] // ph) * (x.shape[4] // pw)

        def kv():
            return torch.empty(B, L, cfg.num_heads, cfg.head_dim, dtype=dtype, device=x.device)

        states = [LayerState(x=torch.empty(B, L, cfg.dim, dtype=dtype, device=x.device), k=kv(), v=kv())
                  for _ in range(cfg.num_layers)]
        if kw.get("commit"):
            for cache, state in zip(kw["cache"], states):
                cache.commit(state.k, state.v, kw.get("start_frame", 0))
        flow = torch.empty_like(x)
        return (flow, states) if kw.get("return_states") else flow
