"""Per-GPU bytes of a rollout actor and of a trainer rank under ZeRO 1/2/3, and which configurations fit a GPU.

    python bench/memory_accounting.py [--config configs/wan2.1-1.3b.yaml] [--set section.field=value ...]
        [--ranks 8,64] [--kinds none,frame_bank,slot] [--checkpointing both|on|off] [--reuse EARLIER.json]
        [--out bench/results/memory_accounting.json]

The activation peaks run the real control flow at full depth (a block's output state is alive while the next block
runs, so peaks are not affine in the depth and cannot be extrapolated like bench/flops.py's FLOPs): 30 minutes
on 2 shared CPU cores at 1.3B. --reuse takes the rollout rows (with --kinds '') and the activation peaks of the settings this
run does not measure (--checkpointing) from an earlier run's JSON, and says so in the output.

Counted, not measured on a GPU. Parameters are sum(p.numel()) of models built on the meta device: the generator
(rollout/components.Generator), the critic, the Wan2.1-T2V-14B teacher (bench/meta_stream.py teacher_config), the
umT5-XXL text encoder (transformers UMT5EncoderModel with Wan's umt5_xxl sizes) and the Wan VAE (diffusers
AutoencoderKLWan defaults), LoRA adapters injected by trainer/lora.py. Runtime tensors (KV cache, bank, text
cache, activations) are the live bytes of meta tensors while bench/meta_stream.py runs the real control flow
(bench/meta_stream.py LiveBytes: no allocator rounding or fragmentation, so lower bounds).

Assumptions, each a line of the output too:
* rollout actor: generator + memory and the text encoder in bf16 on its GPU (rollout/components.build_components);
  the VAE is not loaded (actors store latents); batch 1.
* trainer rank (DeepSpeed bf16, grad_accum_dtype = bf16, so ZeRO-1/2 use DeepSpeedZeroOptimizer): per trained
  model 2 B/param bf16 compute copy, 2 B per trainable param bf16 gradients, 12 B per trainable param fp32 master
  + AdamW exp_avg + exp_avg_sq (torch AdamW allocates exp_avg even at beta1 = 0). ZeRO-1 partitions the 12 B,
  ZeRO-2 also the gradients, ZeRO-3 also the compute copy (ZeRO paper, Rajbhandari et al. 2020, 2+2+12 bytes).
  The frozen teacher is bf16, replicated under ZeRO-1/2 and partitioned under ZeRO-3 (trainer/engines.py); the VAE
  is fp32 and replicated (trainer/worker.py builds it for the first-frame re-encode). EMA: fp32 shadow of the
  trainable generator parameters on the host (trainer/ema.py, device cpu): host RAM, no GPU bytes.
* DeepSpeed buffers: the reduce bucket (reduce_bucket_size 5e8 elements, bf16) per trained engine, capped at its
  trainable parameters; under ZeRO-3 also gathered parameters up to stage3_max_live_parameters (1e9 elements).
* activations: the peak live bytes of one generator update and one critic update (trainer/window.py prefill + roll
  of the window with grad at the exit step, scores on the 21-frame clip, backward; gradients freed as they are
  accumulated, since the ZeRO terms above count them), with and without gradient checkpointing of the blocks
  (model.gradient_checkpointing, trainer.gradient_checkpointing). A checkpointed block of the streaming roll keeps
  a copy of the cache window its forward attended, for its recompute (model/wan.py): every rolled chunk's copies
  (the whole KV cache) stay alive until the backward, and are in the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from flops import mean_window_start, training_models  # noqa: E402
from meta_count import LiveBytes, MemoForward, Meter, flash_sdpa  # noqa: E402
from meta_stream import (META, critic_update, generator_update, meta_generator, stand_in_memory,  # noqa: E402
                         stream_video)
from slotmem.config import load_config  # noqa: E402

GIB = 1 << 30
# Usable memory as nvidia-smi reports it: H100 SXM 80 GB 81,559 MiB; H200 143,771 MiB (/work/.library/device/KINDS.md).
GPUS = {"H100 80GB": 81_559 * (1 << 20), "H200 141GB": 143_771 * (1 << 20)}
# DeepSpeed 0.19 zero config defaults (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
BF16, FP32 = 2, 4
ADAM_STATE = 3 * FP32  # fp32 master + exp_avg + exp_avg_sq
# Wan's umt5_xxl (wan/modules/t5.py): dim 4096, ffn 10240, 64 heads x 64, 24 layers, 32 buckets, vocab 256,384.
UMT5_XXL = dict(vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10_240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")


def numel(module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


# ----------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------


def text_encoder_params() -> int:
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device(META):
        return numel(UMT5EncoderModel(UMT5Config(**UMT5_XXL)))


def vae_params() -> int:
    from diffusers import AutoencoderKLWan

    with torch.device(META):
        return numel(AutoencoderKLWan())  # its defaults are the Wan2.1 VAE (base_dim 96, z_dim 16)


def trained_params(cfg, kind: str, backbone: str) -> dict[str, int]:
    """All and trainable parameters of the generator and critic for trainer.backbone `backbone` (Stages I/II: the
    Stage 0 feature decoder is frozen), and the teacher's."""
    gen, critic, teacher = training_models(cfg, kind, backbone)
    decoder = getattr(gen.memory, "decoder", None)
    if decoder is not None:
        decoder.requires_grad_(False)
    return {"generator": numel(gen), "generator_trainable": numel(gen, True), "critic": numel(critic),
            "critic_trainable": numel(critic, True), "teacher": numel(teacher),
            "memory_modules": numel(gen.memory), "adapter": numel(gen.backbone, True) if backbone == "lora" else 0,
            "largest_teacher_block": numel(teacher.blocks[0])}


