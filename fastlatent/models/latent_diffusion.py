"""``LatentDiffusion``: trains a denoiser on prior-space latents and samples it with fastlatent's fused
samplers.

Objectives (``x0`` the clean latent, ``noise`` unit Gaussian):

* ``"eps"``: VP diffusion on a :class:`~fastlatent.sampling.DiscreteSchedule`: integer ``t ~ U{0..T-1}``,
  ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``, the model sees ``(x_t, t)`` and predicts ``noise``.
* ``"v"``: same corruption, the model predicts ``v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0`` (Salimans & Ho
  2022).
* ``"flow"``: rectified flow on a :class:`~fastlatent.sampling.FlowSchedule`: ``s`` in [0, 1] (uniform or
  logit-normal, then the schedule's shift ``s' = shift s / (1 + (shift - 1) s)``), ``x_s = (1 - s) x0 + s
  noise``, the model sees ``(x_s, s * T)`` and predicts the velocity ``noise - x0``.

These are exactly what :class:`fastlatent.sampling.Sampler` inverts with ``prediction="epsilon"``,
``"v_prediction"`` and ``"flow"``, with the timestep convention it passes the model (``t`` for discrete
schedules, ``sigma * T`` for flow), so a model trained here samples with any of its methods.

The loss is the plain mean squared error to the target, computed in float32.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.base import MODEL_REGISTRY, ConfigMixin, _jsonable, evaluating, register_model
from fastlatent.models.dit import check_label_values, sampling_labels, size_pair
from fastlatent.sampling import DiscreteSchedule, FlowSchedule, KarrasSchedule, Sampler
from fastlatent.sampling.schedules import BETA_SCHEDULES

OBJECTIVES = ("eps", "v", "flow")
FLOW_TIME_SAMPLING = ("uniform", "logit_normal")
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "flow": "flow"}


# ------------------------------------------------------------------------------------------ sub-model configs


def model_spec(model) -> dict:
    """``{"class": name, "config": {...}}`` for a registered ConfigMixin model (a dict spec passes
    through)."""
    if isinstance(model, dict):
        return model
    if not (
        isinstance(model, nn.Module)
        and isinstance(model, ConfigMixin)
        and MODEL_REGISTRY.get(type(model).__name__) is type(model)
    ):
        raise TypeError(
            f"expected a model built from a @register_model ConfigMixin class (so it can be saved and "
            f"rebuilt from its config), or a spec {{'class': name, 'config': {{...}}}}, got "
            f"{type(model).__name__}"
        )
    return {"class": type(model).__name__, "config": model.config}


def build_model(spec, where: str, argument: str) -> nn.Module:
    """The module itself, or one rebuilt from a ``{"class": name, "config": {...}}`` spec via the registry."""
    if isinstance(spec, nn.Module):
        return spec
    if not (isinstance(spec, dict) and set(spec) == {"class", "config"} and isinstance(spec["config"], dict)):
        raise TypeError(
            f"{where}: {argument} must be a model or {{'class': name, 'config': {{...}}}}, got {spec!r}"
        )
    cls = MODEL_REGISTRY.get(spec["class"])
    if cls is None:
        raise ValueError(
            f"{where}: {argument} names an unknown model class {spec['class']!r}; known: "
            f"{sorted(MODEL_REGISTRY)}"
        )
    return cls.from_config(spec["config"])


def schedule_config(schedule, objective) -> dict:
    """A JSON description of the training/sampling schedule: ``{"kind": ..., ...}``."""
    if isinstance(schedule, DiscreteSchedule):
        return {
            "kind": schedule.kind,
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end,
        }
    if isinstance(schedule, FlowSchedule):
        return {"kind": "flow", "shift": schedule.shift, "num_train_timesteps": schedule.num_train_timesteps}
    if isinstance(schedule, KarrasSchedule):
        raise ValueError(
            "LatentDiffusion: a KarrasSchedule (EDM) is for sampling models with their own "
            "preconditioning; train with a DiscreteSchedule (eps, v) or a FlowSchedule (flow)"
        )
    if schedule is None:
        return {"kind": "flow"} if objective == "flow" else {"kind": "linear"}
    if isinstance(schedule, str):
        return {"kind": schedule}
    if isinstance(schedule, dict):
        return dict(schedule)
    raise TypeError(
        f"LatentDiffusion: schedule must be None, a name ({', '.join(BETA_SCHEDULES)}, flow), a dict "
        f"{{'kind': ..., ...}}, a DiscreteSchedule or a FlowSchedule, got {type(schedule).__name__}"
    )


def _build_schedule(config: dict, objective: str):
    kind = config.get("kind")
    params = {k: v for k, v in config.items() if k != "kind"}
    if objective == "flow":
        if kind != "flow":
            raise ValueError(
                f'LatentDiffusion: objective "flow" trains on a flow schedule, got schedule {kind!r}'
            )
        allowed = {f.name for f in dataclasses.fields(FlowSchedule)}
    else:
        if kind not in BETA_SCHEDULES:
            raise ValueError(
                f'LatentDiffusion: objective "{objective}" needs a discrete schedule (one of '
                f"{BETA_SCHEDULES}), got {kind!r}"
            )
        allowed = {f.name for f in dataclasses.fields(DiscreteSchedule)} - {"kind"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"LatentDiffusion: unknown schedule options {unknown} for {kind!r} (allowed: {sorted(allowed)})"
        )
    return FlowSchedule(**params) if kind == "flow" else DiscreteSchedule(kind, **params)


def unpack_prior_batch(where: str, batch):
    """``(x, labels)`` from a DataLoader batch of ``(latents_or_tokens, labels)`` (labels may be absent)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise ValueError(
        f"{where}: batch must be (data, labels) as the DataLoader yields it, got "
        f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (list, tuple)) else ''}"
    )


