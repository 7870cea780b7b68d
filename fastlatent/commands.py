"""The model commands of the `fastlatent` CLI: train-ae, train-prior, sample, reconstruct and demo.

Every option can also come from a config file (``--config FILE``, JSON or TOML, keys spelled like the options
with ``-`` or ``_``); options given on the command line win over the file. The commands run on the GPU when one
is present (``--device`` chooses).

Folders they write:

- ``train-ae --out DIR``: ``DIR/autoencoder`` (the trained autoencoder, safetensors + JSON config; EMA weights
  when ``--ema-decay`` is set), ``DIR/train`` (checkpoints for resuming, ``metrics.jsonl``, ``curves.png``),
  ``DIR/reconstructions.png`` and ``DIR/autoencoder_metrics.json``.
- ``train-prior --autoencoder AE --out DIR``: ``DIR/pipeline`` (autoencoder + prior, loadable with
  :meth:`fastlatent.models.TwoStagePipeline.load`), ``DIR/train-prior`` and ``DIR/samples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

QUANTIZERS = ("fsq", "lfq", "bsq", "vq", "rvq", "kl", "dgae")
PRIORS = ("gpt", "dit", "unet")


# ----------------------------------------------------------------------------------------------- options

def _int_list(text) -> list[int]:
    """``"32,64,64"`` (or a list from a config file) -> ``[32, 64, 64]``."""
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        values = [v for v in str(text).replace(" ", "").split(",") if v]
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _nonneg_float(text) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _optional_float(text):
    if text is None or str(text).lower() in ("none", "off", ""):
        return None
    return float(text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a JSON or TOML config into ``{option_dest: value}`` (``-`` in keys becomes ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--config: {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: "
                         f"{exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a table/object of options, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_config_value_type(action: argparse.Action, value) -> None:
    """A config file's JSON/TOML value must have the option's type: argparse's converters would turn true
    into 1 and 5.7 into 5 without a word."""
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected a value, not {str(value).lower()}")
    integer = action.type in (int, _positive_int)
    if action.type is _int_list and isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value] if integer else []
    for item in items:
        if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
            raise argparse.ArgumentTypeError(f"expected an integer, got {json.dumps(item)}")


def apply_config_defaults(parser: argparse.ArgumentParser, config: dict[str, Any], source: str) -> None:
    """Makes the config's values the parser's defaults, converted and checked like command-line values."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise ValueError(f"--config: {source} has unknown option(s) {unknown}; known: {sorted(actions)}")
    defaults = {}
    for dest, value in config.items():
        action = actions[dest]
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                if not isinstance(value, bool):
                    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
            else:
                _check_config_value_type(action, value)
                if action.type is not None and value is not None:
                    value = action.type(value)
            if action.choices is not None and value not in action.choices:
                raise argparse.ArgumentTypeError(f"expected one of {list(action.choices)}, got {value!r}")
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"--config: {source}: option {dest}: {exc}") from None
        defaults[dest] = value
    parser.set_defaults(**defaults)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (command-line options win)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and sampling")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_training(p: argparse.ArgumentParser, steps: int, batch_size: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=batch_size, help="default %(default)s")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW; default %(default)s)")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps before the cosine decay "
                   "(default %(default)s)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=_optional_float, default=1.0, help="clip the gradient norm (none: off)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (fp16 uses a gradient scaler; default fp32)")
    g.add_argument("--ema-decay", type=_optional_float, default=None,
                   help="keep an EMA of the weights and save it instead of the raw weights (e.g. 0.999)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=500,
                   help="steps between resumable checkpoints (default %(default)s)")
    g.add_argument("--log-every", type=_positive_int, default=25, help="steps between metrics.jsonl records")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from scratch even if the output folder has a checkpoint")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="digits (scikit-learn's 1,797 handwritten digits, 10 classes), photos (patches of the "
                        "sample photographs shipped with scikit-learn/scikit-image) or a folder of images "
                        "(class = subfolder name when there are subfolders)")
    g.add_argument("--image-size", type=_positive_int, default=16,
                   help="image side in pixels (digits are 8x8, upsampled; default %(default)s)")
    g.add_argument("--channels", type=int, default=None,
                   help="image channels (default: 1 for digits, 3 otherwise)")


