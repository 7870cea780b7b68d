"""The build, the extension loader's messages and the `fastlatent` command."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastlatent
from fastlatent import _extension


def test_build_info_describes_the_build():
    info = fastlatent.build_info()
    assert info["extension"] is True
    assert info["version"] == fastlatent.__version__
    assert info["torch"] == torch.__version__
    assert info["torch_built"] == torch.__version__, "extension built against another torch"
    assert info["openmp_version"] > 0 and info["openmp_max_threads"] >= 1
    if info["cuda"]:
        archs = info["cuda_archs"].split(",")
        assert archs and all(a.isdigit() for a in archs), info["cuda_archs"]
        assert info["cuda_compiled_version"] >= 11000
    else:
        assert info["cuda_archs"] == ""


def test_every_op_is_registered_with_a_fake_impl():
    from torch._library.simple_registry import singleton

    for name in fastlatent.ops.TORCH_OPS:
        assert hasattr(torch.ops.fastlatent, name), name
        assert singleton.find(f"fastlatent::{name}").fake_impl.kernel is not None, name


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_info():
    result = _run("-m", "fastlatent", "info")
    assert result.returncode == 0, result.stderr
    assert "fastlatent " + fastlatent.__version__ in result.stdout
    assert "CUDA kernels" in result.stdout and "OpenMP" in result.stdout


def test_cli_info_json_and_help():
    result = _run("-m", "fastlatent", "info", "--json")
    assert result.returncode == 0, result.stderr
    assert '"extension": true' in result.stdout
    result = _run("-m", "fastlatent", "--help")
    assert result.returncode == 0 and "selftest" in result.stdout


def test_missing_extension_is_explained():
    # Block the import of fastlatent._C as if it had never been built.
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastlatent._C":
                    raise ImportError("No module named 'fastlatent._C'")
        sys.meta_path.insert(0, Block())
        import torch, fastlatent
        assert not fastlatent.extension_available()
        assert fastlatent.reference.nearest_code(torch.ones(2, 3), torch.ones(4, 3))[0].tolist() == [0, 0]
        try:
            fastlatent.nearest_code(torch.ones(2, 3), torch.ones(4, 3))
        except RuntimeError as e:
            print(e)
        else:
            raise SystemExit("no error")
    """)
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert (
        "fastlatent.nearest_code: fastlatent's compiled extension (fastlatent._C) could not be loaded"
        in result.stdout
    )
    assert "pip install --no-build-isolation --no-deps -e ." in result.stdout
    info = _run(
        "-c", code.split("import torch, fastlatent")[0] + "from fastlatent.cli import main; main(['info'])"
    )
    assert "NOT LOADED" in info.stdout


def test_cuda_tensor_on_a_build_without_cuda_kernels(monkeypatch):
    class FakeCudaTensor:
        is_cuda = True

    monkeypatch.setattr(_extension, "HAS_CUDA_KERNELS", False)
    with pytest.raises(
        RuntimeError, match="got a CUDA tensor, but this build of fastlatent has no CUDA kernels"
    ):
        _extension.require_device("nearest_code", FakeCudaTensor())


@pytest.mark.slow
def test_cli_selftest():
    result = _run("-m", "fastlatent", "selftest")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selftest passed" in result.stdout
