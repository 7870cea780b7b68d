"""Drop-in diffusers schedulers whose ``step`` runs one fused fastlatent kernel.

``FastDDIMScheduler``, ``FastDPMSolverMultistepScheduler``, ``FastEulerDiscreteScheduler`` and
``FastFlowMatchEulerDiscreteScheduler`` subclass the diffusers schedulers of the same name (config,
``set_timesteps``, ``scale_model_input``, ``add_noise`` and state are theirs) and override ``step``
with the same inputs and outputs. Pipelines accept them as they are::

    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler
    pipe.scheduler = FastDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

diffusers is imported when a class is first used, so fastlatent does not depend on it. A config the
fused step does not implement (stochastic variants, learned variance, third order, per-token
timesteps, churn) raises ValueError naming the option instead of silently running something else.
Stochastic steps draw Philox noise (seeded from ``generator``), not ``torch.randn``: same
distribution, other numbers; pass ``variance_noise`` to reproduce diffusers' noise exactly.
"""

from __future__ import annotations

import torch

from fastlatent.ops import sampler_step as _steps

__all__ = ["FastDDIMScheduler", "FastDPMSolverMultistepScheduler", "FastEulerDiscreteScheduler",
           "FastFlowMatchEulerDiscreteScheduler"]

_PREDICTIONS = {"epsilon": "epsilon", "sample": "sample", "original_sample": "sample",
                "v_prediction": "v_prediction", "flow_prediction": "flow"}


def _unsupported(cls_name: str, what: str) -> ValueError:
    return ValueError(f"fastlatent {cls_name}.step: {what} is not implemented by the fused step; use diffusers' "
                      "own scheduler for it")


def _prediction(scheduler) -> str:
    name = scheduler.config.prediction_type
    if name not in _PREDICTIONS:
        raise _unsupported(type(scheduler).__name__, f"prediction_type={name!r}")
    return _PREDICTIONS[name]


def _x0_options(scheduler) -> dict:
    config = scheduler.config
    if getattr(config, "thresholding", False):
        return dict(threshold_quantile=float(config.dynamic_thresholding_ratio),
                    threshold_max=float(config.sample_max_value))
    if getattr(config, "clip_sample", False):
        return dict(clip_x0=float(config.clip_sample_range))
    return {}


def _like(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    # The fused ops take one dtype; a pipeline mixing them gets the model output cast once.
    return model_output if model_output.dtype == sample.dtype else model_output.to(sample.dtype)


def _host_sigmas(scheduler) -> list[float]:
    """The sigmas as host floats, cached per set_timesteps (FlowMatch keeps them on the device)."""
    sigmas = scheduler.sigmas
    cache = getattr(scheduler, "_fl_sigmas", None)
    if cache is None or cache[0] is not sigmas:
        cache = (sigmas, sigmas.detach().to("cpu", torch.float64).tolist())
        scheduler._fl_sigmas = cache
    return cache[1]


def _make_ddim():
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class FastDDIMScheduler(DDIMScheduler):
        """diffusers' DDIMScheduler with ``step`` as one fused kernel (:func:`fastlatent.ops.ddim_step`)."""

        def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                 variance_noise=None, return_dict=True):
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                                 "creating the scheduler")
            if eta > 0 and variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            t = _host_timestep(self, timestep)
            prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
            alpha_bar_t = float(self.alphas_cumprod[t])
            alpha_bar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
            prev_sample, x0 = _steps.ddim_step(
                _like(model_output, sample), sample, alpha_bar_t, alpha_bar_prev, float(eta),
                prediction=_prediction(self), use_clipped_model_output=use_clipped_model_output,
                noise=variance_noise if eta > 0 else None, generator=generator, **_x0_options(self))
            if not return_dict:
                return prev_sample, x0
            return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    return FastDDIMScheduler


def _host_timestep(scheduler, timestep) -> int:
    """The integer timestep without a device sync: a CUDA tensor is looked up by call order."""
    if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
        timesteps = getattr(scheduler, "_fl_timesteps", None)
        if timesteps is None or timesteps[0] is not scheduler.timesteps:
            timesteps = (scheduler.timesteps, scheduler.timesteps.cpu().tolist(), [0])
            scheduler._fl_timesteps = timesteps
        position = timesteps[2]
        t = int(timesteps[1][position[0] % len(timesteps[1])])
        position[0] += 1
        return t
    return int(timestep)


