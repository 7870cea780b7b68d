"""DiT: a diffusion transformer over latents (Peebles & Xie 2023, https://arxiv.org/abs/2212.09748).

The latent ``[B, C, H, W]`` is cut into ``p x p`` patches (a strided convolution), fixed 2-D sin-cos position
embeddings are added, and ``depth`` transformer blocks run with adaLN-Zero conditioning on ``timestep
embedding + class embedding``; a final adaLN-modulated linear layer and unpatchify give back ``[B, C_out, H,
W]``.

Parameter names and initialisation follow facebookresearch/DiT (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``,
``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}``,
``final_layer.{linear,adaLN_modulation.1}``, ``pos_embed``), so an official checkpoint loads with
``learn_sigma=True`` (DiT-XL/2: ``input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
num_heads=16, num_classes=1000``). Attention runs on ``F.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU).

Classifier-free guidance: label ``num_classes`` is the null class (row ``num_classes`` of the embedding table,
as in DiT). Label dropout during training is **not** done here but by the diffusion wrapper
(:class:`fastlatent.models.LatentDiffusion`), which replaces labels by the null class, so the same denoiser
trains identically whichever wrapper drives it and its forward is a pure function of its inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.base import ConfigMixin, register_model


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos(t f_i), sin(t f_i)]`` as DiT/ADM.

    Args:
        t: ``[B]`` timesteps (any float or int dtype).
        dim: embedding width D.
        max_period: the lowest frequency is ``1 / max_period``.

    Returns:
        ``[B, D]`` float32 embedding (a zero column is appended when D is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """``t [B] -> [B, hidden]``: sinusoidal features, Linear, SiLU, Linear (DiT's ``t_embedder``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``labels [B] -> [B, hidden]`` with ``num_classes + 1`` rows; row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def check_timesteps(where: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` as a float ``[batch]`` tensor on ``device`` (a Python number or 0-d tensor is broadcast)."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"{where}: t must be a tensor [B] or a number, got {type(t).__name__}")
        return torch.full((batch,), float(t), device=device)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{where}: t must be a real tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{where}: t is on {t.device} but x is on {device}")
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{where}: t must be [B] = [{batch}] or a scalar, got shape {list(t.shape)}")
    return t


def check_class_labels(where: str, labels, batch: int, num_classes: int, device: torch.device):
    """Validates the shape/dtype/device of a denoiser's labels (no value check: that would sync the device).

    Returns None for an unconditional model. A conditional model needs labels ``[B]`` int64 in
    ``[0, num_classes]`` (``num_classes`` = the null class); range checks are done by the user-facing entry
    points (``training_step``, ``sample``) where a host sync is acceptable.
    """
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"{where}: this model is unconditional (num_classes=0); labels must be None")
        return None
    if labels is None:
        raise ValueError(
            f"{where}: labels [B] are required (num_classes={num_classes}; pass {num_classes}, the null "
            "class, for unconditional outputs)"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{where}: labels must be an int64 tensor [B], got {what}")
    if labels.shape != (batch,):
        raise ValueError(f"{where}: labels must be [B] = [{batch}], got shape {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{where}: labels are on {labels.device} but x is on {device}")
    return labels


def check_label_values(
    where: str, name: str, labels: torch.Tensor, num_classes: int, allow_null: bool
) -> None:
    """Raises ValueError when a label lies outside ``[0, num_classes)`` (``[0, num_classes]`` with the null
    class).

    One host sync: called by the user-facing entry points only, never inside a model's forward.
    """
    high = num_classes + 1 if allow_null else num_classes
    if labels.numel() and bool(((labels < 0) | (labels >= high)).any()):
        bad = labels[(labels < 0) | (labels >= high)][0].item()
        extra = f" ({num_classes} = the null class)" if allow_null else ""
        raise ValueError(f"{where}: {name} must be in [0, {high - 1}]{extra}, got {bad}")


def sampling_labels(where: str, labels, n: int, num_classes: int, guidance, device: torch.device):
    """The labels a prior samples ``n`` items with: None, an int for all, or ``[n]`` ints; checked.

    Returns ``(labels [n] int64 on device or None, guided)``; ``guided`` says classifier-free guidance
    applies. A conditional model with ``labels=None`` samples the null class (unconditional samples), which
    cannot be guided.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n must be an int >= 1, got {n!r}")
    if guidance is not None:
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, (int, float))
            or not math.isfinite(guidance)
        ):
            raise ValueError(f"{where}: guidance must be a finite number or None, got {guidance!r}")
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"{where}: this prior is unconditional (num_classes=0): labels must be None")
        if guidance is not None:
            raise ValueError(
                f"{where}: classifier-free guidance needs a class-conditional prior (num_classes > 0)"
            )
        return None, False
    if labels is None:
        if guidance is not None:
            raise ValueError(
                f"{where}: guidance needs labels to guide towards (labels=None samples the null class)"
            )
        return torch.full((n,), num_classes, dtype=torch.int64, device=device), False
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = torch.full((n,), labels, dtype=torch.int64)
    elif isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise TypeError(f"{where}: labels must be an int, a list of ints or an integer tensor [n]")
        labels = torch.tensor(labels, dtype=torch.int64)
    elif isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    else:
        raise TypeError(
            f"{where}: labels must be None, an int, a list of ints or an integer tensor [n], "
            f"got {type(labels).__name__}"
        )
    if labels.shape != (n,):
        raise ValueError(f"{where}: labels must have shape [n] = [{n}], got {list(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.int64)
    check_label_values(where, "labels", labels, num_classes, allow_null=True)
    return labels, guidance is not None


def size_pair(value, where: str, name: str) -> list[int]:
    """``[h, w]`` from an int (square) or a pair of ints >= 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(
            f"{where}: {name} must be an int >= 1 or [height, width] of ints >= 1, got {value!r}"
        )
    return [int(v) for v in value]


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE/DiT fixed 2-D sin-cos position embedding, ``[grid_h * grid_w, embed_dim]`` (row-major patches)."""
    gh = np.arange(grid_h, dtype=np.float64)
    gw = np.arange(grid_w, dtype=np.float64)
    grid = np.meshgrid(gw, gh)  # as MAE: the first half embeds the column (w) index, the second the row
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention (timm's ``Attention`` names: ``qkv``, ``proj``) on SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (timm's ``Mlp`` names, DiT's approximate GELU)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh"))))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: ``c`` gives shift/scale/gate for attention and MLP (gates start at
    0)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn_dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """``[B, C, H, W] -> [B, (H/p)(W/p), D]`` with a p x p stride-p convolution (timm's
    ``PatchEmbed.proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@register_model
class DiT(nn.Module, ConfigMixin):
    """Class-conditional diffusion transformer over latents.

    Args:
        input_size: latent height and width (an int for square latents, or ``[h, w]``); each divisible by
            ``patch_size``.
        patch_size: p; the transformer sees ``(h/p)(w/p)`` tokens.
        in_channels: latent channels C.
        hidden_size: transformer width D (even, divisible by ``num_heads``; divisible by 4 for the 2-D
            position embedding).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        num_classes: class count; 0 for an unconditional model (no label embedding, ``labels`` must be None).
            Label ``num_classes`` is the null class for classifier-free guidance.
        learn_sigma: also output C variance channels (``out_channels = 2C``), as the official DiT checkpoints
            do; :class:`LatentDiffusion` samples with the first C channels (it does not train the variance).
        dropout: dropout in attention and MLP (0 in DiT).

    ``forward(x [B, C, h, w], t [B] (or a number), labels [B] int64 or None) -> [B, C_out, h, w]``. ``t`` is
    the training timestep the sampler passes (``0..T-1`` for discrete schedules, ``s * T`` for flow). The
    forward checks shapes, dtypes and devices but not label values (that would sync the device on every call
    and break CUDA-graph capture); :class:`LatentDiffusion`'s ``training_step`` and ``sample`` check those.
    """

    def __init__(
        self,
        input_size: int | list[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        height, width = size_pair(input_size, "DiT", "input_size")
        for name, value in (
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiT: {name} must be an int >= 1, got {value!r}")
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"DiT: input_size {[height, width]} must be divisible by patch_size {patch_size}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"DiT: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4:
            raise ValueError(
                f"DiT: hidden_size must be divisible by 4 (2-D sin-cos position embedding), got {hidden_size}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"DiT: num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"DiT: mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DiT: dropout must be in [0, 1), got {dropout!r}")
        self.input_size = [height, width]
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.grid = (height // patch_size, width // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden_size, *self.grid)).float().unsqueeze(0)
        # Fixed, but saved in the state dict under DiT's name so official checkpoints load strictly.
        self.register_buffer("pos_embed", pos)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, zero adaLN modulations and output layer (the "Zero")."""

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, p*p*C_out] -> [B, C_out, h, w]``."""
        p, c = self.patch_size, self.out_channels
        gh, gw = self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor | None = None) -> torch.Tensor:
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 4
            or x.shape[1] != self.in_channels
            or list(x.shape[2:]) != self.input_size
        ):
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"DiT: x must be [B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}], "
                f"got {shape}"
            )
        t = check_timesteps("DiT", t, x.shape[0], x.device)
        labels = check_class_labels("DiT", labels, x.shape[0], self.num_classes, x.device)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(labels)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))
