"""Drop-in diffusers schedulers whose ``step`` runs fused fastlatent kernels.

``Fast<Name>`` (``FastDDIMScheduler``, ``FastDPMSolverMultistepScheduler``, ... one per diffusers
scheduler in :data:`__all__`) builds diffusers' ``<Name>`` (same arguments, ``from_config``,
``from_pretrained``) and installs the fused ``step`` on the instance
(:func:`fastlatent.sampling.diffusers_fast.accelerate_scheduler`). The object is diffusers' own class,
so pipelines, ``save_pretrained`` (``scheduler_config.json``, ``model_index.json``) and plain-diffusers
reloads see nothing but diffusers::

    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler
    pipe.scheduler = FastDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

or simply ``fastlatent.patch(pipe)``. ``isinstance(s, FastDDIMScheduler)`` is true for an accelerated
``DDIMScheduler``. A config or call the fused step does not cover runs diffusers' own step (never an
error); the swap report says which. diffusers is imported when a class is first used, so fastlatent
does not depend on it.
"""

from __future__ import annotations

from fastlatent.sampling import diffusers_fast

# one Fast<Name> per fused family, so a newly fused scheduler gets its drop-in class with no second list
_NAMES = tuple(sorted(diffusers_fast.covered_schedulers()))

__all__ = ["Fast" + name for name in _NAMES]


class _FastSchedulerMeta(type):
    """``Fast<Name>(...)``/``.from_config``/``.from_pretrained`` give an accelerated diffusers ``<Name>``."""

    def __call__(cls, *args, **kwargs):
        return cls._accelerated(cls._diffusers_class()(*args, **kwargs))

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, cls._diffusers_class()) and diffusers_fast.is_accelerated(instance)

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._diffusers_class(), name)


class _FastScheduler(metaclass=_FastSchedulerMeta):
    _diffusers_name = ""

    @classmethod
    def _diffusers_class(cls):
        import diffusers

        return getattr(diffusers, cls._diffusers_name)

    @staticmethod
    def _accelerated(scheduler):
        diffusers_fast.accelerate_scheduler(scheduler)
        return scheduler

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``, then the fused step installed."""
        made = cls._diffusers_class().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if return_unused_kwargs:
            return cls._accelerated(made[0]), made[1]
        return cls._accelerated(made)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' ``from_pretrained``, then the fused step installed."""
        made = cls._diffusers_class().from_pretrained(*args, **kwargs)
        if isinstance(made, tuple):
            return (cls._accelerated(made[0]),) + tuple(made[1:])
        return cls._accelerated(made)


def _fast_class(name: str) -> type:
    doc = (
        f"diffusers' ``{name}`` with the fused fastlatent ``step`` installed on each instance (the instance "
        f"is a ``diffusers.{name}``; saved configs name it)."
    )
    return _FastSchedulerMeta(
        "Fast" + name, (_FastScheduler,), {"_diffusers_name": name, "__doc__": doc, "__module__": __name__}
    )


def __getattr__(name: str):
    if name.startswith("Fast") and name[4:] in _NAMES:
        try:
            import diffusers  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"fastlatent.sampling.schedulers.{name} needs diffusers (pip install diffusers): {exc}"
            ) from exc
        cls = _fast_class(name[4:])
        globals()[name] = cls
        return cls
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}; the fused diffusers schedulers are "
        f"{', '.join(__all__)} (other diffusers schedulers work as they are: fastlatent.patch "
        "leaves them unchanged)"
    )


def __dir__():
    return sorted(set(globals()) | set(__all__))