def training_labels(where: str, labels, batch: int, num_classes: int, label_dropout: float, device):
    """Checked int64 labels ``[B]`` with label dropout to the null class applied, or None (unconditional)."""
    if num_classes == 0:
        return None  # an unconditional prior ignores the dataset's labels
    if labels is None:
        raise ValueError(
            f"{where}: this prior is class-conditional (num_classes={num_classes}); the batch must be "
            "(data, labels)"
        )
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype.is_floating_point
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise TypeError(
            f"{where}: labels must be an integer tensor [B], got "
            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if labels.shape != (batch,):
        raise ValueError(f"{where}: labels must be [B] = [{batch}], got shape {list(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.int64)
    check_label_values(where, "labels", labels, num_classes, allow_null=True)
    if label_dropout > 0:
        drop = torch.rand(batch, device=device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return labels


# -------------------------------------------------------------------------------------------- LatentDiffusion


@register_model
class LatentDiffusion(nn.Module, ConfigMixin):
    """A class-conditional latent diffusion prior: training objective, label dropout and guided sampling.

    Args:
        denoiser: the network, ``denoiser(x [B, C, h, w], t [B] float, labels [B] int64 or None) -> [B, C', h,
            w]`` with attributes ``in_channels`` (C) and ``num_classes`` (label ``num_classes`` = the null
            class), e.g. :class:`~fastlatent.models.DiT` or :class:`~fastlatent.models.UNet`. It must be a
            registered ConfigMixin model (saved in this model's config as ``{"class": ..., "config": ...}``;
            that dict is also accepted here). Outputs with more than C channels (DiT's ``learn_sigma``) are
            sampled with the first C.
        objective: ``"eps"``, ``"v"`` or ``"flow"`` (see the module docstring).
        schedule: for eps/v a discrete schedule: ``"linear"`` (default; DiT's), ``"scaled_linear"``,
            ``"cosine"``, a ``{"kind": ..., "num_train_timesteps": ..., "beta_start": ..., "beta_end": ...}``
            dict or a :class:`~fastlatent.sampling.DiscreteSchedule`; for flow ``"flow"`` (default),
            ``{"kind": "flow", "shift": ..., "num_train_timesteps": ...}`` or a
            :class:`~fastlatent.sampling.FlowSchedule`.
        label_dropout: probability that a training label is replaced by the null class, so the same network
            learns the unconditional model for classifier-free guidance. Done here, not in the denoiser;
            ignored by an unconditional prior.
        num_classes: defaults to ``denoiser.num_classes``; if given it must agree.
        latent_size: ``[h, w]`` (or an int) of the latents ``sample`` draws; defaults to
            ``denoiser.input_size`` (DiT). Required for a size-agnostic denoiser such as the UNet.
        flow_time_sampling: how flow training draws ``s`` before the shift: ``"uniform"`` or
            ``"logit_normal"`` (``sigmoid(N(0, 1))``, SD3).

    ``training_step((latents [B, C, h, w], labels [B]), step) -> {"loss"}``; ``sample(n, labels, ...)``
    returns prior-space latents ``[n, C, h, w]``.
    """

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        if args or kwargs:  # a constructor call, not copy/pickle reconstruction
            # Record the config here, before ConfigMixin's wrapper of __init__ would reject the denoiser
            # module:
            # the denoiser is stored as its registered class name and config, the schedule as a dict.
            signature = inspect.signature(cls.__init__)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            config = {k: v for k, v in bound.arguments.items() if k != "self"}
            if "denoiser" in config:
                try:
                    config["denoiser"] = model_spec(config["denoiser"])
                except TypeError as exc:
                    raise TypeError(f"LatentDiffusion: denoiser: {exc}") from None
            if "schedule" in config:
                config["schedule"] = schedule_config(config["schedule"], config.get("objective"))
            config = {k: _jsonable(v, f"{cls.__name__}: argument {k}") for k, v in config.items()}
            object.__setattr__(self, "_config", config)
        return self

    def __init__(
        self,
        denoiser,
        objective: str = "eps",
        schedule=None,
        label_dropout: float = 0.1,
        num_classes: int | None = None,
        latent_size: int | list[int] | None = None,
        flow_time_sampling: str = "uniform",
    ):
        super().__init__()
        where = "LatentDiffusion"
        if objective not in OBJECTIVES:
            raise ValueError(f'{where}: objective must be "eps", "v" or "flow", got {objective!r}')
        if flow_time_sampling not in FLOW_TIME_SAMPLING:
            raise ValueError(
                f"{where}: flow_time_sampling must be one of {FLOW_TIME_SAMPLING}, got {flow_time_sampling!r}"
            )
        self.denoiser = build_model(denoiser, where, "denoiser")
        for attribute in ("in_channels", "num_classes"):
            value = getattr(self.denoiser, attribute, None)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{where}: the denoiser ({type(self.denoiser).__name__}) must have an int attribute "
                    f"{attribute}"
                )
        if getattr(self.denoiser, "extra_in_channels", 0):
            raise ValueError(
                f"{where}: the denoiser takes a conditioning image (extra_in_channels="
                f"{self.denoiser.extra_in_channels}); a prior samples from noise alone, build it with "
                "extra_in_channels=0"
            )
        if num_classes is None:
            num_classes = self.denoiser.num_classes
        elif num_classes != self.denoiser.num_classes:
            raise ValueError(
                f"{where}: num_classes={num_classes} but the denoiser was built with num_classes="
                f"{self.denoiser.num_classes}"
            )
        if not (isinstance(label_dropout, (int, float)) and 0.0 <= label_dropout < 1.0):
            raise ValueError(f"{where}: label_dropout must be in [0, 1), got {label_dropout!r}")
        denoiser_size = getattr(self.denoiser, "input_size", None)
        if latent_size is not None:
            latent_size = size_pair(latent_size, where, "latent_size")
            if denoiser_size is not None and list(denoiser_size) != latent_size:
                raise ValueError(
                    f"{where}: latent_size {latent_size} differs from the denoiser's input_size "
                    f"{list(denoiser_size)}"
                )
        elif denoiser_size is not None:
            latent_size = list(denoiser_size)
        self.objective = objective
        self.schedule = _build_schedule(schedule_config(schedule, objective), objective)
        self.num_classes = num_classes
        self.label_dropout = float(label_dropout)
        self.latent_channels = self.denoiser.in_channels
        self.latent_size = latent_size
        self.flow_time_sampling = flow_time_sampling
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self._samplers: dict = {}

    def __getstate__(self):
        # Cached samplers may hold CUDA graphs, which cannot be copied: copies (EMA, pickling) start without
        # them.
        state = self.__dict__.copy()
        state["_samplers"] = {}
        return state

    # ------------------------------------------------------------------ training

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's output for ``x [B, C, h, w]`` at timestep ``t``, sliced to C channels."""
        out = self.denoiser(x, t, labels)
        return out if out.shape[1] == self.latent_channels else out[:, : self.latent_channels].contiguous()

    def _check_latents(self, where: str, latents) -> None:
        if (
            not isinstance(latents, torch.Tensor)
            or not latents.dtype.is_floating_point
            or latents.dim() != 4
            or latents.shape[1] != self.latent_channels
            or latents.shape[0] < 1
        ):
            what = (
                f"{latents.dtype} {list(latents.shape)}"
                if isinstance(latents, torch.Tensor)
                else type(latents).__name__
            )
            raise ValueError(
                f"{where}: latents must be a float tensor [B >= 1, {self.latent_channels}, h, w], got {what}"
            )
        if self.latent_size is not None and list(latents.shape[2:]) != self.latent_size:
            raise ValueError(
                f"{where}: latents must be {self.latent_size[0]}x{self.latent_size[1]}, got "
                f"{latents.shape[2]}x{latents.shape[3]}"
            )

    def loss(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The objective's mean squared error for clean ``latents [B, C, h, w]`` (labels already dropped out).

        Args:
            latents: x0, prior-space latents.
            labels: ``[B]`` int64 (``num_classes`` = null) or None for an unconditional prior.
            noise: the Gaussian noise (drawn when None).
            timesteps: eps/v: integer training timesteps ``[B]`` in ``[0, T)``; flow: times ``s [B]`` in
                ``[0, 1]`` after the shift. Drawn when None.

        Returns:
            The scalar float32 loss.
        """
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn_like(latents)
        elif noise.shape != latents.shape:
            raise ValueError(
                f"LatentDiffusion.loss: noise must have the shape of latents {list(latents.shape)}, "
                f"got {list(noise.shape)}"
            )
        if timesteps is not None:
            if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (b,):
                raise ValueError(
                    f"LatentDiffusion.loss: timesteps must be a tensor [B] = [{b}], got "
                    f"{list(timesteps.shape) if isinstance(timesteps, torch.Tensor) else timesteps!r}"
                )
            low, high = (0.0, 1.0) if self.objective == "flow" else (0, self.num_train_timesteps - 1)
            if timesteps.numel() and bool(((timesteps < low) | (timesteps > high)).any()):
                raise ValueError(
                    f"LatentDiffusion.loss: timesteps must be in [{low}, {high}] for objective "
                    f"{self.objective!r}"
                )
        if self.objective == "flow":
            if timesteps is None:
                if self.flow_time_sampling == "logit_normal":
                    u = torch.sigmoid(torch.randn(b, device=latents.device))
                else:
                    u = torch.rand(b, device=latents.device)
                shift = self.schedule.shift
                timesteps = shift * u / (1 + (shift - 1) * u)
            s = timesteps.to(device=latents.device, dtype=torch.float32)
            s_ = s.view(b, 1, 1, 1)
            x_t = ((1 - s_) * latents.float() + s_ * noise.float()).to(latents.dtype)
            target = noise.float() - latents.float()
            model_t = s * self.num_train_timesteps
        else:
            if timesteps is None:
                timesteps = torch.randint(0, self.num_train_timesteps, (b,), device=latents.device)
            # From the schedule's float32 table (a buffer would follow model.to(bfloat16) and lose precision).
            ab = self.schedule.alphas_cumprod.to(latents.device)[timesteps.long()].view(b, 1, 1, 1)
            alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
            x_t = (alpha * latents.float() + sigma * noise.float()).to(latents.dtype)
            target = (
                noise.float() if self.objective == "eps" else alpha * noise.float() - sigma * latents.float()
            )
            model_t = timesteps.float()
        prediction = self(x_t, model_t, labels)
        return F.mse_loss(prediction.float(), target)

    def training_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        """One training step's loss: ``batch = (latents [B, C, h, w], labels [B])`` in prior space."""
        where = "LatentDiffusion.training_step"
        latents, labels = unpack_prior_batch(where, batch)
        self._check_latents(where, latents)
        if getattr(self.denoiser, "learn_sigma", False):
            raise ValueError(
                f"{where}: the denoiser has learn_sigma=True; training the learned variance (VLB) is not "
                "implemented, build it with learn_sigma=False"
            )
        labels = training_labels(
            where, labels, latents.shape[0], self.num_classes, self.label_dropout, latents.device
        )
        return {"loss": self.loss(latents, labels)}

    # ------------------------------------------------------------------ sampling

    def _sampler(self, method, steps, eta, karras, guidance_rescale, clip_x0):
        key = (method, steps, eta, karras, guidance_rescale, clip_x0)
        entry = self._samplers.get(key)
        if entry is None:
            sampler = Sampler(
                method,
                self.schedule,
                steps,
                prediction=_PREDICTION[self.objective],
                eta=eta,
                karras=karras,
                guidance_rescale=guidance_rescale,
                clip_x0=clip_x0,
            )

            def model_fn(x, t, labels):
                return self(x, t, labels)

            # One model_fn per sampler: a captured CUDA graph is keyed on it, so later calls replay the graph.
            entry = self._samplers[key] = (sampler, model_fn)
        return entry

    def sample(
        self,
        n: int,
        labels=None,
        steps: int = 50,
        guidance: float | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        *,
        eta: float = 0.0,
        karras: bool = False,
        guidance_rescale: float = 0.0,
        clip_x0: float | None = None,
        capture_graph: bool = False,
        latent_size: int | list[int] | None = None,
    ) -> torch.Tensor:
        """Draws ``n`` latents in prior space.

        Args:
            n: how many.
            labels: None (a conditional prior then samples the null class, i.e. unconditionally), an int for
                all samples, or ``n`` class indices (list or integer tensor).
            steps: model evaluations (doubled batch with guidance).
            guidance: classifier-free guidance scale ``g``: ``u + g (c - u)`` from the null-class (u) and
                conditional (c) outputs; None for plain conditional sampling.
            method: ``"ddpm"``, ``"ddim"``, ``"euler"`` or ``"dpmpp_2m"`` (default: euler for flow, ddim
                otherwise; ddpm/ddim need a discrete schedule).
            generator: for the starting noise (and ddpm/ddim-eta noise); same generator state, same samples.
            progress: a tqdm bar.
            eta, karras, guidance_rescale, clip_x0: see :class:`fastlatent.sampling.Sampler`.
            capture_graph: CUDA: capture the whole loop in a CUDA graph, replayed by later calls of the same
                shape.
            latent_size: overrides the prior's ``latent_size`` (size-agnostic denoisers only).

        Returns:
            ``[n, C, h, w]`` latents in the model's dtype, on its device.
        """
        where = "LatentDiffusion.sample"
        parameter = next(self.denoiser.parameters())
        device, dtype = parameter.device, parameter.dtype
        labels, guided = sampling_labels(where, labels, n, self.num_classes, guidance, device)
        size = self.latent_size
        if latent_size is not None:
            size = size_pair(latent_size, where, "latent_size")
            if getattr(self.denoiser, "input_size", None) is not None and size != list(
                self.denoiser.input_size
            ):
                raise ValueError(
                    f"{where}: latent_size {size} differs from the denoiser's input_size "
                    f"{list(self.denoiser.input_size)}"
                )
        if size is None:
            raise ValueError(
                f"{where}: the latent size is unknown (the denoiser has no input_size); pass latent_size "
                "here or to the constructor"
            )
        if method is None:
            method = "euler" if self.objective == "flow" else "ddim"
        sampler, model_fn = self._sampler(method, steps, eta, karras, guidance_rescale, clip_x0)
        cond = labels
        if guided:
            cond = torch.cat([torch.full_like(labels, self.num_classes), labels])
        with evaluating(self):
            return sampler.sample(
                model_fn,
                (n, self.latent_channels, *size),
                cond,
                guidance=float(guidance) if guided else None,
                generator=generator,
                capture_graph=capture_graph,
                progress=progress,
                device=device,
                dtype=dtype,
            )