# ----------------------------------------------------------------------------------------------
# rollout actor
# ----------------------------------------------------------------------------------------------


def rollout_bytes(cfg, kind: str) -> dict[str, int]:
    """One actor streaming 60 latent frames (the bank at budget from chunk 15, a switch at frame 48): persistent
    state after the video and the transient peak of a late chunk and of the switch chunk."""
    gen = meta_generator(cfg.model, cfg.memory, kind)
    tracker = LiveBytes()
    meter = Meter(tracker=tracker)
    memory = stand_in_memory(gen, cfg.memory, cfg.model, meter)
    chunk = cfg.model.num_frame_per_block
    frames, switch = 20 * chunk, 16 * chunk
    with flash_sdpa(), tracker, MemoForward(gen.backbone, meter):
        run = stream_video(gen.backbone, memory, cfg.model, num_frames=frames, switch_frames=[switch], meter=meter)
        text = LiveBytes()
        with text, torch.no_grad():
            ctx = gen.backbone.encode_text(run.state.prompts.embeddings[:1])
            gen.backbone.text_keys(ctx)
    cache = nbytes(t for layer in run.state.cache for t in (layer.sink_k, layer.sink_v, layer.local_k, layer.local_v))
    bank = nbytes(memory.state_tensors())
    out_240 = run.out.untyped_storage().nbytes() * cfg.rollout.num_frames // frames
    late_alive, late_peak = run.peaks[-1]
    switch_alive, switch_peak = run.peaks[switch // chunk]
    return {"weights": BF16 * numel(gen), "text_encoder": BF16 * text_encoder_params(), "kv_cache": cache,
            "bank": bank, "text_cache": text.current, "latents_buffer": out_240,
            "activations_chunk": late_peak - late_alive, "activations_switch": switch_peak - switch_alive}


# ----------------------------------------------------------------------------------------------
# trainer rank
# ----------------------------------------------------------------------------------------------


def _free_grads_on_accumulate(*modules) -> None:
    """ZeRO's terms count the gradients; here a parameter's gradient is dropped as soon as it is accumulated."""
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))


def training_activation_bytes(cfg, kind: str, backbone: str, checkpointing: bool) -> dict[str, int]:
    """Peak live bytes of one generator update and one critic update at the mean window start."""
    gen, critic, teacher = training_models(cfg, kind, backbone)
    _free_grads_on_accumulate(gen, critic)
    gen.backbone.gradient_checkpointing = critic.gradient_checkpointing = checkpointing
    out = {}
    for name in ("generator", "critic"):
        tracker = LiveBytes()
        meter = Meter(tracker=tracker)
        memory = stand_in_memory(gen, cfg.memory, cfg.model, meter)
        kw = dict(start=mean_window_start(cfg), window_frames=cfg.trainer.window_frames, switch_start=None,
                  exit_step=len(cfg.model.denoising_steps) - 1, meter=meter)
        with flash_sdpa(), tracker, MemoForward(gen.backbone, meter):
            if name == "generator":
                generator_update(gen.backbone, memory, teacher, critic, cfg.model, **kw)
            else:
                critic_update(gen.backbone, memory, critic, cfg.model, **kw)
        out[name] = tracker.peak
    return out


def trainer_bytes(params: dict[str, int], vae: int, zero: int, ranks: int, activations: int) -> dict[str, float]:
    """Bytes per rank (module docstring); activations = the measured peak of the update."""
    out = {}
    for name in ("generator", "critic"):
        total, trainable = params[name], params[f"{name}_trainable"]
        out[f"{name} bf16 weights"] = BF16 * total / (ranks if zero == 3 else 1)
        out[f"{name} bf16 grads"] = BF16 * trainable / (ranks if zero >= 2 else 1)
        out[f"{name} fp32 master + AdamW"] = ADAM_STATE * trainable / ranks
        out[f"{name} reduce bucket"] = BF16 * min(REDUCE_BUCKET_ELEMENTS, trainable)
    out["teacher bf16"] = BF16 * params["teacher"] / (ranks if zero == 3 else 1)
    if zero == 3:  # a module's parameters are gathered while it runs: the teacher blocks at the activation peak
        out["zero-3 gathered params"] = BF16 * min(STAGE3_MAX_LIVE_PARAMETERS, 2 * params["largest_teacher_block"])
    out["vae fp32"] = FP32 * vae
    out["activations + stream state"] = activations
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _g(b: float) -> str:
    return f"{b / GIB:.2f}"


