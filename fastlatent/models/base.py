"""What every fastlatent model shares: its constructor arguments as a JSON config, and safe save/load.

A model class derives from :class:`ConfigMixin` (after ``nn.Module``) and is decorated with
:func:`register_model`. Its ``__init__`` arguments must be JSON values (numbers, strings, booleans, None,
lists, dicts); they are recorded on construction as ``model.config``, so
``type(model).from_config(model.config)`` builds the same architecture. ``save_pretrained(folder)`` writes
``config.json`` and ``model.safetensors``; ``load_pretrained(folder)`` rebuilds the class named in the config
from :data:`MODEL_REGISTRY` only (never an arbitrary import, never a pickle), so loading an untrusted folder
cannot run code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_REGISTRY: dict[str, type] = {}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module.eval()`` for the block (no dropout, no EMA/k-means/dead-code updates), then every submodule's
    own training flag restored (``module.train(was_training)`` would switch frozen submodules on)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """:func:`eval_mode` and ``torch.no_grad()`` for the block."""
    with eval_mode(module), torch.no_grad():
        yield


def register_model(cls: type) -> type:
    """Class decorator: makes ``cls`` loadable by name from a saved ``config.json``."""
    name = cls.__name__
    if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
        raise ValueError(f"fastlatent.models: a model class named {name} is already registered")
    MODEL_REGISTRY[name] = cls
    return cls


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{where} must be a JSON value (number, string, bool, None, list or dict) so the model can be "
        f"saved, got {type(value).__name__}"
    )


class ConfigMixin:
    """Records the constructor arguments of the outermost ``__init__`` as ``self.config`` (a dict)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_config" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                config = {}
                for name, param in signature.parameters.items():
                    if name == "self":
                        continue
                    value = bound.arguments.get(name)
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        config.update(value or {})
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                        if value:
                            raise TypeError(f"{cls.__name__}: positional *args cannot be saved in a config")
                    else:
                        config[name] = value
                config = {k: _jsonable(v, f"{cls.__name__}: argument {k}") for k, v in config.items()}
                object.__setattr__(self, "_config", config)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    @property
    def config(self) -> dict:
        """The constructor arguments (a copy), JSON-serialisable."""
        return json.loads(json.dumps(self.__dict__["_config"]))

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` into ``folder`` (created), each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "config": self.config}
        # clone(): safetensors refuses tensors that share storage (tied weights).
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write(
            folder / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata={"format": "pt"})
        )
        atomic_write(
            folder / CONFIG_NAME,
            lambda path: Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
        )
        return folder


def atomic_write(target: str | os.PathLike, write) -> None:
    """Calls ``write(tmp_path)`` then renames over ``target``, so a crash never leaves a half-written file."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_pretrained(
    folder: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    expected: type | tuple[type, ...] | None = None,
):
    """Rebuilds a model saved by ``save_pretrained``: the registered class named in ``config.json``, its
    weights from ``model.safetensors`` (strict). ``expected`` restricts the classes accepted.

    Nothing is allocated before the config is known to fit the weights: the model is first built on the meta
    device, stopped once it registers more parameters than the weights file holds tensors, and its state-dict
    shapes are compared with the safetensors header; a mismatch raises ValueError naming the tensors."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"fastlatent.models.load_pretrained: {path} not found (expected a folder written "
                f"by save_pretrained, with {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        meta = json.loads(config_path.read_text())
        name, config = meta["class"], meta["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"fastlatent.models.load_pretrained: {config_path} is not a fastlatent model config "
            f'(expected {{"class": ..., "config": {{...}}}}): {exc}'
        ) from None
    cls = MODEL_REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"fastlatent.models.load_pretrained: {config_path} names an unknown model class {name!r}; "
            f"known: {sorted(MODEL_REGISTRY)}"
        )
    if expected is not None and not issubclass(cls, expected):
        names = [c.__name__ for c in (expected if isinstance(expected, tuple) else (expected,))]
        raise ValueError(
            f"fastlatent.models.load_pretrained: {folder} holds a {name}, expected one of {names}"
        )
    if not isinstance(config, dict):
        raise ValueError(
            f"fastlatent.models.load_pretrained: {config_path}: config must be an object of "
            f"constructor arguments, got {type(config).__name__}"
        )
    _check_weights_fit_config(cls, config, weights_path)
    model = cls.from_config(config)
    model.load_state_dict(load_file(str(weights_path), device=str(map_location)))
    return model.to(map_location)


class _ConfigTooLarge(ValueError):
    pass


def _weights_header(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (reads the header only)."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(
            f"fastlatent.models.load_pretrained: cannot read {weights_path} as safetensors: {exc}"
        ) from None


def _check_weights_fit_config(cls, config: dict, weights_path: Path) -> None:
    """Builds the model on the meta device (no memory) and compares its state dict with the weights' header,
    before anything is allocated: a tampered config (``"layers_per_block": 100000``) is refused after at most
    as many parameters as the weights file holds, and a size mismatch before the real model exists."""
    header = _weights_header(weights_path)
    where = f"fastlatent.models.load_pretrained: {weights_path.parent}"
    registered = 0

    def count(module, name, param):
        nonlocal registered
        registered += 1
        if registered > len(header):
            raise _ConfigTooLarge(
                f"{where}: the config describes a model with more parameters than the "
                f"{len(header)} tensors of {WEIGHTS_NAME} (config and weights do not match)"
            )

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except _ConfigTooLarge:
        raise
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: the config does not describe a valid {cls.__name__}: {exc}") from None
    except (RuntimeError, NotImplementedError):
        return  # a constructor that computes on its tensors cannot run on meta: the strict load still checks
    finally:
        handle.remove()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - header.keys())
    unexpected = sorted(header.keys() - expected.keys())
    wrong = [
        f"{k}: config {list(expected[k])}, weights {list(header[k])}"
        for k in sorted(expected.keys() & header.keys())
        if expected[k] != header[k]
    ]
    if missing or unexpected or wrong:
        details = (
            ([f"missing from the weights: {missing[:5]}"] if missing else [])
            + ([f"not in the model: {unexpected[:5]}"] if unexpected else [])
            + ([f"shape mismatch: {'; '.join(wrong[:5])}"] if wrong else [])
        )
        raise ValueError(f"{where}: {WEIGHTS_NAME} does not fit {CONFIG_NAME} ({'; '.join(details)})")
