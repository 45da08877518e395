"""The shipped prompt files under toyworld/prompts/: ``python -m toyworld.prompt_files`` rewrites them.

  train_pairs.txt          rollout.prompt_file: one ``prompt_a || prompt_b`` training pair per line
                           (rollout/prompts.py load_training_prompts); the rollout draws the switch
  interactive.jsonl        one 60 s six-prompt script, ``{"prompt": ..., "switch_frame": N}`` per line
                           (load_interactive_script; `slotmem generate --prompts`)
  interactive_benchmark.jsonl   held-out six-prompt scripts, MemFlow's ``{"prompts": [...]}`` per line
  memory_benchmark.jsonl   held-out leave-and-return scripts, same format

The files are generated from the script generators with fixed seeds, so they are the same scripts the
evaluation uses (toyworld/evaluate.py EVAL_SEED offsets).
"""

from __future__ import annotations

import json
from pathlib import Path

from slotmem.config import INTERACTIVE_SWITCH_FRAMES
from toyworld.configs import PROMPTS
from toyworld.scripts import interactive_script, memory_script, two_prompt_script
from toyworld.train_vae import EVAL_SEED_OFFSET

NUM_TRAIN_PAIRS = 200
NUM_BENCHMARK = 20


def prompt_file_texts() -> dict[str, str]:
    pairs = [two_prompt_script(seed).prompts for seed in range(NUM_TRAIN_PAIRS)]
    train = ["# toy-world training pairs (toyworld/scripts.py two_prompt_script, seeds 0..%d)" % (NUM_TRAIN_PAIRS - 1),
             *(f"{a} || {b}" for a, b in pairs)]
    # the first of evaluate.py's interactive scripts with three or more events
    demo = next(s for s in (interactive_script(EVAL_SEED_OFFSET + 100 + i) for i in range(NUM_BENCHMARK))
                if len(s.events) >= 3)
    interactive = [json.dumps({"prompt": demo.prompts[0]})]
    interactive += [json.dumps({"prompt": p, "switch_frame": f}) for p, f in zip(demo.prompts[1:], INTERACTIVE_SWITCH_FRAMES)]
    bench = [json.dumps({"prompts": list(interactive_script(EVAL_SEED_OFFSET + 100 + i).prompts)})
             for i in range(NUM_BENCHMARK)]
    memory = [json.dumps({"prompts": list(memory_script(EVAL_SEED_OFFSET + 200 + i).prompts)})
              for i in range(NUM_BENCHMARK)]
    return {"train_pairs.txt": "\n".join(train) + "\n", "interactive.jsonl": "\n".join(interactive) + "\n",
            "interactive_benchmark.jsonl": "\n".join(bench) + "\n", "memory_benchmark.jsonl": "\n".join(memory) + "\n"}


def write_prompt_files(directory: Path = PROMPTS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in prompt_file_texts().items():
        (directory / name).write_text(text, encoding="utf-8")
        paths.append(directory / name)
    return paths


if __name__ == "__main__":
    for path in write_prompt_files():
        print(path)
