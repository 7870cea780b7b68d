"""Fused ``step`` for diffusers schedulers, installed on an instance: the class, its config and saved files stay diffusers'.

:func:`accelerate_scheduler` gives one scheduler instance a ``step`` that runs one fused fastlatent kernel per call
where the scheduler's config and the call's arguments allow it, and diffusers' own ``step`` (the class method,
unchanged) otherwise: a fallback is never an error and never a different computation. The instance keeps its
diffusers class, so ``save_pretrained``/``save_config`` write exactly what the unpatched scheduler writes and plain
diffusers loads them; after a reload, :func:`fastlatent.patch` installs the fused step again.

No host syncs: a fused step reads nothing from the device. Timesteps and sigmas are copied to the host once per
``set_timesteps`` (the installed ``set_timesteps`` does it right after diffusers' own); a timestep tensor handed to
``step`` is located in ``scheduler.timesteps`` through its storage offset (the elements a loop over
``scheduler.timesteps`` yields are views of it), never by reading its value from the device. Stochastic steps draw
their noise exactly as diffusers does (``randn_tensor`` with the same generator, shape, device and dtype), so a
seeded pipeline gives the same images.

What falls back, per call (the reason is counted in ``scheduler_report(scheduler).fallbacks``):
inputs that need autograd (diffusers' step is differentiable, the fused kernels are inference-only), float64 or
mixed dtypes, devices other than CPU/CUDA, a device timestep that is not an element of ``scheduler.timesteps``,
and schedule values outside what a fused op accepts. Per config (reported by :func:`fastlatent.patch`): the options
listed in :data:`FALLBACK_CONFIGS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections import Counter
from typing import Any, Callable

import torch

from fastlatent._extension import extension_available
from fastlatent.ops import sampler_step as _steps

_STATE = "_fastlatent_step_state"
_PREDICTIONS = {"epsilon": "epsilon", "sample": "sample", "original_sample": "sample",
                "v_prediction": "v_prediction", "flow_prediction": "flow"}
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
    timesteps: Any = None        # the scheduler.timesteps tensor the host copy below was made from
    host_timesteps: list = dataclasses.field(default_factory=list)
    sigmas: Any = None
    host_sigmas: list = dataclasses.field(default_factory=list)
    alphas: Any = None           # (alphas_cumprod tensor, host copy)
    final_alpha: Any = None      # (final_alpha_cumprod tensor, host float)


@dataclasses.dataclass
class _Family:
    config_reason: Callable[[Any], str | None]   # a config-level reason to run diffusers' step, or None
    step: Callable[..., Any]                     # (scheduler, state, arguments) -> diffusers' step output


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
        if isinstance(timesteps, torch.Tensor) and timesteps.device.type != "cpu" and state.timesteps is not None:
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
        base = state.timesteps
        if (isinstance(base, torch.Tensor) and timestep.dim() == 0 and timestep.device == base.device
                and base.dim() == 1 and base.numel() > 0 and timestep.dtype == base.dtype
                and timestep.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()):
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

def _check_call(model_output, sample, *others) -> None:
    tensors = [t for t in (model_output, sample, *others) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise _Fallback("inputs require grad (the fused step is inference-only)")
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise _Fallback("model_output and sample must be tensors")
    if sample.dtype not in _FUSED_DTYPES:
        raise _Fallback(f"dtype {sample.dtype}")
    if model_output.dtype != sample.dtype:
        raise _Fallback("model_output and sample dtypes differ")
    if sample.device.type not in ("cpu", "cuda") or model_output.device != sample.device:
        raise _Fallback(f"device {sample.device}")
    if model_output.shape != sample.shape:
        raise _Fallback("model_output and sample shapes differ")
    if sample.dim() < 1:
        raise _Fallback("0-d sample")


def _prediction(scheduler) -> str:
    name = scheduler.config.prediction_type
    if name not in _PREDICTIONS:
        raise _Fallback(f"prediction_type={name!r}")
    return _PREDICTIONS[name]


def _x0_options(config) -> dict:
    if getattr(config, "thresholding", False):
        return dict(threshold_quantile=float(config.dynamic_thresholding_ratio),
                    threshold_max=float(config.sample_max_value))
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


def _call_op(op, *args, **kwargs):
    """A fused op whose argument checks reject this schedule: diffusers' step runs instead."""
    try:
        return op(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise _Fallback(str(exc).split("\n")[0]) from exc


# ------------------------------------------------------------------ families

def _ddim_reason(scheduler) -> str | None:
    if scheduler.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        return f"prediction_type={scheduler.config.prediction_type!r}"
    return _x0_reason(scheduler.config)


def _ddim_step(scheduler, state, a):
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    if scheduler.num_inference_steps is None:
        raise _Fallback("set_timesteps not called")
    eta = a["eta"]
    if not isinstance(eta, (int, float)):
        raise _Fallback("eta is not a number")
    noise = a["variance_noise"]
    if eta > 0 and noise is not None and a["generator"] is not None:
        raise _Fallback("both generator and variance_noise")
    model_output, sample = a["model_output"], a["sample"]
    _check_call(model_output, sample, noise)
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
    prev_sample, x0 = _call_op(_steps.ddim_step, model_output, sample, alpha_bar_t, alpha_bar_prev, float(eta),
                               prediction=_prediction(scheduler),
                               use_clipped_model_output=bool(a["use_clipped_model_output"]),
                               noise=noise if eta > 0 else None, seed=0, **_x0_options(config))
    if not a["return_dict"]:
        return prev_sample, x0
    return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def _alphas_cumprod(scheduler) -> list:
    """alphas_cumprod as host floats (copied at the swap and per set_timesteps, see _refresh)."""
    state = scheduler.__dict__[_STATE]
    if state.alphas is None or state.alphas[0] is not scheduler.alphas_cumprod:
        state.alphas = (scheduler.alphas_cumprod, _host_copy(scheduler.alphas_cumprod))
    return state.alphas[1]


def _final_alpha(scheduler, state) -> float:
    final = scheduler.final_alpha_cumprod
    if state.final_alpha is None or state.final_alpha[0] is not final:
        state.final_alpha = (final, _host_copy(final.reshape(1))[0] if isinstance(final, torch.Tensor) else final)
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


def _ddpm_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.variance_type not in ("fixed_small",):
        return f"variance_type={config.variance_type!r}"
    return _ddim_reason(scheduler)


def _ddpm_step(scheduler, state, a):
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

    model_output, sample = a["model_output"], a["sample"]
    _check_call(model_output, sample)
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
    noise = _randn(model_output.shape, a["generator"], model_output.device, model_output.dtype) if t > 0 else None
    prev_sample, x0 = _call_op(_steps.ddpm_step, model_output, sample, alpha_bar_t, alpha_bar_prev,
                               prediction=_prediction(scheduler), noise=noise, seed=0,
                               **_x0_options(scheduler.config))
    if not a["return_dict"]:
        return prev_sample, x0
    return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def _reject_integer_timestep(timestep, name: str) -> None:
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise _Fallback(f"integer timestep (diffusers' {name} refuses it)")


def _euler_reason(scheduler) -> str | None:
    if scheduler.config.prediction_type not in ("epsilon", "sample", "original_sample", "v_prediction"):
        return f"prediction_type={scheduler.config.prediction_type!r}"
    return None


def _euler_step(scheduler, state, a):
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    timestep, model_output, sample = a["timestep"], a["model_output"], a["sample"]
    _reject_integer_timestep(timestep, "EulerDiscreteScheduler")
    _check_call(model_output, sample)
    index = _step_index(scheduler, state, timestep)
    sigmas = state.host_sigmas
    if index + 1 >= len(sigmas):
        raise _Fallback("step past the last sigma")
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    s_churn, s_tmin, s_tmax = a["s_churn"], a["s_tmin"], a["s_tmax"]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma > 0:
        raise _Fallback("s_churn > 0")
    prev_sample, x0 = _call_op(_steps.euler_step, model_output, sample, sigma, sigma_next,
                               prediction=_prediction(scheduler))
    scheduler._step_index = index + 1
    if not a["return_dict"]:
        return prev_sample, x0
    return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def _flow_reason(scheduler) -> str | None:
    if scheduler.config.stochastic_sampling:
        return "stochastic_sampling=True"
    return None


def _flow_step(scheduler, state, a):
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    timestep, model_output, sample = a["timestep"], a["model_output"], a["sample"]
    _reject_integer_timestep(timestep, "FlowMatchEulerDiscreteScheduler")
    if a["per_token_timesteps"] is not None:
        raise _Fallback("per_token_timesteps")
    if scheduler.config.stochastic_sampling:
        raise _Fallback("stochastic_sampling=True")
    _check_call(model_output, sample)
    index = _step_index(scheduler, state, timestep)
    sigmas = state.host_sigmas
    if index + 1 >= len(sigmas):
        raise _Fallback("step past the last sigma")
    prev_sample, _ = _call_op(_steps.euler_step, model_output, sample, sigmas[index], sigmas[index + 1],
                              prediction="flow", return_x0=False)
    scheduler._step_index = index + 1
    if not a["return_dict"]:
        return (prev_sample,)
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _dpm_reason(scheduler) -> str | None:
    config = scheduler.config
    if config.algorithm_type != "dpmsolver++":
        return f"algorithm_type={config.algorithm_type!r}"
    if config.solver_order > 2:
        return f"solver_order={config.solver_order}"
    if config.solver_type != "midpoint" and config.solver_order > 1:
        return f"solver_type={config.solver_type!r}"
    if config.variance_type in ("learned", "learned_range"):
        return f"variance_type={config.variance_type!r}"
    if config.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
        return f"prediction_type={config.prediction_type!r}"
    return _x0_reason(config)


def _dpm_alpha_sigma(scheduler, sigma: float) -> tuple[float, float]:
    if scheduler.config.use_flow_sigmas:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _dpm_step(scheduler, state, a):
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    if scheduler.num_inference_steps is None:
        raise _Fallback("set_timesteps not called")
    model_output, sample = a["model_output"], a["sample"]
    _check_call(model_output, sample)
    config = scheduler.config
    index = _step_index(scheduler, state, a["timestep"])
    count = len(state.host_timesteps)
    lower_order_final = (index == count - 1) and (
        config.euler_at_final or (config.lower_order_final and count < 15) or config.final_sigmas_type == "zero")
    first_order = config.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final
    sigmas = state.host_sigmas
    a_t, s_t = _dpm_alpha_sigma(scheduler, sigmas[index])
    a_n, s_n = _dpm_alpha_sigma(scheduler, sigmas[index + 1])
    if first_order:
        prev_x0, a_p, s_p = None, 1.0, 1.0
    else:
        prev_x0 = scheduler.model_outputs[-1]
        a_p, s_p = _dpm_alpha_sigma(scheduler, sigmas[index - 1])
        if not isinstance(prev_x0, torch.Tensor) or prev_x0.dtype != sample.dtype or prev_x0.shape != sample.shape:
            raise _Fallback("previous model output unlike sample")
    prediction = "flow" if config.prediction_type == "flow_prediction" else _prediction(scheduler)
    prev_sample, x0 = _call_op(_steps.dpmpp_2m_step, model_output, sample, prev_x0, a_t, s_t, a_n, s_n, a_p, s_p,
                               prediction=prediction, **_x0_options(config))
    for j in range(config.solver_order - 1):
        scheduler.model_outputs[j] = scheduler.model_outputs[j + 1]
    scheduler.model_outputs[-1] = x0
    if scheduler.lower_order_nums < config.solver_order:
        scheduler.lower_order_nums += 1
    scheduler._step_index = index + 1
    if not a["return_dict"]:
        return (prev_sample,)
    return SchedulerOutput(prev_sample=prev_sample)


_FAMILIES: dict[str, _Family] = {
    "DDIMScheduler": _Family(_ddim_reason, _ddim_step),
    "DDPMScheduler": _Family(_ddpm_reason, _ddpm_step),
    "EulerDiscreteScheduler": _Family(_euler_reason, _euler_step),
    "FlowMatchEulerDiscreteScheduler": _Family(_flow_reason, _flow_step),
    "DPMSolverMultistepScheduler": _Family(_dpm_reason, _dpm_step),
}

#: Configs of covered schedulers that run diffusers' own step, by class (documentation for the swap report).
FALLBACK_CONFIGS = {
    "DDIMScheduler": "thresholding with sample_max_value < 1 or dynamic_thresholding_ratio outside (0, 1]; the "
                     "first step of a zero-terminal-SNR schedule (alpha_bar_t = 0, per call)",
    "DDPMScheduler": "variance_type other than fixed_small; thresholding edge cases as DDIM",
    "EulerDiscreteScheduler": "s_churn > 0 (per call)",
    "FlowMatchEulerDiscreteScheduler": "stochastic_sampling=True, per_token_timesteps (per call)",
    "DPMSolverMultistepScheduler": "algorithm_type other than dpmsolver++, solver_order 3, solver_type heun, "
                                   "learned variance",
}


# ------------------------------------------------------------------ installing

def _diffusers_family(scheduler) -> _Family | None:
    cls = type(scheduler)
    family = _FAMILIES.get(cls.__name__)
    if family is None or not cls.__module__.startswith("diffusers."):
        return None
    return family


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(cls, args, kwargs) -> dict:
    signature = _SIGNATURES.get(cls)
    if signature is None:
        signature = _SIGNATURES[cls] = inspect.signature(cls.step)
    bound = signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))
    return arguments


