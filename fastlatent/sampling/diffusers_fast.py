"""Fused ``step`` for diffusers schedulers, installed on an instance: the class, its config and saved files
stay diffusers'.

:func:`accelerate_scheduler` gives one scheduler instance a ``step`` that runs one fused fastlatent kernel
per call where the scheduler's config and the call's arguments allow it, and diffusers' own ``step`` (the
class method, unchanged) otherwise: a fallback is never an error and never a different computation. The
instance keeps its diffusers class, so ``save_pretrained``/``save_config`` write exactly what the
unpatched scheduler writes and plain diffusers loads them; after a reload, :func:`fastlatent.patch`
installs the fused step again.

No host syncs: a fused step reads nothing from the device. Timesteps and sigmas are copied to the host
once per ``set_timesteps`` (the installed ``set_timesteps`` does it right after diffusers' own; for KDPM2,
whose ``set_timesteps`` costs about as much as a 50-step loop on the CPU, a call that repeats the last one's
arguments, config and ``alphas_cumprod`` restores copies of what that call set instead); a timestep
tensor handed to ``step`` is located in ``scheduler.timesteps`` through its storage offset (the elements a
loop over ``scheduler.timesteps`` yields are views of it), never by reading its value from the device.
Stochastic steps given a ``generator`` draw their noise exactly as diffusers does (``randn_tensor``
with the same generator, shape, device and dtype), so a seeded pipeline gives the same images; given
none, the fused op draws standard normals itself (Philox at a seed taken from torch's default CPU
generator, so ``torch.manual_seed`` repeats a run): the same distribution, not the same numbers.

What falls back, per call (the reason is counted in ``scheduler_report(scheduler).fallbacks``): inputs
that need autograd (diffusers' step is differentiable, the fused kernels are inference-only), float64 or
mixed dtypes, devices other than CPU/CUDA, a device timestep that is not an element of
``scheduler.timesteps``, and schedule values outside what a fused op accepts. Per config (reported by
:func:`fastlatent.patch`): the options listed in :data:`FALLBACK_CONFIGS`."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
import types
import warnings
from collections import Counter, OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from fastlatent._extension import _C, HAS_CUDA_KERNELS, extension_available

_STATE = "_fastlatent_step_state"
_PREDICTIONS = {
    "epsilon": "epsilon",
    "sample": "sample",
    "original_sample": "sample",
    "v_prediction": "v_prediction",
    "flow_prediction": "flow",
}
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Fallback(Exception):
    """Raised inside a fused step (before any state changed): run diffusers' step for this call."""


@dataclasses.dataclass
class SchedulerReport:
    """What :func:`accelerate_scheduler` did to one scheduler.

    ``fused``: the config runs fused steps; ``reason``: why not, when it does not (diffusers' step runs then);
    ``fallbacks``: per-call reasons that ran diffusers' step, counted.
    """

    name: str
    fused: bool
    reason: str | None = None
    fallbacks: Counter = dataclasses.field(default_factory=Counter)

    def __str__(self) -> str:
        if self.fused:
            line = f"{self.name}: step fused"
        else:
            line = f"{self.name}: diffusers' own step ({self.reason})"
        if self.fallbacks:
            calls = ", ".join(f"{why} x{n}" for why, n in self.fallbacks.items())
            line += f"; calls that ran diffusers' step: {calls}"
        return line


@dataclasses.dataclass
class _State:
    report: SchedulerReport
    family: "_Family"
    timesteps: Any = None  # the scheduler.timesteps tensor the host copy below was made from
    host_timesteps: list = dataclasses.field(default_factory=list)
    sigmas: Any = None
    host_sigmas: list = dataclasses.field(default_factory=list)
    alphas: Any = None  # (alphas_cumprod tensor, host copy)
    final_alpha: Any = None  # (final_alpha_cumprod tensor, host float)
    config: Any = None  # the scheduler's (frozen) config that config_reason below was computed for
    config_reason: str | None = None
    host_tables: dict = dataclasses.field(default_factory=dict)  # family tables: name -> (tensor, host list)
    differences: dict = dataclasses.field(default_factory=dict)  # _table_difference: (names, shifts) -> cache
    # DDIM, DDPM, PNDM, LCM: (alphas_cumprod, final_alpha_cumprod, the device table of _traced_timestep)
    traced_alphas: Any = None
    # the last set_timesteps of a family with set_timesteps_attributes: (arguments, config, alphas_cumprod,
    # its version counter, {attribute: value})
    set_timesteps_memo: Any = None


@dataclasses.dataclass
class _Family:
    """One fused scheduler family.

    ``step`` returns the output tuple (what diffusers returns with ``return_dict=False``); :func:`_run_family`
    does the part every family shares: the ``set_timesteps`` check (``needs_set_timesteps``), the per-call
    tensor checks (of the inputs and of the solver state named by ``state_tensors``) and diffusers' output
    dataclass ``output`` (``"module.Class"``).
    """

    config_reason: Callable[[Any], str | None]  # a config-level reason to run diffusers' step, or None
    step: Callable[..., tuple]  # (scheduler, state, arguments) -> diffusers' step output as a tuple
    output: str
    needs_set_timesteps: bool = False
    snapshot: Callable[[Any, Any], None] | None = None  # host copies of the family's own schedule tables
    # the stored solver tensors the step reads (a fallback step may have stored one that requires grad)
    state_tensors: Callable[[Any], tuple] | None = None
    # where diffusers' set_timesteps is a pure function of its arguments, the config and alphas_cumprod and
    # sets exactly these attributes (read in its source; tests compare every attribute with diffusers'): a
    # call that repeats the last one restores copies of its result instead of recomputing it
    set_timesteps_attributes: tuple[str, ...] = ()
    _output_type: Any = dataclasses.field(default=None, repr=False)  # (class, field names), on first use


# ------------------------------------------------------------------ host copies and timestep lookup


def _host_copy(tensor) -> list:
    if tensor is None:
        return []
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu", torch.float64).tolist()
    return [float(v) for v in tensor]


def _refresh(scheduler, state: _State) -> None:
    """Host copies of timesteps and sigmas; made again only when the scheduler holds new tensors."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is not state.timesteps:
        if (
            isinstance(timesteps, torch.Tensor)
            and timesteps.device.type != "cpu"
            and state.timesteps is not None
        ):
            raise _Fallback("scheduler.timesteps replaced on the device after set_timesteps")
        state.timesteps, state.host_timesteps = timesteps, _host_copy(timesteps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not state.sigmas:
        if isinstance(sigmas, torch.Tensor) and sigmas.device.type != "cpu" and state.sigmas is not None:
            raise _Fallback("scheduler.sigmas replaced on the device after set_timesteps")
        state.sigmas, state.host_sigmas = sigmas, _host_copy(sigmas)


def _timestep_value(state: _State, timestep) -> float:
    """The timestep as a host number, without reading the device."""
    if isinstance(timestep, torch.Tensor):
        if torch.compiler.is_compiling():
            # a traced tensor has no value and no storage to locate it by: diffusers' own lookup would read
            # it back (a graph break); a compiled loop sets the step index first (set_begin_index)
            raise _Fallback(
                "a timestep tensor before the step index is known, under torch.compile "
                "(call scheduler.set_begin_index(0) before a compiled loop)"
            )
        base = state.timesteps
        if timestep._base is base and base is not None and base.dim() == 1 and timestep.dim() == 0:
            # an element of scheduler.timesteps, as a loop over it yields (the common case, checked cheaply)
            index, rest = divmod(timestep.storage_offset() - base.storage_offset(), base.stride(0) or 1)
            if rest == 0 and 0 <= index < len(state.host_timesteps):
                return state.host_timesteps[index]
        if (
            isinstance(base, torch.Tensor)
            and timestep.dim() == 0
            and timestep.device == base.device
            and base.dim() == 1
            and base.numel() > 0
            and timestep.dtype == base.dtype
            and timestep.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        ):
            index, rest = divmod(timestep.storage_offset() - base.storage_offset(), base.stride(0) or 1)
            if rest == 0 and 0 <= index < len(state.host_timesteps):
                return state.host_timesteps[index]
        if timestep.device.type == "cpu" and timestep.numel() == 1:
            return float(timestep.reshape(()).tolist())
        raise _Fallback("timestep is a device tensor that is not an element of scheduler.timesteps")
    return float(timestep)


def _index_for_timestep(state: _State, timestep) -> int:
    """diffusers' index_for_timestep on the host copy: the second match when the timestep repeats."""
    value = _timestep_value(state, timestep)
    base = state.timesteps
    if isinstance(base, torch.Tensor) and base.dtype == torch.float32:
        value = float(torch.tensor(value, dtype=torch.float32).tolist())
    matches = [i for i, t in enumerate(state.host_timesteps) if t == value]
    if not matches:
        raise _Fallback("timestep not in scheduler.timesteps")
    return matches[1] if len(matches) > 1 else matches[0]


