"""What a run is, for resume: the settings and model configurations a checkpoint must have been trained with.

A checkpoint whose parameter shapes happen to fit a different model (an LFQ autoencoder over an FSQ run: the
quantisers hold no parameters) would otherwise load without an error and continue the wrong run. The Trainer
stores :func:`run_fingerprint` in every checkpoint and refuses to resume when it differs, naming the keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

# Trainer settings that may change between the runs of one training job (operational, not what is trained;
# `steps` extends or shortens the schedule with a warning).
RESUMABLE_SETTINGS = frozenset(
    {
        "out_dir",
        "steps",
        "resume",
        "progress",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "plot_every",
        "plots",
        "num_workers",
    }
)


def run_fingerprint(module: nn.Module, trainer_settings: Mapping[str, Any]) -> dict:
    """The trainer settings outside :data:`RESUMABLE_SETTINGS` and the configuration (class and constructor
    arguments) of every :class:`~fastlatent.models.ConfigMixin` model inside ``module``, by module name."""
    models = {}
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if isinstance(config, dict) and hasattr(type(sub), "from_config"):
            models[name or "<root>"] = {"class": type(sub).__name__, **config}
    settings = {k: v for k, v in trainer_settings.items() if k not in RESUMABLE_SETTINGS}
    return {"trainer": settings, "models": models}


def _flatten(value, prefix: str, out: dict) -> dict:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value
    return out


def fingerprint_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``"key: saved -> current"`` for every dotted key whose value differs (``<absent>`` where missing)."""
    old, new = _flatten(saved, "", {}), _flatten(current, "", {})
    absent = "<absent>"
    return [
        f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, absent) != new.get(key, absent)
    ]
