"""``Sampler``: a whole sampling loop on the fused step ops, optionally captured in one CUDA graph."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from fastlatent.ops import sampler_steps as _steps
from fastlatent.sampling import diffusers_fast as fast
from fastlatent.sampling.schedules import (
    DiscreteSchedule,
    FlowSchedule,
    KarrasSchedule,
    karras_sigmas,
    make_schedule,
)

METHODS = ("ddpm", "ddim", "euler", "dpmpp_2m")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


@dataclasses.dataclass
class Step:
    """One planned step: what the model sees and the fused op's scalars (all host floats)."""

    timestep: float  # passed to model_fn
    input_scale: float  # model_fn sees input_scale * x
    kind: str  # ddpm, ddim, euler, dpmpp_2m
    args: tuple  # the op's schedule scalars
    alpha: float = 1.0  # dpmpp_2m: this step's (alpha, sigma), the next step's "prev"
    sigma: float = 0.0
    second_order: bool = False


def _dpm_flow_sigmas_and_timesteps(schedule: FlowSchedule, steps: int) -> tuple[list[float], list[float]]:
    """dpmpp_2m over a flow schedule, as diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True)``
    plans it.

    DPM-Solver works in log-SNR ``lambda = log((1 - sigma) / sigma)``, which is -inf at the flow schedule's
    ``sigma = 1`` (pure noise, alpha = 0): the Euler plan's first step cannot be taken. diffusers starts one
    training step below instead, at ``shift(1 - 1/T)``, spacing ``steps + 1`` unshifted times linearly from
    there to 0 and dropping the 0 (it is the final sigma). The starting noise is still unit Gaussian
    (``init_noise_sigma`` 1): treating it as ``x = (1/T) x0 + (1 - 1/T) eps`` is the approximation diffusers
    makes. The model's timesteps are ``sigma * T`` truncated to integers, as diffusers stores them (int64).

    Returns:
        ``steps + 1`` sigmas ending in 0 (float32 values, as diffusers'), and ``steps`` model timesteps.
    """
    t_count, shift = schedule.num_train_timesteps, schedule.shift
    sigmas = 1.0 - np.linspace(1, 1 / t_count, steps + 1)
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    timesteps = (sigmas * t_count).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return [float(v) for v in sigmas], [float(v) for v in timesteps]


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """diffusers' log-sigma interpolation from a sigma to a (fractional) training timestep."""
    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = int(np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)[0])
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = float(np.clip(w, 0, 1))
    return (1 - w) * low + w * (low + 1)