def _step_index(scheduler, state: _State, timestep) -> int:
    """The step index diffusers' _init_step_index would set (begin_index, or the timestep's position)."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    return _index_for_timestep(state, timestep)


# ------------------------------------------------------------------ per-call checks


_GRAD = "inputs require grad (the fused step is inference-only)"


def _check_call(model_output, sample) -> None:
    """Per call: what every fused op needs of the two step tensors (the ops then run without re-checking)."""
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise _Fallback("model_output and sample must be tensors")
    if (model_output.requires_grad or sample.requires_grad) and torch.is_grad_enabled():
        raise _Fallback(_GRAD)
    dtype = sample.dtype
    if dtype not in _FUSED_DTYPES:
        raise _Fallback(f"dtype {dtype}")
    if model_output.dtype != dtype:
        raise _Fallback("model_output and sample dtypes differ")
    # the device through is_cpu/is_cuda/get_device (plain values; building torch.device objects to compare
    # was a tenth of a small step's host time)
    cuda = sample.is_cuda
    if (
        not (cuda or sample.is_cpu)
        or model_output.is_cuda != cuda
        or model_output.is_cpu != sample.is_cpu
        or (cuda and model_output.get_device() != sample.get_device())
    ):
        raise _Fallback(f"device {sample.device}")
    if cuda and not HAS_CUDA_KERNELS:
        raise _Fallback("this build of fastlatent has no CUDA kernels")
    if model_output.shape != sample.shape:
        raise _Fallback("model_output and sample shapes differ")
    if sample.dim() < 1:
        raise _Fallback("0-d sample")


def _check_no_grad(*tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise _Fallback(_GRAD)


def _prediction(scheduler) -> str:
    name = scheduler.config.prediction_type
    if name not in _PREDICTIONS:
        raise _Fallback(f"prediction_type={name!r}")
    return _PREDICTIONS[name]


def _x0_options(config) -> dict:
    if getattr(config, "thresholding", False):
        return dict(
            threshold_quantile=float(config.dynamic_thresholding_ratio),
            threshold_max=float(config.sample_max_value),
        )
    if getattr(config, "clip_sample", False):
        return dict(clip_x0=float(config.clip_sample_range))
    return {}


def _x0_reason(config) -> str | None:
    if getattr(config, "thresholding", False):
        ratio, top = float(config.dynamic_thresholding_ratio), float(config.sample_max_value)
        if not 0.0 < ratio <= 1.0:
            return f"thresholding with dynamic_thresholding_ratio={ratio} (the fused step takes (0, 1])"
        if not top >= 1.0:
            return f"thresholding with sample_max_value={top} (the fused step takes >= 1)"
    elif getattr(config, "clip_sample", False) and not float(config.clip_sample_range) > 0.0:
        return f"clip_sample_range={config.clip_sample_range}"
    return None


def _randn(shape, generator, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class _KernelNoise:
    """Stands for noise that the fused op draws itself (Philox normals at a fresh seed)."""


_KERNEL_NOISE = _KernelNoise()


def _step_noise(a, shape, device, dtype):
    """The noise of a stochastic step: diffusers' own draw (randn_tensor) when the caller passed a
    generator, so its images are reproduced exactly; otherwise drawn inside the fused op, with the same
    distribution and without randn_tensor's cost (about half of a DDPM step on the CPU). Under
    torch.compile or CUDA-graph capture, diffusers' draw too: the kernel's seed is read on the host, which
    would break the graph or be frozen into every replay."""
    if a["generator"] is not None or _tracing_or_capturing(device):
        return _randn(shape, a["generator"], device, dtype)
    return _KERNEL_NOISE


def _tracing_or_capturing(device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _kernel_seed() -> int:
    """seed_from_generator(None) without ``.item()``: a 63-bit seed from torch's default CPU generator (so
    ``torch.manual_seed`` repeats a run), read from a CPU tensor, so no device is ever synchronised."""
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).tolist()[0]


_STEP_OPS = ("ddim_step", "euler_step", "sampler_step")
# the registered ops the fused steps call, by name, looked up once (three attribute lookups per call
# otherwise); empty without the extension, whose steps then all fall back (_fast_step)
_OPS = {name: getattr(torch.ops.fastlatent, name).default for name in _STEP_OPS} if _C is not None else {}


def _direct_lanes() -> dict:
    """The ops' direct lanes (csrc/torch/direct_steps.h), by op: the op's own checks and kernel without the
    dispatcher's argument parsing, two thirds of a small step's op call on the CPU. Each with the op's
    argument names and defaults, so that keyword arguments are passed by position (pybind11 matches a
    keyword in about a microsecond)."""
    if _C is None or not hasattr(_C, "_direct_sampler_step"):
        return {}
    lanes = {}
    for name in _STEP_OPS:
        op = _OPS[name]
        arguments = op._schema.arguments
        position = {a.name: i for i, a in enumerate(arguments)}
        defaults = [a.default_value if a.has_default_value() else None for a in arguments]
        lanes[op] = (getattr(_C, f"_direct_{name}"), position, defaults)
    return lanes


_DIRECT_LANES = _direct_lanes()


def _rejected(exc: Exception) -> _Fallback:
    """The fallback for an op (or lane) that rejected this schedule's arguments, with the op's message."""
    return _Fallback(str(exc).split("\n")[0])


def _call_op(op, *args, **kwargs):
    """Runs a fused op; one whose argument checks reject this schedule runs diffusers' step instead.

    ``op`` is the registered operator itself (``torch.ops.fastlatent.<op>.default``), not the public
    wrapper of :mod:`fastlatent.ops.sampler_steps`: the wrapper's checks (extension, device, autograd) are
    made once per call by :func:`_fast_step` and :func:`_check_call`, and its overhead was a tenth of a
    step at SD latent sizes on the CPU. In eager mode the op runs through its direct lane, which returns
    None wherever the dispatcher has work to do (a dispatch or torch function mode, a tensor subclass, a
    functorch transform, ...); under torch.compile the op itself is called, so the graph holds it.
    """
    try:
        lane = _DIRECT_LANES.get(op)
        if lane is not None and not torch.compiler.is_compiling():
            run, position, defaults = lane
            if kwargs:
                full = list(args)
                full += defaults[len(args) :]
                for key, value in kwargs.items():
                    full[position[key]] = value
                args, kwargs = full, {}
            result = run(*args)
            if result is not None:
                return result
        return op(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise _rejected(exc) from exc


# ------------------------------------------------------------------ traced timesteps (torch.compile)
#
# DDIM, DDPM, PNDM and LCM look their coefficients up by the timestep's value. A timestep tensor traced by
# torch.compile has none (diffusers' own steps break the graph there, on `if prev_timestep >= 0`); these
# families then look it up on the device instead: tables built outside the step (set_timesteps), indexed
# by the traced timestep, coefficients as 0-d tensors, and the step as the torch operations of the fused
# op's formula, which inductor fuses into one kernel. Eager calls never take this path.


def _traced(timestep) -> bool:
    return isinstance(timestep, torch.Tensor) and torch.compiler.is_compiling()


def _alphas_entry_current(entry, alphas, final) -> bool:
    """Whether a table of :func:`_alpha_snapshot` was made from these alphas_cumprod and final alpha."""
    return entry is not None and entry[0] is alphas and entry[1] is final


def _traced_timestep(scheduler, state, timestep, device):
    """(table, t) for a traced timestep: alphas_cumprod (float64, the float32 values) with final_alpha_cumprod
    appended (1.0 where the scheduler has none), made by :func:`_alpha_snapshot` after set_timesteps, and the
    timestep on its device, as the integer index diffusers uses it as."""
    entry = state.traced_alphas
    if not _alphas_entry_current(
        entry, scheduler.alphas_cumprod, getattr(scheduler, "final_alpha_cumprod", None)
    ):
        raise _Fallback("no device alphas for this schedule (set_timesteps not called before compiling)")
    table = entry[2]
    if table.device != device:
        raise _Fallback("scheduler.timesteps on another device than the sample (set_timesteps(device=...))")
    if timestep.is_floating_point() or timestep.dim() != 0:
        raise _Fallback("a traced timestep that is not a 0-d integer tensor")
    return table, timestep.to(table.device)


def _alpha_snapshot(scheduler, state) -> None:
    """The table of :func:`_traced_timestep` on the timesteps' device, made again only when alphas_cumprod,
    final_alpha_cumprod or that device change."""
    timesteps = getattr(scheduler, "timesteps", None)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(timesteps, torch.Tensor) or not isinstance(alphas, torch.Tensor):
        return
    final = getattr(scheduler, "final_alpha_cumprod", None)
    entry = state.traced_alphas
    if not _alphas_entry_current(entry, alphas, final) or entry[2].device != timesteps.device:
        host = alphas.detach().to("cpu", torch.float64)
        last = _final_alpha(scheduler, state) if final is not None else 1.0
        table = torch.cat([host, host.new_full((1,), last)]).to(timesteps.device)
        state.traced_alphas = (alphas, final, table)


def _previous_alpha(table, prev_t):
    """The table's alpha at a previous timestep, the appended final alpha where it is negative (diffusers'
    ``alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod``)."""
    return _lookup(table, torch.where(prev_t >= 0, prev_t, table.shape[0] - 1))


def _sqrt(value):
    """math.sqrt of a host number, Tensor.sqrt of a 0-d tensor (a coefficient at a traced timestep)."""
    return value.sqrt() if isinstance(value, torch.Tensor) else math.sqrt(value)


def _lookup(table, index):
    """table[index] for a 0-d index tensor as a tensor operation (a 0-d index is read back as a number)."""
    return table[index.reshape(1)].reshape(())


def _clip_or_threshold(x0, options: dict):
    """diffusers' clip_sample / _threshold_sample (Imagen dynamic thresholding) on a float32 x0."""
    if "clip_x0" in options:
        return x0.clamp(-options["clip_x0"], options["clip_x0"])
    if "threshold_quantile" not in options:
        return x0
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), options["threshold_quantile"], dim=1)
    s = s.clamp(min=1.0, max=options["threshold_max"]).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape)


def _terms(*pairs):
    """sum(c * v) over (coefficient, tensor) pairs, a Python-number zero coefficient skipped."""
    total = None
    for coefficient, value in pairs:
        if isinstance(coefficient, (int, float)) and coefficient == 0.0:
            continue
        if isinstance(coefficient, torch.Tensor):
            coefficient = coefficient.to(torch.float32)
        term = coefficient * value
        total = term if total is None else total + term
    return total


def _combine_traced(
    model_output,
    sample,
    x0_form,
    *,
    out_x=0.0,
    out_m=0.0,
    out_x0=0.0,
    history=(),
    out_history=(),
    noise=None,
    out_noise=0.0,
    x0_options=None,
    return_x0=True,
):
    """:func:`_combine` with coefficients that may be 0-d tensors: the fused op's formula in float32 torch
    operations (as its kernels compute), for torch.compile to fuse."""
    x, m = sample.float(), model_output.float()
    pairs = [(out_x, x), (out_m, m)] + [(c, h.float()) for c, h in zip(out_history, history)]
    x0 = None
    if return_x0 or not (isinstance(out_x0, (int, float)) and out_x0 == 0.0):
        x0 = _clip_or_threshold(_terms((x0_form[0], x), (x0_form[1], m)), x0_options or {})
        pairs.append((out_x0, x0))
    if noise is not None:
        pairs.append((out_noise, noise.float()))
    out = _terms(*pairs)
    if out is None:
        out = torch.zeros_like(x)
    out = out.to(sample.dtype)
    return (out, x0.to(sample.dtype)) if return_x0 else (out, sample.new_empty((0,)))


# ------------------------------------------------------------------ families


def _ddim_reason(scheduler) -> str | None:
    return _prediction_reason(scheduler.config, "epsilon", "sample", "v_prediction") or _x0_reason(
        scheduler.config
    )


def _ddim_step(scheduler, state, a):
    eta = a["eta"]
    if not isinstance(eta, (int, float)):
        raise _Fallback("eta is not a number")
    noise = a["variance_noise"]
    if eta > 0 and noise is not None and a["generator"] is not None:
        raise _Fallback("both generator and variance_noise")
    model_output, sample = a["model_output"], a["sample"]
    _check_no_grad(noise)
    if _traced(a["timestep"]):
        return _ddim_traced(scheduler, state, a, eta, noise)
    t = int(_timestep_value(state, a["timestep"]))
    config = scheduler.config
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = _alphas_cumprod(scheduler)
    if not 0 <= t < len(alphas):
        raise _Fallback(f"timestep {t} outside the training schedule")
    alpha_bar_t = alphas[t]
    alpha_bar_prev = alphas[prev_t] if prev_t >= 0 else _final_alpha(scheduler, state)
    if eta > 0:
        if noise is None:
            noise = _randn(model_output.shape, a["generator"], model_output.device, model_output.dtype)
        elif noise.shape != sample.shape or noise.dtype != sample.dtype or noise.device != sample.device:
            raise _Fallback("variance_noise unlike sample")
    prev_sample, x0 = _call_op(
        _OPS["ddim_step"],
        model_output,
        sample,
        float(alpha_bar_t),
        float(alpha_bar_prev),
        float(eta),
        prediction=_prediction(scheduler),
        use_clipped_model_output=bool(a["use_clipped_model_output"]),
        noise=noise if eta > 0 else None,
        seed=0,
        **_x0_options(config),
    )
    return prev_sample, x0


def _ddim_traced(scheduler, state, a, eta, noise):
    """DDIM at a traced timestep (see :func:`_traced`): diffusers' formula over the processed x0, with
    the coefficients looked up on the device."""
    model_output, sample = a["model_output"], a["sample"]
    table, t = _traced_timestep(scheduler, state, a["timestep"], sample.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ab_t = _lookup(table, t)
    ab_prev = _previous_alpha(table, prev_t)
    alpha, sigma = ab_t.sqrt(), (1.0 - ab_t).sqrt()
    x0_form, eps_form = _vp_forms(scheduler.config.prediction_type, alpha, sigma)
    std = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).sqrt() if eta > 0 else 0.0
    direction = (1.0 - ab_prev - std**2).sqrt()
    options = _x0_options(scheduler.config)
    if options and a["use_clipped_model_output"]:  # eps = (x - alpha x0) / sigma, from the processed x0
        out_x, out_m, out_x0 = direction / sigma, 0.0, ab_prev.sqrt() - direction * alpha / sigma
    else:  # eps from the forms; epsilon prediction's (0, 1) leaves no x term
        out_x, out_m = (0.0 if isinstance(c, float) and c == 0.0 else direction * c for c in eps_form)
        out_x0 = ab_prev.sqrt()
    if eta > 0 and noise is None:
        noise = _randn(model_output.shape, a["generator"], model_output.device, model_output.dtype)
    return _combine_traced(
        model_output,
        sample,
        x0_form,
        out_x=out_x,
        out_m=out_m,
        out_x0=out_x0,
        noise=noise if eta > 0 else None,
        out_noise=std,
        x0_options=options,
    )


def _alphas_cumprod(scheduler) -> list:
    """alphas_cumprod as host floats (copied at the swap and per set_timesteps, see _refresh)."""
    state = scheduler.__dict__[_STATE]
    alphas = scheduler.alphas_cumprod
    if state.alphas is None or state.alphas[0] is not alphas:
        if (
            state.alphas is not None
            and alphas.device.type != "cpu"
            and alphas.numel() == len(state.alphas[1])
        ):
            # add_noise moves alphas_cumprod to the sample's device: same values, no copy back
            state.alphas = (alphas, state.alphas[1])
        else:
            state.alphas = (alphas, _host_copy(alphas))
    return state.alphas[1]


def _final_alpha(scheduler, state) -> float:
    final = scheduler.final_alpha_cumprod
    if state.final_alpha is None or state.final_alpha[0] is not final:
        state.final_alpha = (
            final,
            _host_copy(final.reshape(1))[0] if isinstance(final, torch.Tensor) else final,
        )
    return float(state.final_alpha[1])


def _snapshot(scheduler, state) -> None:
    """Host copies of everything a fused step reads, made outside step (at the swap, after set_timesteps)."""
    try:
        _refresh(scheduler, state)
    except _Fallback:
        pass
    if isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor):
        _alphas_cumprod(scheduler)
    if isinstance(getattr(scheduler, "final_alpha_cumprod", None), torch.Tensor):
        _final_alpha(scheduler, state)
    if state.family.snapshot is not None:
        state.family.snapshot(scheduler, state)


def _ddpm_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.variance_type not in ("fixed_small",):
        return f"variance_type={config.variance_type!r}"
    return _ddim_reason(scheduler)


def _ddpm_coefficients(alpha_bar_t: float, alpha_bar_prev: float, prediction: str):
    """DDPM's coefficients rounded to float32 in diffusers' order of operations: its step is applied up to
    1000 times, and coefficients rounded differently (even more exactly) drift measurably from its loop."""
    f = np.float32
    a, ap = f(alpha_bar_t), f(alpha_bar_prev)
    beta, beta_prev = f(1) - a, f(1) - ap
    current_alpha = a / ap
    current_beta = f(1) - current_alpha
    sqrt_a, sqrt_b = f(a**0.5), f(beta**0.5)
    if prediction == "epsilon":
        x0_form = (1.0 / float(sqrt_a), -float(sqrt_b) / float(sqrt_a))
    elif prediction == "sample":
        x0_form = (0.0, 1.0)
    elif prediction == "v_prediction":
        x0_form = (float(sqrt_a), -float(sqrt_b))
    else:
        raise _Fallback(f"prediction_type={prediction!r}")
    out_x0 = (f(ap**0.5) * current_beta) / beta
    out_x = (f(current_alpha**0.5) * beta_prev) / beta
    variance = max((beta_prev / beta) * current_beta, f(1e-20))
    return x0_form, float(out_x), float(out_x0), float(f(variance**0.5))


