"""Errors for bad user input: one clear message naming the field or file, no traceback at the CLI."""


class InputError(ValueError):
    """Bad input (prompt file, switch frames, checkpoint, shard, cluster shape); the message names it."""


class ConfigError(InputError):
    """A config value, key or file is invalid; the message names it."""


class JobStopped(Exception):
    """The operator asked the job to stop (`slotmem stop`, SIGTERM, Ctrl-C): the stage checkpointed and returned;
    MLflow runs end as KILLED and a resubmission resumes from the checkpoint."""
