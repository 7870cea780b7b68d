import pytest
import torch

import fastlatent

CUDA_OK = torch.cuda.is_available() and fastlatent.build_info()["cuda"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a build with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    """Runs a test on one torch thread. Tiny models run fastest that way, and on a shared 2-core machine two
    OpenMP threads per process oversubscribe the cores: every small conv/norm waits at a barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