def _make_euler():
    from diffusers import EulerDiscreteScheduler
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    class FastEulerDiscreteScheduler(EulerDiscreteScheduler):
        """diffusers' EulerDiscreteScheduler with ``step`` as one fused kernel (:func:`fastlatent.ops.euler_step`)."""

        def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                 generator=None, return_dict=True):
            if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
                raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                                 "`EulerDiscreteScheduler.step()` is not supported. Make sure to pass one of the "
                                 "`scheduler.timesteps` as a timestep.")
            if self.step_index is None:
                self._init_step_index(timestep)
            sigmas = _host_sigmas(self)
            sigma, sigma_next = sigmas[self.step_index], sigmas[self.step_index + 1]
            if s_churn > 0 and s_tmin <= sigma <= s_tmax and min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) > 0:
                raise _unsupported("FastEulerDiscreteScheduler", "s_churn > 0")
            prev_sample, x0 = _steps.euler_step(_like(model_output, sample), sample, sigma, sigma_next,
                                                prediction=_prediction(self))
            self._step_index += 1
            if not return_dict:
                return prev_sample, x0
            return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    return FastEulerDiscreteScheduler


def _make_flow():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteSchedulerOutput,
    )

    class FastFlowMatchEulerDiscreteScheduler(FlowMatchEulerDiscreteScheduler):
        """diffusers' FlowMatchEulerDiscreteScheduler with ``step`` as one fused kernel."""

        def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                 generator=None, per_token_timesteps=None, return_dict=True):
            if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
                raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                                 "`FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass one "
                                 "of the `scheduler.timesteps` as a timestep.")
            if per_token_timesteps is not None:
                raise _unsupported("FastFlowMatchEulerDiscreteScheduler", "per_token_timesteps")
            if self.config.stochastic_sampling:
                raise _unsupported("FastFlowMatchEulerDiscreteScheduler", "stochastic_sampling=True")
            if self.step_index is None:
                self._init_step_index(timestep)
            sigmas = _host_sigmas(self)
            prev_sample, _ = _steps.euler_step(_like(model_output, sample), sample, sigmas[self.step_index],
                                               sigmas[self.step_index + 1], prediction="flow", return_x0=False)
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    return FastFlowMatchEulerDiscreteScheduler


def _make_dpm():
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class FastDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
        """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order <= 2, midpoint) on one fused kernel per step."""

        def _check_config(self):
            config = self.config
            name = "FastDPMSolverMultistepScheduler"
            if config.algorithm_type != "dpmsolver++":
                raise _unsupported(name, f"algorithm_type={config.algorithm_type!r}")
            if config.solver_order > 2:
                raise _unsupported(name, f"solver_order={config.solver_order}")
            if config.solver_type != "midpoint":
                raise _unsupported(name, f"solver_type={config.solver_type!r}")
            if config.variance_type in ("learned", "learned_range"):
                raise _unsupported(name, f"variance_type={config.variance_type!r}")

        def _alpha_sigma(self, sigma: float) -> tuple[float, float]:
            if self.config.use_flow_sigmas:
                return 1.0 - sigma, sigma
            alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
            return alpha, sigma * alpha

        def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
            if self.num_inference_steps is None:
                raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after "
                                 "creating the scheduler")
            self._check_config()
            if self.step_index is None:
                self._init_step_index(timestep)
            config = self.config
            lower_order_final = (self.step_index == len(self.timesteps) - 1) and (
                config.euler_at_final or (config.lower_order_final and len(self.timesteps) < 15)
                or config.final_sigmas_type == "zero")
            first_order = config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final
            sigmas = _host_sigmas(self)
            i = self.step_index
            a_t, s_t = self._alpha_sigma(sigmas[i])
            a_n, s_n = self._alpha_sigma(sigmas[i + 1])
            a_p, s_p = self._alpha_sigma(sigmas[i - 1]) if not first_order else (1.0, 1.0)
            prev_x0 = None if first_order else self.model_outputs[-1]
            prev_sample, x0 = _steps.dpmpp_2m_step(_like(model_output, sample), sample, prev_x0, a_t, s_t, a_n, s_n,
                                                   a_p, s_p, prediction=_prediction(self), **_x0_options(self))
            for j in range(config.solver_order - 1):
                self.model_outputs[j] = self.model_outputs[j + 1]
            self.model_outputs[-1] = x0
            if self.lower_order_nums < config.solver_order:
                self.lower_order_nums += 1
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return SchedulerOutput(prev_sample=prev_sample)

    return FastDPMSolverMultistepScheduler


_BUILDERS = {"FastDDIMScheduler": _make_ddim, "FastEulerDiscreteScheduler": _make_euler,
             "FastFlowMatchEulerDiscreteScheduler": _make_flow, "FastDPMSolverMultistepScheduler": _make_dpm}


def __getattr__(name: str):
    builder = _BUILDERS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        cls = builder()
    except ImportError as exc:
        raise ImportError(f"fastlatent.sampling.schedulers.{name} needs diffusers (pip install diffusers): {exc}") \
            from exc
    globals()[name] = cls
    return cls
