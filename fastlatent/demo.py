"""`fastlatent demo`: the whole two-stage recipe on scikit-learn's digits, judged by a digit classifier.

1. A small CNN is trained on the real training digits; its accuracy on the held-out test digits says how far
   its
   verdicts can be trusted.
2. An autoencoder (FSQ by default; VQ or KL) is trained on the training digits
   (:func:`fastlatent.recipes.train_autoencoder`);
   reconstruction PSNR/SSIM and codebook usage/perplexity are measured on the test digits.
3. A class-conditional prior is trained on the encoded training digits
   (:func:`fastlatent.recipes.train_prior`): a GPT
   over tokens for FSQ/VQ, a DiT with flow matching for KL.
4. ``samples_per_class`` samples of every class are drawn with classifier-free guidance and classified.

Writes ``reconstructions.png``, ``samples.png`` (one row per class), ``metrics.json`` and ``report.md`` to the
output folder, next to the saved ``autoencoder/`` and ``pipeline/`` and the training logs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import fastlatent
from fastlatent.benchmarking.measure import device_name
from fastlatent.data import DigitsDataset
from fastlatent.evaluation import train_digit_classifier
from fastlatent.recipes import (
    AutoencoderRecipe,
    PriorRecipe,
    class_labels,
    resolve_device,
    sample_images,
    save_grid,
    train_autoencoder,
    train_prior,
)

# Per quantizer: the recipes' fields (on top of their defaults) that reach the demo's bar on a 2-core CPU in
# its
# time budget.
RECIPES = {
    "fsq": {
        "ae": dict(
            quantizer="fsq",
            levels=[5, 5, 5],
            block_out_channels=[16, 32, 32],
            batch_size=32,
            steps=1500,
            lr=2e-3,
        ),
        "prior": dict(prior="gpt", width=128, depth=4, heads=4, batch_size=64, steps=1500, lr=1e-3),
    },
    "vq": {
        "ae": dict(
            quantizer="vq",
            codebook_size=128,
            latent_channels=4,
            block_out_channels=[16, 32, 32],
            batch_size=32,
            steps=1500,
            lr=2e-3,
        ),
        "prior": dict(prior="gpt", width=128, depth=4, heads=4, batch_size=64, steps=1500, lr=1e-3),
    },
    "kl": {
        "ae": dict(
            quantizer="kl",
            latent_channels=4,
            block_out_channels=[16, 32, 32],
            batch_size=32,
            steps=1500,
            lr=2e-3,
        ),
        "prior": dict(
            prior="dit", objective="flow", width=128, depth=4, heads=4, batch_size=64, steps=2000, lr=1e-3
        ),
    },
}
QUICK_STEPS = 20


def run_demo(
    out: str | Path = "demo-out",
    quantizer: str = "fsq",
    *,
    ae_steps: int | None = None,
    prior_steps: int | None = None,
    samples_per_class: int = 50,
    quick: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Runs the demo (see the module docstring) and returns the metrics it writes to ``metrics.json``."""
    if quantizer not in RECIPES:
        raise ValueError(f"fastlatent demo: quantizer must be one of {sorted(RECIPES)}, got {quantizer!r}")
    if samples_per_class < 1:
        raise ValueError(f"fastlatent demo: samples_per_class must be >= 1, got {samples_per_class}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dev = resolve_device(device)
    common = dict(seed=seed, device=device, progress=progress)
    ae_fields, prior_fields = dict(RECIPES[quantizer]["ae"]), dict(RECIPES[quantizer]["prior"])
    if quick:
        ae_steps, prior_steps = ae_steps or QUICK_STEPS, prior_steps or QUICK_STEPS
        samples_per_class = min(samples_per_class, 4)
    if ae_steps:
        ae_fields["steps"] = ae_steps
    if prior_steps:
        prior_fields["steps"] = prior_steps

    print(f"[demo] 1/4 digit classifier on the real training digits ({dev})", flush=True)
    train_digits, test_digits = (
        DigitsDataset("train", size=16, seed=seed),
        DigitsDataset("test", size=16, seed=seed),
    )
    t = time.perf_counter()
    classifier = train_digit_classifier(
        train_digits.images, train_digits.labels, epochs=2 if quick else 15, seed=seed
    ).to(dev)
    classifier_seconds = time.perf_counter() - t
    real_accuracy = classifier.accuracy(test_digits.images.to(dev), test_digits.labels)

    print(f"[demo] 2/4 {quantizer.upper()} autoencoder", flush=True)
    ae_args = AutoencoderRecipe(out=out, **ae_fields, **common)
    autoencoder, ae_metrics = train_autoencoder(ae_args)

    print("[demo] 3/4 class-conditional prior", flush=True)
    prior_args = PriorRecipe(out=out, autoencoder=out / "autoencoder", **prior_fields, **common)
    pipeline, prior_metrics = train_prior(prior_args, autoencoder=autoencoder)

    print(f"[demo] 4/4 {samples_per_class} samples per class, judged by the classifier", flush=True)
    t = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    samples = sample_images(pipeline, labels, prior_args, dev)
    sample_seconds = time.perf_counter() - t
    with torch.no_grad():
        predicted = torch.cat(
            [
                classifier(samples[i : i + 500].to(dev)).argmax(1).cpu()
                for i in range(0, samples.shape[0], 500)
            ]
        )
    per_class = [(predicted[labels == c] == c).float().mean().item() for c in range(10)]
    sample_accuracy = (predicted == labels).float().mean().item()
    shown = min(samples_per_class, 10)
    grid = samples.view(10, samples_per_class, *samples.shape[1:])[:, :shown].reshape(-1, *samples.shape[1:])
    save_grid(grid, out / "samples.png", nrow=shown, row_labels=class_labels(range(10)))

    total = time.perf_counter() - started
    metrics = {
        "quantizer": quantizer,
        "quick": quick,
        "device": device_name(dev),
        "versions": {"fastlatent": fastlatent.__version__, "torch": torch.__version__},
        "seconds": {
            "total": round(total, 1),
            "classifier": round(classifier_seconds, 1),
            "autoencoder": ae_metrics.get("train_seconds"),
            "prior": prior_metrics.get("train_seconds"),
            "sampling": round(sample_seconds, 1),
        },
        "autoencoder": ae_metrics,
        "prior": prior_metrics,
        "classifier": {
            "real_test_accuracy": real_accuracy,
            "sample_accuracy": sample_accuracy,
            "sample_accuracy_per_class": per_class,
            "samples": int(labels.numel()),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(_report(metrics, ae_args, prior_args))
    print(
        f"[demo] done in {total / 60:.1f} min: reconstruction PSNR {ae_metrics['psnr_db']:.1f} dB, "
        f"class accuracy of samples {100 * sample_accuracy:.1f}% "
        f"(classifier on real test digits {100 * real_accuracy:.1f}%); "
        f"see {out / 'report.md'}",
        flush=True,
    )
    return metrics


def _report(m: dict, ae_args: AutoencoderRecipe, prior_args: PriorRecipe) -> str:
    ae, prior, clf = m["autoencoder"], m["prior"], m["classifier"]
    lines = [
        f"# fastlatent demo: {m['quantizer'].upper()} autoencoder + {prior['prior']} prior on the digits",
        "",
        f"{m['device']}, fastlatent {m['versions']['fastlatent']}, torch {m['versions']['torch']}; "
        f"{m['seconds']['total'] / 60:.1f} minutes in all"
        + (" (--quick: wiring check, not quality)" if m["quick"] else "")
        + ".",
        "",
        "## Autoencoder (held-out test digits, 16x16)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| PSNR | {ae['psnr_db']:.2f} dB |",
    ]
    if "ssim" in ae:
        lines.append(f"| SSIM | {ae['ssim']:.3f} |")
    if "codebook_size" in ae:
        lines += [
            f"| codebook size | {ae['codebook_size']} |",
            f"| codebook usage | {100 * ae['codebook_usage']:.1f}% |",
            f"| perplexity | {ae['perplexity']:.1f} |",
        ]
    lines += [
        f"| training | {ae_args.steps} steps, {ae['train_seconds']:.0f} s |",
        "",
        "![reconstructions](reconstructions.png) (rows: originals, then their reconstructions)",
        "",
        f"## Prior: {prior['prior']} ({prior['parameters'] / 1e6:.2f} M parameters, "
        f"latents {prior['latent_shape']})",
        "",
        f"{prior_args.steps} steps, {prior['train_seconds']:.0f} s.",
        "",
        "## Samples",
        "",
        "A digit classifier trained on the real training digits scores "
        f"**{100 * clf['real_test_accuracy']:.1f}%** "
        f"on the held-out real digits and labels **{100 * clf['sample_accuracy']:.1f}%** of the "
        f"{clf['samples']} class-conditional samples with their requested class.",
        "",
        "| class | " + " | ".join(str(c) for c in range(10)) + " |",
        "|---|" + "---|" * 10,
        "| accuracy | " + " | ".join(f"{100 * a:.0f}%" for a in clf["sample_accuracy_per_class"]) + " |",
        "",
        "![samples](samples.png) (one row per class, 0 to 9)",
        "",
    ]
    return "\n".join(lines)