def fits(total: float) -> str:
    return " ".join(f"{name}:{'yes' if total <= cap else 'no'}" for name, cap in GPUS.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "wan2.1-1.3b.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--ranks", default="8,64")
    p.add_argument("--kinds", default="none,frame_bank,slot")
    p.add_argument("--train-kind", default="slot")
    p.add_argument("--backbones", default="full,lora")
    p.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                   help="which gradient-checkpointing settings to measure the activation peaks for")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="an earlier run's output: rollout rows and activation peaks this run does not measure")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_accounting.json"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    if not args.kinds and not earlier:
        p.error("--kinds '' needs --reuse (the rollout rows come from it)")
    measure = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    result = {"config": args.config, "overrides": args.overrides, "gpus": GPUS, "reused_from": args.reuse,
              "reused": []}

    print(f"rollout actor, {cfg.model.name}, bf16, batch 1 (GiB)")
    kinds = [k for k in args.kinds.split(",") if k]
    rollout = {kind: rollout_bytes(cfg, kind) for kind in kinds}
    if not kinds:
        rollout = {kind: {k: v for k, v in r.items() if k != "total"} for kind, r in earlier["rollout"].items()}
        result["reused"].append("rollout")
        print(f"  (reused from {args.reuse})")
    cols = list(next(iter(rollout.values())))
    print(f"{'memory':<12}" + "".join(f"{c:>20}" for c in cols) + f"{'total':>10}")
    for kind, r in rollout.items():
        peak = sum(v for k, v in r.items() if not k.startswith("activations")) + max(
            r["activations_chunk"], r["activations_switch"])
        r["total"] = peak
        print(f"{kind:<12}" + "".join(f"{_g(r[c]):>20}" for c in cols) + f"{_g(peak):>10}  {fits(peak)}")
    result["rollout"] = rollout
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    vae = vae_params()
    result["params"], result["activations"], result["trainer"] = {}, {}, {}
    for backbone in args.backbones.split(","):
        params = trained_params(cfg, args.train_kind, backbone)
        result["params"][backbone] = {**params, "vae": vae, "text_encoder": text_encoder_params()}
        acts = {}
        for ckpt in (False, True):
            if ckpt in measure:
                acts[ckpt] = training_activation_bytes(cfg, args.train_kind, backbone, ckpt)
            elif str(ckpt) in earlier.get("activations", {}).get(backbone, {}):
                acts[ckpt] = earlier["activations"][backbone][str(ckpt)]
                result["reused"].append(f"activations {backbone} checkpointing {ckpt}")
        result["activations"][backbone] = {str(k): v for k, v in acts.items()}
        print(f"\ntrainer rank, backbone {backbone}: parameters {params} (VAE {vae})")
        print("  activation peaks (GiB): " + ", ".join(
            f"{name} update{' +ckpt' if ckpt else ''} {_g(v)}{'' if ckpt in measure else ' (reused)'}"
            for ckpt, a in acts.items() for name, v in a.items()))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"{'ranks':>6}{'ZeRO':>6}{'ckpt':>6}{'gen w/g/opt':>22}{'critic w/g/opt':>22}{'teacher':>9}"
              f"{'acts':>8}{'total':>8}  fits")
        for ranks in (int(r) for r in args.ranks.split(",")):
            for zero in (1, 2, 3):
                for ckpt, a in acts.items():
                    b = trainer_bytes(params, vae, zero, ranks, max(a.values()))
                    result["trainer"][f"{backbone}/{ranks}/zero{zero}/ckpt{int(ckpt)}"] = b
                    g = "/".join(_g(b[f"generator {k}"]) for k in ("bf16 weights", "bf16 grads", "fp32 master + AdamW"))
                    c = "/".join(_g(b[f"critic {k}"]) for k in ("bf16 weights", "bf16 grads", "fp32 master + AdamW"))
                    print(f"{ranks:>6}{zero:>6}{'yes' if ckpt else 'no':>6}{g:>22}{c:>22}{_g(b['teacher bf16']):>9}"
                          f"{_g(b['activations + stream state']):>8}{_g(b['total']):>8}  {fits(b['total'])}")
        ema = FP32 * params["generator_trainable"]
        print(f"  EMA shadow: {_g(ema)} GiB fp32 in host RAM per rank (trainer/ema.py keeps it on the CPU)")
        if backbone == "lora":
            full = trained_params(cfg, args.train_kind, "full") if "full" not in result["params"] else \
                result["params"]["full"]
            print(f"  LoRA r{cfg.trainer.lora_rank}: adapter {params['adapter']:,} params per backbone; generator "
                  f"trainable {params['generator_trainable']:,} (adapter + memory) vs {full['generator_trainable']:,} "
                  f"full; optimizer state (fp32 master + 2 moments) {_g(ADAM_STATE * params['generator_trainable'])} "
                  f"vs {_g(ADAM_STATE * full['generator_trainable'])} GiB unpartitioned")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