def add_model_commands(sub) -> None:
    """Registers train-ae, train-prior, sample, reconstruct and demo on ``sub`` (argparse subparsers)."""

    # train-ae
    p = sub.add_parser("train-ae", help="train a stage-1 autoencoder (FSQ, LFQ, BSQ, VQ, residual VQ or KL)",
                       description="Trains an autoencoder and saves it to OUT/autoencoder, with reconstructions "
                                   "and metrics. Resumes from OUT/train when interrupted.")
    p.add_argument("--out", required=True, help="output folder")
    _add_common(p)
    _add_data(p)
    _add_autoencoder_options(p)
    _add_training(p, steps=3000, batch_size=64, lr=2e-3, warmup=100)
    p.set_defaults(func=cmd_train_ae)

    # train-prior
    p = sub.add_parser("train-prior", help="train a class-conditional prior over a trained autoencoder's latents",
                       description="Encodes the dataset with the autoencoder, trains a prior (GPT over tokens for "
                                   "discrete autoencoders; DiT or UNet latent diffusion for KL ones) and saves the "
                                   "two-stage pipeline to OUT/pipeline.")
    p.add_argument("--autoencoder", required=True, help="folder written by train-ae (OUT/autoencoder)")
    p.add_argument("--out", required=True, help="output folder")
    _add_common(p)
    _add_data(p)
    _add_prior_options(p)
    _add_training(p, steps=3000, batch_size=64, lr=1e-3, warmup=100)
    p.set_defaults(func=cmd_train_prior)

    # sample
    p = sub.add_parser("sample", help="sample images from a trained two-stage pipeline")
    p.add_argument("--pipeline", required=True, help="folder written by train-prior (OUT/pipeline)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (one row per class when --per-class)")
    p.add_argument("--labels", type=_int_list, default=None, help="class of each sample, e.g. 3,3,7")
    p.add_argument("--per-class", type=_positive_int, default=None,
                   help="this many samples of every class, one row per class")
    p.add_argument("--n", type=_positive_int, default=16, help="unconditional sample count (no labels)")
    _add_sampling_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    # reconstruct
    p = sub.add_parser("reconstruct", help="encode and decode images with a trained autoencoder; report PSNR/SSIM")
    p.add_argument("--autoencoder", required=True, help="autoencoder folder (or a pipeline folder)")
    p.add_argument("--input", default="digits",
                   help="digits (the held-out test digits), an image file, or a folder of images")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize inputs to this side (default: the autoencoder's training size when known)")
    p.add_argument("--limit", type=_positive_int, default=64, help="at most this many images")
    p.add_argument("--out", default="reconstructions.png", help="PNG: originals above their reconstructions")
    _add_common(p)
    p.set_defaults(func=cmd_reconstruct)

    # demo
    p = sub.add_parser("demo", help="the main job: train a tokenizer and a class-conditional prior on the digits, "
                                    "sample, and report (under 10 minutes on a 2-core CPU)",
                       description="Trains an autoencoder (FSQ by default) and a class-conditional latent prior on "
                                   "scikit-learn's digits, then writes reconstructions.png, samples.png (one row per "
                                   "class), metrics.json and report.md to OUT. A small digit classifier trained on "
                                   "real digits judges whether the samples show their class.")
    p.add_argument("--out", default="demo-out", help="output folder (default %(default)s)")
    p.add_argument("--quantizer", choices=("fsq", "vq", "kl"), default="fsq",
                   help="fsq and vq: a GPT prior over tokens; kl: a DiT latent-diffusion prior (default fsq)")
    p.add_argument("--ae-steps", type=_positive_int, default=None, help="autoencoder steps (default per quantizer)")
    p.add_argument("--prior-steps", type=_positive_int, default=None, help="prior steps (default per quantizer)")
    p.add_argument("--samples-per-class", type=_positive_int, default=50,
                   help="samples per class judged by the classifier (default %(default)s; the grid shows 10)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything: checks the wiring, not quality")
    _add_common(p)
    p.set_defaults(func=cmd_demo)


def _add_autoencoder_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("autoencoder")
    g.add_argument("--quantizer", choices=QUANTIZERS, default="fsq",
                   help="bottleneck (default fsq); kl: SD-VAE style; dgae: KL encoder with a diffusion (flow "
                        "matching) UNet decoder, DGAE")
    g.add_argument("--decode-steps", type=_positive_int, default=10,
                   help="dgae: sampler steps of the diffusion decoder (default %(default)s)")
    g.add_argument("--levels", type=_int_list, default=[5, 5, 5],
                   help="FSQ levels per latent channel (default 5,5,5 = 125 codes)")
    g.add_argument("--codebook-size", type=_positive_int, default=256,
                   help="VQ/RVQ codebook size; LFQ/BSQ: a power of two (2^latent bits) (default %(default)s)")
    g.add_argument("--num-quantizers", type=_positive_int, default=2, help="residual VQ depth (default 2)")
    g.add_argument("--latent-channels", type=_positive_int, default=None,
                   help="latent channels (default: len(levels) for FSQ, log2(codebook size) for LFQ/BSQ, "
                        "8 for VQ, 4 for KL)")
    g.add_argument("--block-out-channels", type=_int_list, default=[32, 64, 64],
                   help="channels per resolution; downsampling factor 2^(len-1) (default 32,64,64: f4)")
    g.add_argument("--layers-per-block", type=_positive_int, default=1, help="resnet blocks per resolution")
    g.add_argument("--norm-num-groups", type=_positive_int, default=8, help="GroupNorm groups (default 8)")
    g.add_argument("--mid-attention", action="store_true", help="self-attention in the mid block (SD-VAE has it)")
    g = p.add_argument_group("autoencoder loss")
    g.add_argument("--rec-loss", choices=("l1", "l2"), default="l1", help="pixel loss (default l1)")
    g.add_argument("--perceptual-weight", type=_nonneg_float, default=0.0,
                   help="LPIPS weight (needs the lpips package and torchvision's VGG/AlexNet weights; default 0)")
    g.add_argument("--disc-weight", type=_nonneg_float, default=0.0,
                   help="PatchGAN hinge-loss weight with the adaptive VQGAN weighting (default 0: no GAN)")
    g.add_argument("--disc-start", type=int, default=0, help="step at which the discriminator starts")
    g.add_argument("--kl-weight", type=_nonneg_float, default=1e-6, help="KL weight for --quantizer kl")
    g.add_argument("--commitment-weight", type=_nonneg_float, default=0.25, help="VQ/LFQ/BSQ commitment weight")
    g.add_argument("--entropy-weight", type=_nonneg_float, default=0.1, help="LFQ/BSQ entropy-loss weight")


def _add_prior_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prior")
    g.add_argument("--prior", choices=PRIORS, default=None,
                   help="gpt (tokens of a discrete autoencoder), dit or unet (latent diffusion for a KL one); "
                        "default gpt for discrete, dit for KL")
    g.add_argument("--width", type=_positive_int, default=256, help="transformer width / UNet base channels")
    g.add_argument("--depth", type=_positive_int, default=4, help="transformer blocks (UNet: resnets per level)")
    g.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    g.add_argument("--dropout", type=_nonneg_float, default=0.1, help="dropout in the prior")
    g.add_argument("--label-dropout", type=_nonneg_float, default=0.1,
                   help="probability of training on the null class (enables classifier-free guidance)")
    g.add_argument("--objective", choices=("eps", "v", "flow"), default="flow",
                   help="latent diffusion objective (default flow matching)")
    g.add_argument("--patch-size", type=_positive_int, default=1, help="DiT patch size over the latent grid")
    _add_sampling_options(p, for_training=True)


def _add_sampling_options(p: argparse.ArgumentParser, for_training: bool = False) -> None:
    g = p.add_argument_group("sampling" + (" (of the samples.png written after training)" if for_training else ""))
    g.add_argument("--guidance", type=_optional_float, default=None,
                   help="classifier-free guidance scale (none: conditional only; GPT default 1.5, diffusion 3)")
    g.add_argument("--temperature", type=float, default=1.0, help="GPT sampling temperature")
    g.add_argument("--top-k", type=int, default=None, help="GPT: keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="GPT: nucleus sampling probability mass")
    g.add_argument("--sample-steps", type=_positive_int, default=25, help="diffusion sampler steps")
    g.add_argument("--method", choices=("euler", "dpmpp_2m", "ddim", "ddpm"), default=None,
                   help="diffusion sampler (default euler for flow, dpmpp_2m otherwise)")


# ----------------------------------------------------------------------------------------------- helpers

def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def save_grid(images, path: str | Path, nrow: int, scale: int = 4, pad: int = 1) -> Path:
    """Writes ``images [N, C, H, W]`` in [-1, 1] as a PNG grid with ``nrow`` images per row, each pixel
    enlarged ``scale`` times (nearest) so that small digits are visible."""
    import numpy as np
    import torch
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_grid: images must be [N, 1 or 3, H, W] with N >= 1, got {list(images.shape)}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            images[i]
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path)
    return path


def make_image_datasets(data: str, image_size: int, channels: int | None, seed: int):
    """(train, eval, channels, num_classes) for ``--data``."""
    from fastlatent import data as fl_data

    if data == "digits":
        if channels not in (None, 1):
            raise ValueError(f"--channels: the digits are grey (1 channel), got {channels}")
        train = fl_data.DigitsDataset("train", size=image_size, seed=seed)
        test = fl_data.DigitsDataset("test", size=image_size, seed=seed)
        return train, test, 1, train.num_classes
    channels = 3 if channels is None else channels
    if data == "photos":
        train = fl_data.SamplePhotoPatches(patch_size=image_size, num_patches=20_000, seed=seed, channels=channels)
        test = fl_data.SamplePhotoPatches(patch_size=image_size, num_patches=256, seed=seed + 1, channels=channels)
        return train, test, channels, 0
    folder = Path(data)
    if not folder.is_dir():
        raise ValueError(f"--data: expected digits, photos or a folder of images, got {data!r} (no such folder)")
    dataset = fl_data.ImageFolderDataset(folder, size=image_size, channels=channels)
    return dataset, dataset, channels, getattr(dataset, "num_classes", 0) or 0


def _first_images(dataset, limit: int):
    import torch

    images, labels = [], []
    for i in range(min(limit, len(dataset))):
        item = dataset[i]
        image, label = (item if isinstance(item, (tuple, list)) else (item, -1))
        images.append(image)
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels)


