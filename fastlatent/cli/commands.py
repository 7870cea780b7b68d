"""The model commands of the `fastlatent` command: train-ae, train-prior, sample, reconstruct and demo.

Each command turns its options into a recipe of :mod:`fastlatent.recipes` and runs it; the options are the
recipe's fields. Every option can also come from a config file (``--config FILE``, JSON or TOML, keys spelled
like the options with ``-`` or ``_``); options given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fastlatent.cli.options import CommandParser, int_list, nonneg_float, optional_float, positive_int
from fastlatent.demo import run_demo
from fastlatent.recipes import (
    PRIORS,
    QUANTIZERS,
    SAMPLERS,
    AutoencoderRecipe,
    PriorRecipe,
    SamplingOptions,
    reconstruct_grid,
    sample_grid,
    train_autoencoder,
    train_prior,
)


def recipe_from_args(cls: type, args: argparse.Namespace):
    """The recipe ``cls`` (a dataclass of :mod:`fastlatent.recipes`) holding the parsed options."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _add_common(p: CommandParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (command-line options win)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and sampling")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_training(p: CommandParser, steps: int, batch_size: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help="default %(default)s")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW; default %(default)s)")
    g.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="linear warm-up steps before the cosine decay (default %(default)s)",
    )
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=optional_float, default=1.0, help="clip the gradient norm (none: off)")
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (fp16 uses a gradient scaler; default fp32)",
    )
    g.add_argument(
        "--ema-decay",
        type=optional_float,
        default=None,
        help="keep an EMA of the weights and save it instead of the raw weights (e.g. 0.999)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=500,
        help="steps between resumable checkpoints (default %(default)s)",
    )
    g.add_argument("--log-every", type=positive_int, default=25, help="steps between metrics.jsonl records")
    g.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start from scratch even if the output folder has a checkpoint",
    )
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")


def _add_data(p: CommandParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        help="digits (scikit-learn's 1,797 handwritten digits, 10 classes), photos (patches of the "
        "sample photographs shipped with scikit-learn/scikit-image) or a folder of images "
        "(class = subfolder name when there are subfolders)",
    )
    g.add_argument(
        "--image-size",
        type=positive_int,
        default=16,
        help="image side in pixels (digits are 8x8, upsampled; default %(default)s)",
    )
    g.add_argument(
        "--channels", type=int, default=None, help="image channels (default: 1 for digits, 3 otherwise)"
    )


