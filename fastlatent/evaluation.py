"""Image-quality metrics and the digit classifier the demo uses to judge generated samples.

- :func:`psnr` and :func:`ssim` (Wang et al. 2004, Gaussian window sigma 1.5 as in skimage's
  ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``): batched, per image.
- :class:`DigitClassifier` and :func:`train_digit_classifier`: a small CNN trained on real digits; its
  accuracy on held-out real digits says how trustworthy it is, its accuracy on class-conditional samples says
  how well the samples match their requested class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(
            f"fastlatent.evaluation.{name}: x and y must have the same shape, got {list(x.shape)} and "
            f"{list(y.shape)}"
        )
    if x.dim() != 4:
        raise ValueError(f"fastlatent.evaluation.{name}: expected images [B, C, H, W], got {list(x.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(
            f"fastlatent.evaluation.{name}: x and y must be floating point, got {x.dtype} and {y.dtype}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: ``10 log10(data_range^2 / MSE)``.

    Args:
        x, y: ``[B, C, H, W]``; ``data_range`` is max - min of the pixel range (2 for [-1, 1]).

    Returns:
        ``[B]`` float32 (``inf`` for identical images).
    """
    _check_pair("psnr", x, y)
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-(coords**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (mean over channels and the window positions that fit inside the
    image).

    Matches ``skimage.metrics.structural_similarity(x, y, data_range=..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=0)`` per image. Images must be at least as large as the window
    (``2 * int(3.5 * sigma + 0.5) + 1`` pixels, 11 for sigma 1.5).

    Returns:
        ``[B]`` float32.
    """
    _check_pair("ssim", x, y)
    window = _gaussian_window(sigma)
    size = window.numel()
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(
            f"fastlatent.evaluation.ssim: images must be at least {size}x{size} for sigma={sigma}, got "
            f"{x.shape[-2]}x{x.shape[-1]}"
        )
    b, c = x.shape[:2]
    x64, y64 = x.double().reshape(b * c, 1, *x.shape[-2:]), y.double().reshape(b * c, 1, *y.shape[-2:])

    def blur(t):  # separable, valid positions only (skimage filters with reflection then crops the border)
        t = F.conv2d(t, window.view(1, 1, 1, -1))
        return F.conv2d(t, window.view(1, 1, -1, 1))

    mu_x, mu_y = blur(x64), blur(y64)
    var_x = blur(x64 * x64) - mu_x**2
    var_y = blur(y64 * y64) - mu_y**2
    cov = blur(x64 * y64) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.reshape(b, -1).mean(1).float()


class DigitClassifier(nn.Module):
    """A small CNN for ``[B, 1, S, S]`` digit images in [-1, 1] (S >= 8), 10 classes."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(
                f"DigitClassifier.accuracy: need as many labels as images (at least one), got "
                f"{images.shape[0]} images and {labels.shape[0]} labels"
            )
        was_training = self.training
        self.eval()
        correct = 0
        for start in range(0, images.shape[0], batch_size):
            logits = self(images[start : start + batch_size])
            correct += (logits.argmax(1) == labels[start : start + batch_size].to(logits.device)).sum().item()
        self.train(was_training)
        return correct / images.shape[0]


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shifts each image by up to ``max_shift`` pixels, filling with the background (-1)."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, images.shape[1], h, w + 2 * max_shift)
    shifted = padded.gather(2, rows.to(images.device))
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, images.shape[1], h, w)
    return shifted.gather(3, cols.to(images.device))


def train_digit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_shift: int | None = None,
) -> DigitClassifier:
    """Trains a :class:`DigitClassifier` on ``images [N, 1, S, S]`` in [-1, 1] with ``labels [N]``.

    Small random shifts (``max_shift``, default S // 8) make it robust to the slight misplacements of
    generated digits without teaching it anything about them. Deterministic for a given seed on the CPU.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"train_digit_classifier: images must be [N, 1, S, S], got {list(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"train_digit_classifier: labels must be [N] = [{images.shape[0]}], got {list(labels.shape)}"
        )
    if epochs < 1:
        raise ValueError(f"train_digit_classifier: epochs must be >= 1, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(num_classes=int(labels.max().item()) + 1).to(images.device)
    shift = images.shape[-1] // 8 if max_shift is None else max_shift
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(images.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=gen)
        for start in range(0, images.shape[0], batch_size):
            idx = order[start : start + batch_size]
            x = _random_shift(images[idx], gen, shift)
            loss = F.cross_entropy(model(x), labels[idx].to(images.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
