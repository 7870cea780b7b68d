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

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# One version for the package and the wheel: read from the leaf module (importing fastlatent needs the build).
with open(os.path.join(ROOT, "fastlatent", "_version.py")) as _f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', _f.read(), re.M).group(1)


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
    sys.version_info.major,
    sys.version_info.minor,
    torch.__version__.replace("+", "_"),
    "cuda" if WITH_CUDA else "cpu",
)


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


# ---------------------------------------------------------------- the CUDA emulator (fastlatent._emu)
# Every csrc/kernels/*.cu with kernels, compiled by the host compiler against csrc/emu/fl_emu.h and run
# by the emulator on CPU tensors (docs/cuda-emulation.md). Needs no nvcc or GPU: built by every build.
EMU_INCLUDES = [
    os.path.join(ROOT, "csrc", "emu", "include"),
    os.path.join(ROOT, "csrc", "emu"),
    os.path.join(ROOT, "csrc", "kernels"),
]
# The kernels' memory accesses call the -fsanitize=thread hooks, which the emulator runtime defines
# (libtsan is not linked); -O1 without vectorisation keeps one hook call per access.
EMU_KERNEL_FLAGS = [
    "-std=c++17",
    "-fPIC",
    "-O1",
    "-fno-tree-vectorize",
    "-fsanitize=thread",
    "-g0",
    "-DFL_EMULATION",
    "-D__CUDACC__",
    "-D__CUDA_ARCH__=800",
    "-DFL_WITH_CUDA",
    "-Wno-unknown-pragmas",
    "-Wno-attributes",
]
_LAUNCH = re.compile(r"<<<(.*?)>>>(\s*)\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;\[]*?)\b(\w+)\s*\[\s*\]\s*;")


def emu_rewrite(text):
    """The two spellings of a .cu that are not C++: launches and `extern __shared__` arrays."""
    text = _LAUNCH.sub(
        lambda m: "^ ::fl_emu::config(" + m.group(1) + ") ^" + m.group(2) + "::fl_emu::args(", text
    )

    def dynamic_shared(m):
        element = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m.group(1)).strip()
        return f"{element}* const {m.group(2)} = static_cast<{element}*>(::fl_emu::dynamic_shared_memory());"

    return _EXTERN_SHARED.sub(dynamic_shared, text)


def _emu_kernel_sources():
    return [
        f
        for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
        if "__global__" in open(f).read()
    ]


def _compile_emu_kernels(build_temp):
    """Rewritten .cu -> .cc (only rewritten when changed, for ccache) -> objects, MAX_JOBS at a time."""
    src_dir = os.path.join(build_temp, "emu-src")
    os.makedirs(src_dir, exist_ok=True)
    cxx = os.environ.get("CXX", "c++").split()
    if shutil.which("ccache") and "ccache" not in cxx[0]:
        cxx = ["ccache"] + cxx
    jobs = []
    for cu in _emu_kernel_sources():
        stem = os.path.splitext(os.path.basename(cu))[0]
        cc = os.path.join(src_dir, stem + ".cc")
        text = f'#line 1 "{cu}"\n' + emu_rewrite(open(cu).read())
        if not os.path.exists(cc) or open(cc).read() != text:
            with open(cc, "w") as f:
                f.write(text)
        obj = os.path.join(src_dir, stem + ".o")
        flags = EMU_KERNEL_FLAGS + [f"-I{d}" for d in EMU_INCLUDES]
        jobs.append((cxx + flags + ["-c", cc, "-o", obj], obj))

    def run(job):
        print(" ".join(job[0]), flush=True)
        subprocess.check_call(job[0])
        return job[1]

    controls = _emu_controls()
    controlled = {c["source"]: [] for c in controls}
    for c in controls:
        controlled[c["source"]].append(c["launch"])
    for i, (cmd, obj) in enumerate(jobs):
        # the real launch_<op>_cuda of a controlled op becomes <...>_emulated; module.cpp's dispatcher
        # takes its name and calls it, or the active control
        stem = os.path.splitext(os.path.basename(obj))[0] + ".cu"
        jobs[i] = (cmd[:-4] + [f"-D{fn}={fn}_emulated" for fn in controlled.get(stem, [])] + cmd[-4:], obj)
    for c in controls:
        text = open(os.path.join(ROOT, "csrc", "kernels", c["source"])).read()
        if text.count(c["old"]) != 1:
            raise RuntimeError(
                f"emulator control {c['name']}: its edit matches {text.count(c['old'])} times "
                f"in csrc/kernels/{c['source']} (must be once): update tests/emu/controls.py"
            )
        text = emu_rewrite(text.replace(c["old"], c["new"]))
        text += f"\nFL_EMU_CONTROL({c['name']}, {c['launch']}, {c['params']})\n"
        cc = os.path.join(src_dir, "control_" + c["name"] + ".cc")
        if not os.path.exists(cc) or open(cc).read() != text:
            with open(cc, "w") as f:
                f.write(text)
        obj = os.path.join(src_dir, "control_" + c["name"] + ".o")
        flags = EMU_KERNEL_FLAGS + [f"-Dfastlatent=fl_control_{c['name']}"] + [f"-I{d}" for d in EMU_INCLUDES]
        jobs.append((cxx + flags + ["-c", cc, "-o", obj], obj))

    with concurrent.futures.ThreadPoolExecutor(max(1, int(os.environ.get("MAX_JOBS", "2")))) as pool:
        return list(pool.map(run, jobs))


