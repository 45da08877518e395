"""Inspector: JSON round trip of real per-chunk records, consistent ids, and the slot-assignment PNG."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from memory import build_memory
from memory.inspector import PALETTE, MemoryInspector, assignment_image, save_assignment_png
from slotmem.config import MemoryConfig


def run_slot_memory(make_states, num_chunks: int = 8):
    cfg = MemoryConfig(slot_dim=8, num_slots_per_chunk=3, tokens_per_slot=2, bank_size=2, record_interval=2,
                       retrieve_top_k=4)
    mem = build_memory(cfg, num_layers=2, dim=16, num_heads=2, head_dim=4, text_dim=6, tokens_per_frame=4,
                       num_frame_per_block=2)
    mem.reset(1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for c in range(num_chunks):
            if c % 4 == 0:
                mem.set_prompt(torch.randn(1, 6, generator=g), c // 4)
            mem.read()
            mem.write(make_states(num_layers=2, batch=1, tokens=8, dim=16, heads=2, head_dim=4, generator=g),
                      chunk_index=c, start_frame=2 * c, num_frames=2)
    return mem


def test_records_round_trip_through_json(make_states, tmp_path):
    mem = run_slot_memory(make_states)
    text = mem.inspector.to_json()
    assert json.loads(text)["records"] == mem.inspector.records
    back = MemoryInspector.from_json(text)
    assert back.records == mem.inspector.records
    path = mem.inspector.save(tmp_path / "memory" / "records.json")
    assert MemoryInspector.from_json(path.read_text()).records == mem.inspector.records
    assert set(mem.inspector.summary()) == {"memory/items", "memory/item_age", "memory/retrieved", "memory/evicted"}
    json.dumps(mem.inspect())


def test_records_describe_the_bank_consistently(make_states):
    mem = run_slot_memory(make_states)
    writes = [r for r in mem.inspector.records if r["event"] == "write"]
    assert [r["chunk"] for r in writes] == list(range(8))
    assert [r["recorded"] for r in writes] == [c % 2 == 0 for c in range(8)]
    assert any(r["event"] == "prompt" for r in mem.inspector.records)  # the switch at chunk 4 re-scored the bank
    previous: set[int] = set()
    for r in writes:
        ids = {item["id"] for item in r["items"]}
        assert len(ids) <= 6  # N_budget = bank_size * num_slots_per_chunk
        assert set(r["added"]) <= ids and not (set(r["evicted"]) & ids)
        assert ids == (previous | set(r["added"])) - set(r["evicted"])
        assert set(r["retrieved"]) <= previous
        assert all(item["age"] == r["chunk"] - item["chunk"] >= 0 for item in r["items"])
        previous = ids
    assert any(r["evicted"] for r in writes)


def test_from_json_rejects_other_documents():
    with pytest.raises(ValueError, match="records"):
        MemoryInspector.from_json(json.dumps({"version": 1}))


def test_assignment_png_colours_each_token_by_its_argmax_slot(tmp_path):
    frames, h, w, scale = 2, 3, 4, 5
    labels = torch.arange(frames * h * w) % 3  # slot of each token
    assign = torch.nn.functional.one_hot(labels, 3).T.float()  # (S, L)
    path = save_assignment_png(assign, tmp_path / "slots.png", num_frames=frames, height=h, width=w, scale=scale)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (h * scale, (frames * (w + 1) - 1) * scale, 3)
    for f in range(frames):
        for i in range(h):
            for j in range(w):
                token = f * h * w + i * w + j
                pixel = img[i * scale, (f * (w + 1) + j) * scale]
                assert tuple(pixel) == tuple(PALETTE[int(labels[token])])
    assert (img[:, w * scale] == 255).all()  # white gap between frames


def test_assignment_image_checks_the_grid():
    with pytest.raises(ValueError, match="tokens"):
        assignment_image(torch.zeros(3, 10), num_frames=2, height=2, width=2)


def test_memory_saves_its_latest_assignment(make_states, tmp_path):
    mem = run_slot_memory(make_states, num_chunks=1)
    path = mem.save_assignment_png(tmp_path / "a.png", height=2, width=2, scale=4)
    assert Image.open(path).size == ((2 * 3 - 1) * 4, 2 * 4)


def test_from_json_rejects_non_objects():
    with pytest.raises(ValueError, match="records"):
        MemoryInspector.from_json("[1, 2]")
