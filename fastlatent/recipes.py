"""The two-stage recipes as Python functions: train an autoencoder, train a prior over its latents, sample,
reconstruct. The `fastlatent` command (:mod:`fastlatent.cli`) and the demo call these; so can a script::

    autoencoder, metrics = train_autoencoder(AutoencoderRecipe(out="runs/fsq", steps=500))
    pipeline, _ = train_prior(PriorRecipe(out="runs/fsq", steps=500), autoencoder=autoencoder)

A recipe's fields are the command's options (``--batch-size`` is ``batch_size``), with the same defaults;
error
messages name the option. The recipes run on the GPU when one is present (``device`` chooses).

Folders they write:

- :func:`train_autoencoder` into ``out``: ``autoencoder`` (the trained autoencoder, safetensors + JSON config;
  EMA weights when ``ema_decay`` is set), ``train`` (checkpoints for resuming, ``metrics.jsonl``,
  ``curves.png``),
  ``reconstructions.png`` and ``autoencoder_metrics.json``.
- :func:`train_prior` into ``out``: ``pipeline`` (autoencoder + prior, loadable with
  :meth:`fastlatent.models.TwoStagePipeline.load`), ``train-prior`` and ``samples.png``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fastlatent import data as fl_data
from fastlatent import models
from fastlatent.evaluation import psnr, ssim
from fastlatent.nn import codebook_usage
from fastlatent.training import Trainer, TrainerConfig

QUANTIZERS = ("fsq", "lfq", "bsq", "vq", "rvq", "kl", "dgae")
PRIORS = ("gpt", "dit", "unet")
SAMPLERS = ("euler", "dpmpp_2m", "ddim", "ddpm")


# ----------------------------------------------------------------------------------------------- recipes


@dataclass(kw_only=True)
class RunOptions:
    """Where and how a recipe runs."""

    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    seed: int = 0  # seeds weights, data order and sampling
    progress: bool = True  # progress bars


@dataclass(kw_only=True)
class SamplingOptions(RunOptions):
    """How a two-stage pipeline samples (GPT over tokens, or latent diffusion)."""

    guidance: float | None = None  # classifier-free guidance scale; None: GPT 1.5, diffusion 3
    temperature: float = 1.0  # GPT sampling temperature
    top_k: int | None = None  # GPT: keep the k most likely tokens
    top_p: float | None = None  # GPT: nucleus sampling probability mass
    sample_steps: int = 25  # diffusion sampler steps
    method: str | None = None  # diffusion sampler (one of SAMPLERS); None: euler for flow, dpmpp_2m otherwise


@dataclass(kw_only=True)
class TrainingOptions(RunOptions):
    """The data and the optimisation shared by both training recipes."""

    data: str = "digits"  # digits, photos or a folder of images (class = subfolder name)
    image_size: int = 16
    channels: int | None = None  # default: 1 for digits, 3 otherwise
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup: int = 100  # linear warm-up steps before the cosine decay
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)
    ema_decay: float | None = None  # keep an EMA of the weights and save it instead of the raw weights
    checkpoint_every: int = 500
    log_every: int = 25
    resume: bool = True  # resume from a checkpoint in the output folder
    workers: int = 0  # DataLoader worker processes


@dataclass(kw_only=True)
class AutoencoderRecipe(TrainingOptions):
    """A stage-1 autoencoder (``fastlatent train-ae``): architecture, bottleneck and loss."""

    out: str | Path
    lr: float = 2e-3
    quantizer: str = "fsq"  # one of QUANTIZERS
    decode_steps: int = 10  # dgae: sampler steps of the diffusion decoder
    levels: list[int] = field(default_factory=lambda: [5, 5, 5])  # FSQ levels per latent channel
    codebook_size: int = 256  # VQ/RVQ codebook size; LFQ/BSQ: a power of two
    num_quantizers: int = 2  # residual VQ depth
    latent_channels: int | None = (
        None  # default: len(levels) for FSQ, log2(codebook size) LFQ/BSQ, 8 VQ, 4 KL
    )
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_attention: bool = False
    rec_loss: str = "l1"  # l1 or l2
    perceptual_weight: float = 0.0  # LPIPS weight
    disc_weight: float = 0.0  # PatchGAN hinge-loss weight (adaptive VQGAN weighting)
    disc_start: int = 0
    kl_weight: float = 1e-6
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1


@dataclass(kw_only=True)
class PriorRecipe(TrainingOptions, SamplingOptions):
    """A class-conditional prior over an autoencoder's latents (``fastlatent train-prior``)."""

    out: str | Path
    autoencoder: str | Path | None = None  # folder written by train_autoencoder (out/autoencoder)
    prior: str | None = None  # gpt, dit or unet; default gpt for discrete autoencoders, dit for KL
    width: int = 256  # transformer width / UNet base channels x 2
    depth: int = 4  # transformer blocks (UNet: resnets per level x 2)
    heads: int = 4
    dropout: float = 0.1
    label_dropout: float = 0.1  # probability of the null class (enables classifier-free guidance)
    objective: str = "flow"  # eps, v or flow (latent diffusion)
    patch_size: int = 1  # DiT patch size over the latent grid


