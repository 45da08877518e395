"""The root config, building it from YAML presets and ``section.field=value`` overrides.

Every default is the paper's (SlotMemory Table 6 and Appendix A.1/A.3) or the anchor codebases'
(Self-Forcing / LongLive / MemFlow) unless a field's docstring says otherwise. Presets live in ``configs/``
as YAML; ``load_config(path, overrides)`` reads one, applies overrides and builds the sections, each of which
validates itself at construction with an error naming the field. Unknown sections or keys are errors that
list the valid ones. Cross-section rules are checked once the sections exist (``Config.__post_init__``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from slotmem.config.jobs import (ClusterConfig, PipelineConfig, RolloutConfig, StorageConfig, TrackingConfig,
                                 TrainerConfig)
from slotmem.config.model import MemoryConfig, ModelConfig, TeacherConfig
from slotmem.errors import ConfigError

@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        # Cross-section checks.
        self.teacher.check_fits(self.model)
        if self.trainer.window_frames % self.model.num_frame_per_block:
            raise ConfigError(f"trainer.window_frames ({self.trainer.window_frames}) must be a multiple of "
                              f"model.num_frame_per_block ({self.model.num_frame_per_block})")
        if self.rollout.num_frames % self.model.num_frame_per_block:
            raise ConfigError(f"rollout.num_frames ({self.rollout.num_frames}) must be a multiple of "
                              f"model.num_frame_per_block ({self.model.num_frame_per_block})")
        chunk_tokens = self.model.num_frame_per_block * self.model.tokens_per_frame
        if self.memory.tokens_per_slot > chunk_tokens:
            raise ConfigError(f"memory.tokens_per_slot ({self.memory.tokens_per_slot}) must be <= the tokens of one "
                              f"chunk (model.num_frame_per_block * tokens per frame = {chunk_tokens})")
        if self.rollout.num_frames >= self.model.rope_max_frames:
            raise ConfigError(f"rollout.num_frames ({self.rollout.num_frames}) must be below "
                              f"model.rope_max_frames ({self.model.rope_max_frames})")
        if self.tracking.experiment and self.tracking.experiment != self.storage.experiment:
            raise ConfigError(f"tracking.experiment ({self.tracking.experiment!r}) differs from storage.experiment "
                              f"({self.storage.experiment!r}); runs are found by one experiment name: set only "
                              "storage.experiment")
        if self.trainer.backbone == "lora" and self.trainer.lora_rank > self.model.dim:
            raise ConfigError(f"trainer.lora_rank ({self.trainer.lora_rank}) must be <= model.dim ({self.model.dim})")
        if self.trainer.window_frames <= self.model.num_frame_per_block:
            raise ConfigError(f"trainer.window_frames ({self.trainer.window_frames}) must exceed one chunk "
                              f"({self.model.num_frame_per_block}): a mid-video window starts with a chunk of context")
        if self.pipeline.max_policy_lag < self.trainer.publish_every - 1:
            raise ConfigError(f"pipeline.max_policy_lag ({self.pipeline.max_policy_lag}) must be at least "
                              f"trainer.publish_every - 1 ({self.trainer.publish_every - 1}): rollouts only see a new "
                              "policy every publish_every generator updates, so a smaller bound starves the trainer")

    @property
    def experiment(self) -> str:
        """The one experiment name of storage and tracking."""
        return self.storage.experiment

    def teacher_model(self) -> ModelConfig:
        """The teacher as a backbone config (architecture from the teacher section, the rest from model)."""
        return self.teacher.model_config(self.model)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in fields(self)}

    def flat(self) -> dict[str, Any]:
        """'section.field' -> value, for MLflow params."""
        return {f"{sec}.{k}": v for sec, d in self.to_dict().items() for k, v in d.items()}


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Config)}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}

# What each job reads from disk: (field, value getter). A field left empty means a random network, allowed only
# with model.allow_random_weights (tests, the random-weight tiny preset).
_WEIGHT_FIELDS = {
    "model.model_path": lambda c: c.model.model_path,
    "model.text_encoder_path": lambda c: c.model.text_encoder_path,
    "model.vae_path": lambda c: c.model.vae_path,
    "teacher.model_path": lambda c: c.teacher.model_path,
    "trainer.critic_path": lambda c: c.trainer.critic_path,
}
JOB_WEIGHTS = {
    "generate": ("model.model_path", "model.text_encoder_path", "model.vae_path"),
    "rollout": ("model.model_path", "model.text_encoder_path"),
    "train": ("model.model_path", "model.text_encoder_path", "teacher.model_path", "trainer.critic_path"),
    "pipeline": tuple(_WEIGHT_FIELDS),
}


def check_weights(cfg: Config, job: str) -> None:
    """Refuse to start `job` with an empty weight path (naming every one) unless random weights are allowed."""
    if cfg.model.allow_random_weights:
        derived = (cfg.teacher.num_layers, cfg.teacher.dim, cfg.teacher.num_heads, cfg.teacher.ffn_dim,
                   cfg.teacher.freq_dim)
        own = (cfg.model.num_layers, cfg.model.dim, cfg.model.num_heads, cfg.model.ffn_dim, cfg.model.freq_dim)
        if job in ("train", "pipeline") and not cfg.teacher.model_path and derived != own:
            raise ConfigError("teacher.model_path is empty, so the teacher is derived from the generator's init, but "
                              f"the teacher section's architecture {derived} differs from the model's {own} "
                              "(num_layers, dim, num_heads, ffn_dim, freq_dim); set teacher.model_path or match them")
        return
    missing = [name for name in JOB_WEIGHTS[job] if not _WEIGHT_FIELDS[name](cfg)]
    if missing:
        raise ConfigError(f"{job} needs local weights, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} empty (preset {cfg.model.name!r}); point "
                          f"{'it' if len(missing) == 1 else 'them'} at local files, or set "
                          "model.allow_random_weights=true for a random-weight smoke run")


def _section_to_dict(section) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        v = getattr(section, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------------------------
# building sections from plain data
# ----------------------------------------------------------------------------------------------


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    """Convert YAML/CLI values to the field's declared type (lists -> tuples, ints -> floats)."""
    origin = get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{name} must be a list, got {value!r}")
        args = get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(section, name, elem, v) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{section}.{name} must be a string, got {value!r}")
    return value


