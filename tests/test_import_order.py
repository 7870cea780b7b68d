"""Every fastlatent module imports in any order: no import cycle, hidden or not."""

import ast
import pathlib
import subprocess
import sys

import pytest

import fastlatent

PACKAGE_DIR = pathlib.Path(fastlatent.__file__).parent
# Importing the command's entry point runs the command.
NOT_IMPORTABLE = {"fastlatent.__main__"}


def _module_names() -> list[str]:
    names = []
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name not in NOT_IMPORTABLE:
            names.append(name)
    return sorted(names)


def test_module_list_is_complete():
    names = _module_names()
    assert {
        "fastlatent",
        "fastlatent.ops.fsq",
        "fastlatent.reference.fsq",
        "fastlatent.ops.checks.lfq",
    } <= set(names)
    assert len(names) > 50


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = _module_names()
    if order == "reverse":
        names = names[::-1]
    script = "import importlib\nfor name in {!r}:\n    importlib.import_module(name)\n".format(names)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE_DIR.parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_op_modules_import_their_reference_at_module_level():
    """A reference import inside a function hides a cycle from the test above; keep them at the top."""
    hidden = []
    for path in sorted((PACKAGE_DIR / "ops").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                    "fastlatent.reference"
                ):
                    hidden.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{inner.lineno}")
                if isinstance(inner, ast.Import) and any(
                    a.name.startswith("fastlatent.reference") for a in inner.names
                ):
                    hidden.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{inner.lineno}")
    assert not hidden, hidden
