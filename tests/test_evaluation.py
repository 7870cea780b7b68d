import math

import numpy as np
import pytest
import torch

from fastlatent.evaluation import DigitClassifier, psnr, ssim, train_digit_classifier


def _pair(shape=(3, 2, 24, 19), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    return x, (x + 0.2 * torch.randn(shape, generator=g)).clamp(-1, 1)


def test_psnr_matches_definition():
    x, y = _pair()
    mse = ((x - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(4 / mse))
    assert math.isinf(psnr(x, x)[0].item())


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    ours = ssim(x, y)
    for i in range(x.shape[0]):
        ref = metrics.structural_similarity(
            x[i].numpy().astype(np.float64),
            y[i].numpy().astype(np.float64),
            data_range=2.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=0,
        )
        assert abs(ours[i].item() - ref) < 1e-5
    torch.testing.assert_close(ssim(x, x), torch.ones(x.shape[0]))


def test_metrics_reject_bad_inputs():
    x, y = _pair()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:1])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ssim(x[0], y[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(TypeError, match="floating point"):
        psnr(x.long(), y.long())


def test_digit_classifier_learns_and_checks_arguments():
    # Two synthetic "digits": a vertical and a horizontal bar, at random offsets.
    g = torch.Generator().manual_seed(0)
    n = 256
    images = -torch.ones(n, 1, 12, 12)
    labels = torch.arange(n) % 2
    offsets = torch.randint(2, 10, (n,), generator=g)
    for i in range(n):
        if labels[i] == 0:
            images[i, 0, :, offsets[i]] = 1
        else:
            images[i, 0, offsets[i], :] = 1
    model = train_digit_classifier(images[:200], labels[:200], epochs=15, batch_size=32)
    assert isinstance(model, DigitClassifier)
    assert model.accuracy(images[200:], labels[200:]) > 0.95
    with pytest.raises(ValueError, match="labels must be"):
        train_digit_classifier(images, labels[:3])
    with pytest.raises(ValueError, match="as many labels as images"):
        model.accuracy(images[:4], labels[:3])