def _fast_step(self, *args, **kwargs):
    """diffusers' ``step`` with the same arguments and outputs, as one fused kernel where the config allows."""
    state: _State = self.__dict__[_STATE]
    cls = type(self)
    try:
        if not extension_available():
            raise _Fallback("fastlatent extension not built")
        try:
            arguments = _bind(cls, args, kwargs)
        except TypeError as exc:
            raise _Fallback("arguments diffusers' step does not bind") from exc
        reason = state.family.config_reason(self)  # the config may have changed since the swap
        if reason is not None:
            raise _Fallback(reason)
        _refresh(self, state)
        return state.family.step(self, state, arguments)
    except _Fallback as why:
        state.report.fallbacks[str(why)] += 1
        return cls.step(self, *args, **kwargs)


def _fast_set_timesteps(self, *args, **kwargs):
    """diffusers' ``set_timesteps``, then host copies of the new timesteps and sigmas (the one sync, here)."""
    result = type(self).set_timesteps(self, *args, **kwargs)
    state: _State = self.__dict__[_STATE]
    state.timesteps = state.sigmas = None
    _snapshot(self, state)
    return result


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
        state = _State(SchedulerReport(name, reason is None, reason), family)
        scheduler.__dict__[_STATE] = state
        scheduler.__dict__["step"] = types.MethodType(_fast_step, scheduler)
        scheduler.__dict__["set_timesteps"] = types.MethodType(_fast_set_timesteps, scheduler)
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