# ----------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def save_grid(
    images, path: str | Path, nrow: int, scale: int = 4, pad: int = 1, row_labels: list[str] | None = None
) -> Path:
    """Writes ``images [N, C, H, W]`` in [-1, 1] as a PNG grid with ``nrow`` images per row, each pixel
    enlarged ``scale`` times (nearest) so that small digits are visible. ``row_labels`` (one per row) are
    written in a margin left of the rows: which row holds the originals, which class a row is."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_grid: images must be [N, 1 or 3, H, W] with N >= 1, got {list(images.shape)}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"save_grid: row_labels must have one label per row ({rows}), got {len(row_labels)}")
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = images[i]
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    if row_labels:
        image = _label_rows(image, row_labels, row_height=(h + pad) * scale, top=pad * scale)
    image.save(path)
    return path


def _label_rows(image: Image.Image, labels: list[str], row_height: int, top: int) -> Image.Image:
    """``image`` with a white margin on its left holding each row's label, centred on the row."""
    font = ImageFont.load_default()
    gap = 6
    margin = max(font.getbbox(label)[2] for label in labels) + 2 * gap
    labelled = Image.new(
        image.mode, (image.width + margin, image.height), 255 if image.mode == "L" else "white"
    )
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for r, label in enumerate(labels):
        centre = top + r * row_height + (row_height - top) // 2
        draw.text((gap, centre), label, fill=0 if image.mode == "L" else "black", font=font, anchor="lm")
    return labelled


def make_image_datasets(data: str, image_size: int, channels: int | None, seed: int):
    """(train, eval, channels, num_classes) for ``--data``."""
    if data == "digits":
        if channels not in (None, 1):
            raise ValueError(f"--channels: the digits are grey (1 channel), got {channels}")
        train = fl_data.DigitsDataset("train", size=image_size, seed=seed)
        test = fl_data.DigitsDataset("test", size=image_size, seed=seed)
        return train, test, 1, train.num_classes
    channels = 3 if channels is None else channels
    if data == "photos":
        train = fl_data.SamplePhotoPatches(
            patch_size=image_size, num_patches=20_000, seed=seed, channels=channels
        )
        test = fl_data.SamplePhotoPatches(
            patch_size=image_size, num_patches=256, seed=seed + 1, channels=channels
        )
        return train, test, channels, 0
    folder = Path(data)
    if not folder.is_dir():
        raise ValueError(
            f"--data: expected digits, photos or a folder of images, got {data!r} (no such folder)"
        )
    dataset = fl_data.ImageFolderDataset(folder, size=image_size, channels=channels)
    return dataset, dataset, channels, getattr(dataset, "num_classes", 0) or 0


def _first_images(dataset, limit: int):
    images, labels = [], []
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        image, label = item if isinstance(item, (tuple, list)) else (item, -1)
        images.append(image)
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels)