def add_model_commands(sub) -> None:
    """Registers train-ae, train-prior, sample, reconstruct and demo on ``sub`` (argparse subparsers)."""

    # train-ae
    p = sub.add_parser(
        "train-ae",
        help="train a stage-1 autoencoder (FSQ, LFQ, BSQ, VQ, residual VQ or KL)",
        description="Trains an autoencoder and saves it to OUT/autoencoder, with reconstructions "
        "and metrics. Resumes from OUT/train when interrupted.",
    )
    p.add_argument("--out", required=True, help="output folder")
    _add_common(p)
    _add_data(p)
    _add_autoencoder_options(p)
    _add_training(p, steps=3000, batch_size=64, lr=2e-3, warmup=100)
    p.set_defaults(func=cmd_train_ae)

    # train-prior
    p = sub.add_parser(
        "train-prior",
        help="train a class-conditional prior over a trained autoencoder's latents",
        description="Encodes the dataset with the autoencoder, trains a prior (GPT over tokens for "
        "discrete autoencoders; DiT or UNet latent diffusion for KL ones) and saves the "
        "two-stage pipeline to OUT/pipeline.",
    )
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
    p.add_argument(
        "--out", default="samples.png", help="PNG grid to write (one row per class when --per-class)"
    )
    p.add_argument("--labels", type=int_list, default=None, help="class of each sample, e.g. 3,3,7")
    p.add_argument(
        "--per-class",
        type=positive_int,
        default=None,
        help="this many samples of every class, one row per class",
    )
    p.add_argument("--n", type=positive_int, default=16, help="unconditional sample count (no labels)")
    _add_sampling_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    # reconstruct
    p = sub.add_parser(
        "reconstruct", help="encode and decode images with a trained autoencoder; report PSNR/SSIM"
    )
    p.add_argument("--autoencoder", required=True, help="autoencoder folder (or a pipeline folder)")
    p.add_argument(
        "--input",
        default="digits",
        help="digits (the held-out test digits), an image file, or a folder of images",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize inputs to this side (default: the autoencoder's training size when known)",
    )
    p.add_argument("--limit", type=positive_int, default=64, help="at most this many images")
    p.add_argument("--out", default="reconstructions.png", help="PNG: originals above their reconstructions")
    _add_common(p)
    p.set_defaults(func=cmd_reconstruct)

    # demo
    p = sub.add_parser(
        "demo",
        help="the main job: train a tokenizer and a class-conditional prior on the digits, "
        "sample, and report (under 10 minutes on a 2-core CPU)",
        description="Trains an autoencoder (FSQ by default) and a class-conditional latent prior on "
        "scikit-learn's digits, then writes reconstructions.png, samples.png (one row per "
        "class), metrics.json and report.md to OUT. A small digit classifier trained on "
        "real digits judges whether the samples show their class.",
    )
    p.add_argument("--out", default="demo-out", help="output folder (default %(default)s)")
    p.add_argument(
        "--quantizer",
        choices=("fsq", "vq", "kl"),
        default="fsq",
        help="fsq and vq: a GPT prior over tokens; kl: a DiT latent-diffusion prior (default fsq)",
    )
    p.add_argument(
        "--ae-steps", type=positive_int, default=None, help="autoencoder steps (default per quantizer)"
    )
    p.add_argument(
        "--prior-steps", type=positive_int, default=None, help="prior steps (default per quantizer)"
    )
    p.add_argument(
        "--samples-per-class",
        type=positive_int,
        default=50,
        help="samples per class judged by the classifier (default %(default)s; the grid shows 10)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few steps of everything: checks the wiring, not quality"
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)


def _add_autoencoder_options(p: CommandParser) -> None:
    g = p.add_argument_group("autoencoder")
    g.add_argument(
        "--quantizer",
        choices=QUANTIZERS,
        default="fsq",
        help="bottleneck (default fsq); kl: SD-VAE style; dgae: KL encoder with a diffusion (flow "
        "matching) UNet decoder, DGAE",
    )
    g.add_argument(
        "--decode-steps",
        type=positive_int,
        default=10,
        help="dgae: sampler steps of the diffusion decoder (default %(default)s)",
    )
    g.add_argument(
        "--levels",
        type=int_list,
        default=[5, 5, 5],
        help="FSQ levels per latent channel (default 5,5,5 = 125 codes)",
    )
    g.add_argument(
        "--codebook-size",
        type=positive_int,
        default=256,
        help="VQ/RVQ codebook size; LFQ/BSQ: a power of two (2^latent bits) (default %(default)s)",
    )
    g.add_argument("--num-quantizers", type=positive_int, default=2, help="residual VQ depth (default 2)")
    g.add_argument(
        "--latent-channels",
        type=positive_int,
        default=None,
        help="latent channels (default: len(levels) for FSQ, log2(codebook size) for LFQ/BSQ, "
        "8 for VQ, 4 for KL)",
    )
    g.add_argument(
        "--block-out-channels",
        type=int_list,
        default=[32, 64, 64],
        help="channels per resolution; downsampling factor 2^(len-1) (default 32,64,64: f4)",
    )
    g.add_argument("--layers-per-block", type=positive_int, default=1, help="resnet blocks per resolution")
    g.add_argument("--norm-num-groups", type=positive_int, default=8, help="GroupNorm groups (default 8)")
    g.add_argument(
        "--mid-attention", action="store_true", help="self-attention in the mid block (SD-VAE has it)"
    )
    g = p.add_argument_group("autoencoder loss")
    g.add_argument("--rec-loss", choices=("l1", "l2"), default="l1", help="pixel loss (default l1)")
    g.add_argument(
        "--perceptual-weight",
        type=nonneg_float,
        default=0.0,
        help="LPIPS weight (needs the lpips package and torchvision's VGG/AlexNet weights; default 0)",
    )
    g.add_argument(
        "--disc-weight",
        type=nonneg_float,
        default=0.0,
        help="PatchGAN hinge-loss weight with the adaptive VQGAN weighting (default 0: no GAN)",
    )
    g.add_argument("--disc-start", type=int, default=0, help="step at which the discriminator starts")
    g.add_argument("--kl-weight", type=nonneg_float, default=1e-6, help="KL weight for --quantizer kl")
    g.add_argument(
        "--commitment-weight", type=nonneg_float, default=0.25, help="VQ/LFQ/BSQ commitment weight"
    )
    g.add_argument("--entropy-weight", type=nonneg_float, default=0.1, help="LFQ/BSQ entropy-loss weight")


def _add_prior_options(p: CommandParser) -> None:
    g = p.add_argument_group("prior")
    g.add_argument(
        "--prior",
        choices=PRIORS,
        default=None,
        help="gpt (tokens of a discrete autoencoder), dit or unet (latent diffusion for a KL one); "
        "default gpt for discrete, dit for KL",
    )
    g.add_argument("--width", type=positive_int, default=256, help="transformer width / UNet base channels")
    g.add_argument(
        "--depth", type=positive_int, default=4, help="transformer blocks (UNet: resnets per level)"
    )
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    g.add_argument("--dropout", type=nonneg_float, default=0.1, help="dropout in the prior")
    g.add_argument(
        "--label-dropout",
        type=nonneg_float,
        default=0.1,
        help="probability of training on the null class (enables classifier-free guidance)",
    )
    g.add_argument(
        "--objective",
        choices=("eps", "v", "flow"),
        default="flow",
        help="latent diffusion objective (default flow matching)",
    )
    g.add_argument("--patch-size", type=positive_int, default=1, help="DiT patch size over the latent grid")
    _add_sampling_options(p, for_training=True)


def _add_sampling_options(p: CommandParser, for_training: bool = False) -> None:
    g = p.add_argument_group(
        "sampling" + (" (of the samples.png written after training)" if for_training else "")
    )
    g.add_argument(
        "--guidance",
        type=optional_float,
        default=None,
        help="classifier-free guidance scale (none: conditional only; GPT default 1.5, diffusion 3)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="GPT sampling temperature")
    g.add_argument("--top-k", type=int, default=None, help="GPT: keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="GPT: nucleus sampling probability mass")
    g.add_argument("--sample-steps", type=positive_int, default=25, help="diffusion sampler steps")
    g.add_argument(
        "--method",
        choices=SAMPLERS,
        default=None,
        help="diffusion sampler (default euler for flow, dpmpp_2m otherwise)",
    )


def cmd_train_ae(args: argparse.Namespace) -> int:
    _, metrics = train_autoencoder(recipe_from_args(AutoencoderRecipe, args))
    print(json.dumps(metrics, indent=2))
    print(f"autoencoder saved to {Path(args.out) / 'autoencoder'}")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    _, metrics = train_prior(recipe_from_args(PriorRecipe, args))
    print(json.dumps(metrics, indent=2))
    print(f"pipeline saved to {Path(args.out) / 'pipeline'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    path, count = sample_grid(
        args.pipeline,
        args.out,
        recipe_from_args(SamplingOptions, args),
        labels=args.labels,
        per_class=args.per_class,
        n=args.n,
    )
    print(f"{count} samples written to {path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    metrics = reconstruct_grid(
        args.autoencoder,
        args.out,
        input=args.input,
        image_size=args.image_size,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(metrics, indent=2))
    print(f"originals and reconstructions written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(
        args.out,
        args.quantizer,
        ae_steps=args.ae_steps,
        prior_steps=args.prior_steps,
        samples_per_class=args.samples_per_class,
        quick=args.quick,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
    )
    return 0
