"""Stage-1 training losses: reconstruction (L1/L2), LPIPS, a PatchGAN discriminator with hinge or
non-saturating loss, the VQGAN adaptive generator weight and start step, and the KL / commitment / codebook /
entropy regularisers; :class:`AutoencoderTask` ties an autoencoder and :class:`AutoencoderLoss` to the
trainer's protocol.

The recipe is taming-transformers' ``VQLPIPSWithDiscriminator`` and latent-diffusion's
``LPIPSWithDiscriminator`` (Esser et al., 2021, https://arxiv.org/abs/2012.09841; Rombach et al., 2022).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.autoencoders import AutoencoderOutput
from fastlatent.models.base import ConfigMixin, evaluating, register_model

# torchvision checkpoints of the LPIPS backbones, as torch.hub caches them
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
# smallest image side each backbone's pooling stack accepts
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}


def lpips_backbone_path(net: str) -> Path:
    """Where the torchvision weights of LPIPS backbone ``net`` are expected: ``$TORCH_HOME/hub/checkpoints``
    (``torch.hub.get_dir()``; by default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


class LPIPS(nn.Module):
    """LPIPS perceptual distance (Zhang et al., 2018, https://arxiv.org/abs/1801.03924) over the ``lpips``
    package.

    Never downloads: the backbone's torchvision weights must be in the torch hub cache (see
    :func:`lpips_backbone_path`), else a FileNotFoundError says which file to put where. The calibrated linear
    heads ship with the ``lpips`` package. The network is frozen, always in eval mode (the heads' dropout
    stays off when a parent module trains) and kept out of ``parameters()`` and ``state_dict()``: checkpoints
    do not carry 60 MB of fixed VGG weights, and DDP/optimisers never see them.
    ``.to()``/``.cuda()``/``.half()`` move it.

    Args:
        net: "vgg" (taming's and LDM's choice), "alex" or "squeeze".
        pretrained_backbone: False builds a randomly initialised backbone (for tests; not a perceptual
            metric).

    ``forward(x, y) -> [B]``: distance per image of ``x`` and ``y`` ``[B, C, H, W]`` in [-1, 1]; C is 3, or 1
    (grey images, repeated to RGB). Differentiable in both inputs.
    """

    def __init__(self, net: str = "vgg", pretrained_backbone: bool = True):
        super().__init__()
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"LPIPS: net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        try:
            import lpips
        except ImportError as e:
            raise ImportError("LPIPS needs the lpips package: pip install lpips") from e
        path = lpips_backbone_path(net)
        if pretrained_backbone and not path.is_file():
            raise FileNotFoundError(
                f"LPIPS(net={net!r}): the backbone weights {path} are missing, and fastlatent never "
                f"downloads. Copy {LPIPS_BACKBONE_FILES[net]} (from https://download.pytorch.org/models/"
                f"{LPIPS_BACKBONE_FILES[net]}, or any torch hub cache) into {path.parent}, or point "
                f"TORCH_HOME at a folder holding hub/checkpoints/{LPIPS_BACKBONE_FILES[net]}. Use "
                "perceptual_weight=0 to train without LPIPS."
            )
        with warnings.catch_warnings():
            # lpips builds its trunk with torchvision's deprecated pretrained=False; weights come below
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        if pretrained_backbone:
            _load_lpips_backbone(model, net, path)
        model.eval().requires_grad_(False)
        self.net = net
        self.pretrained_backbone = pretrained_backbone
        self.__dict__["_lpips"] = model  # outside _modules: no parameters(), no state_dict()

    def _apply(self, fn, recurse=True):
        self.__dict__["_lpips"]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.__dict__["_lpips"].eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] not in (1, 3):
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"LPIPS: {name} must be [B, 3, H, W] (or [B, 1, H, W] grey) in [-1, 1], got {shape}"
                )
            if not t.is_floating_point():
                raise TypeError(f"LPIPS: {name} must be a floating-point tensor, got {t.dtype}")
        if x.shape != y.shape:
            raise ValueError(
                f"LPIPS: x and y must have the same shape, got {list(x.shape)} and {list(y.shape)}"
            )
        if min(x.shape[2:]) < LPIPS_MIN_SIZE[self.net]:
            raise ValueError(
                f"LPIPS(net={self.net!r}) needs images of at least {LPIPS_MIN_SIZE[self.net]}x"
                f"{LPIPS_MIN_SIZE[self.net]}, got {x.shape[2]}x{x.shape[3]} (upsample them, or use "
                f"net='vgg', which takes 16x16)"
            )
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        model = self.__dict__["_lpips"]
        weight = model.lin0.model[-1].weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x, y = x.to(weight.dtype), y.to(weight.dtype)
        return model(x, y).reshape(x.shape[0])

    def extra_repr(self) -> str:
        return f"net={self.net!r}, pretrained_backbone={self.pretrained_backbone}"


