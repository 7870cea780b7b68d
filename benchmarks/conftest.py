"""Shared set-up for the benchmark suites (pytest-benchmark).

Run: python -m pytest benchmarks/ --benchmark-only [--full] [-k cpu]
Each case runs every provider side by side in one process; the table that
pytest-benchmark prints (and --benchmark-json writes) carries the device, torch version and
the work done per call in `extra_info`.
"""

import platform

import pytest
import torch

import fastlatent


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the large shapes too (minutes on a 2-core CPU)")


def pytest_collection_modifyitems(config, items):
    cuda_ok = torch.cuda.is_available() and fastlatent.build_info()["cuda"]
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and a build with CUDA kernels")
    skip_full = pytest.mark.skip(reason="large shape: pass --full")
    for item in items:
        if "cuda" in item.keywords and not cuda_ok:
            item.add_marker(skip_cuda)
        if "full" in item.keywords and not config.getoption("--full"):
            item.add_marker(skip_full)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "full: large shape, only with --full")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def timed(fn, device: torch.device):
    """fn wrapped so that each timed call includes waiting for the GPU."""
    if device.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return synced
