"""``TwoStagePipeline``: a stage-1 autoencoder and a stage-2 prior, used and saved as one model.

Continuous autoencoders (KL, DGAE): the prior (:class:`~fastlatent.models.LatentDiffusion`) lives in the
scaled latent space ``(z - shift_factor) * scaling_factor``; ``decode`` maps back with ``z = latents /
scaling_factor + shift_factor``. Discrete autoencoders (VQ, FSQ, LFQ, BSQ): the prior
(:class:`~fastlatent.models.TokenGPT`) models the token grid ``[B, h, w]`` (``[B, h, w, Q]`` for residual VQ)
flattened row-major to ``[B, L]``; the grid shape is part of the pipeline's config.

Saved layout (``save(folder)``)::

    folder/pipeline.json                 {"format": "fastlatent.TwoStagePipeline", "version": 1,
                                          "token_grid": ...}
    folder/autoencoder/{config.json, model.safetensors}
    folder/prior/{config.json, model.safetensors}

``TwoStagePipeline.load(folder)`` rebuilds both models from registered classes only (JSON + safetensors, never
a pickle), so an untrusted folder cannot run code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from fastlatent.models.base import atomic_write, evaluating, load_pretrained

PIPELINE_NAME = "pipeline.json"
PIPELINE_FORMAT = "fastlatent.TwoStagePipeline"
PIPELINE_VERSION = 1
_STAGE1_ATTRIBUTES = ("is_discrete", "latent_channels", "downsample_factor", "encode", "decode")


class TwoStagePipeline(nn.Module):
    """Encode images to prior space, decode back, and sample images from the prior.

    Args:
        autoencoder: a stage-1 model (``encode``, ``decode``, ``is_discrete``, ``latent_channels``,
            ``downsample_factor``, ``scaling_factor``, ``shift_factor``; discrete ones also ``codebook_size``,
            ``encode_indices``, ``decode_indices``).
        prior: a :class:`~fastlatent.models.LatentDiffusion` for a continuous autoencoder (latent channels
            must match) or a :class:`~fastlatent.models.TokenGPT` for a discrete one (``vocab_size`` must
            equal ``codebook_size``).
        token_grid: discrete only: the token grid ``[h, w]`` (or ``[h, w, Q]`` for residual VQ) whose
            ``h * w (* Q)`` must equal the prior's ``seq_len``. Default: square ``[s, s]`` with ``s * s =
            seq_len`` (``[s, s, Q]`` when the autoencoder has ``num_quantizers = Q > 1``).

    Both models must be registered ConfigMixin models for :meth:`save` / :meth:`load`.
    """

    def __init__(self, autoencoder: nn.Module, prior: nn.Module, token_grid: list[int] | None = None):
        super().__init__()
        where = "TwoStagePipeline"
        missing = [a for a in _STAGE1_ATTRIBUTES if not hasattr(autoencoder, a)]
        if missing:
            raise TypeError(
                f"{where}: autoencoder ({type(autoencoder).__name__}) lacks the stage-1 protocol's {missing}"
            )
        if not hasattr(prior, "sample") or not hasattr(prior, "training_step"):
            raise TypeError(
                f"{where}: prior ({type(prior).__name__}) must be a stage-2 prior with sample() and "
                "training_step() (LatentDiffusion or TokenGPT)"
            )
        self.autoencoder = autoencoder
        self.prior = prior
        self.is_discrete = bool(autoencoder.is_discrete)
        if self.is_discrete:
            self.token_grid = self._check_discrete(where, autoencoder, prior, token_grid)
        else:
            if token_grid is not None:
                raise ValueError(f"{where}: token_grid is for discrete autoencoders; this one is continuous")
            self.token_grid = None
            self._check_continuous(where, autoencoder, prior)

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_discrete(where, ae, prior, token_grid):
        for attribute in ("vocab_size", "seq_len"):
            if not isinstance(getattr(prior, attribute, None), int):
                raise TypeError(
                    f"{where}: a discrete autoencoder needs a token prior (TokenGPT, with vocab_size and "
                    f"seq_len), got {type(prior).__name__}"
                )
        for attribute in ("codebook_size", "encode_indices", "decode_indices"):
            if not hasattr(ae, attribute):
                raise TypeError(f"{where}: the discrete autoencoder ({type(ae).__name__}) lacks {attribute}")
        if prior.vocab_size != ae.codebook_size:
            raise ValueError(
                f"{where}: the prior's vocab_size ({prior.vocab_size}) must equal the autoencoder's "
                f"codebook_size ({ae.codebook_size})"
            )
        if token_grid is None:
            depth = int(getattr(ae, "num_quantizers", 1) or 1)
            side = math.isqrt(prior.seq_len // depth) if prior.seq_len % depth == 0 else 0
            if side * side * depth != prior.seq_len:
                raise ValueError(
                    f"{where}: the prior's seq_len ({prior.seq_len}) is not a square grid"
                    f"{f' times {depth} quantizers' if depth > 1 else ''}; pass token_grid=[h, w"
                    f"{', Q' if depth > 1 else ''}]"
                )
            token_grid = [side, side] + ([depth] if depth > 1 else [])
        if (
            not isinstance(token_grid, (list, tuple))
            or len(token_grid) not in (2, 3)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in token_grid)
        ):
            raise ValueError(
                f"{where}: token_grid must be [h, w] or [h, w, Q] of ints >= 1, got {token_grid!r}"
            )
        token_grid = [int(v) for v in token_grid]
        if math.prod(token_grid) != prior.seq_len:
            raise ValueError(
                f"{where}: token_grid {token_grid} holds {math.prod(token_grid)} tokens but the prior's "
                f"seq_len is {prior.seq_len}"
            )
        return token_grid

    @staticmethod
    def _check_continuous(where, ae, prior):
        channels = getattr(prior, "latent_channels", None)
        if not isinstance(channels, int):
            raise TypeError(
                f"{where}: a continuous autoencoder needs a latent prior (LatentDiffusion, with "
                f"latent_channels), got {type(prior).__name__}"
            )
        if channels != ae.latent_channels:
            raise ValueError(
                f"{where}: the prior models {channels} latent channels but the autoencoder has "
                f"latent_channels={ae.latent_channels}"
            )
        for attribute in ("scaling_factor", "shift_factor"):
            value = getattr(ae, attribute, None)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(
                    f"{where}: the autoencoder's {attribute} must be a finite number, got {value!r}"
                )
        if float(ae.scaling_factor) == 0:
            raise ValueError(f"{where}: the autoencoder's scaling_factor must be non-zero")

    # ------------------------------------------------------------------ properties

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.autoencoder.shift_factor)

    @property
    def image_size(self) -> list[int] | None:
        """``[H, W]`` of the images the prior's samples decode to (None when the prior's size is open)."""
        f = self.autoencoder.downsample_factor
        if self.is_discrete:
            return [self.token_grid[0] * f, self.token_grid[1] * f]
        size = getattr(self.prior, "latent_size", None)
        return None if size is None else [size[0] * f, size[1] * f]

    # ------------------------------------------------------------------ encode / decode / sample

    def _check_images(self, where, images):
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
            what = (
                f"{images.dtype} {list(images.shape)}"
                if isinstance(images, torch.Tensor)
                else type(images).__name__
            )
            raise ValueError(f"{where}: images must be a float tensor [B, C, H, W] in [-1, 1], got {what}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> prior space: latents ``[B, C_lat, h, w]`` (scaled and
        shifted) or tokens ``[B, L]`` int64."""
        where = "TwoStagePipeline.encode"
        self._check_images(where, images)
        with evaluating(self):
            if self.is_discrete:
                indices = self.autoencoder.encode_indices(images)
                if list(indices.shape[1:]) != self.token_grid:
                    raise ValueError(
                        f"{where}: the autoencoder gave a token grid {list(indices.shape[1:])} for "
                        f"images {list(images.shape)}, but the prior models a {self.token_grid} grid "
                        f"(images of {self.image_size[0]}x{self.image_size[1]})"
                    )
                return indices.reshape(indices.shape[0], -1).long()
            latents = self.autoencoder.encode(images)
            size = getattr(self.prior, "latent_size", None)
            if size is not None and list(latents.shape[2:]) != list(size):
                raise ValueError(
                    f"{where}: the autoencoder gave {latents.shape[2]}x{latents.shape[3]} latents for "
                    f"images {list(images.shape)}, but the prior models {size[0]}x{size[1]}"
                )
            return (latents - self.shift_factor) * self.scaling_factor

    def decode(self, latents_or_tokens: torch.Tensor, **decode_kwargs) -> torch.Tensor:
        """Prior-space latents ``[B, C_lat, h, w]`` or tokens ``[B, L]`` -> images ``[B, C, H, W]``.

        ``decode_kwargs`` go to the autoencoder's ``decode`` / ``decode_indices`` (e.g. a diffusion decoder's
        steps or generator).
        """
        where = "TwoStagePipeline.decode"
        x = latents_or_tokens
        with evaluating(self):
            if self.is_discrete:
                seq_len = math.prod(self.token_grid)
                if (
                    not isinstance(x, torch.Tensor)
                    or x.dim() != 2
                    or x.shape[1] != seq_len
                    or x.dtype.is_floating_point
                    or x.dtype == torch.bool
                ):
                    what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"{where}: tokens must be an integer tensor [B, {seq_len}], got {what}")
                codebook = self.autoencoder.codebook_size
                if x.numel() and bool(((x < 0) | (x >= codebook)).any()):
                    raise ValueError(
                        f"{where}: tokens must be in [0, {codebook - 1}] (the codebook size is {codebook})"
                    )
                indices = x.long().reshape(x.shape[0], *self.token_grid)
                return self.autoencoder.decode_indices(indices, **decode_kwargs)
            channels = self.autoencoder.latent_channels
            if (
                not isinstance(x, torch.Tensor)
                or x.dim() != 4
                or x.shape[1] != channels
                or not x.dtype.is_floating_point
            ):
                what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{where}: latents must be a float tensor [B, {channels}, h, w], got {what}")
            return self.autoencoder.decode(x / self.scaling_factor + self.shift_factor, **decode_kwargs)

    def sample(
        self,
        n: int,
        labels=None,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        decode_kwargs: dict | None = None,
        **prior_kwargs,
    ) -> torch.Tensor:
        """``n`` images from the prior, decoded: ``[n, C, H, W]``.

        Args:
            n, labels, guidance, generator: as the prior's ``sample``.
            steps: diffusion priors only: sampler steps (default: the prior's).
            decode_kwargs: passed to the autoencoder's decode.
            prior_kwargs: other options of the prior's ``sample`` (LatentDiffusion: ``method``, ``eta``, ...;
                TokenGPT: ``temperature``, ``top_k``, ``top_p``).
        """
        if self.is_discrete:
            if steps is not None:
                raise ValueError(
                    "TwoStagePipeline.sample: steps is for diffusion priors; a token prior samples "
                    "seq_len tokens (use temperature, top_k, top_p)"
                )
            prior_out = self.prior.sample(n, labels, guidance=guidance, generator=generator, **prior_kwargs)
        else:
            if steps is not None:
                prior_kwargs["steps"] = steps
            prior_out = self.prior.sample(n, labels, guidance=guidance, generator=generator, **prior_kwargs)
        return self.decode(prior_out, **(decode_kwargs or {}))

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes ``autoencoder/``, ``prior/`` (``save_pretrained``) and ``pipeline.json`` into ``folder``."""
        for name, model in (("autoencoder", self.autoencoder), ("prior", self.prior)):
            if not hasattr(model, "save_pretrained"):
                raise TypeError(
                    f"TwoStagePipeline.save: the {name} ({type(model).__name__}) is not a fastlatent "
                    "ConfigMixin model (no save_pretrained)"
                )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.autoencoder.save_pretrained(folder / "autoencoder")
        self.prior.save_pretrained(folder / "prior")
        meta = {
            "format": PIPELINE_FORMAT,
            "version": PIPELINE_VERSION,
            "autoencoder": "autoencoder",
            "prior": "prior",
            "token_grid": self.token_grid,
        }
        # Written last: a folder with pipeline.json holds both stages.
        atomic_write(
            folder / PIPELINE_NAME,
            lambda path: Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> "TwoStagePipeline":
        """Rebuilds a pipeline written by :meth:`save` (registered classes, JSON and safetensors only)."""
        folder = Path(folder)
        meta_path = folder / PIPELINE_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"TwoStagePipeline.load: {meta_path} not found (expected a folder written by "
                "TwoStagePipeline.save)"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ValueError(f"TwoStagePipeline.load: {meta_path} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != PIPELINE_FORMAT:
            raise ValueError(f"TwoStagePipeline.load: {meta_path} is not a {PIPELINE_FORMAT} file")
        if meta.get("version") != PIPELINE_VERSION:
            raise ValueError(
                f"TwoStagePipeline.load: {meta_path} has version {meta.get('version')!r}; this "
                f"fastlatent reads version {PIPELINE_VERSION}"
            )
        parts = {}
        for name in ("autoencoder", "prior"):
            sub = meta.get(name)
            # Sub-folders must stay inside the pipeline folder: a crafted pipeline.json cannot point
            # elsewhere.
            if not isinstance(sub, str) or not sub or Path(sub).is_absolute() or ".." in Path(sub).parts:
                raise ValueError(
                    f"TwoStagePipeline.load: {meta_path}: {name} must name a sub-folder, got {sub!r}"
                )
            parts[name] = load_pretrained(folder / sub, map_location=map_location)
        return cls(parts["autoencoder"], parts["prior"], token_grid=meta.get("token_grid"))
