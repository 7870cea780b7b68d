"""Option types, the recording parser and ``--config`` files of the `fastlatent` command (public argparse
API only)."""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path
from typing import Any


class _RecordingGroup:
    """An argument group that records its options in its parser's ``options``."""

    def __init__(self, parser: CommandParser, group) -> None:
        self._parser, self._group = parser, group

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = self._group.add_argument(*args, **kwargs)
        self._parser.options[action.dest] = action
        return action


class CommandParser(argparse.ArgumentParser):
    """A command's parser that keeps ``options`` (dest -> action), so that ``--config`` can check and convert
    a file's values like command-line values without argparse's private attributes."""

    def __init__(self, *args, **kwargs) -> None:
        self.options: dict[str, argparse.Action] = {}
        self._wrap_groups = False  # argparse's own groups (made in __init__) stay as they are
        super().__init__(*args, **kwargs)
        self._wrap_groups = True

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options[action.dest] = action
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        return _RecordingGroup(self, group) if self._wrap_groups else group

    def add_mutually_exclusive_group(self, **kwargs):
        group = super().add_mutually_exclusive_group(**kwargs)
        return _RecordingGroup(self, group) if self._wrap_groups else group


def int_list(text) -> list[int]:
    """``"32,64,64"`` (or a list from a config file) -> ``[32, 64, 64]``."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        values = [v for v in str(text).replace(" ", "").split(",") if v]
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonneg_float(text) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def optional_float(text):
    if text is None or str(text).lower() in ("none", "off", ""):
        return None
    return float(text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a JSON or TOML config into ``{option_dest: value}`` (``-`` in keys becomes ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ValueError(
            f"--config: {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a table/object of options, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_config_value_type(action: argparse.Action, value) -> None:
    """A config file's JSON/TOML value must have the option's type: argparse's converters would turn true
    into 1 and 5.7 into 5 without a word."""
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a value, not {str(value).lower()}")
    integer = action.type in (int, positive_int)
    if action.type is int_list and isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value] if integer else []
    for item in items:
        if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
            raise argparse.ArgumentTypeError(f"expected an integer, got {json.dumps(item)}")


def apply_config_defaults(parser: CommandParser, config: dict[str, Any], source: str) -> None:
    """Makes the config's values the parser's defaults, converted and checked like command-line values."""
    actions = {dest: a for dest, a in parser.options.items() if dest not in ("help", "config")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise ValueError(f"--config: {source} has unknown option(s) {unknown}; known: {sorted(actions)}")
    defaults = {}
    for dest, value in config.items():
        action = actions[dest]
        try:
            if action.nargs == 0 and isinstance(action.const, bool):  # store_true / store_false
                if not isinstance(value, bool):
                    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
            else:
                _check_config_value_type(action, value)
                if action.type is not None and value is not None:
                    value = action.type(value)
            if action.choices is not None and value not in action.choices:
                raise argparse.ArgumentTypeError(f"expected one of {list(action.choices)}, got {value!r}")
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"--config: {source}: option {dest}: {exc}") from None
        defaults[dest] = value
    parser.set_defaults(**defaults)
