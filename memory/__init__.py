"""SlotMemory: object-centric KV memory for streaming video diffusion (paper §3.3-3.5), pure torch.

The pipeline builds one memory with `build_memory(memory_cfg, ...)` and drives it through the
interface in memory/base.py (reset, set_prompt, read, write, slot_loss, freeze_slot_grouper, inspect).
"""

from memory.base import ChunkInfo, LayerStateLike, StreamingMemory
from memory.baselines import FrameBankMemory, NoMemory
from memory.inspector import MemoryInspector, save_assignment_png
from memory.losses import contrastive_loss, reconstruction_loss
from memory.streaming import MEMORY_KINDS, SlotMemory, build_memory

__all__ = [
    "MEMORY_KINDS",
    "ChunkInfo",
    "FrameBankMemory",
    "LayerStateLike",
    "MemoryInspector",
    "NoMemory",
    "SlotMemory",
    "StreamingMemory",
    "build_memory",
    "contrastive_loss",
    "reconstruction_loss",
    "save_assignment_png",
]
