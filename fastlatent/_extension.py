"""Loads the compiled extension fastlatent._C and explains clearly when it can't."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch and its libcudart before _C needs them)

from fastlatent._version import __version__

try:
    from fastlatent import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# Read once: a plain bool that torch.compile can trace through (a call into _C can't be).
HAS_CUDA_KERNELS = bool(_C is not None and _C.build_info()["cuda"])

REBUILD_HINT = (
    "Build it from the fastlatent checkout with:\n"
    "    pip install --no-build-isolation --no-deps -e .\n"
    "(add FASTLATENT_CUDA=1 to insist on the CUDA kernels; `fastlatent info` shows what was built)"
)


def extension_available() -> bool:
    """True when fastlatent._C loaded, so torch.ops.fastlatent.* exist."""
    return _C is not None


def _explain_missing() -> str:
    lines = [f"fastlatent's compiled extension (fastlatent._C) could not be loaded: {_IMPORT_ERROR}"]
    try:
        from fastlatent import _build_meta
    except ImportError:
        lines.append("It does not seem to have been built.")
    else:
        if _build_meta.TORCH_VERSION != torch.__version__:
            lines.append(
                f"It was built against torch {_build_meta.TORCH_VERSION}, but torch {torch.__version__} "
                "is installed now: rebuild it against this torch."
            )
    lines.append(REBUILD_HINT)
    return "\n".join(lines)


def require_extension(op: str) -> None:
    """Raise a RuntimeError naming `op` and the fix when the extension is missing."""
    if _C is None:
        raise RuntimeError(f"fastlatent.{op}: " + _explain_missing())


def require_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise when a CUDA tensor reaches an op of a build without CUDA kernels."""
    require_extension(op)
    if not HAS_CUDA_KERNELS and any(t.is_cuda for t in tensors):
        raise RuntimeError(
            f"fastlatent.{op} got a CUDA tensor, but this build of fastlatent has no CUDA kernels "
            "(built without nvcc, against a CPU-only torch, or with FASTLATENT_CUDA=0).\n" + REBUILD_HINT
        )


def build_info() -> dict:
    """How fastlatent was built and what this process can use.

    Returns a dict with: version, torch (running), torch_built (compiled against),
    extension (bool), cuda (CUDA kernels compiled), cuda_archs (SM list from nvcc),
    cuda_arch_flags (TORCH_CUDA_ARCH_LIST at build time), cuda_compiled_version,
    cpu_simd, openmp_version, openmp_max_threads, torch_threads, gpus (visible devices
    with their compute capability) and, when the extension is missing, extension_error.
    """
    info = {"version": __version__, "torch": torch.__version__, "extension": _C is not None}
    if _C is not None:
        built = _C.build_info()
        info["torch_built"] = built.pop("torch_version")
        info.update(built)
    else:
        info["extension_error"] = _explain_missing()
        info["cuda"] = False
    info["torch_threads"] = torch.get_num_threads()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    info["gpus"] = gpus
    return info