class Sampler:
    """Samples a latent diffusion / flow model with fused steps.

    Args:
        method: ``"ddpm"``, ``"ddim"``, ``"euler"`` or ``"dpmpp_2m"`` (DPM-Solver++(2M)).
        schedule: a :class:`~fastlatent.sampling.DiscreteSchedule` (or ``"linear"``,
            ``"scaled_linear"``, ``"cosine"``), :class:`~fastlatent.sampling.FlowSchedule` (``"flow"``) or
            :class:`~fastlatent.sampling.KarrasSchedule` (``"karras"``). ddpm/ddim need a discrete one.
        steps: number of model evaluations, ``>= 1`` (at most ``num_train_timesteps`` for ddpm/ddim).
        prediction: what the model predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
            ``"flow"`` (velocity; the default with a FlowSchedule).
        eta: DDIM noise (0 deterministic, 1 DDPM-like).
        karras: with a DiscreteSchedule and euler/dpmpp_2m, space the sigmas as EDM does
            (diffusers' ``use_karras_sigmas=True``).
        guidance_rescale, clip_x0, threshold_quantile, threshold_max: passed to every step (see
            :mod:`fastlatent.ops.sampler_steps`).

    Timesteps follow the diffusers scheduler of the same method and default config: ddpm/ddim
    "leading" spacing, euler and dpmpp_2m "linspace"; flow: euler as ``FlowMatchEulerDiscreteScheduler``
    (``linspace(1, 1/T)`` shifted, starting at sigma 1), dpmpp_2m as ``DPMSolverMultistepScheduler(
    use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)`` (starting at
    ``shift(1 - 1/T)``, where the log-SNR is finite, with integer timesteps), so with the same model the
    trajectory matches diffusers' loop (tested).

    What ``model_fn(x, t, cond)`` sees: ``x`` ``[B, ...]`` (``[2B, ...]`` with guidance: the batch
    twice, the model's unconditional half first), already scaled for the method (``x / sqrt(sigma^2 + 1)``
    for euler on a discrete schedule, as ``scale_model_input``); ``t`` a float32 ``[B]`` tensor of the
    training timestep (``sigma * T`` for flow, truncated to an integer for dpmpp_2m; ``sigma`` itself for a
    KarrasSchedule); ``cond`` as given.
    """

    def __init__(
        self,
        method: str,
        schedule: Any = "scaled_linear",
        steps: int = 50,
        *,
        prediction: str | None = None,
        eta: float = 0.0,
        karras: bool = False,
        guidance_rescale: float = 0.0,
        clip_x0: float | None = None,
        threshold_quantile: float | None = None,
        threshold_max: float = 1.0,
    ):
        if method not in METHODS:
            raise ValueError(
                f'fastlatent.sampling.Sampler: method must be "ddpm", "ddim", "euler" or "dpmpp_2m", '
                f'got "{method}"'
            )
        self.schedule = make_schedule(schedule)
        if prediction is None:
            prediction = "flow" if isinstance(self.schedule, FlowSchedule) else "epsilon"
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"fastlatent.sampling.Sampler: prediction must be one of {PREDICTIONS}, got {prediction!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"fastlatent.sampling.Sampler: steps must be an int >= 1, got {steps!r}")
        if method in ("ddpm", "ddim"):
            if not isinstance(self.schedule, DiscreteSchedule):
                raise ValueError(
                    f"fastlatent.sampling.Sampler: {method} needs a discrete schedule (linear, "
                    f"scaled_linear or cosine), got {type(self.schedule).__name__}"
                )
            if steps > self.schedule.num_train_timesteps:
                raise ValueError(
                    f"fastlatent.sampling.Sampler: steps must be at most the schedule's "
                    f"num_train_timesteps ({self.schedule.num_train_timesteps}) for {method}, got {steps}"
                )
        if eta < 0 or (eta > 0 and method != "ddim"):
            raise ValueError(f"fastlatent.sampling.Sampler: eta must be >= 0 and is for ddim only, got {eta}")
        if karras and not isinstance(self.schedule, DiscreteSchedule):
            raise ValueError(
                "fastlatent.sampling.Sampler: karras=True respaces a discrete schedule; "
                "use KarrasSchedule directly otherwise"
            )
        if karras and method in ("ddpm", "ddim"):
            raise ValueError(
                f"fastlatent.sampling.Sampler: karras=True is for euler and dpmpp_2m, not {method}"
            )
        if (prediction == "flow") != isinstance(self.schedule, FlowSchedule):
            raise ValueError(
                'fastlatent.sampling.Sampler: prediction "flow" goes with a FlowSchedule and only '
                f"with it, got prediction {prediction!r} and {type(self.schedule).__name__}"
            )
        self.method, self.steps, self.prediction, self.eta, self.karras = (
            method,
            steps,
            prediction,
            eta,
            karras,
        )
        self.options = dict(
            guidance_rescale=guidance_rescale,
            clip_x0=clip_x0,
            threshold_quantile=threshold_quantile,
            threshold_max=threshold_max,
        )
        self.plan, self.init_noise_sigma = self._plan()
        self._graphs: dict = {}
        self._timestep_cache: tuple = (None, None)

    # ------------------------------------------------------------------ from diffusers

    _DIFFUSERS_METHODS = {
        "DDIMScheduler": "ddim",
        "DDPMScheduler": "ddpm",
        "EulerDiscreteScheduler": "euler",
        "FlowMatchEulerDiscreteScheduler": "euler",
        "DPMSolverMultistepScheduler": "dpmpp_2m",
        "EulerAncestralDiscreteScheduler": "euler_ancestral",
    }

    @classmethod
    def from_config(
        cls, config, steps: int = 50, *, eta: float = 0.0, class_name: str | None = None
    ) -> "Sampler":
        """A sampler that steps exactly as the diffusers scheduler ``config`` describes.

        ``config``: a diffusers scheduler config (``scheduler.config``, or the dict of a
        ``scheduler_config.json`` with its ``_class_name``) of ``DDIMScheduler``, ``DDPMScheduler``,
        ``EulerDiscreteScheduler``, ``FlowMatchEulerDiscreteScheduler``,
        ``EulerAncestralDiscreteScheduler`` or ``DPMSolverMultistepScheduler`` (orders 1-3,
        ``dpmsolver++``/``dpmsolver`` and their SDE variants, as the patched scheduler fuses them). A config
        without ``_class_name`` (that of a scheduler built in code rather than loaded) needs ``class_name``.
        See :meth:`from_scheduler`.
        """
        try:
            import diffusers
        except ImportError as exc:
            raise ImportError(f"fastlatent.sampling.Sampler.from_config needs diffusers: {exc}") from exc
        name = class_name or dict(config).get("_class_name")
        if name is None:
            raise ValueError(
                "fastlatent.sampling.Sampler.from_config: config has no _class_name (a "
                "scheduler built in code): pass class_name= or use "
                "Sampler.from_scheduler(scheduler)"
            )
        if name not in cls._DIFFUSERS_METHODS:
            raise ValueError(
                f"fastlatent.sampling.Sampler.from_config: config must be one of "
                f"{sorted(cls._DIFFUSERS_METHODS)} (its _class_name), got {name!r}"
            )
        return cls.from_scheduler(getattr(diffusers, name).from_config(config), steps, eta=eta)

    @classmethod
    def from_scheduler(cls, scheduler, steps: int | None = None, *, eta: float = 0.0) -> "Sampler":
        """A sampler whose plan is ``scheduler``'s own: its timesteps, sigmas and alphas after
        ``set_timesteps(steps)`` (``steps_offset``, ``set_alpha_to_one``, spacings, Karras/exponential/beta
        sigmas, ``final_sigmas_type``), its prediction type and its x0 clipping / thresholding (diffusers'
        defaults included, e.g. DDIM's ``clip_sample=True``).

        ``sample(model_fn, x_T)`` then takes unit noise and scales it by the scheduler's
        ``init_noise_sigma``, as a diffusers pipeline prepares its latents, and gives the trajectory of the
        diffusers loop (deterministic methods to float rounding; ddpm, ddim with ``eta > 0``, Euler ancestral
        and SDE DPM-Solver draw other noise from the same distribution: Philox at ``(seed, step)``, and the
        diffusers loop given that noise gives the same sample). ``scheduler`` is not modified (a copy is
        planned).

        Raises:
            ValueError: a scheduler class or config this plan cannot express (use ``fastlatent.patch`` on the
                scheduler instead, which falls back to diffusers' step).
        """
        name = type(scheduler).__name__
        method = cls._DIFFUSERS_METHODS.get(name)
        where = "fastlatent.sampling.Sampler.from_scheduler"
        if method is None or not type(scheduler).__module__.startswith("diffusers."):
            names = ", ".join(sorted(cls._DIFFUSERS_METHODS))
            raise ValueError(f"{where}: scheduler must be a diffusers {names}, got {name}")
        config = scheduler.config
        prediction = {
            "epsilon": "epsilon",
            "v_prediction": "v_prediction",
            "sample": "sample",
            "original_sample": "sample",
            "flow_prediction": "flow",
        }.get(getattr(config, "prediction_type", None))
        if name == "FlowMatchEulerDiscreteScheduler":
            prediction = "flow"
            if config.stochastic_sampling:
                raise ValueError(f"{where}: stochastic_sampling=True is not expressible; patch the scheduler")
        if prediction is None:
            raise ValueError(f"{where}: prediction_type={config.prediction_type!r} is not expressible")
        general_dpm = name == "DPMSolverMultistepScheduler" and (
            config.algorithm_type != "dpmsolver++"
            or config.solver_order > 2
            or (config.solver_order == 2 and config.solver_type != "midpoint")
            or config.variance_type in ("learned", "learned_range")
        )
        if general_dpm or name == "EulerAncestralDiscreteScheduler":
            return cls._from_scheduler_general(scheduler, steps, prediction)
        if name == "DDPMScheduler" and config.variance_type != "fixed_small":
            raise ValueError(
                f"{where}: DDPMScheduler variance_type={config.variance_type!r} is not expressible"
            )
        options = dict(guidance_rescale=0.0, clip_x0=None, threshold_quantile=None, threshold_max=1.0)
        if getattr(config, "thresholding", False):
            options.update(
                threshold_quantile=float(config.dynamic_thresholding_ratio),
                threshold_max=float(config.sample_max_value),
            )
        elif getattr(config, "clip_sample", False):
            options["clip_x0"] = float(config.clip_sample_range)
        planner = type(scheduler).from_config(config)
        steps = steps if steps is not None else (scheduler.num_inference_steps or 50)
        planner.set_timesteps(steps, device="cpu")
        timesteps = planner.timesteps.double().tolist()
        plan: list[Step] = []
        if method in ("ddim", "ddpm"):
            alphas = planner.alphas_cumprod.double().tolist()
            ratio = config.num_train_timesteps // planner.num_inference_steps
            for i, t in enumerate(timesteps):
                t = int(t)
                if method == "ddim":
                    prev = t - ratio
                    ab_prev = alphas[prev] if prev >= 0 else float(planner.final_alpha_cumprod)
                    plan.append(Step(float(t), 1.0, "ddim", (alphas[t], ab_prev, float(eta))))
                else:
                    prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
                    plan.append(Step(float(t), 1.0, "ddpm", (alphas[t], alphas[prev] if prev >= 0 else 1.0)))
            init = 1.0
        elif name == "EulerDiscreteScheduler":
            sigmas = planner.sigmas.double().tolist()
            # the DDIM form in y = x / sqrt(sigma^2 + 1) (see _plan): the model sees y, as scale_model_input
            for i, t in enumerate(timesteps):
                ab_t, ab_next = 1.0 / (sigmas[i] ** 2 + 1.0), 1.0 / (sigmas[i + 1] ** 2 + 1.0)
                plan.append(Step(t, 1.0, "ddim", (ab_t, ab_next, 0.0)))
            init = float(planner.init_noise_sigma) / math.sqrt(sigmas[0] ** 2 + 1.0)
        elif name == "FlowMatchEulerDiscreteScheduler":
            sigmas = planner.sigmas.double().tolist()
            for i, t in enumerate(timesteps):
                plan.append(Step(t, 1.0, "euler", (sigmas[i], sigmas[i + 1])))
            init = 1.0
        else:
            sigmas = planner.sigmas.double().tolist()

            def alpha_sigma(sig):
                if config.use_flow_sigmas:
                    return 1.0 - sig, sig
                alpha = 1.0 / math.sqrt(sig * sig + 1.0)
                return alpha, sig * alpha

            count = len(timesteps)
            for i, t in enumerate(timesteps):
                a_t, s_t = alpha_sigma(sigmas[i])
                a_n, s_n = alpha_sigma(sigmas[i + 1])
                final = i == count - 1 and (
                    config.euler_at_final
                    or (config.lower_order_final and count < 15)
                    or config.final_sigmas_type == "zero"
                )
                second = config.solver_order == 2 and i > 0 and not final
                plan.append(Step(t, 1.0, "dpmpp_2m", (a_t, s_t, a_n, s_n), a_t, s_t, second))
            init = float(planner.init_noise_sigma)
        sampler = cls.__new__(cls)
        sampler.schedule, sampler.method, sampler.steps = (
            None,
            ("ddim" if name == "EulerDiscreteScheduler" else method),
            len(plan),
        )
        sampler.prediction, sampler.eta, sampler.karras = prediction, float(eta), False
        sampler.options = options
        sampler.plan, sampler.init_noise_sigma = plan, init
        sampler._graphs, sampler._timestep_cache = {}, (None, None)
        return sampler

    @classmethod
    def _from_scheduler_general(cls, scheduler, steps, prediction) -> "Sampler":
        """Schedulers planned as generic fused steps (``sampler_step``: host coefficients over the sample, the
        model output, up to 3 earlier converted outputs and noise), with the coefficients of the patched
        scheduler's fused step: DPM-Solver multistep of any order/algorithm the patched step fuses
        (``sde-dpmsolver++`` included) and Euler ancestral. Noise is Philox at ``(seed, step)``, as for
        ddpm."""
        name, config = type(scheduler).__name__, scheduler.config
        reason = (fast._dpm_reason if name == "DPMSolverMultistepScheduler" else fast._ancestral_reason)(
            scheduler
        )
        if reason is not None:
            raise ValueError(
                f"fastlatent.sampling.Sampler.from_scheduler: {name} with {reason} is not expressible; "
                "patch the scheduler"
            )
        planner = type(scheduler).from_config(config)
        planner.set_timesteps(
            steps if steps is not None else (scheduler.num_inference_steps or 50), device="cpu"
        )
        timesteps = planner.timesteps.double().tolist()
        sigmas = planner.sigmas.double().tolist()
        plan: list[Step] = []
        options = dict(guidance_rescale=0.0, clip_x0=None, threshold_quantile=None, threshold_max=1.0)
        if name == "EulerAncestralDiscreteScheduler":
            for i, t in enumerate(timesteps):
                sigma, sigma_to = sigmas[i], sigmas[i + 1]
                sigma_up = math.sqrt(max(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2, 0.0))
                ratio = (math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0)) - sigma) / sigma
                x0_x, x0_m = fast._sigma_forms(config.prediction_type, sigma)
                args = (x0_x, x0_m, 1.0 + ratio, 0.0, -ratio, (), sigma_up, False)
                plan.append(Step(t, 1.0 / math.sqrt(sigma * sigma + 1.0), "generic", args))
        else:
            plus = config.algorithm_type.endswith("dpmsolver++")
            if plus:
                options.update(fast._x0_options(config))
            count = len(timesteps)
            for i, t in enumerate(timesteps):
                final = i == count - 1 and (
                    config.euler_at_final
                    or (config.lower_order_final and count < 15)
                    or config.final_sigmas_type == "zero"
                )
                second = i == count - 2 and config.lower_order_final and count < 15
                done = min(i, config.solver_order)  # diffusers' lower_order_nums at this step
                order = 1 if config.solver_order == 1 or done < 1 or final else 2
                if order == 2 and not (config.solver_order == 2 or done < 2 or second):
                    order = 3
                c_x, c_m, c_noise = fast._dpm_coefficients(
                    config.algorithm_type, config.solver_type, order, sigmas, i, planner
                )
                alpha, sigma = fast._dpm_alpha_sigma(planner, sigmas[i])
                x0_form, eps_form = fast._vp_forms(config.prediction_type, alpha, sigma)
                form = x0_form if plus else eps_form
                keep = i + 1 < count and config.solver_order > 1  # later steps read this converted output
                args = (*form, c_x, 0.0, c_m[0], tuple(c_m[1:order]), c_noise, keep)
                plan.append(Step(t, 1.0, "generic", args))
        sampler = cls.__new__(cls)
        sampler.schedule, sampler.steps, sampler.eta, sampler.karras = None, len(plan), 0.0, False
        sampler.method = "euler_ancestral" if name.startswith("EulerAncestral") else "dpm_solver"
        sampler.prediction, sampler.options = prediction, options
        sampler.plan, sampler.init_noise_sigma = plan, float(planner.init_noise_sigma)
        sampler._graphs, sampler._timestep_cache = {}, (None, None)
        return sampler

    # ------------------------------------------------------------------ plan

    def _sigmas_and_timesteps(self):
        """(sigmas incl. the final one, model timesteps, space) for euler and dpmpp_2m."""
        s, n = self.schedule, self.steps
        if isinstance(s, FlowSchedule) and self.method == "dpmpp_2m":
            return (*_dpm_flow_sigmas_and_timesteps(s, n), "flow")
        if isinstance(s, FlowSchedule):
            sigmas = s.sigmas(n) + [0.0]
            timesteps = (torch.tensor(sigmas[:-1], dtype=torch.float32) * s.num_train_timesteps).tolist()
            return sigmas, timesteps, "flow"
        if isinstance(s, KarrasSchedule):
            return s.sigmas(n) + [0.0], s.sigmas(n), "ve"
        t_count = s.num_train_timesteps
        full = np.array(s.sigmas, dtype=np.float32)
        if self.method == "euler":
            timesteps = np.linspace(0, t_count - 1, n, dtype=np.float32)[::-1].copy()
        else:
            timesteps = np.linspace(0, t_count - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        sigmas = np.interp(timesteps, np.arange(0, t_count), full)
        if self.karras:
            log_sigmas = np.log(full)
            sigmas = np.array(karras_sigmas(n, float(sigmas[-1]), float(sigmas[0])))
            timesteps = np.array([_sigma_to_t(float(sig), log_sigmas) for sig in sigmas])
            if self.method == "dpmpp_2m":
                timesteps = timesteps.round()
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return (
            [float(v) for v in sigmas],
            [float(v) for v in timesteps],
            "vp" if self.method == "dpmpp_2m" else "ve",
        )

    def _plan(self):
        plan: list[Step] = []
        if self.method in ("ddpm", "ddim"):
            s = self.schedule
            ratio = s.num_train_timesteps // self.steps
            timesteps = (np.arange(0, self.steps) * ratio).round()[::-1].astype(np.int64)
            for t in timesteps:
                prev = int(t) - ratio
                ab_t = s.alpha_bars[int(t)]
                ab_prev = s.alpha_bars[prev] if prev >= 0 else 1.0
                args = (ab_t, ab_prev) if self.method == "ddpm" else (ab_t, ab_prev, self.eta)
                plan.append(Step(float(t), 1.0, self.method, args))
            return plan, 1.0
        sigmas, timesteps, space = self._sigmas_and_timesteps()
        if self.method == "euler":
            if isinstance(self.schedule, DiscreteSchedule):
                # An Euler step of the probability-flow ODE in sigma space, x = x0 + sigma eps, is exactly
                # a deterministic DDIM step in the variance-preserving space y = x / sqrt(sigma^2 + 1)
                # (with alpha_bar = 1 / (sigma^2 + 1)), and y is what the model sees. Stepping y with the
                # fused DDIM op removes diffusers' separate scale_model_input pass; the trajectory is the
                # same (tested against EulerDiscreteScheduler), and y = x at the final sigma = 0.
                for i, t in enumerate(timesteps):
                    ab_t, ab_next = 1.0 / (sigmas[i] ** 2 + 1.0), 1.0 / (sigmas[i + 1] ** 2 + 1.0)
                    plan.append(Step(t, 1.0, "ddim", (ab_t, ab_next, 0.0)))
                return plan, sigmas[0] / math.sqrt(sigmas[0] ** 2 + 1.0)
            for i, t in enumerate(timesteps):
                plan.append(Step(t, 1.0, "euler", (sigmas[i], sigmas[i + 1])))
            # flow: x = (1 - sigma) x0 + sigma eps starts at unit noise; Karras: x = x0 + sigma eps at
            # sigma_max
            return plan, (1.0 if space == "flow" else sigmas[0])

        def alpha_sigma(sig):
            if space == "flow":
                return 1.0 - sig, sig
            if space == "ve":
                return 1.0, sig
            alpha = 1.0 / math.sqrt(sig * sig + 1.0)
            return alpha, sig * alpha

        for i, t in enumerate(timesteps):
            a_t, s_t = alpha_sigma(sigmas[i])
            a_n, s_n = alpha_sigma(sigmas[i + 1])
            second = i > 0 and i < len(timesteps) - 1
            plan.append(Step(t, 1.0, "dpmpp_2m", (a_t, s_t, a_n, s_n), a_t, s_t, second))
        init = 1.0 if space in ("flow", "vp") else sigmas[0]
        return plan, init

    # ------------------------------------------------------------------ loop

    def _timesteps(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        """The ``t`` tensor of every step, made once per batch size and device (not one fill per step)."""
        key, tensors = self._timestep_cache
        if key != (batch, device):
            tensors = [
                torch.full((batch,), step.timestep, dtype=torch.float32, device=device) for step in self.plan
            ]
            self._timestep_cache = ((batch, device), tensors)
        return tensors

    def _loop(self, model_fn, x, cond, guidance, seed, seed_offsets, progress):
        prev_x0, prev_step, history = None, None, []
        batch = x.shape[0] * (2 if guidance is not None else 1)
        timesteps = self._timesteps(batch, x.device)
        options = dict(self.options, guidance_scale=guidance)
        if guidance is None:
            options["guidance_rescale"] = 0.0
        steps = self.plan
        if progress:
            steps = tqdm(steps, desc=f"fastlatent {self.method}", leave=False)
        for i, step in enumerate(steps):
            model_in = torch.cat([x, x]) if guidance is not None else x
            if step.input_scale != 1.0:
                model_in = model_in * step.input_scale
            out = model_fn(model_in, timesteps[i], cond)
            if out.dtype != x.dtype:
                raise TypeError(
                    f"fastlatent.sampling.Sampler: model_fn returned {out.dtype} for a {x.dtype} "
                    "sample; sample in the model's dtype (or cast inside model_fn)"
                )
            noise_args = {}
            if step.kind in ("ddpm", "ddim", "generic"):
                noise_args = (
                    dict(seed_offset=seed_offsets[i])
                    if seed_offsets is not None
                    else dict(seed=seed, offset=i)
                )
            if step.kind == "ddpm":
                x, _ = _steps.ddpm_step(
                    out, x, *step.args, prediction=self.prediction, return_x0=False, **noise_args, **options
                )
            elif step.kind == "ddim":
                x, _ = _steps.ddim_step(
                    out, x, *step.args, prediction=self.prediction, return_x0=False, **noise_args, **options
                )
            elif step.kind == "generic":  # x0_x, x0_m, out_x, out_m, out_x0, out_history, out_noise, keep_x0
                x, x0 = _steps.sampler_step(
                    out,
                    x,
                    *step.args[:5],
                    history[: len(step.args[5])],
                    step.args[5],
                    step.args[6],
                    return_x0=step.args[7],
                    **noise_args,
                    **options,
                )
                if step.args[7]:
                    history = [x0, *history[:2]]  # converted model outputs, newest first
            elif step.kind == "euler":
                x, _ = _steps.euler_step(
                    out, x, *step.args, prediction=self.prediction, return_x0=False, **options
                )
            else:
                prev_args = (prev_step.alpha, prev_step.sigma) if step.second_order else (1.0, 1.0)
                x, x0 = _steps.dpmpp_2m_step(
                    out,
                    x,
                    prev_x0 if step.second_order else None,
                    *step.args,
                    *prev_args,
                    prediction=self.prediction,
                    **options,
                )
                prev_x0, prev_step = x0, step
        return x

    def sample(
        self,
        model_fn: Callable,
        shape_or_x,
        cond=None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        capture_graph: bool = False,
        progress: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Runs the loop from noise to a sample.

        Args:
            model_fn: ``model_fn(x, t, cond) -> model output`` like ``x`` (see the class docstring).
            shape_or_x: a shape (unit noise is drawn from ``generator`` on ``device``, in ``dtype``) or
                ``x_T``, unit-variance starting noise (the sampler scales it by the schedule's initial sigma).
            cond: anything ``model_fn`` takes; with ``capture_graph`` a tensor or a (nested) list/tuple/dict
                of tensors, copied into the graph's static inputs on each call.
            guidance: classifier-free guidance scale; ``model_fn`` then gets the batch twice and returns
                ``[uncond; cond]``.
            generator: for the starting noise and the noise of ddpm/ddim(eta > 0) steps. One 63-bit seed is
                drawn from it per call; step ``i`` draws Philox noise at ``(seed, i)``.
            capture_graph: CUDA only: capture the whole loop (model included) in a CUDA graph for this shape,
                dtype, guidance and model_fn, replayed by later calls with fresh inputs and noise. The model
                must be capturable (no host syncs, no data-dependent shapes).
            progress: show a tqdm progress bar over the steps.

        Returns:
            The final sample ``x_0`` (a new tensor).
        """
        if isinstance(shape_or_x, torch.Tensor):
            x = shape_or_x
            if device is not None and torch.device(device) != x.device:
                raise ValueError(
                    f"fastlatent.sampling.Sampler.sample: x_T is on {x.device} but device={device}"
                )
        else:
            shape = tuple(int(v) for v in shape_or_x)
            gen_device = generator.device if generator is not None else torch.device("cpu")
            x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
            x = x.to(device=device or "cpu", dtype=dtype)
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(
                f"fastlatent.sampling.Sampler.sample: need a batch of at least one, got {list(x.shape)}"
            )
        if guidance is not None and not math.isfinite(guidance):
            raise ValueError(f"fastlatent.sampling.Sampler.sample: guidance must be finite, got {guidance}")
        needs_noise = self.method == "ddpm" or (self.method == "ddim" and self.eta > 0)
        needs_noise = needs_noise or any(s.kind == "generic" and s.args[6] != 0.0 for s in self.plan)
        seed = _steps.seed_from_generator(generator) if needs_noise else 0
        x_start = x * self.init_noise_sigma if self.init_noise_sigma != 1.0 else x.clone()
        if not capture_graph:
            return self._loop(model_fn, x_start, cond, guidance, seed, None, progress)
        if not x.is_cuda:
            raise ValueError("fastlatent.sampling.Sampler.sample: capture_graph=True needs CUDA tensors")
        return self._replay(model_fn, x_start, cond, guidance, seed)

    # ------------------------------------------------------------------ CUDA graphs

    def _replay(self, model_fn, x, cond, guidance, seed):
        key = (tuple(x.shape), x.dtype, x.device, guidance, id(model_fn), _structure(cond))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(model_fn, x, cond, guidance, seed)
            self._graphs[key] = entry
        graph, static_x, static_cond, seed_offsets, static_out, _ = entry
        static_x.copy_(x)
        _copy_into(static_cond, cond)
        seed_offsets.copy_(_seed_table(seed, len(self.plan)), non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, model_fn, x, cond, guidance, seed):
        static_x = x.clone()
        static_cond = _clone_tree(cond)
        seed_offsets = _seed_table(seed, len(self.plan)).to(x.device)
        # Warm-up on a side stream (lazy initialisation, allocator pools, autotuning), as
        # torch.cuda.graphs recommends; then capture the loop from the same static inputs.
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._loop(model_fn, static_x.clone(), static_cond, guidance, 0, seed_offsets, False)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._loop(model_fn, static_x, static_cond, guidance, 0, seed_offsets, False)
        # model_fn is kept alive with the graph: the key holds its id.
        return graph, static_x, static_cond, seed_offsets, static_out, model_fn


def _seed_table(seed: int, steps: int) -> torch.Tensor:
    table = torch.empty(steps, 2, dtype=torch.int64)
    table[:, 0] = seed
    table[:, 1] = torch.arange(steps)
    return table


def _structure(tree):
    if isinstance(tree, torch.Tensor):
        return ("tensor", tuple(tree.shape), tree.dtype, tree.device)
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(_structure(v) for v in tree))
    if isinstance(tree, dict):
        return ("dict", tuple((k, _structure(v)) for k, v in sorted(tree.items())))
    if tree is None or isinstance(tree, (int, float, str, bool)):
        return ("value", tree)
    raise TypeError(
        f"fastlatent.sampling.Sampler.sample: with capture_graph, cond must be tensors in "
        f"lists/tuples/dicts (or plain values), got {type(tree).__name__}"
    )


def _clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    return tree


def _copy_into(static, tree):
    if isinstance(static, torch.Tensor):
        static.copy_(tree)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, tree):
            _copy_into(s, v)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], tree[k])
