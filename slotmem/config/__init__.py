"""Typed, validated configuration: one frozen dataclass per section (see loader.py)."""

from slotmem.config.checks import check_choice, check_float, check_int, check_name, check_sorted_frames
from slotmem.config.jobs import (BACKBONE_MODES, INTERACTIVE_SWITCH_FRAMES, PIPELINE_MODES, TRAIN_SWITCH_CHOICES,
                                 WAN_NEGATIVE_PROMPT, ClusterConfig, PipelineConfig, RolloutConfig, StorageConfig,
                                 TrackingConfig, TrainerConfig)
from slotmem.config.loader import (JOB_WEIGHTS, SECTIONS, Config, build_config, build_section, check_weights,
                                   dump_yaml, load_config, parse_override, replace)
from slotmem.config.model import RECACHE_MODES, MemoryConfig, ModelConfig, TeacherConfig
from slotmem.errors import ConfigError

__all__ = [
    "BACKBONE_MODES", "INTERACTIVE_SWITCH_FRAMES", "JOB_WEIGHTS", "PIPELINE_MODES", "RECACHE_MODES", "SECTIONS",
    "TRAIN_SWITCH_CHOICES", "WAN_NEGATIVE_PROMPT", "ClusterConfig", "Config", "ConfigError", "MemoryConfig",
    "ModelConfig", "PipelineConfig", "RolloutConfig", "StorageConfig", "TeacherConfig", "TrackingConfig",
    "TrainerConfig", "build_config", "build_section", "check_choice", "check_float", "check_int", "check_name",
    "check_sorted_frames", "check_weights", "dump_yaml", "load_config", "parse_override", "replace",
]
