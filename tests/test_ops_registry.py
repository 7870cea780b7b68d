"""fastlatent.ops.TORCH_OPS is the list of schemas the extension registers, and every op module exposes the
public argument check its reference twin uses."""

import ast
from pathlib import Path

import torch

import fastlatent


def _registered_schemas() -> set[str]:
    # every schema the dispatcher knows; ours are the fastlatent:: ones (one overload each)
    return {
        s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastlatent::")
    }


def test_torch_ops_is_the_set_of_registered_schemas():
    assert fastlatent.extension_available()
    registered = _registered_schemas()
    assert len(fastlatent.ops.TORCH_OPS) == len(set(fastlatent.ops.TORCH_OPS))
    assert set(fastlatent.ops.TORCH_OPS) == registered, (
        f"missing from TORCH_OPS: {sorted(registered - set(fastlatent.ops.TORCH_OPS))}; "
        f"not registered: {sorted(set(fastlatent.ops.TORCH_OPS) - registered)}"
    )


def test_reference_modules_import_only_public_names():
    folder = Path(fastlatent.__file__).parent / "reference"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastlatent"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert not (node.value.id.endswith("ops") and node.attr.startswith("_")), (
                    f"{path.name} uses {node.value.id}.{node.attr}"
                )
