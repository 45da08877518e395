"""The streaming-memory interface shared by SlotMemory and its baselines (DESIGN §3).

The pipeline drives one memory object per trajectory:

    reset(B)
    set_prompt(pooled_text, prompt_index, text_keys)         # and again at every prompt switch
    for each chunk c:
        memory_kv = read(exclude_frames)                      # before denoising chunk c
        ... denoise chunk c, then the clean re-run at context_noise ...
        write(states, chunk_index=c, start_frame=..., num_frames=...)

``states`` is the backbone's per-layer record of the clean re-run: anything with ``.x`` (B, L, dim)
token features entering self-attention and ``.k``/``.v`` (B, L, H, D) post-RoPE keys/values, with
L = num_frames * tokens_per_frame. ``read()`` returns per layer (K, V) of shape (B, M, H, D) that the
backbone places between the sink and the local keys, or None when there is nothing to attend to.

This module holds the argument checks and bookkeeping common to every kind; subclasses implement
``_reset_state``, ``_on_prompt``, ``_read``, ``_write`` and ``inspect``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from memory.inspector import MemoryInspector
from memory.losses import SlotLoss
from slotmem.config import ConfigError, MemoryConfig
from slotmem.errors import InputError

KV = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class LayerStateLike(Protocol):
    """One layer of the clean re-run (the backbone's LayerState satisfies this)."""

    x: torch.Tensor  # (B, L, dim) token features entering self-attention
    k: torch.Tensor  # (B, L, H, D) keys after RoPE, exactly as cached
    v: torch.Tensor  # (B, L, H, D) values


@dataclass(frozen=True)
class ChunkInfo:
    """Metadata eta of a written chunk (paper §3.3)."""

    chunk_index: int
    start_frame: int
    num_frames: int
    prompt_index: int
    recorded: bool  # True on the chunks that go into the bank (every record_interval chunks)


class StreamingMemory(nn.Module):
    """Base class: argument checks, prompt/chunk bookkeeping and the inspector."""

    kind = ""

    def __init__(self, memory_cfg: MemoryConfig, *, num_layers: int, dim: int, num_heads: int, head_dim: int,
                 text_dim: int, tokens_per_frame: int, num_frame_per_block: int):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("dim", dim), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("text_dim", text_dim), ("tokens_per_frame", tokens_per_frame),
                            ("num_frame_per_block", num_frame_per_block)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"build_memory: {name} must be a positive integer, got {value!r}")
        chunk_tokens = num_frame_per_block * tokens_per_frame
        if memory_cfg.tokens_per_slot > chunk_tokens:
            raise ConfigError(f"memory.tokens_per_slot ({memory_cfg.tokens_per_slot}) must be <= the tokens of one "
                              f"chunk (num_frame_per_block * tokens_per_frame = {chunk_tokens})")
        self.cfg = memory_cfg
        self.num_layers = num_layers
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.text_dim = text_dim
        self.tokens_per_frame = tokens_per_frame
        self.num_frame_per_block = num_frame_per_block
        self.inspector = MemoryInspector()
        self.batch_size: int | None = None
        self.last_chunk: int | None = None
        self.prompt_index: int | None = None
        self.pooled_text: torch.Tensor | None = None  # (B, text_dim)
        self.text_keys: list[torch.Tensor] | None = None  # per layer (B, Lt, H, D)
        self._last_retrieved: list[int] = []

    # ------------------------------------------------------------------------------------------
    # public interface
    # ------------------------------------------------------------------------------------------

    def reset(self, batch_size: int) -> None:
        """Start a new trajectory: empty bank, no slot state, no prompt, cleared inspector."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"memory.reset: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.last_chunk = None
        self.prompt_index = None
        self.pooled_text = None
        self.text_keys = None
        self._last_retrieved = []
        self.inspector.clear()
        self._reset_state()

    def set_prompt(self, pooled_text: torch.Tensor, prompt_index: int,
                   text_keys: Sequence[torch.Tensor] | None = None) -> None:
        """Activate a prompt: pooled_text (B, text_dim), text_keys per layer (B, Lt, H, D) or None.

        At a switch this re-scores the bank against the new prompt; nothing is evicted here.
        """
        B = self._require_reset("set_prompt")
        if not isinstance(pooled_text, torch.Tensor) or tuple(pooled_text.shape) != (B, self.text_dim):
            got = tuple(pooled_text.shape) if isinstance(pooled_text, torch.Tensor) else type(pooled_text).__name__
            raise InputError(f"memory.set_prompt: pooled_text must have shape ({B}, {self.text_dim}) "
                             f"(batch, text_dim), got {got}")
        if not isinstance(prompt_index, int) or isinstance(prompt_index, bool) or prompt_index < 0:
            raise InputError(f"memory.set_prompt: prompt_index must be a non-negative integer, got {prompt_index!r}")
        if text_keys is not None:
            text_keys = list(text_keys)
            if len(text_keys) != self.num_layers:
                raise InputError(f"memory.set_prompt: text_keys has {len(text_keys)} layers, "
                                 f"expected {self.num_layers} (num_layers)")
            for i, tk in enumerate(text_keys):
                ok = isinstance(tk, torch.Tensor) and tk.dim() == 4 and tk.shape[0] == B
                if not ok or tuple(tk.shape[2:]) != (self.num_heads, self.head_dim):
                    got = tuple(tk.shape) if isinstance(tk, torch.Tensor) else type(tk).__name__
                    raise InputError(f"memory.set_prompt: text_keys[{i}] must have shape ({B}, Lt, {self.num_heads}, "
                                     f"{self.head_dim}), got {got}")
        self.pooled_text = pooled_text
        self.prompt_index = prompt_index
        self.text_keys = text_keys
        self._leave_inference_mode()
        self._on_prompt()

    def read(self, exclude_frames: Sequence[tuple[int, int]] = ()) -> list[KV] | None:
        """Per-layer (K, V) (B, M, H, D) to insert between sink and local keys, or None.

        exclude_frames: [start, stop) spans of latent frames the call already attends (its sink, recent window and
        own frames); memories that store copies of cached tokens skip items of those frames.
        """
        self._require_reset("read")
        self._leave_inference_mode()
        return self._read(tuple((int(a), int(b)) for a, b in exclude_frames))

    def write(self, states: Sequence[LayerStateLike], *, chunk_index: int, start_frame: int, num_frames: int) -> None:
        """Feed the clean re-run of chunk `chunk_index`; items enter the bank every record_interval chunks."""
        B = self._require_reset("write")
        if self.prompt_index is None:
            raise InputError("memory.write: call set_prompt(...) before the first write")
        for name, value, lo in (("chunk_index", chunk_index, 0), ("start_frame", start_frame, 0),
                                ("num_frames", num_frames, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise InputError(f"memory.write: {name} must be an integer >= {lo}, got {value!r}")
        if self.last_chunk is not None and chunk_index <= self.last_chunk:
            raise InputError(f"memory.write: chunk_index must increase; got {chunk_index} after {self.last_chunk} "
                             f"(write once per committed chunk, not for recache passes)")
        self._check_states(states, B, num_frames * self.tokens_per_frame)
        self._leave_inference_mode()
        info = ChunkInfo(chunk_index=chunk_index, start_frame=start_frame, num_frames=num_frames,
                         prompt_index=self.prompt_index, recorded=chunk_index % self.cfg.record_interval == 0)
        self._write(list(states), info)
        self.last_chunk = chunk_index
        self._last_retrieved = []

    def slot_loss(self, stage: int, *, feature_weight: float = 1.0) -> SlotLoss:
        """The slot objective of `stage` over the writes since the last call (memory/losses.py): Stage 0 warm-up
        (L_con + feature_weight * L_feat), L_slot of eq. 7 in Stages I/II; zero for memories without slots."""
        if stage not in (0, 1, 2):
            raise InputError(f"memory.slot_loss: stage must be 0, 1 or 2, got {stage!r}")
        return self._slot_loss(stage, feature_weight)

    def freeze_slot_grouper(self, flag: bool) -> None:
        """Freeze slot attention, initialiser and dynamics predictor (Stage I); no-op without slots."""

    def restart_slot_chain(self) -> None:
        """The next write's slots start from the learned initialiser, not from the previous chunk's (Stage 0
        trains the grouper on chains that start inside its window); the bank and the cache are kept. No-op
        without slots."""

    def inspect(self) -> dict:
        raise NotImplementedError

    @property
    def next_chunk(self) -> int:
        """The chunk a read() now would serve."""
        return 0 if self.last_chunk is None else self.last_chunk + 1

    # ------------------------------------------------------------------------------------------
    # hooks for subclasses
    # ------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        pass

    def _on_prompt(self) -> None:
        pass

    def _read(self, exclude_frames: tuple[tuple[int, int], ...]) -> list[KV] | None:
        raise NotImplementedError

    def _write(self, states: list[LayerStateLike], info: ChunkInfo) -> None:
        raise NotImplementedError

    def _slot_loss(self, stage: int, feature_weight: float) -> SlotLoss:
        return SlotLoss(torch.zeros(()), {}, {})

    def _state_tensors(self) -> list[str]:
        """Attributes holding tensors (or dicts/lists of them) that persist between calls."""
        return ["pooled_text", "text_keys"]

    def _leave_inference_mode(self) -> None:
        """State built under torch.inference_mode (a rollout or a prefill) may neither enter autograd nor be
        updated in place outside it; outside inference mode, clone such state once into normal tensors."""
        if torch.is_inference_mode_enabled():
            return
        for name in self._state_tensors():
            setattr(self, name, normal_tensors(getattr(self, name)))

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _require_reset(self, method: str) -> int:
        if self.batch_size is None:
            raise InputError(f"memory.{method}: call reset(batch_size) first")
        return self.batch_size

    def _check_states(self, states: Sequence[LayerStateLike], B: int, L: int) -> None:
        if len(states) != self.num_layers:
            raise InputError(f"memory.write: states has {len(states)} layers, expected {self.num_layers} (num_layers)")
        H, D = self.num_heads, self.head_dim
        for i, s in enumerate(states):
            if not isinstance(s, LayerStateLike):
                raise InputError(f"memory.write: states[{i}] must have .x, .k and .v tensors, got {type(s).__name__}")
            if tuple(s.x.shape) != (B, L, self.dim):
                raise InputError(f"memory.write: states[{i}].x must have shape ({B}, {L}, {self.dim}) "
                                 f"(batch, num_frames * tokens_per_frame, dim), got {tuple(s.x.shape)}")
            for name in ("k", "v"):
                t = getattr(s, name)
                if tuple(t.shape) != (B, L, H, D):
                    raise InputError(f"memory.write: states[{i}].{name} must have shape ({B}, {L}, {H}, {D}), "
                                     f"got {tuple(t.shape)}")


def normal_tensors(obj):
    """obj with every inference-mode tensor replaced by a normal clone (tensors, dicts, lists, None)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: normal_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [normal_tensors(v) for v in obj]
    return obj
