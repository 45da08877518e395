"""Checkpoints in the Wan and diffusers layouts: round trips, the key map against diffusers' own
model, and one clear error for every way a checkpoint can be wrong."""

from pathlib import Path

import pytest
import torch
import yaml

from model.wan import CausalWanModel
from model.weights import (build_model, detect_layout, load_checkpoint, load_state_dict_file, read_checkpoint,
                           save_checkpoint, save_state_dict_file, wan_to_diffusers_key)
from slotmem.config import build_section
from slotmem.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(**changes):
    data = yaml.safe_load((REPO / "configs/tiny-random.yaml").read_text())["model"]
    data.update(changes)
    return build_section("model", data)


def fresh(seed, **changes):
    torch.manual_seed(seed)
    return CausalWanModel(tiny_cfg(**changes)).eval()


@pytest.fixture(scope="module")
def source():
    return fresh(0)


@pytest.fixture(scope="module")
def probe(source):
    """Inputs and the source model's output: a loaded model must reproduce it exactly."""
    cfg = source.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=g)
    te = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.no_grad():
        return x, te, source(x, 500.0, source.encode_text(te))


@torch.no_grad()
def assert_same_outputs(model, probe):
    x, te, expected = probe
    assert torch.equal(model(x, 500.0, model.encode_text(te)), expected)


@pytest.mark.parametrize("layout,name,shard", [
    ("wan", "model.safetensors", None),
    ("wan", "wan_dir", None),
    ("diffusers", "diffusers_dir", None),
    ("diffusers", "diffusers_sharded", 20_000),
    ("wan", "wan_sharded", 20_000),
])
def test_round_trip(source, probe, tmp_path, layout, name, shard):
    path = save_checkpoint(source, tmp_path / name, layout=layout, max_shard_bytes=shard)
    if shard:
        assert len(list(path.glob("*-of-*.safetensors"))) > 1 and list(path.glob("*.index.json"))
    target = fresh(seed=7)
    assert load_checkpoint(target, path) == layout
    assert_same_outputs(target, probe)


def test_key_map_covers_diffusers_exactly(source):
    """Our diffusers names are exactly WanTransformer3DModel's state-dict keys, with equal shapes."""
    diffusers = pytest.importorskip("diffusers")
    cfg = source.cfg
    theirs = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps).state_dict()
    ours = {wan_to_diffusers_key(k): v.shape for k, v in source.state_dict().items()}
    assert set(ours) == set(theirs)
    assert all(ours[k] == theirs[k].shape for k in ours)


def test_pth_files_wrappers_and_pipeline_dirs(source, probe, tmp_path):
    state = source.state_dict()
    torch.save({"model." + k: v for k, v in state.items()}, tmp_path / "prefixed.pth")
    torch.save({"state_dict": state, "step": torch.tensor(3)}, tmp_path / "nested.pt")
    save_checkpoint(source, tmp_path / "pipeline" / "transformer", layout="diffusers")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    # the original release keeps the VAE and text encoder beside the transformer
    release = save_checkpoint(source, tmp_path / "release", layout="wan")
    save_state_dict_file({"encoder.conv1.weight": torch.zeros(2)}, release / "Wan2.1_VAE.safetensors")
    for path in (tmp_path / "prefixed.pth", tmp_path / "nested.pt", tmp_path / "pipeline", release):
        target = fresh(seed=8)
        load_checkpoint(target, path)
        assert_same_outputs(target, probe)
    assert detect_layout(read_checkpoint(tmp_path / "pipeline")) == "diffusers"


def test_state_dict_file_helpers(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_state_dict_file(tensors, tmp_path / "sub" / "w.safetensors", metadata={"policy_version": "3"})
    loaded = load_state_dict_file(tmp_path / "sub" / "w.safetensors")
    assert torch.equal(loaded["a"], tensors["a"]) and loaded["b"].dtype == torch.bfloat16
    # group-readable, and nothing but the finished file is left (it was written beside it, then renamed)
    assert (tmp_path / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["w.safetensors"]
    with pytest.raises(InputError, match="must end in .safetensors"):
        save_state_dict_file(tensors, tmp_path / "w.bin")


def edited(source, tmp_path, name, edit):
    state = {k: v.clone() for k, v in source.state_dict().items()}
    edit(state)
    save_state_dict_file(state, tmp_path / name)
    return tmp_path / name


def test_mismatched_checkpoints_give_one_clear_error(source, tmp_path):
    def drop(state):
        del state["blocks.1.cross_attn.norm_k.weight"]
        del state["head.modulation"]

    def extra(state):
        state["blocks.9.self_attn.q.weight"] = torch.zeros(1)

    def reshape(state):
        state["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)

    cases = [
        (drop, r"2 missing keys \(blocks.1.cross_attn.norm_k.weight, head.modulation\)"),
        (extra, r"1 unexpected keys \(blocks.9.self_attn.q.weight\)"),
        (reshape, r"1 shape mismatches \(blocks.0.ffn.0.weight \(3, 3\) vs model \(128, 64\)\)"),
    ]
    for i, (edit, message) in enumerate(cases):
        target = fresh(seed=9)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(InputError, match=message):
            load_checkpoint(target, edited(source, tmp_path, f"bad{i}.safetensors", edit))
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded

    # a diffusers checkpoint reports problems in diffusers names
    path = save_checkpoint(source, tmp_path / "diffusers", layout="diffusers")
    state = load_state_dict_file(path / "diffusion_pytorch_model.safetensors")
    del state["blocks.0.norm2.weight"]  # the cross-attention norm
    save_state_dict_file(state, path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(InputError, match=r"diffusers layout.*1 missing keys \(blocks.0.norm2.weight\)"):
        load_checkpoint(fresh(seed=9), path)

    # a model of another size
    with pytest.raises(InputError, match="shape mismatches"):
        load_checkpoint(fresh(seed=9, ffn_dim=96), edited(source, tmp_path, "ok.safetensors", lambda s: None))


def test_unreadable_paths(tmp_path):
    model = fresh(seed=10)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no weights"):
        load_checkpoint(model, tmp_path / "empty")
    save_state_dict_file({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="cannot tell the checkpoint layout"):
        load_checkpoint(model, tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_checkpoint(model, tmp_path / "junk.safetensors")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(InputError, match="does not hold one state dict"):
        load_checkpoint(model, tmp_path / "list.pth")
    with pytest.raises(InputError, match="layout must be"):
        save_checkpoint(model, tmp_path / "x", layout="comfy")


def test_build_model_loads_model_path_in_the_configured_dtype(source, probe, tmp_path):
    path = save_checkpoint(source, tmp_path / "ckpt", layout="wan")
    loaded = build_model(tiny_cfg(model_path=str(path)))
    assert_same_outputs(loaded, probe)
    half = build_model(tiny_cfg(model_path=str(path), dtype="bfloat16"))
    assert half.dtype == torch.bfloat16
    with pytest.raises(InputError, match="does not exist"):
        build_model(tiny_cfg(model_path=str(tmp_path / "missing")))