def _load_lpips_backbone(model: nn.Module, net: str, path: Path) -> None:
    """Copies torchvision's ``features.{i}.*`` weights into lpips' ``slice{k}.{i}`` modules."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or another file under the expected name
        raise ValueError(
            f"LPIPS(net={net!r}): {path} is not a readable torchvision checkpoint ({e}); replace it with "
            f"https://download.pytorch.org/models/{LPIPS_BACKBONE_FILES[net]}"
        ) from None
    slices = {name.split(".")[1]: name for name, _ in model.net.named_modules() if name.count(".") == 1}
    targets = dict(model.net.named_parameters())
    loaded = set()
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features" or parts[1] not in slices:
            continue  # the classifier head, or layers past the last slice
        target = f"{slices[parts[1]]}.{'.'.join(parts[2:])}"
        if target not in targets or targets[target].shape != value.shape:
            raise ValueError(
                f"LPIPS(net={net!r}): {path} does not match torchvision's {net} ({key} {list(value.shape)})"
            )
        with torch.no_grad():
            targets[target].copy_(value)
        loaded.add(target)
    if loaded != set(targets):
        raise ValueError(f"LPIPS(net={net!r}): {path} lacks {sorted(set(targets) - loaded)[:4]}...")


@register_model
class PatchGANDiscriminator(nn.Module, ConfigMixin):
    """PatchGAN discriminator (pix2pix; taming's ``NLayerDiscriminator``, same parameter names ``main.*``).

    Args:
        in_channels: image channels.
        ndf: width of the first layer (doubles per layer up to 8x).
        n_layers: stride-2 layers; the logits map is about ``H / 2**n_layers - 2`` pixels on a side, so inputs
            need at least ``2**n_layers * 3`` pixels (3 layers: 24; 2 layers: 12).
        norm: "batch" (taming), "group" (GroupNorm with up to 32 groups; batch-size independent), "instance"
            or "none".

    ``forward(x [B, C, H, W]) -> logits [B, 1, h, w]``. Conv weights are initialised N(0, 0.02) and norm
    weights N(1, 0.02), as taming's ``weights_init``.
    """

    NORMS = ("batch", "group", "instance", "none")

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PatchGANDiscriminator: {name} must be an int >= 1, got {value!r}")
        if norm not in self.NORMS:
            raise ValueError(f"PatchGANDiscriminator: norm must be one of {self.NORMS}, got {norm!r}")
        self.in_channels, self.n_layers, self.norm = in_channels, n_layers, norm
        self.min_size = 2**n_layers * 3
        use_bias = norm != "batch"  # a batch norm's shift makes the conv bias redundant (taming)

        def norm_layer(channels):
            if norm == "batch":
                return nn.BatchNorm2d(channels)
            if norm == "group":
                return nn.GroupNorm(math.gcd(32, channels), channels)
            if norm == "instance":
                return nn.InstanceNorm2d(channels, affine=True)
            return nn.Identity()

        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=use_bias),
            norm_layer(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PatchGANDiscriminator: x must be [B, {self.in_channels}, H, W], got {shape}")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"PatchGANDiscriminator: with n_layers={self.n_layers} images must be at least "
                f"{self.min_size}x{self.min_size}, got {x.shape[2]}x{x.shape[3]} (use fewer layers)"
            )
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``(mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits: ``(mean(softplus(-D(x))) + mean(softplus(D(G(z))))) / 2``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: torch.Tensor, disc_loss: str) -> torch.Tensor:
    """The generator's side: ``-mean(D(G(z)))`` for hinge (taming), non-saturating
    ``mean(softplus(-D(G(z))))`` for vanilla."""
    if disc_loss == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adaptive_generator_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's adaptive weight ``||grad_w nll|| / (||grad_w g|| + eps)`` at the decoder's last layer ``w``,
    clamped to ``[0, max_weight]`` and detached, so the GAN term's gradient there matches the
    reconstruction's.

    Returns 0 when gradients are off (evaluation), as taming does. Raises ValueError when either loss does not
    depend on ``last_layer_weight``.
    """
    if not torch.is_grad_enabled() or not (nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        which = "nll_loss" if nll_grad is None else "g_loss"
        raise ValueError(
            f"adaptive_generator_weight: {which} does not depend on last_layer_weight (pass the "
            "decoder's final conv weight, autoencoder.last_layer_weight)"
        )
    weight = nll_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def _call_with_detached_parameters(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with gradients flowing to ``x`` but not into ``module``'s parameters. Detached copies
    rather than toggled ``requires_grad`` flags, so a DDP wrapper's view of which parameters train never
    changes."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def reconstruction_metrics(x: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Validation metrics of ``reconstruction`` against images ``x [B, C, H, W]`` in [-1, 1]: the batch means
    of the per-image ``mse`` (reconstruction clamped to [-1, 1]) and ``psnr`` in dB (peak-to-peak range 2;
    the mse floored at 1e-10, so identical images give 106 dB, not inf)."""
    x_hat = reconstruction.float().clamp(-1, 1)
    mse = (x_hat - x.float()).square().flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))
    return {"mse": mse.mean(), "psnr": psnr.mean()}


def check_loss_weight(owner: str, name: str, value) -> float:
    """A loss term's weight as a float; ValueError naming ``owner`` and the argument unless finite, >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class AutoencoderLoss(nn.Module):
    """Weighted stage-1 objective, with its discriminator.

    Generator loss (what the autoencoder minimises)::

        nll  = reconstruction_weight * rec(x, x_hat) + perceptual_weight * mean(LPIPS(x, x_hat))
        loss = nll + kl_weight * kl + commitment_weight * commitment + codebook_weight * codebook
               + entropy_weight * entropy             # the terms the autoencoder reports
               + [step >= disc_start] * disc_weight * d_weight * g_adv(D(x_hat))

    with ``d_weight`` the adaptive weight (:func:`adaptive_generator_weight`, 1 with
    ``adaptive_disc_weight=False``). Discriminator loss (step >= disc_start): ``disc_weight_d * d_loss(D(x),
    D(sg(x_hat)))``.

    Args:
        reconstruction: "l1" (taming, LDM) or "l2", mean over pixels.
        reconstruction_weight, perceptual_weight: as above; perceptual_weight=0 builds no LPIPS.
        lpips_net, pretrained_lpips: see :class:`LPIPS`.
        disc_weight: weight of the generator's adversarial term; 0 builds no discriminator.
        disc_start: first step with a GAN term (generator and discriminator).
        disc_loss: "hinge" or "vanilla" (BCE; non-saturating generator loss).
        adaptive_disc_weight, max_adaptive_weight: the VQGAN adaptive weight and its clamp.
        disc_in_channels, disc_ndf, disc_layers, disc_norm: see :class:`PatchGANDiscriminator`.
        kl_weight, commitment_weight, codebook_weight, entropy_weight: weights of the autoencoder's loss terms
            (LDM: kl 1e-6; VQGAN: commitment 0.25, codebook 1; MAGVIT-v2 entropy 0.1).
    """

    TERM_WEIGHTS = ("kl", "commitment", "codebook", "entropy")

    def __init__(
        self,
        reconstruction: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        lpips_net: str = "vgg",
        pretrained_lpips: bool = True,
        disc_weight: float = 0.5,
        disc_start: int = 10_000,
        disc_loss: str = "hinge",
        adaptive_disc_weight: bool = True,
        max_adaptive_weight: float = 1e4,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
        kl_weight: float = 1e-6,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        entropy_weight: float = 0.1,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"AutoencoderLoss: reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(
                f"AutoencoderLoss: disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}"
            )
        if not isinstance(disc_start, int) or isinstance(disc_start, bool) or disc_start < 0:
            raise ValueError(f"AutoencoderLoss: disc_start must be an int >= 0, got {disc_start!r}")
        self.reconstruction = reconstruction
        self.reconstruction_weight = check_loss_weight(
            "AutoencoderLoss", "reconstruction_weight", reconstruction_weight
        )
        self.perceptual_weight = check_loss_weight("AutoencoderLoss", "perceptual_weight", perceptual_weight)
        self.disc_weight = check_loss_weight("AutoencoderLoss", "disc_weight", disc_weight)
        self.max_adaptive_weight = check_loss_weight(
            "AutoencoderLoss", "max_adaptive_weight", max_adaptive_weight
        )
        self.weights = {
            name: check_loss_weight("AutoencoderLoss", f"{name}_weight", w)
            for name, w in zip(
                self.TERM_WEIGHTS, (kl_weight, commitment_weight, codebook_weight, entropy_weight)
            )
        }
        self.disc_start = disc_start
        self.disc_loss = disc_loss
        self.adaptive_disc_weight = bool(adaptive_disc_weight)
        self.perceptual = LPIPS(lpips_net, pretrained_lpips) if self.perceptual_weight > 0 else None
        self.discriminator = (
            PatchGANDiscriminator(disc_in_channels, disc_ndf, disc_layers, disc_norm)
            if self.disc_weight > 0
            else None
        )

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def reconstruction_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        diff = x_hat.float() - x.float()
        return diff.abs().mean() if self.reconstruction == "l1" else diff.square().mean()

    def generator_loss(
        self,
        x: torch.Tensor,
        output: AutoencoderOutput,
        step: int,
        last_layer_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The autoencoder's loss and its parts (detached metrics). ``last_layer_weight`` is needed once the
        GAN term is on with the adaptive weight."""
        x_hat = output.reconstruction
        if x_hat.shape != x.shape:
            raise ValueError(
                f"AutoencoderLoss: reconstruction shape {list(x_hat.shape)} differs from the images' "
                f"{list(x.shape)}"
            )
        unknown = set(output.losses) - set(self.TERM_WEIGHTS)
        if unknown:
            raise ValueError(
                f"AutoencoderLoss: the autoencoder reports loss terms {sorted(unknown)} this loss has no "
                f"weight for (known: {list(self.TERM_WEIGHTS)})"
            )
        rec = self.reconstruction_loss(x, x_hat)
        nll = self.reconstruction_weight * rec
        metrics = {"rec_loss": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(x.float(), x_hat.float()).mean()
            nll = nll + self.perceptual_weight * perceptual
            metrics["perceptual_loss"] = perceptual.detach()
        loss = nll
        for name, value in output.losses.items():
            loss = loss + self.weights[name] * value.float()
            metrics[name] = value.detach()
        if self.gan_active(step):
            logits_fake = _call_with_detached_parameters(self.discriminator, x_hat)
            g_loss = generator_adversarial_loss(logits_fake.float(), self.disc_loss)
            if self.adaptive_disc_weight:
                if last_layer_weight is None:
                    raise ValueError(
                        "AutoencoderLoss.generator_loss: last_layer_weight is required for the adaptive "
                        "GAN weight (pass autoencoder.last_layer_weight)"
                    )
                d_weight = adaptive_generator_weight(nll, g_loss, last_layer_weight, self.max_adaptive_weight)
            else:
                d_weight = torch.ones((), device=g_loss.device)
            loss = loss + self.disc_weight * d_weight * g_loss
            metrics.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        metrics["nll_loss"] = nll.detach()
        return loss, metrics

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss on real ``x`` and detached ``x_hat`` (zero before ``disc_start``)."""
        if self.discriminator is None:
            raise ValueError(
                "AutoencoderLoss.discriminator_loss: built with disc_weight=0, there is no discriminator"
            )
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        d_loss = D_LOSSES[self.disc_loss](logits_real.float(), logits_fake.float())
        if not self.gan_active(step):
            d_loss = d_loss * 0.0
        return d_loss, {
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


class AutoencoderTask(nn.Module):
    """An autoencoder and its :class:`AutoencoderLoss`, as the trainer drives them.

    ``training_step((images, labels) or images, step) -> dict``: "loss" (the autoencoder's), "disc_loss" once
    ``step >= loss.disc_start`` (computed from the detached reconstruction, so its gradients reach only the
    discriminator), and detached metrics: rec_loss, perceptual_loss, nll_loss, the autoencoder's loss terms
    (kl, commitment, codebook, entropy), perplexity and usage (discrete), g_loss, d_weight, logits_real,
    logits_fake. ``discriminator_parameters()`` lists what the second optimiser trains.
    """

    def __init__(self, autoencoder: nn.Module, loss: AutoencoderLoss):
        super().__init__()
        for attr in ("encode", "decode", "last_layer_weight", "in_channels"):
            if not hasattr(autoencoder, attr):
                raise TypeError(
                    f"AutoencoderTask: autoencoder must implement the stage-1 protocol (missing {attr!r}), "
                    f"got {type(autoencoder).__name__}"
                )
        if not isinstance(loss, AutoencoderLoss):
            raise TypeError(f"AutoencoderTask: loss must be an AutoencoderLoss, got {type(loss).__name__}")
        if loss.discriminator is not None and loss.discriminator.in_channels != autoencoder.out_channels:
            raise ValueError(
                f"AutoencoderTask: the discriminator takes {loss.discriminator.in_channels} channels but "
                f"the autoencoder outputs {autoencoder.out_channels} (set disc_in_channels)"
            )
        self.autoencoder = autoencoder
        self.loss = loss

    @staticmethod
    def _images(batch) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"AutoencoderTask: batch must be images [B, C, H, W] or (images, labels), got "
                f"{type(images).__name__}"
            )
        return images

    def training_step(self, batch, step: int) -> dict:
        x = self._images(batch)
        x = x.to(self.autoencoder.last_layer_weight.device)
        output = self.autoencoder(x)
        loss, metrics = self.loss.generator_loss(x, output, step, self.autoencoder.last_layer_weight)
        result = {"loss": loss, **metrics}
        for key in ("perplexity", "usage"):
            if key in output.stats:
                result[key] = output.stats[key].detach()
        if self.loss.gan_active(step):
            d_loss, d_metrics = self.loss.discriminator_loss(x, output.reconstruction.detach(), step)
            result["disc_loss"] = d_loss
            result.update(d_metrics)
        return result

    @torch.no_grad()
    def validation_step(self, batch) -> dict:
        """Reconstruction metrics without gradients or codebook updates: rec_loss, mse and psnr (images in
        [-1, 1], so the peak-to-peak range is 2)."""
        x = self._images(batch).to(self.autoencoder.last_layer_weight.device)
        with evaluating(self):
            output = self.autoencoder(x)
        return {
            "rec_loss": self.loss.reconstruction_loss(x, output.reconstruction),
            **reconstruction_metrics(x, output.reconstruction),
        }

    def discriminator_parameters(self) -> list:
        return [] if self.loss.discriminator is None else list(self.loss.discriminator.parameters())
