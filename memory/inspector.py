"""Memory inspector: a JSON-serialisable per-chunk record of the bank and a picture of slot assignments.

Records are plain dicts of ints, floats, strings and lists, so rollout can write them next to a
trajectory and MLflow can log them as a JSON artifact. A record describes one event of one chunk:

  {"event": "write",  "chunk": c, "prompt_index": p, "recorded": bool,
   "retrieved": [ids read before this chunk], "added": [ids], "evicted": [ids],
   "items": [{"id", "chunk", "age", "score", ...kind-specific fields}, ...]}
  {"event": "prompt", "chunk": c, "prompt_index": p, "items": [...rescored under the new prompt]}

Items describe one layer and batch element (layer 0, element 0 unless the memory says otherwise).
The picture colours every token of a chunk by its argmax slot, frames side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RECORD_VERSION = 1

# Distinct colours (Tableau 20 order); slots beyond 20 reuse them.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


class MemoryInspector:
    """An append-only list of per-chunk records."""

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def add(self, record: dict) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records = []

    def to_json(self) -> str:
        return json.dumps({"version": RECORD_VERSION, "records": self.records})

    @classmethod
    def from_json(cls, text: str) -> "MemoryInspector":
        data = json.loads(text)
        valid = isinstance(data, dict) and data.get("version") == RECORD_VERSION
        if not valid or not isinstance(data.get("records"), list):
            raise ValueError(f"not a memory inspector record (version {RECORD_VERSION} with a 'records' list)")
        return cls(data["records"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    def summary(self) -> dict[str, float]:
        """Scalar metrics over the write records (for MLflow): bank size, item age, retrieved/evicted counts."""
        writes = [r for r in self.records if r.get("event") == "write"]
        if not writes:
            return {}
        ages = [item["age"] for r in writes for item in r["items"]]
        return {
            "memory/items": float(np.mean([len(r["items"]) for r in writes])),
            "memory/item_age": float(np.mean(ages)) if ages else 0.0,
            "memory/retrieved": float(np.mean([len(r["retrieved"]) for r in writes])),
            "memory/evicted": float(sum(len(r["evicted"]) for r in writes)),
        }


def assignment_image(assign: torch.Tensor, *, num_frames: int, height: int, width: int, scale: int = 8) -> np.ndarray:
    """assign (S, L) or argmax labels (L,), L = num_frames*height*width -> RGB (height*scale, frames*width*scale, 3).

    Frames are laid side by side, separated by a one-cell white gap.
    """
    labels = assign.argmax(dim=0) if assign.dim() == 2 else assign
    if labels.numel() != num_frames * height * width:
        raise ValueError(f"assignment has {labels.numel()} tokens, expected num_frames*height*width = "
                         f"{num_frames}*{height}*{width}")
    grid = labels.detach().cpu().numpy().reshape(num_frames, height, width) % len(PALETTE)  # (F, h, w)
    rgb = PALETTE[grid]  # (F, h, w, 3)
    gap = np.full((num_frames, height, 1, 3), 255, dtype=np.uint8)
    strip = np.concatenate([rgb, gap], axis=2).transpose(1, 0, 2, 3).reshape(height, num_frames * (width + 1), 3)
    strip = strip[:, :-1]  # drop the gap after the last frame
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def save_assignment_png(assign: torch.Tensor, path: str | Path, *, num_frames: int, height: int, width: int,
                        scale: int = 8) -> Path:
    """Write the slot-assignment picture of one chunk as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(assignment_image(assign, num_frames=num_frames, height=height, width=width, scale=scale)).save(path)
    return path
