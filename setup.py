"""Build fastlatent and its compiled extension, fastlatent._C.

Always builds the CPU kernels (OpenMP, -O3). Builds the CUDA kernels too when torch is a
CUDA build and nvcc is found. Environment:

  FASTLATENT_CUDA=0|1     force the CUDA kernels off, or on (1 fails if they can't be built)
  TORCH_CUDA_ARCH_LIST    GPU architectures, default "8.0;9.0+PTX" (A100, H100, PTX for newer)
  CUDA_HOME               CUDA toolkit; default: the toolkit that holds the nvcc on PATH
  FASTLATENT_CPU_ARCH     -march for the CPU kernels, default "native"; "" for a portable build
  FASTLATENT_DEBUG=1      keep debug info (-g) and drop -O3
  MAX_JOBS                parallel compile jobs (ninja)

Install with `pip install --no-build-isolation --no-deps -e .` so the build uses the torch
already installed (build isolation would fetch a different torch).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else a toolkit that matches the nvcc on PATH.

    torch's own guess is the parent of `which nvcc`, which is /usr/local when nvcc is a link
    or a wrapper script in /usr/local/bin; a candidate counts only if it has the headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


CUDA_MODE = os.environ.get("FASTLATENT_CUDA", "auto").strip().lower()
if CUDA_MODE not in ("auto", "0", "1"):
    sys.exit(f"setup.py: FASTLATENT_CUDA must be 0, 1 or unset, got {CUDA_MODE!r}")
_cuda_home = _find_cuda_home()
if _cuda_home and CUDA_MODE != "0":
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if not _cuda_home or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        reasons.append("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    if CUDA_MODE == "0":
        return False
    if reasons and CUDA_MODE == "1":
        sys.exit("setup.py: FASTLATENT_CUDA=1 but the CUDA kernels can't be built: " + "; ".join(reasons))
    if reasons:
        print("fastlatent: building CPU kernels only: " + "; ".join(reasons), file=sys.stderr)
    return not reasons


WITH_CUDA = _want_cuda()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # torch would otherwise query the local GPU (and fail with IndexError where there is none).
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
DEBUG = os.environ.get("FASTLATENT_DEBUG", "0") == "1"
CPU_ARCH = os.environ.get("FASTLATENT_CPU_ARCH", "native").strip()

BUILD_TAG = "py{}{}-torch{}-{}".format(
    sys.version_info.major, sys.version_info.minor, torch.__version__.replace("+", "_"),
    "cuda" if WITH_CUDA else "cpu")


def _sources():
    kernels = sorted(glob.glob(os.path.join("csrc", "kernels", "*.cpp")))
    bindings = sorted(glob.glob(os.path.join("csrc", "torch", "*.cpp")))
    cuda = sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu"))) if WITH_CUDA else []
    return kernels + bindings + cuda


def _extension():
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    # torch compiles with ISO -std=c++20, under which gcc turns FMA contraction off; the
    # kernels' inner loops are written as a*b+c and want FMAs (5-10% on nearest_code).
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it gcc keeps the
    # activations' clamped exp loops scalar on targets without AVX-512 masking (a portable build's
    # GroupNorm+SiLU was 15x slower than a native one). Results are unchanged: it permits no reassociation.
    cxx = opt + ["-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    if CPU_ARCH:
        cxx.append(f"-march={CPU_ARCH}")
    macros = [("FL_TORCH_VERSION", f'"{torch.__version__}"')]
    kwargs = dict(
        name="fastlatent._C",
        sources=_sources(),
        include_dirs=[os.path.join(ROOT, "csrc", "kernels"), os.path.join(ROOT, "csrc", "torch")],
        extra_link_args=["-fopenmp"],
    )
    if not WITH_CUDA:
        return CppExtension(define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)
    arch_flags = os.environ["TORCH_CUDA_ARCH_LIST"]
    macros += [("FL_WITH_CUDA", None), ("FL_CUDA_ARCH_FLAGS", f'"{arch_flags}"')]
    nvcc = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-std=c++17", "-lineinfo"]
    return CUDAExtension(define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


class BuildExt(BuildExtension):
    """Keeps objects in build/temp-<tag> (not a random /tmp dir) so pip rebuilds are incremental."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp-" + BUILD_TAG)


def _write_build_meta():
    # Read at import time to explain a failed import of _C (e.g. torch upgraded since the build).
    with open(os.path.join(ROOT, "fastlatent", "_build_meta.py"), "w") as f:
        f.write("# Generated by setup.py; do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")


_write_build_meta()

setup(
    name="fastlatent",
    version=VERSION,
    description="Fast C++/CUDA kernels for latent generative models: VQ, FSQ, fused GroupNorm, diffusion samplers",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The benchmark suites ship inside the wheel as fastlatent/_benchmarks, so `fastlatent bench` works after a
    # plain pip install (an editable install finds them in the checkout's benchmarks/ folder instead).
    packages=find_packages(include=["fastlatent", "fastlatent.*"]) + ["fastlatent._benchmarks"],
    package_dir={"fastlatent._benchmarks": "benchmarks"},
    package_data={"fastlatent._benchmarks": ["*.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    # The models, their training and the demo need these (digits data, plots, safe weights, progress bars).
    install_requires=["torch", "numpy", "safetensors", "tqdm", "pillow", "scikit-learn", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "lpips", "scikit-image"],
        "bench": ["pytest-benchmark", "faiss-cpu", "vector-quantize-pytorch"],
    },
    entry_points={"console_scripts": ["fastlatent = fastlatent.cli:main"]},
    zip_safe=False,
)