def build_section(name: str, data: dict[str, Any]):
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; valid sections: {sorted(SECTIONS)}")
    cls = SECTIONS[name]
    if not isinstance(data, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys of {name!r}: {valid}")
    kwargs = {k: _coerce(name, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def build_config(data: dict[str, Any]) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    return Config(**{name: build_section(name, data.get(name) or {}) for name in SECTIONS})


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.field=value' -> (section, field, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.field (e.g. trainer.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    if isinstance(value, str) and raw.strip() and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads '1e-4' as a string
    return parts[0], parts[1], value


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (or the built-in defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    data = json.loads(json.dumps(data))  # deep copy
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"override {text!r}: unknown section {section!r}; valid sections: {sorted(SECTIONS)}")
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value
    return build_config(_absolute_local_paths(data))


# local paths a job reads, maybe in other processes: Ray Train runs its workers in a trial directory, not the
# driver's working directory, so a relative path is made absolute where the config is read
_LOCAL_PATH_FIELDS = (("model", "model_path"), ("model", "text_encoder_path"), ("model", "tokenizer_path"),
                      ("model", "vae_path"), ("teacher", "model_path"), ("trainer", "critic_path"),
                      ("trainer", "lora_path"), ("rollout", "prompt_file"), ("pipeline", "sample_prompts"))


def _absolute_local_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Relative local weight paths (relative to the working directory, as on the command line) made absolute."""
    for section, key in _LOCAL_PATH_FIELDS:
        fields_ = data.get(section)
        value = fields_.get(key) if isinstance(fields_, dict) else None  # a malformed section fails in build_config
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            data[section][key] = str(Path.cwd() / value)
    return data


def replace(section, **changes):
    """dataclasses.replace that re-validates (frozen sections validate in __post_init__)."""
    return dataclasses.replace(section, **changes)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
