"""Per-layer self-attention KV cache: a frame sink plus a rolling local window (LongLive layout).

A chunk of F frames starting at absolute frame s attends to (anchors-video §2.3, DESIGN §2):
  * the sink: frames [0, sink_size), never evicted;
  * the most recent min(local_attn_size - sink_size - F, capacity) committed frames after the sink;
  * its own F frames (passed in by the caller, not stored here).
That is local_attn_size frames in all, sink included. Capacity of the rolling part is
local_attn_size - sink_size - num_frame_per_block frames, which is all a chunk ever reads.

Keys are stored after RoPE (absolute frame phase), values as projected. Only ``commit`` writes:
it is called by the clean re-run of a finished chunk; noisy denoising steps read the cache and
attend to their own K/V transiently, never changing it. Stored tensors are detached: no gradient
flows across chunks through the cache (Self-Forcing).

Committed frames are always the sink [0, sink_frames) plus the contiguous run
[end_frame - local_frames, end_frame). A commit must start at end_frame, except right after
``drop_local`` (local window empty, sink full), when it may start later: the prompt-switch recache
re-commits the recent clean frames under the new prompt chunk by chunk. The gap is allowed for
the first commit after drop_local() only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slotmem.errors import InputError


class LayerKVCache:
    def __init__(self, *, batch_size: int, num_heads: int, head_dim: int, tokens_per_frame: int,
                 sink_size: int, local_attn_size: int, num_frame_per_block: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if local_attn_size < sink_size + num_frame_per_block:
            raise InputError(f"model.local_attn_size ({local_attn_size}) must hold the sink ({sink_size}) "
                             f"plus one chunk ({num_frame_per_block})")
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.sink_size = sink_size
        self.local_attn_size = local_attn_size
        self.capacity = local_attn_size - sink_size - num_frame_per_block  # rolling frames kept
        T = tokens_per_frame
        # buffers: [B, frames * tokens_per_frame, H, D], frames in chronological order
        self.sink_k = torch.zeros(batch_size, sink_size * T, num_heads, head_dim, dtype=dtype, device=device)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.local_k = torch.zeros(batch_size, self.capacity * T, num_heads, head_dim, dtype=dtype, device=device)
        self.local_v = torch.zeros_like(self.local_k)
        self.sink_frames = 0
        self.local_frames = 0
        self.end_frame = 0
        self._gap_allowed = False  # set by drop_local() for the recache's first commit

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def local_start(self) -> int:
        """First absolute frame of the rolling window."""
        return self.end_frame - self.local_frames

    def committed_frames(self) -> list[int]:
        """Absolute indices of the frames held (sink, then rolling window)."""
        return list(range(self.sink_frames)) + list(range(self.local_start, self.end_frame))

    def reset(self) -> None:
        """Forget everything (new video)."""
        self.sink_frames = self.local_frames = self.end_frame = 0
        self._gap_allowed = False

    def drop_local(self) -> None:
        """Keep the sink, drop the rolling frames (prompt-switch recache re-commits them)."""
        self.local_frames = 0
        self.end_frame = self.sink_frames
        self._gap_allowed = True

    # -- reads ------------------------------------------------------------------------------

    def check_call(self, start_frame: int, num_frames: int, *, commit: bool) -> None:
        """Raise InputError unless a call over [start_frame, start_frame + num_frames) fits."""
        if num_frames > self.local_attn_size - self.sink_size:
            raise InputError(f"a cached call takes at most model.local_attn_size - model.sink_size = "
                             f"{self.local_attn_size - self.sink_size} frames, got {num_frames}")
        if start_frame < self.end_frame:
            raise InputError(f"frames [{start_frame}, {start_frame + num_frames}) overlap the committed frames "
                             f"(cache ends at frame {self.end_frame}); reset() the cache to start over")
        if commit and start_frame != self.end_frame:
            if not (self._gap_allowed and self.sink_frames == self.sink_size):
                raise InputError(f"commit of frames starting at {start_frame} must continue the committed "
                                 f"frames at {self.end_frame} (a gap is allowed only after drop_local())")

    def window(self, num_frames: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(sink_k, sink_v, local_k, local_v) attended by a call of num_frames frames (views)."""
        T = self.tokens_per_frame
        recent = min(self.local_frames, max(0, self.local_attn_size - self.sink_size - num_frames))
        lo, hi = (self.local_frames - recent) * T, self.local_frames * T
        sink = self.sink_frames * T
        return self.sink_k[:, :sink], self.sink_v[:, :sink], self.local_k[:, lo:hi], self.local_v[:, lo:hi]

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Copies of the committed K/V of frames [start, stop): [B, n*T, H, D] each, bit-identical."""
        held = set(self.committed_frames())
        if stop <= start or any(f not in held for f in range(start, stop)):
            raise InputError(f"frames [{start}, {stop}) are not all in the cache "
                             f"(held: sink [0, {self.sink_frames}), window [{self.local_start}, {self.end_frame}))")
        T = self.tokens_per_frame
        ks, vs = [], []
        if start < self.sink_frames:
            hi = min(stop, self.sink_frames)
            ks.append(self.sink_k[:, start * T:hi * T])
            vs.append(self.sink_v[:, start * T:hi * T])
        if stop > self.local_start and self.local_frames:
            lo, hi = max(start, self.local_start) - self.local_start, stop - self.local_start
            ks.append(self.local_k[:, lo * T:hi * T])
            vs.append(self.local_v[:, lo * T:hi * T])
        return torch.cat(ks, dim=1).clone(), torch.cat(vs, dim=1).clone()

    # -- the one write ----------------------------------------------------------------------

    def commit(self, k: Tensor, v: Tensor, start_frame: int) -> None:
        """Store a chunk's post-RoPE keys and values [B, F*T, H, D]; evict the oldest rolling frames."""
        T = self.tokens_per_frame
        if k.shape != v.shape or k.shape[0] != self.batch_size or k.shape[1] % T or k.shape[2:] != self.sink_k.shape[2:]:
            raise InputError(f"commit expects K/V [B={self.batch_size}, F*{T}, {self.sink_k.shape[2]}, "
                             f"{self.sink_k.shape[3]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        num_frames = k.shape[1] // T
        self.check_call(start_frame, num_frames, commit=True)
        k, v = k.detach(), v.detach()
        self._gap_allowed = False
        self.end_frame = start_frame  # differs from end_frame only for the recache gap after drop_local()

        # frames below sink_size fill the sink (only while it is filling, so start == sink_frames)
        to_sink = max(0, min(num_frames, self.sink_size - start_frame))
        if to_sink:
            lo = self.sink_frames * T
            self.sink_k[:, lo:lo + to_sink * T] = k[:, :to_sink * T]
            self.sink_v[:, lo:lo + to_sink * T] = v[:, :to_sink * T]
            self.sink_frames += to_sink
        rest = num_frames - to_sink
        if rest:
            kept = min(self.local_frames + rest, self.capacity)
            for buf, new in ((self.local_k, k), (self.local_v, v)):
                # chronological [old window, new frames], keep the last `kept` frames
                joined = torch.cat([buf[:, :self.local_frames * T], new[:, to_sink * T:]], dim=1)
                buf[:, :kept * T] = joined[:, joined.shape[1] - kept * T:]
            self.local_frames = kept
        self.end_frame = start_frame + num_frames