def _ddpm_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    if _traced(a["timestep"]):
        return _ddpm_traced(scheduler, state, a)
    t = int(_timestep_value(state, a["timestep"]))
    if scheduler.custom_timesteps or scheduler.num_inference_steps:
        host = state.host_timesteps
        if t not in host:
            raise _Fallback("timestep not in scheduler.timesteps")
        index = host.index(t)
        prev_t = -1 if index == len(host) - 1 else int(host[index + 1])
    else:
        prev_t = t - 1
    alphas = _alphas_cumprod(scheduler)
    if not 0 <= t < len(alphas):
        raise _Fallback(f"timestep {t} outside the training schedule")
    alpha_bar_t = alphas[t]
    alpha_bar_prev = alphas[prev_t] if prev_t >= 0 else 1.0
    noise = _step_noise(a, model_output.shape, model_output.device, model_output.dtype) if t > 0 else None
    prediction = scheduler.config.prediction_type
    x0_form, out_x, out_x0, out_noise = _ddpm_coefficients(alpha_bar_t, alpha_bar_prev, prediction)
    prev_sample, x0 = _combine(
        model_output,
        sample,
        x0_form,
        out_x=out_x,
        out_x0=out_x0,
        noise=noise,
        out_noise=out_noise if noise is not None else 0.0,
        x0_options=_x0_options(scheduler.config),
    )
    return prev_sample, x0


def _ddpm_traced(scheduler, state, a):
    """DDPM at a traced timestep (see :func:`_traced`): coefficients in float32 in diffusers' order of
    operations, as :func:`_ddpm_coefficients` rounds them; the noise term is zero at t = 0."""
    model_output, sample = a["model_output"], a["sample"]
    table, t = _traced_timestep(scheduler, state, a["timestep"], sample.device)
    if scheduler.custom_timesteps or scheduler.num_inference_steps:
        # diffusers' previous_timestep: the timestep after t's first position in scheduler.timesteps, -1
        # after the last; where t is not there (diffusers' lookup fails), NaN: never another step's alpha
        timesteps = scheduler.timesteps.to(table.device)
        matches = timesteps == t
        first = matches & (matches.cumsum(0) == 1)
        following = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
        prev_t = (first * following).sum()
        ab_prev = torch.where(matches.any(), _previous_alpha(table, prev_t), math.nan)
    else:  # t - 1, and 1.0 (DDPM's appended alpha) before the first training timestep
        ab_prev = _previous_alpha(table, t - 1)
    ab, ab_prev = _lookup(table, t).float(), ab_prev.float()
    beta, beta_prev = 1.0 - ab, 1.0 - ab_prev
    current_alpha = ab / ab_prev
    current_beta = 1.0 - current_alpha
    sqrt_a, sqrt_b = ab.sqrt(), beta.sqrt()
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0_form = (1.0 / sqrt_a, -sqrt_b / sqrt_a)
    elif prediction == "sample":
        x0_form = (0.0, 1.0)
    elif prediction == "v_prediction":
        x0_form = (sqrt_a, -sqrt_b)
    else:
        raise _Fallback(f"prediction_type={prediction!r}")
    variance = (beta_prev / beta * current_beta).clamp(min=1e-20)
    noise = _step_noise(a, model_output.shape, model_output.device, model_output.dtype)
    return _combine_traced(
        model_output,
        sample,
        x0_form,
        out_x=current_alpha.sqrt() * beta_prev / beta,
        out_x0=ab_prev.sqrt() * current_beta / beta,
        noise=noise,
        out_noise=torch.where(t > 0, variance.sqrt(), 0.0),
        x0_options=_x0_options(scheduler.config),
    )


_INTEGER_DTYPES = (torch.int32, torch.int64)


def _reject_integer_timestep(timestep, name: str) -> None:
    """diffusers' ``isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))`` (the legacy types are
    CPU int32/int64 tensors), without the legacy types' slow isinstance on the common float tensor."""
    if isinstance(timestep, int) or (
        isinstance(timestep, torch.Tensor)
        and timestep.dtype in _INTEGER_DTYPES
        and timestep.device.type == "cpu"
    ):
        raise _Fallback(f"integer timestep (diffusers' {name} refuses it)")


def _sigma_step(scheduler, state, a, name: str) -> tuple[int, list]:
    """The prologue of the sigma-space steps (Euler, Euler ancestral, flow Euler): diffusers' refusal of
    integer timesteps (``name``: its class), then the step index and the host sigmas, one past it included."""
    _reject_integer_timestep(a["timestep"], name)
    index = _step_index(scheduler, state, a["timestep"])
    sigmas = state.host_sigmas
    if index + 1 >= len(sigmas):
        raise _Fallback("step past the last sigma")
    return index, sigmas


def _reject_churn(a, sigma: float, sigma_count: int) -> None:
    """Stochastic churn (diffusers' gamma > 0 at this sigma) is not fused: diffusers' step runs."""
    s_churn, s_tmin, s_tmax = a["s_churn"], a["s_tmin"], a["s_tmax"]
    gamma = min(s_churn / (sigma_count - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma > 0:
        raise _Fallback("s_churn > 0")


def _prediction_reason(config, *supported: str) -> str | None:
    """The config-level reason for a prediction type the fused step does not implement, or None."""
    if config.prediction_type not in supported:
        return f"prediction_type={config.prediction_type!r}"
    return None


# what the multistep solvers' fused steps convert (DPM-Solver multistep/singlestep, UniPC, DEIS)
_SOLVER_PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _solver_config_reason(config) -> str | None:
    """The config-level reasons shared by the DPM-Solver and DEIS families: order above 3, a learned
    variance, an unsupported prediction type (checked in that order), or None."""
    if config.solver_order > 3:
        return f"solver_order={config.solver_order}"
    if getattr(config, "variance_type", None) in ("learned", "learned_range"):
        return f"variance_type={config.variance_type!r}"
    return _prediction_reason(config, *_SOLVER_PREDICTIONS)


def _euler_reason(scheduler) -> str | None:
    return _prediction_reason(scheduler.config, "epsilon", "sample", "original_sample", "v_prediction")


def _euler_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    index, sigmas = _sigma_step(scheduler, state, a, "EulerDiscreteScheduler")
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    _reject_churn(a, sigma, len(sigmas))
    prev_sample, x0 = _call_op(
        _OPS["euler_step"],
        model_output,
        sample,
        float(sigma),
        float(sigma_next),
        prediction=_prediction(scheduler),
    )
    scheduler._step_index = index + 1
    return prev_sample, x0


def _flow_reason(scheduler) -> str | None:
    return None


def _flow_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    index, sigmas = _sigma_step(scheduler, state, a, "FlowMatchEulerDiscreteScheduler")
    if a["per_token_timesteps"] is not None:
        raise _Fallback("per_token_timesteps")
    if scheduler.config.stochastic_sampling:
        prev_sample = _flow_stochastic(scheduler, state, a, index, sigmas)
        scheduler._step_index = index + 1
        return (prev_sample,)
    prev_sample, _ = _call_op(
        _OPS["euler_step"],
        model_output,
        sample,
        float(sigmas[index]),
        float(sigmas[index + 1]),
        prediction="flow",
        return_x0=False,
    )
    scheduler._step_index = index + 1
    return (prev_sample,)


def _combine(
    model_output,
    sample,
    x0_form,
    *,
    out_x=0.0,
    out_m=0.0,
    out_x0=0.0,
    history=(),
    out_history=(),
    noise=None,
    out_noise=0.0,
    x0_options=None,
    return_x0=True,
):
    """One generic fused step (fastlatent.ops.sampler_step) with host coefficients."""
    if history:
        # the op rejects a history tensor of another shape or dtype with a ValueError/TypeError (a fallback,
        # through _call_op); another device is a RuntimeError there, so it is checked here (as _check_call
        # does, without building torch.device objects), with autograd
        cuda = sample.is_cuda
        index = sample.get_device() if cuda else -1
        grad = torch.is_grad_enabled()
        for h in history:
            if not isinstance(h, torch.Tensor) or (h.get_device() != index if cuda else not h.is_cpu):
                raise _Fallback("solver history unlike sample")
            if grad and h.requires_grad:
                raise _Fallback(_GRAD)
    # only the keyword arguments that differ from the schema's defaults: each one passed costs the op call
    # about a microsecond of parsing (a fifth of the host time of a small step)
    options = dict(x0_options) if x0_options else {}
    if out_noise != 0.0:
        if noise is _KERNEL_NOISE:
            options["seed"] = _kernel_seed()
        elif noise is not None:
            options["noise"] = noise.to(sample.dtype) if noise.dtype != sample.dtype else noise
    if not return_x0:
        options["return_x0"] = False
    return _call_op(
        _OPS["sampler_step"],
        model_output,
        sample,
        float(x0_form[0]),
        float(x0_form[1]),
        float(out_x),
        float(out_m),
        float(out_x0),
        list(history),
        [float(v) for v in out_history],
        float(out_noise),
        **options,
    )


def _multistep_update(
    model_output, sample, form, c_x, c_m, history, x0_options=None, noise=None, out_noise=0.0
):
    """A multistep solver's update in one fused op: returns (c_x x + c_m[0] m0 + sum_k c_m[k] history[k-1],
    m0), m0 the converted output (x0 or eps: ``form`` applied to the sample and the model output) that the
    scheduler stores. ``form=None``: ``model_output`` is already converted (UniPC after its corrector, DEIS
    after thresholding, PNDM's eps) and only the update is returned. ``noise``/``out_noise``: the SDE
    variants' noise term (see :func:`_combine`)."""
    if form is None:
        prev_sample, _ = _combine(
            model_output,
            sample,
            (0.0, 0.0),
            out_x=c_x,
            out_m=c_m[0],
            history=history,
            out_history=c_m[1:],
            return_x0=False,
        )
        return prev_sample
    return _combine(
        model_output,
        sample,
        form,
        out_x=c_x,
        out_x0=c_m[0],
        history=history,
        out_history=c_m[1:],
        noise=noise,
        out_noise=out_noise,
        x0_options=x0_options,
    )


def _shift_in(items: list, value, count: int) -> None:
    """diffusers' history shift: items[0..count-2] = items[1..count-1], then items[-1] = value (in place)."""
    for i in range(count - 1):
        items[i] = items[i + 1]
    items[-1] = value


def _vp_forms(prediction: str, alpha: float, sigma: float) -> tuple[tuple, tuple]:
    """(x0, eps) as (coefficient of the sample, coefficient of the model output), as diffusers converts."""
    if prediction == "epsilon":
        return (1.0 / alpha, -sigma / alpha), (0.0, 1.0)
    if prediction == "sample":
        return (0.0, 1.0), (1.0 / sigma, -alpha / sigma)
    if prediction == "v_prediction":
        return (alpha, -sigma), (sigma, alpha)
    if prediction == "flow_prediction":
        return (1.0, -sigma), (1.0, 1.0 - sigma)
    raise _Fallback(f"prediction_type={prediction!r}")


def _sigma_forms(prediction: str, sigma: float) -> tuple:
    """x0 in EDM/Karras sigma space (x = x0 + sigma eps) as diffusers' Euler-type schedulers convert."""
    if prediction == "epsilon":
        return (1.0, -sigma)
    if prediction == "v_prediction":
        return (1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0))
    if prediction in ("sample", "original_sample"):
        return (0.0, 1.0)
    raise _Fallback(f"prediction_type={prediction!r}")


def _dpm_reason(scheduler) -> str | None:
    config = scheduler.config
    algorithm = config.algorithm_type
    if algorithm not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"):
        return f"algorithm_type={algorithm!r}"
    if algorithm == "sde-dpmsolver" and config.solver_order == 3:
        return "algorithm_type='sde-dpmsolver' with solver_order=3"
    if (reason := _solver_config_reason(config)) is not None:
        return reason
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        if config.prediction_type == "flow_prediction":
            return f"algorithm_type={algorithm!r} with flow_prediction"
        if config.thresholding:
            return f"algorithm_type={algorithm!r} with thresholding"
    return _x0_reason(config)


def _dpm_alpha_sigma(scheduler, sigma: float) -> tuple[float, float]:
    if scheduler.config.use_flow_sigmas:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _dpm_coefficients(algorithm, solver_type, order, sigmas, index, scheduler):
    """The DPM-Solver update as (c_x, [c_m0, c_m1, c_m2], c_noise) over the sample, the converted model
    outputs (newest first) and the noise; diffusers' first/second/third order formulas with D0, D1, D2
    expanded."""
    a_t, s_t = _dpm_alpha_sigma(scheduler, sigmas[index + 1])
    a_0, s_0 = _dpm_alpha_sigma(scheduler, sigmas[index])
    lam = lambda a, s: math.log(a) - math.log(s) if s > 0 else math.inf  # noqa: E731
    lam_t, lam_0 = lam(a_t, s_t), lam(a_0, s_0)
    h = lam_t - lam_0
    plus = algorithm in ("dpmsolver++", "sde-dpmsolver++")
    em1 = math.expm1(-h) if plus else math.expm1(h)  # e^-h - 1 (++), e^h - 1
    noise = 0.0
    if algorithm == "dpmsolver++":
        c_x, base = s_t / s_0, -a_t * em1
    elif algorithm == "dpmsolver":
        c_x, base = a_t / a_0, -s_t * em1
    elif algorithm == "sde-dpmsolver++":
        c_x, base = s_t / s_0 * math.exp(-h), a_t * (-math.expm1(-2.0 * h))
        noise = s_t * math.sqrt(-math.expm1(-2.0 * h))
    else:  # sde-dpmsolver
        c_x, base = a_t / a_0, -2.0 * s_t * em1
        noise = s_t * math.sqrt(math.expm1(2.0 * h))
    d0 = [1.0, 0.0, 0.0]
    if order == 1:
        return c_x, [base * v for v in d0], noise
    a_1, s_1 = _dpm_alpha_sigma(scheduler, sigmas[index - 1])
    r0 = (lam_0 - lam(a_1, s_1)) / h
    d1_0 = [1.0 / r0, -1.0 / r0, 0.0]
    if order == 2:
        if solver_type == "midpoint":
            c_d1 = 0.5 * base
        elif algorithm == "dpmsolver++":
            c_d1 = a_t * (em1 / h + 1.0)
        elif algorithm == "dpmsolver":
            c_d1 = -s_t * (em1 / h - 1.0)
        elif algorithm == "sde-dpmsolver++":
            c_d1 = a_t * ((-math.expm1(-2.0 * h)) / (-2.0 * h) + 1.0)
        else:
            c_d1 = -2.0 * s_t * (em1 / h - 1.0)
        return c_x, [base * p + c_d1 * q for p, q in zip(d0, d1_0)], noise
    a_2, s_2 = _dpm_alpha_sigma(scheduler, sigmas[index - 2])
    r1 = (lam(a_1, s_1) - lam(a_2, s_2)) / h
    d1_1 = [0.0, 1.0 / r1, -1.0 / r1]
    diff = [p - q for p, q in zip(d1_0, d1_1)]
    d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d1_0, diff)]
    d2 = [q / (r0 + r1) for q in diff]
    if algorithm == "dpmsolver++":
        c_d1, c_d2 = a_t * (em1 / h + 1.0), -a_t * ((em1 + h) / h**2 - 0.5)
    elif algorithm == "dpmsolver":
        c_d1, c_d2 = -s_t * (em1 / h - 1.0), -s_t * ((em1 - h) / h**2 - 0.5)
    else:  # sde-dpmsolver++
        e2 = -math.expm1(-2.0 * h)
        c_d1, c_d2 = a_t * (e2 / (-2.0 * h) + 1.0), a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    return c_x, [base * p + c_d1 * q + c_d2 * w for p, q, w in zip(d0, d1, d2)], noise


