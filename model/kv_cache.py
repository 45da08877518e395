"""Per-layer self-attention KV cache: a frame sink plus a rolling local window (LongLive layout).

A chunk of F frames starting at absolute frame s attends to (anchors-video §2.3, DESIGN §2):
  * the sink: ``sink_size`` frames never evicted (frames [0, sink_size) until a prompt switch rebuilds it);
  * the most recent min(local_attn_size - sink_size - F, capacity) committed frames after the sink;
  * its own F frames (passed in by the caller, not stored here).
That is local_attn_size frames in all, sink included. Capacity of the rolling part is
local_attn_size - sink_size - num_frame_per_block frames, which is all a chunk ever reads.

Keys are stored after RoPE (absolute frame phase), values as projected. Only ``commit`` writes:
it is called by the clean re-run of a finished chunk; noisy denoising steps read the cache and
attend to their own K/V transiently, never changing it. Stored tensors are detached: no gradient
flows across chunks through the cache (Self-Forcing).

Committed frames are always the sink [sink_start, sink_start + sink_frames) plus the contiguous run
[end_frame - local_frames, end_frame). A commit must start at end_frame, except right after a prompt-switch
``drop_local`` (sink kept, LongLive global_sink=true) or ``drop_all`` (the sink is rebuilt from the first
recached frames, global_sink=false): the recache then re-commits the recent clean frames under the new prompt,
in one call of up to local_attn_size frames (LongLive's single recache) or chunk by chunk. While the sink is
not full the first frames of a commit fill it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slotmem.config import ModelConfig
from slotmem.errors import InputError

Span = tuple[int, int]  # [start, stop) of absolute latent frames


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
        self.sink_start = 0
        self.sink_frames = 0
        self.local_frames = 0
        self.end_frame = 0
        self._gap_allowed = False  # set by drop_local() / drop_all() for the recache's first commit

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def local_start(self) -> int:
        """First absolute frame of the rolling window."""
        return self.end_frame - self.local_frames

    @property
    def sink_span(self) -> Span:
        return self.sink_start, self.sink_start + self.sink_frames

    def committed_frames(self) -> list[int]:
        """Absolute indices of the frames held (sink, then rolling window)."""
        return list(range(*self.sink_span)) + list(range(self.local_start, self.end_frame))

    def visible_spans(self, num_frames: int) -> list[Span]:
        """Committed frames a call of num_frames at end_frame attends: the sink and the recent window."""
        recent = self._recent(num_frames)
        return [span for span in (self.sink_span, (self.end_frame - recent, self.end_frame)) if span[1] > span[0]]

    def reset(self) -> None:
        """Forget everything (new video)."""
        self.sink_start = self.sink_frames = self.local_frames = self.end_frame = 0
        self._gap_allowed = False

    def drop_local(self) -> None:
        """Keep the sink, drop the rolling frames (a prompt-switch recache re-commits them)."""
        self.local_frames = 0
        self.end_frame = self.sink_span[1]
        self._gap_allowed = True

    def drop_all(self) -> None:
        """Drop sink and rolling frames: the recache's first frames become the new sink (LongLive global_sink=false)."""
        self.sink_start = self.sink_frames = self.local_frames = self.end_frame = 0
        self._gap_allowed = True

    # -- reads ------------------------------------------------------------------------------

    def max_call_frames(self) -> int:
        """Frames one call may hold: a chunk's worth normally, a whole window for the recache after a drop."""
        return self.local_attn_size if self._gap_allowed else self.local_attn_size - self.sink_size

    def check_call(self, start_frame: int, num_frames: int, *, commit: bool) -> None:
        """Raise InputError unless a call over [start_frame, start_frame + num_frames) fits."""
        if num_frames > self.max_call_frames():
            raise InputError(f"a cached call takes at most {self.max_call_frames()} frames (model.local_attn_size - "
                             f"model.sink_size, or model.local_attn_size for a recache), got {num_frames}")
        if start_frame < self.end_frame:
            raise InputError(f"frames [{start_frame}, {start_frame + num_frames}) overlap the committed frames "
                             f"(cache ends at frame {self.end_frame}); reset() the cache to start over")
        if commit and start_frame != self.end_frame and not self._gap_allowed:
            raise InputError(f"commit of frames starting at {start_frame} must continue the committed "
                             f"frames at {self.end_frame} (a gap is allowed only after drop_local() / drop_all())")

    def _recent(self, num_frames: int) -> int:
        return min(self.local_frames, max(0, self.local_attn_size - self.sink_size - num_frames))

    def window(self, num_frames: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(sink_k, sink_v, local_k, local_v) attended by a call of num_frames frames (views)."""
        T = self.tokens_per_frame
        lo, hi = (self.local_frames - self._recent(num_frames)) * T, self.local_frames * T
        sink = self.sink_frames * T
        return self.sink_k[:, :sink], self.sink_v[:, :sink], self.local_k[:, lo:hi], self.local_v[:, lo:hi]

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Copies of the committed K/V of frames [start, stop): [B, n*T, H, D] each, bit-identical."""
        held = self.committed_frames()
        if stop <= start or any(f not in held for f in range(start, stop)):
            raise InputError(f"frames [{start}, {stop}) are not all in the cache (held: sink {list(self.sink_span)}, "
                             f"window [{self.local_start}, {self.end_frame}))")
        T = self.tokens_per_frame
        ks, vs = [], []
        for f in range(start, stop):  # frame by frame: the two buffers are not contiguous in time
            if self.sink_span[0] <= f < self.sink_span[1]:
                i, k_buf, v_buf = f - self.sink_start, self.sink_k, self.sink_v
            else:
                i, k_buf, v_buf = f - self.local_start, self.local_k, self.local_v
            ks.append(k_buf[:, i * T:(i + 1) * T])
            vs.append(v_buf[:, i * T:(i + 1) * T])
        return torch.cat(ks, dim=1).clone(), torch.cat(vs, dim=1).clone()

    # -- the one write ----------------------------------------------------------------------

    def commit(self, k: Tensor, v: Tensor, start_frame: int) -> None:
        """Store a call's post-RoPE keys and values [B, F*T, H, D]; evict the oldest rolling frames."""
        T = self.tokens_per_frame
        if k.shape != v.shape or k.shape[0] != self.batch_size or k.shape[1] % T or k.shape[2:] != self.sink_k.shape[2:]:
            raise InputError(f"commit expects K/V [B={self.batch_size}, F*{T}, {self.sink_k.shape[2]}, "
                             f"{self.sink_k.shape[3]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        num_frames = k.shape[1] // T
        self.check_call(start_frame, num_frames, commit=True)
        k, v = k.detach(), v.detach()
        self._gap_allowed = False
        if self.sink_frames == 0:
            self.sink_start = start_frame
        self.end_frame = start_frame  # differs from end_frame only for the recache gap after a drop

        # the first frames fill the sink while it is not full (the first chunk, or a rebuilt sink)
        to_sink = min(num_frames, self.sink_size - self.sink_frames)
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


def block_causal_mask(model_cfg: ModelConfig, start_frame: int, num_frames: int, tokens_per_frame: int,
                      device: torch.device | str = "cpu") -> Tensor:
    """[L, L] bool mask of the teacher-forced causal forward, equal to what the KV cache attends.

    Query frame i in chunk b (chunks are aligned to absolute multiples of num_frame_per_block) sees
    key frame j iff j < end(b) and (j < sink_size or j >= end(b) - (local_attn_size - sink_size)).
    """
    frames = torch.arange(start_frame, start_frame + num_frames, device=device)
    nfb = model_cfg.num_frame_per_block
    end = ((frames // nfb + 1) * nfb).clamp(max=start_frame + num_frames)[:, None]  # [F, 1]
    key = frames[None, :]  # [1, F]
    recent = model_cfg.local_attn_size - model_cfg.sink_size
    visible = (key < end) & ((key < model_cfg.sink_size) | (key >= end - recent))  # [F, F]
    return visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