def _emu_controls():
    """The planted-bug controls (tests/emu/controls.py), when the tests are part of the tree."""
    path = os.path.join(ROOT, "tests", "emu", "controls.py")
    if not os.path.exists(path):
        return []
    scope = {}
    exec(compile(open(path).read(), path, "exec"), scope)
    return scope["CONTROLS"]


def _emu_extension():
    # The bindings compile unchanged: binding_shim.h sends their CUDA registrations to fastlatent_emu.
    bindings = [
        f
        for f in sorted(glob.glob(os.path.join("csrc", "torch", "*.cpp")))
        if os.path.basename(f) not in ("library.cpp", "module.cpp")
    ]
    cxx = [
        "-O2",
        "-g0",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-unused-function",
        "-include",
        os.path.join(ROOT, "csrc", "emu", "binding_shim.h"),
    ]
    return CppExtension(
        name="fastlatent._emu",
        # fsq_cpu.cpp: fsq_make_constants, the host-side level tables the fsq binding fills in
        sources=[os.path.join("csrc", "emu", f) for f in ("runtime.cpp", "module.cpp")]
        + bindings
        + [os.path.join("csrc", "kernels", "fsq_cpu.cpp")],
        include_dirs=EMU_INCLUDES + [os.path.join(ROOT, "csrc", "torch")],
        define_macros=[("FL_WITH_CUDA", None), ("FL_OP_NAMESPACE", '"fastlatent_emu"')],
        extra_compile_args={"cxx": cxx},
        # fastlatent._C defines the same fastlatent:: launchers for the GPU: bind ours to ours
        extra_link_args=["-Wl,-Bsymbolic"],
    )


class BuildExt(BuildExtension):
    """Keeps objects in build/temp-<tag> (not a random /tmp dir) so pip rebuilds are incremental."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp-" + BUILD_TAG)

    def build_extension(self, ext):
        if ext.name != "fastlatent._emu":
            return super().build_extension(ext)
        # its own folder: the bindings compile again here with other flags (and _C's objects stay valid)
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, "emu")
        try:
            ext.extra_objects = _compile_emu_kernels(self.build_temp)
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


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
    description=(
        "Fast C++/CUDA kernels for latent generative models: VQ, FSQ, fused GroupNorm, diffusion samplers"
    ),
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The benchmark suites ship inside the wheel as fastlatent/_benchmarks, so `fastlatent bench` works after
    # a plain pip install (an editable install finds them in the checkout's benchmarks/ folder instead).
    packages=find_packages(include=["fastlatent", "fastlatent.*"]) + ["fastlatent._benchmarks"],
    package_dir={"fastlatent._benchmarks": "benchmarks"},
    package_data={"fastlatent._benchmarks": ["*.md"]},
    ext_modules=[_extension(), _emu_extension()],
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