def build_autoencoder(recipe: AutoencoderRecipe, channels: int):
    """The autoencoder ``recipe`` describes, for images of ``channels`` channels."""
    common = dict(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=list(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block,
        norm_num_groups=recipe.norm_num_groups,
        mid_block_add_attention=bool(recipe.mid_attention),
    )
    if recipe.quantizer == "kl":
        return models.AutoencoderKL(latent_channels=recipe.latent_channels or 4, **common)
    if recipe.quantizer == "dgae":
        del common["out_channels"]
        widths = list(recipe.block_out_channels)
        return models.DiffusionDecoderAutoencoder(
            latent_channels=recipe.latent_channels or 4,
            decoder_channels=widths[0],
            decoder_channel_mult=[w // widths[0] or 1 for w in widths],
            decoder_layers_per_block=recipe.layers_per_block,
            decoder_attention_levels=[],
            decoder_mid_attention=bool(recipe.mid_attention),
            decoder_attention_head_dim=None,
            decoder_norm_num_groups=recipe.norm_num_groups,
            decode_steps=recipe.decode_steps,
            **common,
        )
    if recipe.quantizer in ("vq", "rvq"):
        return models.VQAutoencoder(
            latent_channels=recipe.latent_channels or 8,
            codebook_size=recipe.codebook_size,
            quantizer=recipe.quantizer,
            num_quantizers=recipe.num_quantizers if recipe.quantizer == "rvq" else 1,
            kmeans_init=True,
            threshold_ema_dead_code=2.0,
            **common,
        )
    if recipe.quantizer == "fsq":
        if recipe.latent_channels not in (None, len(recipe.levels)):
            raise ValueError(
                f"--latent-channels: FSQ has one latent channel per level ({len(recipe.levels)} for "
                f"--levels {recipe.levels}), got {recipe.latent_channels}"
            )
        return models.FSQAutoencoder(quantizer="fsq", levels=list(recipe.levels), **common)
    return models.FSQAutoencoder(quantizer=recipe.quantizer, codebook_size=recipe.codebook_size, **common)


def _trainer_config(recipe: TrainingOptions, out_dir: Path, **extra):
    return TrainerConfig(
        out_dir=str(out_dir),
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup_steps=min(recipe.warmup, recipe.steps - 1) if recipe.steps > 1 else 0,
        weight_decay=recipe.weight_decay,
        grad_clip=recipe.grad_clip,
        precision=recipe.precision,
        ema_decay=recipe.ema_decay,
        checkpoint_every=recipe.checkpoint_every,
        log_every=recipe.log_every,
        seed=recipe.seed,
        num_workers=recipe.workers,
        resume=recipe.resume,
        progress=recipe.progress,
        **extra,
    )


def evaluate_reconstructions(autoencoder, images, device, batch_size: int = 256) -> tuple[dict, Any]:
    """PSNR/SSIM (and codebook usage for discrete autoencoders) of ``images`` [N, C, H, W]; returns
    (metrics, reconstructions)."""
    autoencoder.eval()
    recons, indices = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            out = autoencoder(x)
            recons.append(out.reconstruction.float().clamp(-1, 1).cpu())
            if autoencoder.is_discrete:
                indices.append(out.stats["indices"].cpu())
    recon = torch.cat(recons)
    metrics = {"psnr_db": psnr(recon, images.float()).mean().item(), "images": int(images.shape[0])}
    if min(images.shape[-2:]) >= 11:
        metrics["ssim"] = ssim(recon, images.float()).mean().item()
    if autoencoder.is_discrete:
        usage = codebook_usage(torch.cat(indices), autoencoder.codebook_size)
        metrics.update(
            codebook_size=int(autoencoder.codebook_size),
            codebook_usage=usage.fraction_used.item(),
            perplexity=usage.perplexity.item(),
        )
    return metrics, recon


def _interleave(originals, reconstructions, per_row: int):
    """Rows of originals, each followed by the row of their reconstructions."""
    rows = []
    for start in range(0, originals.shape[0], per_row):
        rows += [originals[start : start + per_row], reconstructions[start : start + per_row]]
    return torch.cat(rows)


def _interleave_labels(count: int, per_row: int) -> list[str]:
    """The row labels of :func:`_interleave`'s grid of ``count`` originals."""
    return ["original", "reconstruction"] * math.ceil(count / per_row)


def class_labels(classes) -> list[str]:
    """Row labels for a grid with one row per class."""
    return [f"class {int(c)}" for c in classes]


# ----------------------------------------------------------------------------------------------- train-ae


def train_autoencoder(recipe: AutoencoderRecipe) -> tuple[Any, dict]:
    """Trains the autoencoder ``recipe`` describes; returns (autoencoder with the saved weights, metrics)."""
    device = resolve_device(recipe.device)
    out = Path(recipe.out)
    train_set, eval_set, channels, _ = make_image_datasets(
        recipe.data, recipe.image_size, recipe.channels, recipe.seed
    )
    torch.manual_seed(recipe.seed)
    autoencoder = build_autoencoder(recipe, channels)
    loss = (
        None
        if recipe.quantizer == "dgae"
        else models.AutoencoderLoss(
            reconstruction=recipe.rec_loss,
            perceptual_weight=recipe.perceptual_weight,
            disc_weight=recipe.disc_weight,
            disc_start=recipe.disc_start,
            kl_weight=recipe.kl_weight,
            commitment_weight=recipe.commitment_weight,
            entropy_weight=recipe.entropy_weight,
            disc_in_channels=channels,
        )
    )
    if recipe.quantizer == "dgae":
        if recipe.disc_weight:
            raise ValueError("--disc-weight: DGAE trains without a GAN (its diffusion decoder replaces it)")
        task = models.DGAETask(
            autoencoder,
            kl_weight=recipe.kl_weight,
            perceptual_weight=recipe.perceptual_weight,
            reconstruction_weight=0.0,
        )
    else:
        task = models.AutoencoderTask(autoencoder, loss)
    started = time.perf_counter()
    trainer = Trainer(task, _trainer_config(recipe, out / "train"), device=device)
    summary = trainer.fit(train_set)
    trained = (trainer.ema_model() if recipe.ema_decay else task).autoencoder.to(device).eval()
    if not trained.is_discrete:
        loader = torch.utils.data.DataLoader(train_set, batch_size=256)
        trained.fit_latent_scale(((x.to(device), y) for x, y in loader), max_batches=8)
    if trainer.dist.is_main:  # under torchrun, one process writes the weights
        trained.save_pretrained(out / "autoencoder")
    images, _ = _first_images(eval_set, 512)
    metrics, recon = evaluate_reconstructions(trained, images, device)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    metrics["final_loss"] = summary.get("loss") if isinstance(summary, dict) else None
    save_grid(
        _interleave(images[:40], recon[:40], 10),
        out / "reconstructions.png",
        nrow=10,
        row_labels=_interleave_labels(min(40, images.shape[0]), 10),
    )
    (out / "autoencoder_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return trained, metrics


# ----------------------------------------------------------------------------------------------- train-prior


def load_autoencoder(folder: str | Path, device):
    """The autoencoder saved in ``folder`` (by train_autoencoder, or inside a pipeline folder)."""
    folder = Path(folder)
    if (folder / "pipeline.json").is_file():
        return models.TwoStagePipeline.load(folder, map_location=device).autoencoder.eval()
    return models.load_pretrained(folder, map_location=device).eval()


def build_prior(recipe: PriorRecipe, autoencoder, latent_shape, num_classes: int):
    """The prior ``recipe`` describes, sized to the autoencoder's latents ``latent_shape``
    (``[C, h, w]``; tokens: ``[h, w]`` or ``[h, w, Q]``)."""
    kind = recipe.prior or ("gpt" if autoencoder.is_discrete else "dit")
    if autoencoder.is_discrete != (kind == "gpt"):
        raise ValueError(
            f"--prior {kind}: a {'discrete' if autoencoder.is_discrete else 'continuous (KL)'} "
            f"autoencoder needs {'gpt' if autoencoder.is_discrete else 'dit or unet'}"
        )
    if kind == "gpt":
        return models.TokenGPT(
            vocab_size=int(autoencoder.codebook_size),
            seq_len=math.prod(latent_shape),
            num_classes=num_classes,
            dim=recipe.width,
            depth=recipe.depth,
            num_heads=recipe.heads,
            dropout=recipe.dropout,
            label_dropout=recipe.label_dropout,
        )
    channels, h, w = latent_shape
    if kind == "dit":
        denoiser = models.DiT(
            input_size=[h, w],
            patch_size=recipe.patch_size,
            in_channels=channels,
            hidden_size=recipe.width,
            depth=recipe.depth,
            num_heads=recipe.heads,
            num_classes=num_classes,
            dropout=recipe.dropout,
        )
    else:
        denoiser = models.UNet(
            in_channels=channels,
            base_channels=recipe.width // 2,
            channel_mult=[1, 2],
            layers_per_block=max(1, recipe.depth // 2),
            attention_levels=[1],
            num_classes=num_classes,
            norm_num_groups=8,
            dropout=recipe.dropout,
        )
    return models.LatentDiffusion(
        denoiser,
        objective=recipe.objective,
        label_dropout=recipe.label_dropout,
        num_classes=num_classes,
        latent_size=[h, w],
    )


def _sample_kwargs(recipe: SamplingOptions, discrete: bool) -> dict:
    if discrete:
        return dict(
            guidance=1.5 if recipe.guidance is None else recipe.guidance,
            temperature=recipe.temperature,
            top_k=recipe.top_k,
            top_p=recipe.top_p,
        )
    return dict(
        guidance=3.0 if recipe.guidance is None else recipe.guidance,
        steps=recipe.sample_steps,
        method=recipe.method,
    )


def train_prior(recipe: PriorRecipe, autoencoder=None) -> tuple[Any, dict]:
    """Trains the prior ``recipe`` describes over ``autoencoder`` (default: loaded from
    ``recipe.autoencoder``);
    returns (pipeline, metrics)."""
    device = resolve_device(recipe.device)
    out = Path(recipe.out)
    if autoencoder is None:
        if recipe.autoencoder is None:
            raise ValueError("--autoencoder: give the folder written by train-ae (or pass the autoencoder)")
        autoencoder = load_autoencoder(recipe.autoencoder, device)
    train_set, _, channels, num_classes = make_image_datasets(
        recipe.data, recipe.image_size, recipe.channels, recipe.seed
    )
    probe, _ = _first_images(train_set, 1)
    with torch.no_grad():
        z = autoencoder.encode(probe.to(device))
        grid = (
            list(autoencoder.encode_indices(probe.to(device)).shape[1:]) if autoencoder.is_discrete else None
        )
    latent_shape = grid if autoencoder.is_discrete else list(z.shape[1:])
    torch.manual_seed(recipe.seed)
    prior = build_prior(recipe, autoencoder, latent_shape, num_classes)
    pipeline = models.TwoStagePipeline(autoencoder, prior, token_grid=grid).to(device)
    started = time.perf_counter()
    with torch.no_grad():
        latents = fl_data.encode_dataset(
            pipeline.encode, train_set, batch_size=256, device=device, num_classes=num_classes or None
        )
    encode_seconds = time.perf_counter() - started
    trainer = Trainer(prior, _trainer_config(recipe, out / "train-prior"), device=device)
    trainer.fit(latents)
    trained_prior = trainer.ema_model() if recipe.ema_decay else prior
    pipeline = models.TwoStagePipeline(autoencoder, trained_prior.to(device).eval(), token_grid=grid)
    pipeline.save(out / "pipeline")
    metrics = {
        "prior": type(trained_prior).__name__,
        "train_seconds": round(time.perf_counter() - started, 1),
        "encode_seconds": round(encode_seconds, 1),
        "latent_shape": latent_shape,
        "parameters": sum(p.numel() for p in trained_prior.parameters()),
    }
    if num_classes:
        labels = torch.arange(num_classes).repeat_interleave(8)
        images = sample_images(pipeline, labels, recipe, device)
        save_grid(images, out / "samples.png", nrow=8, row_labels=class_labels(range(num_classes)))
    return pipeline, metrics


def sample_images(pipeline, labels, options: SamplingOptions, device, batch_size: int = 500):
    """Samples ``pipeline`` for ``labels`` (a tensor, or an int count for unconditional samples)."""
    generator = torch.Generator(device=device).manual_seed(options.seed)
    kwargs = _sample_kwargs(options, pipeline.is_discrete)
    if isinstance(labels, int):
        if kwargs.get("guidance") is not None and getattr(pipeline.prior, "num_classes", 0):
            kwargs["guidance"] = None
        return torch.cat(
            [
                pipeline.sample(min(batch_size, labels - s), None, generator=generator, **kwargs).cpu()
                for s in range(0, labels, batch_size)
            ]
        )
    outs = []
    with torch.no_grad():
        for start in range(0, labels.numel(), batch_size):
            part = labels[start : start + batch_size].to(device)
            outs.append(pipeline.sample(part.numel(), part, generator=generator, **kwargs).float().cpu())
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------- sample /
# reconstruct


def sample_grid(
    pipeline: str | Path,
    out: str | Path,
    options: SamplingOptions,
    *,
    labels: list[int] | None = None,
    per_class: int | None = None,
    n: int = 16,
) -> tuple[Path, int]:
    """Samples the pipeline saved in ``pipeline`` into the PNG grid ``out``: ``per_class`` samples of every
    class (a row per class, labelled), the classes ``labels``, or ``n`` unconditional samples. Returns (path,
    number of samples)."""
    device = resolve_device(options.device)
    loaded = models.TwoStagePipeline.load(pipeline, map_location=device).eval()
    num_classes = int(getattr(loaded.prior, "num_classes", 0) or 0)
    if labels is not None and per_class is not None:
        raise ValueError("--labels and --per-class: give one of them")
    if per_class is None and labels is None:
        images, nrow = sample_images(loaded, n, options, device), min(n, 8)
        return save_grid(images, out, nrow=nrow), images.shape[0]
    if not num_classes:
        raise ValueError("--labels/--per-class: this pipeline's prior is unconditional (no classes)")
    wanted = (
        torch.arange(num_classes).repeat_interleave(per_class)
        if per_class is not None
        else torch.tensor(labels)
    )
    bad = [int(v) for v in wanted if not 0 <= int(v) < num_classes]
    if bad:
        raise ValueError(f"--labels: classes must be in [0, {num_classes}), got {bad}")
    nrow = per_class or min(len(wanted), 10)
    images = sample_images(loaded, wanted, options, device)
    rows = [wanted[start : start + nrow].tolist() for start in range(0, len(wanted), nrow)]
    row_labels = [
        f"class {row[0]}" if len(set(row)) == 1 else "classes " + ",".join(map(str, row)) for row in rows
    ]
    return save_grid(images, out, nrow=nrow, row_labels=row_labels), images.shape[0]


def reconstruct_grid(
    autoencoder: str | Path,
    out: str | Path,
    *,
    input: str = "digits",
    image_size: int | None = None,
    limit: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Encodes and decodes ``input`` (``digits``: the held-out test digits; an image file; a folder of images)
    with the autoencoder saved in ``autoencoder``; writes originals above their reconstructions (rows
    labelled)
    to the PNG ``out`` and returns PSNR/SSIM (and codebook usage) metrics."""
    dev = resolve_device(device)
    model = load_autoencoder(autoencoder, dev)
    channels = model.config.get("in_channels", 3)
    if input == "digits":
        dataset = fl_data.DigitsDataset("test", size=image_size or 16, seed=seed)
    else:
        source = Path(input)
        if not source.exists():
            raise ValueError(
                f"--input: expected digits, an image file or a folder, got {input!r} (not found)"
            )
        if image_size is None:
            raise ValueError(
                "--image-size: needed for image files and folders (the side the autoencoder expects)"
            )
        if source.is_dir():
            dataset = fl_data.ImageFolderDataset(source, size=image_size, channels=channels, labels=None)
        else:  # one file: the folder reader in a folder holding just a link to it (same decoding and checks)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / source.name).symlink_to(source.resolve())
                dataset = fl_data.ImageFolderDataset(tmp, size=image_size, channels=channels, labels=None)
                if not len(dataset):
                    raise ValueError(f"--input: {source} could not be read: {dataset.skipped[0][1]}")
                images, _ = _first_images(dataset, 1)
    if input == "digits" or Path(input).is_dir():
        if not len(dataset):
            raise ValueError(f"--input: no readable images in {input}")
        images, _ = _first_images(dataset, limit)
    metrics, recon = evaluate_reconstructions(model, images, dev)
    per_row = min(8, images.shape[0])
    save_grid(
        _interleave(images, recon, per_row),
        out,
        nrow=per_row,
        row_labels=_interleave_labels(images.shape[0], per_row),
    )
    return metrics