def _dpm_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    config = scheduler.config
    algorithm = config.algorithm_type
    sde = algorithm.startswith("sde-")
    variance_noise = a["variance_noise"] if sde else None
    _check_no_grad(variance_noise)
    index = _step_index(scheduler, state, a["timestep"])
    count = len(state.host_timesteps)
    lower_order_final = (index == count - 1) and (
        config.euler_at_final
        or (config.lower_order_final and count < 15)
        or config.final_sigmas_type == "zero"
    )
    lower_order_second = (index == count - 2) and config.lower_order_final and count < 15
    if config.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final:
        order = 1
    elif config.solver_order == 2 or scheduler.lower_order_nums < 2 or lower_order_second:
        order = 2
    else:
        order = 3
    sigmas = state.host_sigmas
    if index + 1 >= len(sigmas) or index - (order - 1) < 0:
        raise _Fallback("step index outside the sigmas")
    c_x, c_m, c_noise = _dpm_coefficients(algorithm, config.solver_type, order, sigmas, index, scheduler)
    alpha, sigma = _dpm_alpha_sigma(scheduler, sigmas[index])
    x0_form, eps_form = _vp_forms(config.prediction_type, alpha, sigma)
    plus = algorithm.endswith("dpmsolver++")
    history = [scheduler.model_outputs[-1 - j] for j in range(order - 1)]
    noise = None
    if sde:
        if variance_noise is None:
            noise = _step_noise(a, model_output.shape, model_output.device, torch.float32)
        else:
            noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
    prev_sample, converted = _multistep_update(
        model_output,
        sample,
        x0_form if plus else eps_form,
        c_x,
        c_m[:order],
        history,
        _x0_options(config) if plus else None,
        noise,
        c_noise,
    )
    _shift_in(scheduler.model_outputs, converted, config.solver_order)
    if scheduler.lower_order_nums < config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index = index + 1
    return (prev_sample,)


def _ancestral_reason(scheduler) -> str | None:
    return _prediction_reason(scheduler.config, "epsilon", "v_prediction")


def _ancestral_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    index, sigmas = _sigma_step(scheduler, state, a, "EulerAncestralDiscreteScheduler")
    sigma, sigma_to = sigmas[index], sigmas[index + 1]
    sigma_up = math.sqrt(max(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2, 0.0))
    sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
    ratio = (sigma_down - sigma) / sigma
    noise = _step_noise(a, model_output.shape, model_output.device, model_output.dtype)
    prev_sample, x0 = _combine(
        model_output,
        sample,
        _sigma_forms(scheduler.config.prediction_type, sigma),
        out_x=1.0 + ratio,
        out_x0=-ratio,
        noise=noise,
        out_noise=sigma_up,
    )
    scheduler._step_index = index + 1
    return prev_sample, x0


def _pndm_reason(scheduler) -> str | None:
    if not scheduler.config.skip_prk_steps:
        return "skip_prk_steps=False (Runge-Kutta warm-up steps)"
    return _prediction_reason(scheduler.config, "epsilon", "v_prediction")


_PLMS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _pndm_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    config = scheduler.config
    stride = config.num_train_timesteps // scheduler.num_inference_steps
    traced = _traced(a["timestep"])  # a traced timestep: its alphas looked up on the device
    if traced:
        table, t = _traced_timestep(scheduler, state, a["timestep"], sample.device)
    else:
        t = int(_timestep_value(state, a["timestep"]))
    prev_t = t - stride
    counter = scheduler.counter
    ets = list(scheduler.ets)
    if counter != 1:
        ets = ets[-3:] + [model_output]
    else:
        prev_t, t = t, t + stride
    # the model output combination, over (current model output, ets[-2], ets[-3], ets[-4])
    if len(ets) == 1 and counter == 0:
        weights, x, history = (1.0,), sample, []
    elif len(ets) == 1 and counter == 1:
        if scheduler.cur_sample is None:
            raise _Fallback("no stored sample for the second PLMS step")
        weights, x, history = (0.5, 0.5), scheduler.cur_sample, [ets[-1]]
    else:
        weights, x, history = _PLMS[min(len(ets), 4)], sample, ets[-2::-1][:3]
    if traced:
        ab_t = _lookup(table, t)
        ab_prev = _previous_alpha(table, prev_t)
    else:
        alphas = _alphas_cumprod(scheduler)
        if not (0 <= t < len(alphas) and prev_t < len(alphas)):
            raise _Fallback(f"timestep {t} outside the training schedule")
        ab_t = alphas[t]
        ab_prev = alphas[prev_t] if prev_t >= 0 else _final_alpha(scheduler, state)
    denom = ab_t * _sqrt(1.0 - ab_prev) + _sqrt(ab_t * (1.0 - ab_t) * ab_prev)
    k = (ab_prev - ab_t) / denom
    out_x = _sqrt(ab_prev / ab_t)
    scale = 1.0
    if config.prediction_type == "v_prediction":  # eps = sqrt(ab_t) v + sqrt(1 - ab_t) x, on the combination
        scale, out_x = _sqrt(ab_t), out_x - k * _sqrt(1.0 - ab_t)
    coefficients = [-k * scale * w for w in weights]
    if traced:
        prev_sample, _ = _combine_traced(
            model_output,
            x,
            (0.0, 0.0),
            out_x=out_x,
            out_m=coefficients[0],
            history=history,
            out_history=coefficients[1:],
            return_x0=False,
        )
    else:
        prev_sample = _multistep_update(model_output, x, None, out_x, coefficients, history)
    if counter != 1:
        scheduler.ets = ets
    if len(ets) == 1 and counter == 0:
        scheduler.cur_sample = sample
    elif len(ets) == 1 and counter == 1:
        scheduler.cur_sample = None
    scheduler.counter = counter + 1
    return (prev_sample,)


def _lcm_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        return f"prediction_type={config.prediction_type!r}"
    if config.thresholding or config.clip_sample:
        return "x0 clipping or thresholding (LCM returns the denoised sample, not x0)"
    return None


def _lcm_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    index = _step_index(scheduler, state, a["timestep"])
    host = state.host_timesteps
    traced = _traced(a["timestep"])  # a traced timestep: its alpha and scalings computed on the device
    if traced:
        table, t = _traced_timestep(scheduler, state, a["timestep"], sample.device)
        ab_t = _lookup(table, t)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.to(torch.float64))
    else:
        t = int(_timestep_value(state, a["timestep"]))
        ab_t = _alphas_cumprod(scheduler)[t]
        c_skip, c_out = (float(v) for v in scheduler.get_scalings_for_boundary_condition_discrete(t))
    if index + 1 < len(host):
        prev_t = int(host[index + 1])
        ab_prev = _alphas_cumprod(scheduler)[prev_t] if prev_t >= 0 else _final_alpha(scheduler, state)
    else:  # diffusers' prev_timestep = timestep
        ab_prev = ab_t
    x0_form, _ = _vp_forms(scheduler.config.prediction_type, _sqrt(ab_t), _sqrt(1.0 - ab_t))
    denoised_form = (c_out * x0_form[0] + c_skip, c_out * x0_form[1])
    last = index == scheduler.num_inference_steps - 1
    noise = None if last else _step_noise(a, model_output.shape, model_output.device, sample.dtype)
    prev_sample, denoised = (_combine_traced if traced else _combine)(
        model_output,
        sample,
        denoised_form,
        out_x0=1.0 if last else _sqrt(ab_prev),
        noise=noise,
        out_noise=0.0 if last else _sqrt(1.0 - ab_prev),
    )
    scheduler._step_index = index + 1
    return prev_sample, denoised


def _lms_reason(scheduler) -> str | None:
    return _prediction_reason(scheduler.config, "epsilon", "v_prediction", "sample")


_LMS_CACHE: dict = {}


def _lms_coefficients(sigmas: list, index: int, order: int) -> list:
    """diffusers' get_lms_coefficient on host floats (Lagrange basis integrated with scipy's quad), cached by
    the schedule's values: new tensors from set_timesteps with the same schedule reuse them."""
    key = (tuple(sigmas), index, order)
    cached = _LMS_CACHE.get(key)
    if cached is not None:
        return cached
    from scipy import integrate  # optional: only LMS needs it (diffusers imports it there too)

    def coefficient(current):
        def basis(tau):
            prod = 1.0
            for k in range(order):
                if current != k:
                    prod *= (tau - sigmas[index - k]) / (sigmas[index - current] - sigmas[index - k])
            return prod

        return integrate.quad(basis, sigmas[index], sigmas[index + 1], epsrel=1e-4)[0]

    cached = [coefficient(c) for c in range(order)]
    if len(_LMS_CACHE) > 4096:
        _LMS_CACHE.clear()
    _LMS_CACHE[key] = cached
    return cached


def _lms_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    order = int(a["order"])
    if not 1 <= order <= 4:
        raise _Fallback(f"order={order}")
    index = _step_index(scheduler, state, a["timestep"])
    sigmas = state.host_sigmas
    if index + 1 >= len(sigmas):
        raise _Fallback("step past the last sigma")
    sigma = sigmas[index]
    derivatives = list(scheduler.derivatives) + [None]
    if len(derivatives) > order:
        derivatives.pop(0)
    used = min(index + 1, order)
    if len(derivatives) < used:
        raise _Fallback("fewer stored derivatives than the order needs")
    coefficients = _lms_coefficients(sigmas, index, used)
    cx, cm = _sigma_forms(scheduler.config.prediction_type, sigma)
    derivative_form = ((1.0 - cx) / sigma, -cm / sigma)
    history = [derivatives[-2 - j] for j in range(used - 1)]
    prev_sample, derivative = _combine(
        model_output,
        sample,
        derivative_form,
        out_x=1.0,
        out_x0=coefficients[0],
        history=history,
        out_history=coefficients[1:],
    )
    x0 = torch.add(sample, derivative, alpha=-sigma)
    if not scheduler.is_scale_input_called:
        warnings.warn(
            "The `scale_model_input` function should be called before `step` to ensure correct "
            "denoising. See `StableDiffusionPipeline` for a usage example."
        )
    derivatives[-1] = derivative
    scheduler.derivatives = derivatives
    scheduler._step_index = index + 1
    return prev_sample, x0


# ------------------------------------------------------------------ UniPC, DEIS, DPM-Solver singlestep
# Coefficients in float64 on the host from the host sigma table; each step is one generic fused op (two or
# three where a nonlinear x0 or the UniC corrector must be materialised as diffusers' state), and the
# scheduler's own state (model_outputs, timestep_list, last_sample, this_order, sample, lower_order_nums,
# step_index) is left exactly as diffusers' step leaves it, so fused and diffusers' steps can alternate.