def build_autoencoder(args, channels: int):
    """The autoencoder ``train-ae``'s options describe."""
    from fastlatent import models

    common = dict(in_channels=channels, out_channels=channels, block_out_channels=list(args.block_out_channels),
                  layers_per_block=args.layers_per_block, norm_num_groups=args.norm_num_groups,
                  mid_block_add_attention=bool(args.mid_attention))
    if args.quantizer == "kl":
        return models.AutoencoderKL(latent_channels=args.latent_channels or 4, **common)
    if args.quantizer == "dgae":
        del common["out_channels"]
        widths = list(args.block_out_channels)
        return models.DiffusionDecoderAutoencoder(
            latent_channels=args.latent_channels or 4, decoder_channels=widths[0],
            decoder_channel_mult=[w // widths[0] or 1 for w in widths], decoder_layers_per_block=args.layers_per_block,
            decoder_attention_levels=[], decoder_mid_attention=bool(args.mid_attention),
            decoder_attention_head_dim=None, decoder_norm_num_groups=args.norm_num_groups,
            decode_steps=args.decode_steps, **common)
    if args.quantizer in ("vq", "rvq"):
        return models.VQAutoencoder(latent_channels=args.latent_channels or 8, codebook_size=args.codebook_size,
                                    quantizer=args.quantizer,
                                    num_quantizers=args.num_quantizers if args.quantizer == "rvq" else 1,
                                    kmeans_init=True, threshold_ema_dead_code=2.0, **common)
    if args.quantizer == "fsq":
        if args.latent_channels not in (None, len(args.levels)):
            raise ValueError(f"--latent-channels: FSQ has one latent channel per level ({len(args.levels)} for "
                             f"--levels {args.levels}), got {args.latent_channels}")
        return models.FSQAutoencoder(quantizer="fsq", levels=list(args.levels), **common)
    return models.FSQAutoencoder(quantizer=args.quantizer, codebook_size=args.codebook_size, **common)


def _trainer_config(args, out_dir: Path, **extra):
    from fastlatent.training import TrainerConfig

    return TrainerConfig(out_dir=str(out_dir), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=min(args.warmup, args.steps - 1) if args.steps > 1 else 0,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip, precision=args.precision,
                         ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every, seed=args.seed, num_workers=args.workers, resume=args.resume,
                         progress=args.progress, **extra)


def evaluate_reconstructions(autoencoder, images, device, batch_size: int = 256) -> tuple[dict, Any]:
    """PSNR/SSIM (and codebook usage for discrete autoencoders) of ``images`` [N, C, H, W]; returns
    (metrics, reconstructions)."""
    import torch

    from fastlatent.evaluation import psnr, ssim
    from fastlatent.nn import codebook_usage

    autoencoder.eval()
    recons, indices = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
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
        metrics.update(codebook_size=int(autoencoder.codebook_size), codebook_usage=usage.fraction_used.item(),
                       perplexity=usage.perplexity.item())
    return metrics, recon


def _interleave(originals, reconstructions, per_row: int):
    """Rows of originals, each followed by the row of their reconstructions."""
    import torch

    rows = []
    for start in range(0, originals.shape[0], per_row):
        rows += [originals[start:start + per_row], reconstructions[start:start + per_row]]
    return torch.cat(rows)


# ----------------------------------------------------------------------------------------------- train-ae

def train_autoencoder(args) -> tuple[Any, dict]:
    """Trains per ``args`` (train-ae's options); returns (autoencoder with the saved weights, metrics)."""
    import torch

    from fastlatent import models
    from fastlatent.training import Trainer

    device = resolve_device(args.device)
    out = Path(args.out)
    train_set, eval_set, channels, _ = make_image_datasets(args.data, args.image_size, args.channels, args.seed)
    torch.manual_seed(args.seed)
    autoencoder = build_autoencoder(args, channels)
    loss = None if args.quantizer == "dgae" else models.AutoencoderLoss(reconstruction=args.rec_loss, perceptual_weight=args.perceptual_weight,
                                  disc_weight=args.disc_weight, disc_start=args.disc_start, kl_weight=args.kl_weight,
                                  commitment_weight=args.commitment_weight, entropy_weight=args.entropy_weight,
                                  disc_in_channels=channels)
    if args.quantizer == "dgae":
        if args.disc_weight:
            raise ValueError("--disc-weight: DGAE trains without a GAN (its diffusion decoder replaces it)")
        task = models.DGAETask(autoencoder, kl_weight=args.kl_weight, perceptual_weight=args.perceptual_weight,
                               reconstruction_weight=0.0)
    else:
        task = models.AutoencoderTask(autoencoder, loss)
    started = time.perf_counter()
    trainer = Trainer(task, _trainer_config(args, out / "train"), device=device)
    summary = trainer.fit(train_set)
    trained = (trainer.ema_model() if args.ema_decay else task).autoencoder.to(device).eval()
    if not trained.is_discrete:
        loader = torch.utils.data.DataLoader(train_set, batch_size=256)
        trained.fit_latent_scale(((x.to(device), y) for x, y in loader), max_batches=8)
    if trainer.dist.is_main:  # under torchrun, one process writes the weights
        trained.save_pretrained(out / "autoencoder")
    images, _ = _first_images(eval_set, 512)
    metrics, recon = evaluate_reconstructions(trained, images, device)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    metrics["final_loss"] = summary.get("loss") if isinstance(summary, dict) else None
    save_grid(_interleave(images[:40], recon[:40], 10), out / "reconstructions.png", nrow=10)
    (out / "autoencoder_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return trained, metrics


def cmd_train_ae(args) -> int:
    _, metrics = train_autoencoder(args)
    print(json.dumps(metrics, indent=2))
    print(f"autoencoder saved to {Path(args.out) / 'autoencoder'}")
    return 0


# ----------------------------------------------------------------------------------------------- train-prior

def _load_autoencoder(folder: str | Path, device):
    from fastlatent import models

    folder = Path(folder)
    if (folder / "pipeline.json").is_file():
        return models.TwoStagePipeline.load(folder, map_location=device).autoencoder.eval()
    return models.load_pretrained(folder, map_location=device).eval()


def build_prior(args, autoencoder, latent_shape, num_classes: int):
    """The prior ``train-prior``'s options describe, sized to the autoencoder's latents ``latent_shape``
    (``[C, h, w]``; tokens: ``[h, w]`` or ``[h, w, Q]``)."""
    from fastlatent import models

    kind = args.prior or ("gpt" if autoencoder.is_discrete else "dit")
    if autoencoder.is_discrete != (kind == "gpt"):
        raise ValueError(f"--prior {kind}: a {'discrete' if autoencoder.is_discrete else 'continuous (KL)'} "
                         f"autoencoder needs {'gpt' if autoencoder.is_discrete else 'dit or unet'}")
    if kind == "gpt":
        return models.TokenGPT(vocab_size=int(autoencoder.codebook_size), seq_len=math.prod(latent_shape),
                               num_classes=num_classes, dim=args.width, depth=args.depth, num_heads=args.heads,
                               dropout=args.dropout, label_dropout=args.label_dropout)
    channels, h, w = latent_shape
    if kind == "dit":
        denoiser = models.DiT(input_size=[h, w], patch_size=args.patch_size, in_channels=channels,
                              hidden_size=args.width, depth=args.depth, num_heads=args.heads,
                              num_classes=num_classes, dropout=args.dropout)
    else:
        denoiser = models.UNet(in_channels=channels, base_channels=args.width // 2, channel_mult=[1, 2],
                               layers_per_block=max(1, args.depth // 2), attention_levels=[1],
                               num_classes=num_classes, norm_num_groups=8, dropout=args.dropout)
    return models.LatentDiffusion(denoiser, objective=args.objective, label_dropout=args.label_dropout,
                                  num_classes=num_classes, latent_size=[h, w])


def _sample_kwargs(args, discrete: bool) -> dict:
    if discrete:
        return dict(guidance=1.5 if args.guidance is None else args.guidance, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p)
    return dict(guidance=3.0 if args.guidance is None else args.guidance, steps=args.sample_steps,
                method=args.method)


def train_prior(args, autoencoder=None) -> tuple[Any, dict]:
    """Trains a prior per ``args`` (train-prior's options); returns (pipeline, metrics)."""
    import torch

    from fastlatent import data as fl_data
    from fastlatent import models
    from fastlatent.training import Trainer

    device = resolve_device(args.device)
    out = Path(args.out)
    if autoencoder is None:
        autoencoder = _load_autoencoder(args.autoencoder, device)
    train_set, _, channels, num_classes = make_image_datasets(args.data, args.image_size, args.channels, args.seed)
    probe, _ = _first_images(train_set, 1)
    with torch.no_grad():
        z = autoencoder.encode(probe.to(device))
        grid = list(autoencoder.encode_indices(probe.to(device)).shape[1:]) if autoencoder.is_discrete else None
    latent_shape = grid if autoencoder.is_discrete else list(z.shape[1:])
    torch.manual_seed(args.seed)
    prior = build_prior(args, autoencoder, latent_shape, num_classes)
    pipeline = models.TwoStagePipeline(autoencoder, prior, token_grid=grid).to(device)
    started = time.perf_counter()
    with torch.no_grad():
        latents = fl_data.encode_dataset(pipeline.encode, train_set, batch_size=256, device=device,
                                         num_classes=num_classes or None)
    encode_seconds = time.perf_counter() - started
    trainer = Trainer(prior, _trainer_config(args, out / "train-prior"), device=device)
    trainer.fit(latents)
    trained_prior = trainer.ema_model() if args.ema_decay else prior
    pipeline = models.TwoStagePipeline(autoencoder, trained_prior.to(device).eval(), token_grid=grid)
    pipeline.save(out / "pipeline")
    metrics = {"prior": type(trained_prior).__name__, "train_seconds": round(time.perf_counter() - started, 1),
               "encode_seconds": round(encode_seconds, 1), "latent_shape": latent_shape,
               "parameters": sum(p.numel() for p in trained_prior.parameters())}
    if num_classes:
        labels = torch.arange(num_classes).repeat_interleave(8)
        images = sample_images(pipeline, labels, args, device)
        save_grid(images, out / "samples.png", nrow=8)
    return pipeline, metrics


def sample_images(pipeline, labels, args, device, batch_size: int = 500):
    """Samples ``pipeline`` for ``labels`` (a tensor, or an int count for unconditional samples)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(args.seed)
    kwargs = _sample_kwargs(args, pipeline.is_discrete)
    if isinstance(labels, int):
        if kwargs.get("guidance") is not None and getattr(pipeline.prior, "num_classes", 0):
            kwargs["guidance"] = None
        return torch.cat([pipeline.sample(min(batch_size, labels - s), None, generator=generator, **kwargs).cpu()
                          for s in range(0, labels, batch_size)])
    outs = []
    with torch.no_grad():
        for start in range(0, labels.numel(), batch_size):
            part = labels[start:start + batch_size].to(device)
            outs.append(pipeline.sample(part.numel(), part, generator=generator, **kwargs).float().cpu())
    return torch.cat(outs)


def cmd_train_prior(args) -> int:
    _, metrics = train_prior(args)
    print(json.dumps(metrics, indent=2))
    print(f"pipeline saved to {Path(args.out) / 'pipeline'}")
    return 0


# ----------------------------------------------------------------------------------------------- sample / reconstruct

def cmd_sample(args) -> int:
    import torch

    from fastlatent import models

    device = resolve_device(args.device)
    pipeline = models.TwoStagePipeline.load(args.pipeline, map_location=device).eval()
    num_classes = int(getattr(pipeline.prior, "num_classes", 0) or 0)
    if args.labels is not None and args.per_class is not None:
        raise ValueError("--labels and --per-class: give one of them")
    if args.per_class is not None or args.labels is not None:
        if not num_classes:
            raise ValueError("--labels/--per-class: this pipeline's prior is unconditional (no classes)")
        labels = (torch.arange(num_classes).repeat_interleave(args.per_class) if args.per_class is not None
                  else torch.tensor(args.labels))
        bad = [int(v) for v in labels if not 0 <= int(v) < num_classes]
        if bad:
            raise ValueError(f"--labels: classes must be in [0, {num_classes}), got {bad}")
        nrow = args.per_class or min(len(labels), 10)
        images = sample_images(pipeline, labels, args, device)
    else:
        images, nrow = sample_images(pipeline, args.n, args, device), min(args.n, 8)
    path = save_grid(images, args.out, nrow=nrow)
    print(f"{images.shape[0]} samples written to {path}")
    return 0


def cmd_reconstruct(args) -> int:
    device = resolve_device(args.device)
    autoencoder = _load_autoencoder(args.autoencoder, device)
    channels = autoencoder.config.get("in_channels", 3)
    size = args.image_size
    from fastlatent import data as fl_data

    if args.input == "digits":
        dataset = fl_data.DigitsDataset("test", size=size or 16, seed=args.seed)
    else:
        source = Path(args.input)
        if not source.exists():
            raise ValueError(f"--input: expected digits, an image file or a folder, got {args.input!r} (not found)")
        if size is None:
            raise ValueError("--image-size: needed for image files and folders (the side the autoencoder expects)")
        if source.is_dir():
            dataset = fl_data.ImageFolderDataset(source, size=size, channels=channels, labels=None)
        else:  # one file: the folder reader in a folder holding just a link to it (same decoding and checks)
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / source.name).symlink_to(source.resolve())
                dataset = fl_data.ImageFolderDataset(tmp, size=size, channels=channels, labels=None)
                if not len(dataset):
                    raise ValueError(f"--input: {source} could not be read: {dataset.skipped[0][1]}")
                images, _ = _first_images(dataset, 1)
    if args.input == "digits" or Path(args.input).is_dir():
        if not len(dataset):
            raise ValueError(f"--input: no readable images in {args.input}")
        images, _ = _first_images(dataset, args.limit)
    metrics, recon = evaluate_reconstructions(autoencoder, images, device)
    per_row = min(8, images.shape[0])
    save_grid(_interleave(images, recon, per_row), args.out, nrow=per_row)
    print(json.dumps(metrics, indent=2))
    print(f"originals and reconstructions written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from fastlatent.demo import run_demo

    run_demo(args.out, args.quantizer, ae_steps=args.ae_steps, prior_steps=args.prior_steps,
             samples_per_class=args.samples_per_class, quick=args.quick, seed=args.seed, device=args.device,
             progress=args.progress)
    return 0