def _log_snr(alpha: float, sigma: float) -> float:
    """log(alpha) - log(sigma) with diffusers' IEEE limits (sigma = 0 -> +inf, alpha = 0 -> -inf)."""
    if sigma <= 0.0:
        return math.inf if alpha > 0.0 else math.nan
    if alpha <= 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def _finite(*values) -> None:
    if not all(math.isfinite(v) for v in values):
        raise _Fallback("non-finite schedule coefficients (degenerate step)")


def _solver_step_index(scheduler, state: _State, timestep) -> int:
    """The step index of UniPC / DEIS / DPM-Solver singlestep: as _step_index, except that a timestep outside
    the schedule starts at the last step (their index_for_timestep does this instead of raising)."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    _timestep_value(state, timestep)  # a device timestep that is not an element falls back here
    try:
        return _index_for_timestep(state, timestep)
    except _Fallback:
        return len(state.host_timesteps) - 1


def _converted_forms(scheduler, prediction: str, index: int, sigmas: list) -> tuple[tuple, tuple | None]:
    """(x0, eps) of diffusers' convert_model_output as (coefficient of the sample, of the model output),
    before thresholding; eps is None where diffusers has no eps form for the prediction type."""
    alpha, sigma = _dpm_alpha_sigma(scheduler, sigmas[index])
    if prediction == "flow_prediction":
        return (1.0, -sigmas[index]), None  # diffusers uses the raw sigma here, whatever the sigma schedule
    x0_form, eps_form = _vp_forms(prediction, alpha, sigma)
    return x0_form, eps_form


def _unipc_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.solver_type not in ("bh1", "bh2"):
        return f"solver_type={config.solver_type!r}"
    if getattr(scheduler, "solver_p", None) is not None:
        return "solver_p (another scheduler as the predictor)"
    if (reason := _prediction_reason(config, *_SOLVER_PREDICTIONS)) is not None:
        return reason
    if not scheduler.predict_x0:
        if config.prediction_type == "flow_prediction":
            return "predict_x0=False with flow_prediction (diffusers refuses it)"
        return None
    return _x0_reason(config)


def _f32_alpha_sigma(flow: bool, sigma: float):
    """diffusers' _sigma_to_alpha_sigma_t on a float32 sigma, in float32 as its tensor code computes it
    (``flow``: the scheduler's use_flow_sigmas)."""
    s = np.float32(sigma)
    if flow:
        return np.float32(1.0) - s, s
    alpha = np.float32(1.0) / np.sqrt(s * s + np.float32(1.0))
    return alpha, s * alpha


_MULTISTEP_CACHE: dict = {}


def _cached(key: tuple):
    """Host coefficients by schedule values (each loop over the same schedule reuses them): ``key`` is
    (family, *the arguments of its _<family>_coefficients_f32), plain numbers, strings and tuples. So this is
    a function of constants, which torch.compile runs when it traces a step (marked by
    :func:`_mark_host_constants`) instead of tracing its float32 tensor and numpy arithmetic."""
    value = _MULTISTEP_CACHE.get(key)
    if value is None:
        try:
            value = _COEFFICIENTS_F32[key[0]](*key[1:])
        except _Fallback as why:
            value = str(why)  # a degenerate step: the reason, raised by _host_coefficients
        if len(_MULTISTEP_CACHE) > 8192:
            _MULTISTEP_CACHE.clear()
        _MULTISTEP_CACHE[key] = value
    return value


def _host_coefficients(key: tuple):
    """:func:`_cached`'s coefficients, or its degenerate step's fallback (raised here: an exception inside a
    function torch.compile runs at trace time would end the compilation rather than fall back)."""
    value = _cached(key)
    if isinstance(value, str):
        raise _Fallback(value)
    return value


def _unipc_coefficients(scheduler, sigmas: list, target: int, sources: list, order: int, corrector: bool):
    """UniPC's B(h) update from sigmas[sources[0]] to sigmas[target], expanded over its inputs: returns
    (c_x, [c_m0, c_m1, ...], c_new) for x (the sample the update starts from), the stored converted outputs
    m0, m1, ... (at sigmas[sources[k]], newest first) and, for the corrector, the new converted output.
    diffusers' D1_k = (m_k - m0) / r_k and its rhos (0.5, or the solve of R rhos = b) are folded in.

    The scalars are rounded to float32 in diffusers' order of operations: it takes log-SNR differences
    (h ~ 0.1 between lambdas up to ~7) in float32, and a loop of its steps carries that rounding (1e-5 to
    1e-4 relative over 10-50 steps), which float64 coefficients would not reproduce."""
    key = (
        "unipc",
        sigmas[target],
        tuple(sigmas[k] for k in sources[:order]),
        order,
        corrector,
        bool(scheduler.predict_x0),
        scheduler.config.solver_type,
        bool(scheduler.config.use_flow_sigmas),
    )
    return _host_coefficients(key)


def _unipc_coefficients_f32(sigma_target, source_sigmas, order, corrector, predict_x0, solver_type, flow):
    # float32 CPU tensors, vectorised over the few sigmas involved (torch's float32 log/expm1 give the same
    # values on 0-d and 1-d tensors); read back with tolist, never item
    table = torch.tensor([sigma_target, *source_sigmas], dtype=torch.float32)
    if flow:
        alphas, sigmas_t = 1 - table, table
    else:
        alphas = 1 / ((table**2 + 1) ** 0.5)
        sigmas_t = table * alphas
    lambdas = torch.log(alphas) - torch.log(sigmas_t)
    h = lambdas[0] - lambdas[1]
    rks = torch.cat([(lambdas[2:] - lambdas[1]) / h, torch.ones(1)])
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    alpha_t, sigma_t, sigma_0, alpha_0 = alphas[0], sigmas_t[0], sigmas_t[1], alphas[1]
    base = alpha_t if predict_x0 else sigma_t
    head = torch.stack(
        [sigma_t / sigma_0 if predict_x0 else alpha_t / alpha_0, base * h_phi_1, base * b_h, h, b_h, h_phi_1]
    ).tolist()
    c_x, c_m0, scale, h_value = head[0], -head[1], -head[2], head[3]
    if order > 1 and not math.isfinite(h_value):
        raise _Fallback("non-finite step size at a higher order (degenerate step)")
    # diffusers multiplies B(h) by its (zero) residual even at order 1: an infinite B(h) gives NaN there
    _finite(*head[4:])
    rows_t, b_t = torch.stack(rows), torch.stack(b)
    if corrector and order > 1:
        rhos_t = _solve(rows_t, b_t)
    elif not corrector and order > 2:
        rhos_t = _solve(rows_t[:-1, :-1], b_t[:-1])
    else:
        rhos_t = None
    rk_values = rks.tolist()[: order - 1]
    if rhos_t is not None:
        rhos = rhos_t.tolist()
    else:
        rhos = [0.5] if corrector else [0.5] * (order - 1)
    c_m = [c_m0] + [0.0] * (order - 1)
    for k, r in enumerate(rk_values, start=1):
        if r == 0.0:
            raise _Fallback("zero UniPC node (degenerate step)")
        w = scale * rhos[k - 1] / r
        c_m[k] += w
        c_m[0] -= w
    c_new = 0.0
    if corrector:
        c_new = scale * rhos[-1]
        c_m[0] -= c_new
    _finite(c_x, c_new, *c_m)
    return c_x, c_m, c_new


def _solve(matrix, rhs):
    """torch.linalg.solve on the host (as diffusers solves for UniPC's rhos), a singular system falls back."""
    try:
        return torch.linalg.solve(matrix, rhs)
    except RuntimeError as exc:
        raise _Fallback("singular UniPC system (degenerate step)") from exc


def _unipc_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    config = scheduler.config
    index = _solver_step_index(scheduler, state, a["timestep"])
    sigmas, count = state.host_sigmas, len(state.host_timesteps)
    if index + 1 >= len(sigmas):
        raise _Fallback("step past the last sigma")
    outputs, solver_order = scheduler.model_outputs, config.solver_order
    if len(outputs) != solver_order:
        raise _Fallback("model_outputs unlike solver_order")
    use_corrector = (
        index > 0 and index - 1 not in scheduler.disable_corrector and scheduler.last_sample is not None
    )
    this_order = min(solver_order, count - index) if config.lower_order_final else solver_order
    this_order = min(this_order, scheduler.lower_order_nums + 1)
    if not 1 <= this_order <= 3 or index - (this_order - 1) < 0:
        raise _Fallback(f"predictor order {this_order} at step {index}")
    predict_x0 = scheduler.predict_x0
    x0_form, eps_form = _converted_forms(scheduler, config.prediction_type, index, sigmas)
    form = x0_form if predict_x0 else eps_form
    x0_options = _x0_options(config) if predict_x0 else None
    c_x, c_m, _ = _unipc_coefficients(
        scheduler, sigmas, index + 1, [index - k for k in range(this_order)], this_order, False
    )
    predictor_history = [outputs[-k] for k in range(1, this_order)]  # m1, m2 after the shift below
    if use_corrector:
        order_c = getattr(scheduler, "this_order", None)
        if not isinstance(order_c, int) or not 1 <= order_c <= min(3, solver_order) or index - order_c < 0:
            raise _Fallback(f"corrector order {order_c} at step {index}")
        cc_x, cc_m, c_new = _unipc_coefficients(
            scheduler, sigmas, index, [index - 1 - k for k in range(order_c)], order_c, True
        )
        history = [scheduler.last_sample] + [outputs[-1 - k] for k in range(order_c)]
        weights = [cc_x] + cc_m
        if len(history) > 3:  # order-3 corrector: fold last_sample and m2 first (the op takes 3 histories)
            folded, _ = _combine(
                history[3], history[0], (0.0, 0.0), out_x=weights[0], out_m=weights[3], return_x0=False
            )
            history, weights = [folded] + history[1:3], [1.0] + weights[1:3]
        corrected, converted = _combine(
            model_output,
            sample,
            form,
            out_x0=c_new,
            history=history,
            out_history=weights,
            x0_options=x0_options,
        )
        prev_sample = _multistep_update(converted, corrected, None, c_x, c_m, predictor_history)
    else:
        prev_sample, converted = _multistep_update(
            model_output, sample, form, c_x, c_m, predictor_history, x0_options
        )
        corrected = sample
    _shift_in(outputs, converted, solver_order)
    _shift_in(scheduler.timestep_list, a["timestep"], solver_order)
    scheduler.this_order = this_order
    scheduler.last_sample = corrected
    if scheduler.lower_order_nums < solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index = index + 1
    return (prev_sample,)


def _multistep_order(config, lower_order_nums: int, index: int, count: int) -> int:
    """The order of a DEIS / DPM-Solver multistep step (warm-up and lower_order_final below 15 steps)."""
    lower_final = index == count - 1 and config.lower_order_final and count < 15
    lower_second = index == count - 2 and config.lower_order_final and count < 15
    if config.solver_order == 1 or lower_order_nums < 1 or lower_final:
        return 1
    if config.solver_order == 2 or lower_order_nums < 2 or lower_second:
        return 2
    return 3


def _deis_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.algorithm_type != "deis" or config.solver_type != "logrho":
        return f"algorithm_type={config.algorithm_type!r}, solver_type={config.solver_type!r}"
    if (reason := _solver_config_reason(config)) is not None:
        return reason
    return _x0_reason(config)


def _deis_coefficients(scheduler, sigmas: list, index: int, order: int) -> tuple[float, list]:
    """DEIS log-rho update (rho = sigma / alpha) as (c_x, [c_m0, c_m1, c_m2]) over the sample and the
    converted outputs, newest first: diffusers' integrated Lagrange basis in log(rho), its scalars rounded
    to float32 in its order of operations (it takes numpy's float32 log; the integrals' differences cancel,
    see _unipc_coefficients)."""
    key = ("deis", tuple(sigmas[index - k] for k in range(-1, order)), bool(scheduler.config.use_flow_sigmas))
    return _host_coefficients(key)


def _deis_coefficients_f32(step_sigmas, flow):
    """``step_sigmas``: the target sigma, then the current one and the earlier ones (newest first)."""
    f = np.float32
    order = len(step_sigmas) - 1
    with np.errstate(all="ignore"):
        a_t, s_t = _f32_alpha_sigma(flow, step_sigmas[0])
        a_0, s_0 = _f32_alpha_sigma(flow, step_sigmas[1])
        c_x = float(a_t) / float(a_0)
        if order == 1:
            h = (np.log(a_t) - np.log(s_t)) - (np.log(a_0) - np.log(s_0))
            coefficients = [-float(s_t * (np.exp(h) - f(1.0)))]
        else:
            rhos = [s / a for a, s in (_f32_alpha_sigma(flow, step_sigmas[k + 1]) for k in range(order))]
            rho_t = s_t / a_t
            logs, log_t = [np.log(r) for r in rhos], np.log(rho_t)

            def integral(value, log_value, b, c, d=None):
                if d is None:  # integral of (log t - c) / (b - c) dt, in logs
                    return value * (-c + log_value - f(1.0)) / (b - c)
                inner = c * (d - log_value + f(1.0)) - d * log_value + d + log_value**2
                numerator = value * (inner - f(2.0) * log_value + f(2.0))
                return numerator / ((b - c) * (b - d))

            coefficients = []
            for k in range(order):
                nodes = [logs[k]] + [logs[j] for j in range(k + 1, order)] + [logs[j] for j in range(k)]
                coefficient = integral(rho_t, log_t, *nodes) - integral(rhos[0], logs[0], *nodes)
                coefficients.append(float(a_t) * float(coefficient))
    _finite(c_x, *coefficients)
    return c_x, coefficients


def _deis_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    config = scheduler.config
    index = _solver_step_index(scheduler, state, a["timestep"])
    sigmas = state.host_sigmas
    outputs = scheduler.model_outputs
    if len(outputs) != config.solver_order:
        raise _Fallback("model_outputs unlike solver_order")
    order = _multistep_order(config, scheduler.lower_order_nums, index, len(state.host_timesteps))
    if index + 1 >= len(sigmas) or index - (order - 1) < 0:
        raise _Fallback("step index outside the sigmas")
    c_x, c_m = _deis_coefficients(scheduler, sigmas, index, order)
    alpha, sigma = _dpm_alpha_sigma(scheduler, sigmas[index])
    x0_form, eps_form = _converted_forms(scheduler, config.prediction_type, index, sigmas)
    history = [outputs[-k] for k in range(1, order)]  # m1, m2 after the shift below
    if config.thresholding:  # eps = (x - alpha x0') / sigma with a thresholded x0': materialise it first
        eps, _ = _combine(
            model_output,
            sample,
            x0_form,
            out_x=1.0 / sigma,
            out_x0=-alpha / sigma,
            x0_options=_x0_options(config),
            return_x0=False,
        )
        prev_sample = _multistep_update(eps, sample, None, c_x, c_m, history)
    else:
        if eps_form is None or getattr(config, "use_flow_sigmas", False):
            eps_form = ((1.0 - alpha * x0_form[0]) / sigma, -alpha * x0_form[1] / sigma)
        prev_sample, eps = _multistep_update(model_output, sample, eps_form, c_x, c_m, history)
    _shift_in(outputs, eps, config.solver_order)
    if scheduler.lower_order_nums < config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index = index + 1
    return (prev_sample,)


def _dpm_single_reason(scheduler) -> str | None:
    config = scheduler.config
    algorithm = config.algorithm_type
    if algorithm not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        return f"algorithm_type={algorithm!r}"
    if config.solver_type not in ("midpoint", "heun"):
        return f"solver_type={config.solver_type!r}"
    if (reason := _solver_config_reason(config)) is not None:
        return reason
    if algorithm == "dpmsolver":
        if config.prediction_type == "flow_prediction":
            return "algorithm_type='dpmsolver' with flow_prediction"
        if config.thresholding:
            return "algorithm_type='dpmsolver' with thresholding"
    return _x0_reason(config)


def _dpm_single_coefficients(scheduler, algorithm, solver_type, sigmas, index, order):
    """The singlestep DPM-Solver update from sigmas[index - order + 1] to sigmas[index + 1] as
    (c_x, [c_m0, c_m1, c_m2], c_noise) over the sample stored at the order's first step, the converted
    outputs (newest first) and the noise; diffusers' D0, D1, D2 (and D1_1 for midpoint) expanded. Its
    scalars are float32 tensor values in diffusers' order of operations (see _unipc_coefficients)."""
    key = ("single", algorithm, solver_type, order, tuple(sigmas[index + 1 - k] for k in range(order + 1)))
    key += (bool(scheduler.config.use_flow_sigmas),)
    return _host_coefficients(key)


def _dpm_single_coefficients_f32(algorithm, solver_type, order, step_sigmas, flow):
    """``step_sigmas``: sigmas[index + 1 - k] for k = 0..order (the target first)."""
    table = torch.tensor(step_sigmas, dtype=torch.float32)
    if flow:
        alphas, sigmas_t = 1 - table, table
    else:
        alphas = 1 / ((table**2 + 1) ** 0.5)
        sigmas_t = table * alphas
    lambdas = torch.log(alphas) - torch.log(sigmas_t)  # t, s0, s1, s2
    alpha_t, sigma_t = alphas[0], sigmas_t[0]
    h = lambdas[0] - lambdas[order]
    noise = torch.zeros(())
    if algorithm == "dpmsolver++":
        c_x, phi = sigma_t / sigmas_t[order], -(alpha_t * (torch.exp(-h) - 1.0))
        k1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        k2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif algorithm == "dpmsolver":
        c_x, phi = alpha_t / alphas[order], -(sigma_t * (torch.exp(h) - 1.0))
        k1 = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        k2 = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    else:  # sde-dpmsolver++
        c_x, phi = sigma_t / sigmas_t[order] * torch.exp(-h), alpha_t * (1.0 - torch.exp(-2.0 * h))
        k1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        k2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)
        noise = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    if order == 1:
        c_x, phi, noise = torch.stack([c_x, phi, noise]).tolist()
        c_m = [phi]
    elif order == 2:
        r0 = (lambdas[1] - lambdas[2]) / h
        k1 = 0.5 * phi if solver_type == "midpoint" else k1
        c_x, phi, k1, inv_r0, noise = torch.stack([c_x, phi, k1, 1.0 / r0, noise]).tolist()
        c_m = [k1 * inv_r0, phi - k1 * inv_r0]  # D0 = m1, D1 = (m0 - m1) / r0
    else:
        r0, r1 = (lambdas[1] - lambdas[3]) / h, (lambdas[2] - lambdas[3]) / h
        values = torch.stack([c_x, phi, k1, k2, r0, r1, 1.0 / r0, 1.0 / r1, noise]).tolist()
        c_x, phi, k1, k2, r0, r1, inv_r0, inv_r1, noise = values
        d0 = [0.0, 0.0, 1.0]
        d1_0 = [0.0, inv_r1, -inv_r1]
        d1_1 = [inv_r0, 0.0, -inv_r0]
        if solver_type == "midpoint":
            c_m = [phi * p + k1 * q for p, q in zip(d0, d1_1)]
        else:
            d1 = [(r0 * p - r1 * q) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
            d2 = [2.0 * (q - p) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
            c_m = [phi * p + k1 * q + k2 * w for p, q, w in zip(d0, d1, d2)]
    _finite(c_x, noise, *c_m)
    return c_x, c_m, noise


def _dpm_single_step(scheduler, state, a):
    model_output, sample = a["model_output"], a["sample"]
    config = scheduler.config
    algorithm = config.algorithm_type
    index = _solver_step_index(scheduler, state, a["timestep"])
    sigmas, outputs = state.host_sigmas, scheduler.model_outputs
    order_list = scheduler.order_list
    if len(outputs) != config.solver_order or not 0 <= index < len(order_list):
        raise _Fallback("step index outside the order list")
    order = order_list[index]
    shifted = list(outputs[1:]) + [model_output]  # model_outputs after diffusers' shift (new one last)
    if not 1 <= order <= len(shifted):
        raise _Fallback(f"order {order}")
    while shifted[-order] is None:  # img2img may start mid-cycle: diffusers lowers the order
        order -= 1
    if index + 1 >= len(sigmas) or index - (order - 1) < 0:
        raise _Fallback("step index outside the sigmas")
    c_x, c_m, c_noise = _dpm_single_coefficients(
        scheduler, algorithm, config.solver_type, sigmas, index, order
    )
    x0_form, eps_form = _converted_forms(scheduler, config.prediction_type, index, sigmas)
    plus = algorithm != "dpmsolver"
    noise = None
    if algorithm == "sde-dpmsolver++":
        noise = _step_noise(a, model_output.shape, model_output.device, model_output.dtype)
    start = sample if order == 1 else scheduler.sample
    out_x, history, weights = c_x, [], []
    if order > 1:
        history = [start] + [shifted[-1 - k] for k in range(1, order)]  # x_start, m1, m2
        out_x, weights = 0.0, [c_x] + c_m[1:]
    prev_sample, converted = _multistep_update(
        model_output,
        sample,
        x0_form if plus else eps_form,
        out_x,
        [c_m[0]] + weights,
        history,
        _x0_options(config) if plus else None,
        noise,
        c_noise,
    )
    _shift_in(outputs, converted, config.solver_order)
    if order == 1:
        scheduler.sample = sample
    scheduler._step_index = index + 1
    return (prev_sample,)


def _flow_stochastic(scheduler, state, a, index, sigmas):
    model_output, sample = a["model_output"], a["sample"]
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    noise = _step_noise(a, sample.shape, sample.device, sample.dtype)
    prev_sample, _ = _combine(
        model_output,
        sample,
        (1.0, -sigma),
        out_x0=1.0 - sigma_next,
        noise=noise,
        out_noise=sigma_next,
        return_x0=False,
    )
    return prev_sample


# ------------------------------------------------------------- two-stage schedulers: Heun, KDPM2, flow Heun
#
# Each of these runs every sigma interval as two calls of step: a first-order stage that stores what the
# second needs on the scheduler (diffusers' attributes: sample, prev_derivative, dt), then a correction. The
# fused stages read and write exactly those attributes, as tensors of the same kind, so fused calls and
# diffusers' own calls (a fallback) can follow one another in either order.


_DT32: dict = {}


def _dt32(sigma_to: float, sigma_from: float) -> float:
    """sigma_to - sigma_from in float32, the rounding of diffusers' 0-d tensor subtraction; memoised (numpy's
    scalar arithmetic costs a few microseconds a call, and a loop meets the same pairs every run)."""
    key = (sigma_to, sigma_from)
    value = _DT32.get(key)
    if value is None:
        if len(_DT32) > 8192:
            _DT32.clear()
        value = _DT32[key] = float(np.float32(sigma_to) - np.float32(sigma_from))
    return value


def _host_table(scheduler, state, name: str, *, in_step: bool = True) -> list:
    """A schedule tensor of the scheduler (sigmas_interpol, ...) as host floats, copied outside step (by the
    family's snapshot after set_timesteps) and again only when the scheduler holds a new tensor."""
    tensor = getattr(scheduler, name, None)
    cached = state.host_tables.get(name)
    if cached is not None and cached[0] is tensor:
        return cached[1]
    if not isinstance(tensor, torch.Tensor):
        raise _Fallback(f"scheduler.{name} not set (set_timesteps not called)")
    if in_step and tensor.device.type != "cpu":
        raise _Fallback(f"scheduler.{name} replaced on the device after set_timesteps")
    host = _host_copy(tensor)
    state.host_tables[name] = (tensor, host)
    return host


def _table_difference(
    scheduler, state, minuend: str, shift_m: int, subtrahend: str, shift_s: int, index: int
):
    """``scheduler.<minuend>[index + shift_m] - scheduler.<subtrahend>[index + shift_s]`` as the 0-d tensor
    diffusers stores (same dtype, device and value: an elementwise difference rounds each element alone),
    taken from the whole table's differences, computed once per pair of schedule tensors: one view per
    step instead of two index ops and a subtraction."""
    a, b = getattr(scheduler, minuend), getattr(scheduler, subtrahend)
    if torch.compiler.is_compiling():  # in the graph as diffusers computes it (a version is no guard there)
        return a[index + shift_m] - b[index + shift_s]
    key = (minuend, shift_m, subtrahend, shift_s)
    cached = state.differences.get(key)
    # a new table, or an in-place change to one (its version), computes the differences again
    if (
        cached is None
        or cached[0] is not a
        or cached[1] is not b
        or cached[2] != a._version
        or cached[3] != b._version
    ):
        if a.device != b.device:  # KDPM2 ancestral on a GPU: sigmas_interpol there, sigmas on the CPU
            return a[index + shift_m] - b[index + shift_s]  # a 0-d CPU operand is a scalar to the GPU one
        count = min(a.shape[0] - shift_m, b.shape[0] - shift_s)
        differences = a[shift_m : shift_m + count] - b[shift_s : shift_s + count]
        # every 0-d view at once (unbind: one call, where indexing made one view per step at the cost of
        # the rest of this function)
        cached = state.differences[key] = (a, b, a._version, b._version, differences.unbind(0))
    views = cached[4]
    if not 0 <= index < len(views):
        return a[index + shift_m] - b[index + shift_s]  # diffusers' own indexing (and its error, if any)
    return views[index]


def _table_snapshot(*names: str) -> Callable[[Any, Any], None]:
    def snapshot(scheduler, state) -> None:
        for name in names:
            if isinstance(getattr(scheduler, name, None), torch.Tensor):
                _host_table(scheduler, state, name, in_step=False)

    return snapshot


def _heun_reason(scheduler) -> str | None:
    return _prediction_reason(scheduler.config, "epsilon", "v_prediction", "sample") or _x0_reason(
        scheduler.config
    )


_KEEPING_LANE = getattr(_C, "_direct_sampler_step_keeping_model_output", None)


def _step_keeping_model_output(model_output, sample, x0_form, dt):
    """(x + dt m, x0_form applied, a copy of m): on the CPU one pass through the op's lane that also writes
    the copy (as much a pass as the copy alone was: the step read m); otherwise the op and a copy."""
    if _KEEPING_LANE is not None and not torch.compiler.is_compiling():
        try:
            result = _KEEPING_LANE(
                model_output, sample, float(x0_form[0]), float(x0_form[1]), 1.0, float(dt), 0.0
            )
        except (ValueError, TypeError) as exc:
            raise _rejected(exc) from exc
        if result is not None:
            return result
    prev_sample, x0 = _combine(model_output, sample, x0_form, out_x=1.0, out_m=dt)
    return prev_sample, x0, model_output.clone()


def _heun_update(scheduler, state, model_output, sample, index, prediction, x0_options, return_x0):
    """One stage of Heun's method (HeunDiscreteScheduler, FlowMatchHeunDiscreteScheduler); returns
    (prev_sample, x0 or None) and leaves prev_derivative, dt, sample and the step index as diffusers does.

    First stage, from sigma to sigma_next: d = (x - x0) / sigma, x' = x + dt d, and d, dt, x are stored.
    Second stage at sigma_next: x' = x_first + dt / 2 (d_first + (x - x0) / sigma_next), one fused op with the
    stored sample and derivative as history.

    With an epsilon-form x0 (x0 = x - sigma m: epsilon prediction, and flow matching's velocity) and no
    clipping, the derivative (x - x0) / sigma is the model output itself, so both stages are plain sums of
    the operands, x' = x + dt m and x' = x_first + dt/2 d_first + dt/2 m, which the kernel runs without its
    x0 term: bound by memory, where the x0 term made it bound by its multiplies (one core of the CI's EPYC,
    131072 elements)."""
    sigmas = state.host_sigmas
    epsilon_form = prediction == "epsilon" and not x0_options
    if scheduler.dt is None:
        if index + 1 >= len(sigmas):
            raise _Fallback("step past the last sigma")
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        if sigma == 0.0:
            raise _Fallback("degenerate schedule step (sigma = 0)")  # diffusers divides by it
        dt = _dt32(sigma_next, sigma)
        x0_form = _sigma_forms(prediction, sigma)
        if epsilon_form and return_x0:
            # x' and x0 = x - sigma m in one pass; the stored derivative is the model output's values, in a
            # tensor of its own as diffusers stores it (a copy: the caller may reuse its buffer, as a CUDA
            # graph's static output does), written by the CPU kernel in the same pass
            prev_sample, x0, derivative = _step_keeping_model_output(model_output, sample, x0_form, dt)
        elif epsilon_form:
            # the derivative in the x0 slot: 0 x + 1 m
            prev_sample, derivative = _combine(model_output, sample, (0.0, 1.0), out_x=1.0, out_m=dt)
            x0 = None
        elif return_x0:
            prev_sample, x0 = _combine(
                model_output,
                sample,
                x0_form,
                out_x=1.0 + dt / sigma,
                out_x0=-dt / sigma,
                x0_options=x0_options,
            )
            # the stored derivative, (x - x0) / sigma from the clipped x0: a second pass over x and x0
            derivative, _ = _combine(
                x0, sample, (0.0, 0.0), out_x=1.0 / sigma, out_m=-1.0 / sigma, return_x0=False
            )
        else:
            if x0_options:
                raise _Fallback("x0 clipping without x0 output")
            # the derivative itself in the x0 slot: d = ((1 - c_x) x - c_m m) / sigma, x' = x + dt d
            derivative_form = ((1.0 - x0_form[0]) / sigma, -x0_form[1] / sigma)
            prev_sample, derivative = _combine(model_output, sample, derivative_form, out_x=1.0, out_x0=dt)
            x0 = None
        scheduler.prev_derivative = derivative
        # diffusers' 0-d tensor sigmas[index + 1] - sigmas[index], on the sigmas' device
        scheduler.dt = _table_difference(scheduler, state, "sigmas", 1, "sigmas", 0, index)
        scheduler.sample = sample
    else:
        if not 1 <= index < len(sigmas):
            raise _Fallback("step index outside the sigmas")
        first_derivative, first_sample = scheduler.prev_derivative, scheduler.sample
        if first_derivative is None or first_sample is None:
            raise _Fallback("second Heun stage without a stored first stage")
        sigma, sigma_next = sigmas[index - 1], sigmas[index]
        if sigma_next == 0.0:
            raise _Fallback("degenerate schedule step (sigma_next = 0)")  # diffusers divides by it
        dt = _dt32(sigma_next, sigma)
        half = 0.5 * dt
        if epsilon_form:  # (x - x0) / sigma_next is the model output: dt/2 m, no x0 term
            out_x, out_m, out_x0 = 0.0, half, 0.0
        else:
            out_x, out_m, out_x0 = half / sigma_next, 0.0, -half / sigma_next
        prev_sample, x0 = _combine(
            model_output,
            sample,
            _sigma_forms(prediction, sigma_next),
            out_x=out_x,
            out_m=out_m,
            out_x0=out_x0,
            history=[first_sample, first_derivative],
            out_history=[1.0, half],
            x0_options=x0_options,
            return_x0=return_x0,
        )
        if not return_x0:
            x0 = None
        scheduler.prev_derivative = scheduler.dt = scheduler.sample = None
    scheduler._step_index = index + 1
    return prev_sample, x0


def _heun_step(scheduler, state, a):
    index = _step_index(scheduler, state, a["timestep"])
    config = scheduler.config
    clip = dict(clip_x0=float(config.clip_sample_range)) if config.clip_sample else None
    return _heun_update(
        scheduler, state, a["model_output"], a["sample"], index, config.prediction_type, clip, return_x0=True
    )


def _flow_heun_reason(scheduler) -> str | None:
    return None


def _flow_heun_step(scheduler, state, a):
    timestep, model_output, sample = a["timestep"], a["model_output"], a["sample"]
    _reject_integer_timestep(timestep, "FlowMatchHeunDiscreteScheduler")
    if sample.dtype != torch.float32:
        # diffusers upcasts the sample but not the model output's product with sigma: its own rounding
        raise _Fallback(f"dtype {sample.dtype} (FlowMatchHeun mixes float32 and the model's dtype)")
    index = _step_index(scheduler, state, timestep)
    sigmas = state.host_sigmas
    first = scheduler.dt is None
    position = index if first else index - 1
    if not 0 <= position < len(sigmas):
        raise _Fallback("step index outside the sigmas")
    sigma = sigmas[position]
    _reject_churn(a, sigma, len(sigmas))
    # flow matching's x0 = x - sigma v is the epsilon form in sigma space
    prev_sample, _ = _heun_update(scheduler, state, model_output, sample, index, "epsilon", None, False)
    return (prev_sample,)


def _kdpm2_reason(scheduler) -> str | None:
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        return f"prediction_type={scheduler.config.prediction_type!r} (diffusers raises for it)"
    return None


def _kdpm2_update(scheduler, state, a, ancestral: bool):
    """One stage of KDPM2 (DPM-Solver-2 in sigma space) or its ancestral variant, one fused op per stage.

    First stage: a half step from sigma to the log-midpoint sigma_interpol, x' = x + (sigma_interpol - sigma)
    (x - x0) / sigma; the sample is stored (the ancestral variant also stores dt, as diffusers does). Second
    stage: from the stored sample with the derivative at the midpoint, to the next sigma, or for the ancestral
    variant to sigma_down plus sigma_up times noise drawn as diffusers draws it (randn_tensor with the model
    output's shape, dtype and device and the call's generator)."""
    model_output, sample = a["model_output"], a["sample"]
    index = _step_index(scheduler, state, a["timestep"])
    sigmas = state.host_sigmas
    interpol = _host_table(scheduler, state, "sigmas_interpol")
    prediction = scheduler.config.prediction_type
    if scheduler.sample is None:
        mid = index if ancestral else index + 1  # diffusers' midpoint index in each variant's table
        if not 0 <= mid < min(len(sigmas), len(interpol)) or index + 1 >= len(sigmas):
            raise _Fallback("step past the last sigma")
        sigma = sigmas[index]
        c = _dt32(interpol[mid], sigma) / sigma
        prev_sample, x0 = _combine(
            model_output, sample, _sigma_forms(prediction, sigma), out_x=1.0 + c, out_x0=-c
        )
        scheduler.sample = sample
        if ancestral:  # diffusers' 0-d tensor sigmas_interpol[index] - sigmas[index]
            scheduler.dt = _table_difference(scheduler, state, "sigmas_interpol", 0, "sigmas", 0, index)
    else:
        if not 1 <= index <= min(len(sigmas), len(interpol)):
            raise _Fallback("step index outside the sigmas")
        sigma = sigmas[index - 1]
        noise, sigma_up = None, 0.0
        if ancestral:
            up = _host_table(scheduler, state, "sigmas_up")
            down = _host_table(scheduler, state, "sigmas_down")
            if index > min(len(up), len(down)):
                raise _Fallback("step index outside the sigmas")
            sigma_mid, sigma_to, sigma_up = interpol[index - 1], down[index - 1], up[index - 1]
        else:
            if index >= len(sigmas):
                raise _Fallback("step index outside the sigmas")
            sigma_mid, sigma_to = interpol[index], sigmas[index]
        c = _dt32(sigma_to, sigma) / sigma_mid
        first = scheduler.sample
        if not (
            isinstance(first, torch.Tensor)
            and (first.shape, first.dtype, first.device) == (sample.shape, sample.dtype, sample.device)
        ):
            raise _Fallback("stored first-stage sample unlike sample")
        if ancestral:  # drawn after every check that can fall back: diffusers' step would draw it again
            noise = _step_noise(a, model_output.shape, model_output.device, model_output.dtype)
        prev_sample, x0 = _combine(
            model_output,
            sample,
            _sigma_forms(prediction, sigma_mid),
            out_x=c,
            out_x0=-c,
            history=[first],
            out_history=[1.0],
            noise=noise,
            out_noise=sigma_up,
        )
        scheduler.sample = None
    scheduler._step_index = index + 1
    return prev_sample, x0


def _kdpm2_step(scheduler, state, a):
    return _kdpm2_update(scheduler, state, a, ancestral=False)


def _kdpm2_ancestral_step(scheduler, state, a):
    return _kdpm2_update(scheduler, state, a, ancestral=True)


_SCHEDULERS = "diffusers.schedulers."
# what KDPM2's set_timesteps (both variants) assigns
_KDPM2_SET_TIMESTEPS = (
    "num_inference_steps",
    "log_sigmas",
    "sigmas",
    "sigmas_interpol",
    "timesteps",
    "sample",
    "_step_index",
    "_begin_index",
)
# _cached's families: the key's first item -> the function of the rest
_COEFFICIENTS_F32 = {
    "unipc": _unipc_coefficients_f32,
    "deis": _deis_coefficients_f32,
    "single": _dpm_single_coefficients_f32,
}

_HOST_CONSTANTS_MARKED = False


def _mark_host_constants() -> None:
    """Lets torch.compile run the host-coefficient functions (functions of plain numbers: :func:`_cached`,
    :func:`_lms_coefficients`) when it traces a step, rather than trace their float32 tensor, numpy and scipy
    arithmetic (which breaks the graph). torch.compiler.assume_constant_result needs the compiler stack,
    which diffusers imports (fastlatent itself does not: 2 s); without it the functions stay unmarked, and a
    compiled loop of those families breaks its graph as diffusers' own steps do."""
    global _HOST_CONSTANTS_MARKED
    if _HOST_CONSTANTS_MARKED or "torch._dynamo" not in sys.modules:
        return
    for fn in (_cached, _lms_coefficients):
        torch.compiler.assume_constant_result(fn)
    _HOST_CONSTANTS_MARKED = True


_FAMILIES: dict[str, _Family] = {
    "DDIMScheduler": _Family(
        _ddim_reason,
        _ddim_step,
        _SCHEDULERS + "scheduling_ddim.DDIMSchedulerOutput",
        True,
        snapshot=_alpha_snapshot,
    ),
    "DDPMScheduler": _Family(
        _ddpm_reason,
        _ddpm_step,
        _SCHEDULERS + "scheduling_ddpm.DDPMSchedulerOutput",
        snapshot=_alpha_snapshot,
    ),
    "EulerDiscreteScheduler": _Family(
        _euler_reason, _euler_step, _SCHEDULERS + "scheduling_euler_discrete.EulerDiscreteSchedulerOutput"
    ),
    "FlowMatchEulerDiscreteScheduler": _Family(
        _flow_reason,
        _flow_step,
        _SCHEDULERS + "scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteSchedulerOutput",
    ),
    "DPMSolverMultistepScheduler": _Family(
        _dpm_reason, _dpm_step, _SCHEDULERS + "scheduling_utils.SchedulerOutput", True
    ),
    "EulerAncestralDiscreteScheduler": _Family(
        _ancestral_reason,
        _ancestral_step,
        _SCHEDULERS + "scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput",
    ),
    "PNDMScheduler": _Family(
        _pndm_reason,
        _pndm_step,
        _SCHEDULERS + "scheduling_utils.SchedulerOutput",
        True,
        snapshot=_alpha_snapshot,
    ),
    "LCMScheduler": _Family(
        _lcm_reason,
        _lcm_step,
        _SCHEDULERS + "scheduling_lcm.LCMSchedulerOutput",
        True,
        snapshot=_alpha_snapshot,
    ),
    "LMSDiscreteScheduler": _Family(
        _lms_reason, _lms_step, _SCHEDULERS + "scheduling_lms_discrete.LMSDiscreteSchedulerOutput", True
    ),
    "UniPCMultistepScheduler": _Family(
        _unipc_reason,
        _unipc_step,
        _SCHEDULERS + "scheduling_utils.SchedulerOutput",
        True,
        state_tensors=lambda s: (s.last_sample, *s.model_outputs),
    ),
    "DEISMultistepScheduler": _Family(
        _deis_reason,
        _deis_step,
        _SCHEDULERS + "scheduling_utils.SchedulerOutput",
        True,
        state_tensors=lambda s: s.model_outputs,
    ),
    "DPMSolverSinglestepScheduler": _Family(
        _dpm_single_reason,
        _dpm_single_step,
        _SCHEDULERS + "scheduling_utils.SchedulerOutput",
        True,
        state_tensors=lambda s: (s.sample, *s.model_outputs),
    ),
    "HeunDiscreteScheduler": _Family(
        _heun_reason, _heun_step, _SCHEDULERS + "scheduling_heun_discrete.HeunDiscreteSchedulerOutput"
    ),
    "KDPM2DiscreteScheduler": _Family(
        _kdpm2_reason,
        _kdpm2_step,
        _SCHEDULERS + "scheduling_k_dpm_2_discrete.KDPM2DiscreteSchedulerOutput",
        snapshot=_table_snapshot("sigmas_interpol"),
        set_timesteps_attributes=_KDPM2_SET_TIMESTEPS,
    ),
    "KDPM2AncestralDiscreteScheduler": _Family(
        _kdpm2_reason,
        _kdpm2_ancestral_step,
        _SCHEDULERS + "scheduling_k_dpm_2_ancestral_discrete.KDPM2AncestralDiscreteSchedulerOutput",
        snapshot=_table_snapshot("sigmas_interpol", "sigmas_up", "sigmas_down"),
        set_timesteps_attributes=_KDPM2_SET_TIMESTEPS + ("sigmas_up", "sigmas_down"),
    ),
    "FlowMatchHeunDiscreteScheduler": _Family(
        _flow_heun_reason,
        _flow_heun_step,
        _SCHEDULERS + "scheduling_flow_match_heun_discrete.FlowMatchHeunDiscreteSchedulerOutput",
    ),
}

#: Configs of covered schedulers that run diffusers' own step, by class (documentation for the swap report).
FALLBACK_CONFIGS = {
    "DDIMScheduler": "thresholding with sample_max_value < 1 or dynamic_thresholding_ratio outside (0, 1]; "
    "epsilon prediction at alpha_bar_t = 0 (a zero-terminal-SNR schedule's first step, per call)",
    "DDPMScheduler": "variance_type other than fixed_small; thresholding edge cases as DDIM",
    "EulerDiscreteScheduler": "s_churn > 0 (per call)",
    "FlowMatchEulerDiscreteScheduler": "per_token_timesteps (per call)",
    "DPMSolverMultistepScheduler": "learned variance; sde-dpmsolver at order 3; dpmsolver/sde-dpmsolver with "
    "thresholding or flow_prediction",
    "EulerAncestralDiscreteScheduler": "prediction_type='sample' (diffusers does not implement it either)",
    "PNDMScheduler": "skip_prk_steps=False (the Runge-Kutta warm-up)",
    "LCMScheduler": "clip_sample or thresholding",
    "LMSDiscreteScheduler": "order > 4 (per call)",
    "UniPCMultistepScheduler": "solver_p; predict_x0=False with flow_prediction; thresholding edge cases as "
    "DDIM; steps diffusers computes as NaN/inf (bh1 or predict_x0=False onto a zero final sigma, orders > 1 "
    "onto it with lower_order_final=False) and solver_order > 3 (per call)",
    "DEISMultistepScheduler": "solver_order > 3; thresholding edge cases as DDIM",
    "DPMSolverSinglestepScheduler": "learned variance; dpmsolver with thresholding or flow_prediction; "
    "two equal sigmas in a higher-order step (per call)",
    "HeunDiscreteScheduler": "clip_sample_range <= 0",
    "KDPM2DiscreteScheduler": "prediction_type='sample' (diffusers does not implement it either)",
    "KDPM2AncestralDiscreteScheduler": "prediction_type='sample' (diffusers does not implement it either)",
    "FlowMatchHeunDiscreteScheduler": "s_churn > 0, or a sample that is not float32 (per call)",
}


# ------------------------------------------------------------------ installing


def _diffusers_family(scheduler) -> _Family | None:
    cls = type(scheduler)
    family = _FAMILIES.get(cls.__name__)
    if family is None or not cls.__module__.startswith("diffusers."):
        return None
    return family


_SIGNATURES: dict[type, tuple] = {}


def _signature(cls) -> tuple:
    """(names, positional count, defaults, known names) of ``cls.step``, computed once per class (at the
    swap: a loop compiled before any eager step is not compiled again once the first step has filled it)."""
    entry = _SIGNATURES.get(cls)
    if entry is None:
        parameters = list(inspect.signature(cls.step).parameters.values())[1:]
        if any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
            raise TypeError("step takes *args or **kwargs")
        names = tuple(p.name for p in parameters)
        positional = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in parameters)
        defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
        entry = _SIGNATURES[cls] = (names, positional, defaults, frozenset(names))
    return entry


def _bind(cls, args, kwargs) -> dict:
    """diffusers' step arguments by name, defaults filled (Signature.bind costs about as much as a step)."""
    entry = _SIGNATURES.get(cls)
    if entry is None:
        entry = _signature(cls)
    names, positional, defaults, known = entry
    if len(args) > positional:
        raise TypeError("too many positional arguments")
    arguments = dict(defaults)
    arguments.update(zip(names, args))
    if kwargs:
        given = names[: len(args)]
        for key in kwargs:
            if key not in known or key in given:
                raise TypeError(f"unexpected or repeated argument {key!r}")
        arguments.update(kwargs)
    if len(arguments) != len(names):
        raise TypeError("missing arguments")
    return arguments


def _output_type(family: _Family) -> tuple:
    """(diffusers' output dataclass, its field names), imported on first use."""
    entry = family._output_type
    if entry is None:
        module, _, name = family.output.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        entry = family._output_type = (cls, tuple(f.name for f in dataclasses.fields(cls)))
    return entry


def _output(output_type: tuple, values: tuple):
    """diffusers' output dataclass holding ``values`` in field order, as its ``__init__`` and
    ``BaseOutput.__post_init__`` build it (every field an attribute, the non-None ones also items, in
    order), without their per-call field introspection (a fifth of a fused step's host time): attributes
    written to the instance dictionary, items through OrderedDict's own __setitem__ (BaseOutput's would set
    the attribute again)."""
    cls, names = output_type
    out = cls.__new__(cls)
    attributes = out.__dict__
    for i, name in enumerate(names):
        value = values[i] if i < len(values) else None
        attributes[name] = value
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
    return out


def _run_family(scheduler, state: _State, family: _Family, a: dict):
    """The part every fused family shares: checks before the step, diffusers' output after it."""
    if family.needs_set_timesteps and scheduler.num_inference_steps is None:
        raise _Fallback("set_timesteps not called")
    if family.state_tensors is not None:
        _check_no_grad(*family.state_tensors(scheduler))
    _check_call(a["model_output"], a["sample"])
    output_type = _output_type(family)
    values = family.step(scheduler, state, a)
    return _output(output_type, values) if a["return_dict"] else values


def _fast_step(self, *args, **kwargs):
    """diffusers' ``step`` with the same arguments and outputs, one fused kernel where the config allows."""
    state: _State = self.__dict__[_STATE]
    cls = type(self)
    try:
        if not extension_available():
            raise _Fallback("fastlatent extension not built")
        try:
            arguments = _bind(cls, args, kwargs)
        except TypeError as exc:
            raise _Fallback("arguments diffusers' step does not bind") from exc
        # the config may have changed since the swap; it is frozen (register_to_config replaces it),
        # so its reason is computed again only for a new one
        config = self._internal_dict
        if config is not state.config:
            state.config_reason = state.family.config_reason(self)
            state.config = config
        if state.config_reason is not None:
            raise _Fallback(state.config_reason)
        _refresh(self, state)
        try:
            return _run_family(self, state, state.family, arguments)
        except (ZeroDivisionError, OverflowError) as exc:
            # a degenerate schedule step (two equal sigmas): diffusers' tensor math gives its IEEE result
            raise _Fallback(f"degenerate schedule step ({exc})") from exc
    except _Fallback as why:
        state.report.fallbacks[str(why)] += 1
        return cls.step(self, *args, **kwargs)


def _fast_set_timesteps(self, *args, **kwargs):
    """diffusers' ``set_timesteps``, then host copies of the new timesteps and sigmas (the one sync, here)."""
    state: _State = self.__dict__[_STATE]
    names = state.family.set_timesteps_attributes
    if names:
        result = _memoised_set_timesteps(self, state, names, args, kwargs)
    else:
        result = type(self).set_timesteps(self, *args, **kwargs)
    state.timesteps = state.sigmas = None
    _snapshot(self, state)
    return result


_PLAIN_ARGUMENTS = (bool, int, float, str, torch.device, type(None))


def _memoised_set_timesteps(scheduler, state: _State, names: tuple, args: tuple, kwargs: dict):
    """diffusers' set_timesteps, or, when the arguments, the config and alphas_cumprod are those of the last
    call, copies of what that call set. KDPM2's costs about 30 ms on the CPU (a numpy interpolation per
    sigma), as much as its 50-step loop at SD latent sizes, and a pipeline repeats it for every image."""
    values = args + tuple(kwargs.values())
    key = None
    if all(isinstance(v, _PLAIN_ARGUMENTS) for v in values):
        key = (tuple((type(v), v) for v in args), tuple((k, type(v), v) for k, v in sorted(kwargs.items())))
    alphas = getattr(scheduler, "alphas_cumprod", None)
    version = alphas._version if isinstance(alphas, torch.Tensor) else None
    memo = state.set_timesteps_memo
    if (
        key is not None
        and memo is not None
        and memo[0] == key
        and memo[1] is scheduler._internal_dict
        and memo[2] is alphas
        and memo[3] == version
    ):
        for name, value in memo[4].items():
            setattr(scheduler, name, value.clone() if isinstance(value, torch.Tensor) else value)
        return None
    result = type(scheduler).set_timesteps(scheduler, *args, **kwargs)
    state.set_timesteps_memo = None
    if key is not None and result is None and all(name in scheduler.__dict__ for name in names):
        attributes = {}
        for name in names:
            value = scheduler.__dict__[name]
            if not (isinstance(value, (torch.Tensor, *_PLAIN_ARGUMENTS))):
                return result
            attributes[name] = value.clone() if isinstance(value, torch.Tensor) else value
        state.set_timesteps_memo = (key, scheduler._internal_dict, alphas, version, attributes)
    return result


_METHODS: dict[type, tuple] = {}


def _installed_methods(cls) -> tuple:
    """Per class: the installed step and set_timesteps, with diffusers' signatures and docs (callers inspect
    them, e.g. to decide whether to pass a generator)."""
    methods = _METHODS.get(cls)
    if methods is None:

        def step(self, *args, **kwargs):
            return _fast_step(self, *args, **kwargs)

        def set_timesteps(self, *args, **kwargs):
            return _fast_set_timesteps(self, *args, **kwargs)

        for wrapper, original in ((step, cls.step), (set_timesteps, cls.set_timesteps)):
            wrapper.__signature__ = inspect.signature(original)
            wrapper.__doc__ = original.__doc__
            wrapper.__qualname__ = original.__qualname__
        methods = _METHODS[cls] = (step, set_timesteps)
    return methods


def accelerate_scheduler(scheduler) -> SchedulerReport:
    """Installs the fused ``step`` on one diffusers scheduler instance (idempotent); returns its report.

    A scheduler class without a fused step is left as it is (``fused=False``, with the reason). The report is
    kept on the instance: :func:`scheduler_report`.
    """
    name = type(scheduler).__name__
    state = scheduler.__dict__.get(_STATE)
    family = _diffusers_family(scheduler)
    if family is None:
        return SchedulerReport(name, False, "no fused step for this scheduler class")
    reason = family.config_reason(scheduler)
    if state is None:
        _output_type(family)  # imported now, not in the first step (which torch.compile may be tracing)
        _mark_host_constants()
        state = _State(SchedulerReport(name, reason is None, reason), family)
        # the config's reason as the first step would compute it: a loop compiled before any eager step is
        # not compiled again once that step has stored it (torch.compile guards on it)
        state.config, state.config_reason = scheduler._internal_dict, reason
        try:
            _signature(type(scheduler))
        except TypeError:
            pass  # a step that takes *args: every call falls back, in _fast_step
        scheduler.__dict__[_STATE] = state
        step, set_timesteps = _installed_methods(type(scheduler))
        scheduler.__dict__["step"] = types.MethodType(step, scheduler)
        scheduler.__dict__["set_timesteps"] = types.MethodType(set_timesteps, scheduler)
        _snapshot(scheduler, state)
    else:
        state.report.fused, state.report.reason = reason is None, reason
    return state.report


def restore_scheduler(scheduler) -> None:
    """Removes the fused ``step`` (diffusers' class methods apply again)."""
    for key in (_STATE, "step", "set_timesteps"):
        scheduler.__dict__.pop(key, None)


def scheduler_report(scheduler) -> SchedulerReport | None:
    """The report of an accelerated scheduler (None when :func:`accelerate_scheduler` was not applied)."""
    state = scheduler.__dict__.get(_STATE)
    return None if state is None else state.report


def is_accelerated(scheduler) -> bool:
    return _STATE in scheduler.__dict__


def covered_schedulers() -> tuple[str, ...]:
    """diffusers scheduler class names that have a fused step."""
    return tuple(_FAMILIES)
