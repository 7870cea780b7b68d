"""Vector-quantisation layers on the fused kernels: VectorQuantize and ResidualVQ.

Constructor and forward keywords, defaults, return tuples, loss definitions and state_dict keys
follow vector-quantize-pytorch 1.32, so switching is a change of import. Where the two differ the
class docstring says so; the README's "Drop-in for vector-quantize-pytorch" table lists every option.
"""

from __future__ import annotations

import math
import warnings
from collections import namedtuple
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastlatent.ops import code_stats, ema_update_, kmeans, nearest_code, sample_code

# Rows per chunk where a [rows, K] logit matrix is needed (stochastic sampling, diversity and
# cross-entropy losses, top-k): memory stays at ~2^22 floats per chunk whatever N is.
_LOGIT_CHUNK_ELEMENTS = 1 << 22

LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"]
)


def _gumbel_perturbed(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` plus Gumbel noise (vector-quantize-pytorch's clamps): its argmax is a draw from
    ``softmax(logits / T)``."""
    noise = torch.zeros_like(logits).uniform_(0, 1)
    return logits / temperature - torch.log((-torch.log(noise.clamp_min(1e-20))).clamp_min(1e-20))


class VQStats(NamedTuple):
    """What a forward pass measured (returned with ``return_stats=True``)."""

    commitment_loss: torch.Tensor  # unweighted mean squared distance input -> code
    codebook_loss: torch.Tensor  # learnable codebooks only, else 0
    perplexity: torch.Tensor  # exp(entropy of this batch's code histogram)
    codes_used: torch.Tensor  # fraction of the codebook that this batch used
    nonfinite_rows: torch.Tensor  # rows holding NaN/Inf seen so far (kept out of the EMA and k-means)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    # eps as vector-quantize-pytorch's l2norm, so cosine codebooks agree bit for bit
    return F.normalize(t, dim=-1, eps=1e-6)


def rotate_to(src: torch.Tensor, tgt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick (Fifty et al., 2025, arXiv 2410.06424): ``tgt`` in value, with the
    gradient of ``src`` passed through the rotation and rescaling that maps ``src`` onto it."""
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = (src / norm_src.clamp_min(eps)).detach()
    q = (tgt / norm_tgt.clamp_min(eps)).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    rotated = src - 2 * (src * w).sum(-1, keepdim=True) * w + 2 * (src * u).sum(-1, keepdim=True) * q
    return rotated * (norm_tgt / norm_src.clamp_min(eps)).detach()


def directional_reparam(src: torch.Tensor, tgt: torch.Tensor, noise_variance: float = 5e-3) -> torch.Tensor:
    """DiVeQ: ``src`` moved along the (noised) direction to ``tgt`` by the quantisation error."""
    error = tgt - src
    noised = error + math.sqrt(noise_variance) * torch.randn_like(error)
    return src + _l2norm(noised).detach() * error.norm(dim=-1, keepdim=True)


def orthogonal_loss(codebooks: torch.Tensor) -> torch.Tensor:
    """Orthogonality regulariser (Shin et al., 2021, arXiv 2112.00384, eq. 2) of ``[C, K, D]`` codebooks.

    ``sum_ij cos(c_i, c_j)^2 / (C K^2) - 1 / K``, computed as the squared Frobenius norm of the
    ``D x D`` Gram matrix ``E^T E`` of the normalised codes (equal to that of ``E E^T``): one GEMM,
    O(D^2) memory instead of the O(K^2) similarity matrix.
    """
    c, k = codebooks.shape[:2]
    normed = _l2norm(codebooks.float())
    gram = normed.transpose(-1, -2) @ normed
    return gram.pow(2).sum() / (c * k * k) - 1.0 / k


def _usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum()
    return entropy.exp(), (counts > 0).float().mean()


def _neg_distances(rows: torch.Tensor, codes: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Logits of vector-quantize-pytorch: cosine similarity, or minus the Euclidean distance
    ``sqrt(max(|x|^2 + |c|^2 - 2<x, c>, 1e-8))``. ``rows [C, m, D]``, ``codes [C, K, D]`` -> ``[C, m, K]``."""
    sim = rows @ codes.transpose(-1, -2)
    if cosine:
        return sim
    sq = rows.pow(2).sum(-1, keepdim=True) + codes.pow(2).sum(-1)[:, None, :] - 2 * sim
    return -sq.clamp_min(1e-8).sqrt()


def _row_chunks(m: int, k: int):
    step = max(1, _LOGIT_CHUNK_ELEMENTS // max(k, 1))
    return [(s, min(s + step, m)) for s in range(0, m, step)]


def _lens_to_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=lens.device) < lens[:, None]


class Codebook(nn.Module):
    """The codebook state, with vector-quantize-pytorch's buffer names and shapes.

    ``embed [C, K, D]`` (a Parameter when learnable), ``embed_avg [C, K, D]`` and
    ``cluster_size [C, K]`` (the EMA statistics, always float32) and ``initted`` (k-means done),
    with ``C`` codebooks (heads with separate codebooks, else 1). A state_dict saved by
    vector-quantize-pytorch's ``VectorQuantize`` loads as it is.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int,
        kmeans_init: bool,
        use_cosine_sim: bool,
        learnable: bool,
    ):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # Data-quality counters (not saved: a checkpoint of vector-quantize-pytorch loads strictly).
        self.register_buffer("num_nonfinite_rows", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("num_nonfinite_codes", torch.zeros((), dtype=torch.int64), persistent=False)
        self.codebook_size, self.num_codebooks, self.learnable = codebook_size, num_codebooks, learnable
        self.use_cosine_sim = use_cosine_sim

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16()/.to(dtype) move the codes but keep the EMA statistics in float32: a
        # cluster size of 1e5 and 1e-5 smoothing do not survive fp16, and the EMA must not drift.
        super()._apply(fn, recurse)
        for name in ("cluster_size", "embed_avg"):
            t = getattr(self, name)
            if t.dtype != torch.float32:
                setattr(self, name, t.float())
        return self

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return _l2norm(x) if self.use_cosine_sim else x


class VectorQuantize(nn.Module):
    """Vector quantiser with an EMA (or learnable) codebook, on fused kernels; a drop-in for
    vector-quantize-pytorch's ``VectorQuantize`` (same keywords, defaults, outputs, losses and
    state_dict keys).

    The nearest code is found by :func:`fastlatent.ops.nearest_code` (no N x K distance matrix;
    all heads with separate codebooks in one launch), the EMA statistics by
    :func:`fastlatent.ops.code_stats` and applied by :func:`fastlatent.ops.ema_update_`.

    Args (as vector-quantize-pytorch; the less common ones in the README table):
        dim: feature size of the input. codebook_size: ``K``. codebook_dim: size of the codes (the
            input is projected to ``heads * codebook_dim`` and back when that differs from ``dim``).
        heads: split every vector into ``heads`` sub-vectors, each quantised; indices gain a last
            axis of size ``heads``. separate_codebook_per_head: one codebook per head.
        decay, eps: EMA decay and Laplace smoothing of the cluster sizes.
        kmeans_init, kmeans_iters: initialise the codebook by k-means on the first training batch.
        use_cosine_sim: quantise by cosine similarity (inputs and codes l2-normalised).
        threshold_ema_dead_code: codes whose EMA cluster size falls below this are re-seeded from
            rows of the current batch (0 disables it). Codes holding NaN/Inf are re-seeded too.
        channel_last / accept_image_fmap / accept_3d_fmap: input ``[..., dim]``; or channel-first
            ``[B, dim, N]`` (also ``[B, dim, *spatial]``); ``[B, dim, H, W]``; ``[B, dim, T, H, W]``.
        commitment_weight: weight of ``mse(x, sg(q))`` (``mse(x, q)`` with a learnable codebook).
        commitment_use_cross_entropy_loss: commitment as cross-entropy over the code logits.
        orthogonal_reg_weight (+ _active_codes_only, _max_codes): codebook orthogonality loss.
        codebook_diversity_loss_weight, codebook_diversity_temperature: minus the entropy of the
            batch-averaged code distribution.
        stochastic_sample_codes, sample_codebook_temp: in training, draw codes by Gumbel-max over
            ``logits / temperature`` (logits: minus the Euclidean distance, or the cosine similarity).
        straight_through: Gumbel straight-through gradient. rotation_trick: rotation-trick gradient
            (default: on when ``dim > 1``). directional_reparam: DiVeQ gradient.
        learnable_codebook, ema_update, manual_ema_update, freeze_codebook, in_place_codebook_optimizer,
            affine_param, sync_update_v, vq_bridge: codebook learning, as vector-quantize-pytorch.
        sync_codebook: all-reduce the EMA statistics over ``torch.distributed`` (default: when a
            process group with more than one process is initialised).
        deterministic: bitwise-reproducible EMA statistics on CUDA (sorted reduction); the CPU always is.

    ``forward(x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
    freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
    ema_update_weight=None, accum_ema_update=False, ema_update=None, return_stats=False)`` returns
    ``(quantized, indices, loss)`` (plus a :class:`LossBreakdown` with ``return_loss_breakdown``,
    or a :class:`VQStats` with ``return_stats``); with ``indices`` given, ``(quantized, ce_loss)``.

    Rows holding NaN or Inf are quantised (to code 0) but kept out of the EMA statistics, the
    k-means initialisation and dead-code re-seeding; they are counted in
    ``_codebook.num_nonfinite_rows`` (and :class:`VQStats`) with a warning the first time.

    Differences from vector-quantize-pytorch: channel-first inputs may have any number of spatial
    dims; with ``mask`` and ``use_cosine_sim`` the commitment loss is taken against the normalised
    input (vector-quantize-pytorch uses the raw input there); k-means and dead-code re-seeding draw
    their random rows differently (same distribution).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: bool | None = None,
        sync_affine_param: bool = False,
        ema_update: bool | None = None,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable | None = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        deterministic: bool = True,
    ):
        super().__init__()
        name = "VectorQuantize"
        for arg, value in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be an int >= 1, got {value!r}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"{name}: codebook_dim must be None or an int >= 1, got {codebook_dim!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name}: decay must be in [0, 1], got {decay}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"{name}: threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        if not 0.0 <= sync_update_v <= 1.0:
            raise ValueError(f"{name}: sync_update_v must be in [0, 1], got {sync_update_v}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError(f"{name}: accept_image_fmap and accept_3d_fmap are exclusive")
        learnable_codebook = (
            (directional_reparam or vq_bridge is not None)
            if learnable_codebook is None
            else learnable_codebook
        )
        # vector-quantize-pytorch asks for ema_update=False next to learnable_codebook=True; here it follows.
        ema_update = (
            (not directional_reparam and vq_bridge is None and not learnable_codebook)
            if ema_update is None
            else ema_update
        )
        rotation_trick = (not directional_reparam and dim > 1) if rotation_trick is None else rotation_trick
        if sum(map(bool, (straight_through, rotation_trick, directional_reparam))) > 1:
            raise ValueError(
                f"{name}: at most one of straight_through, rotation_trick and directional_reparam; "
                "rotation_trick defaults to True, pass rotation_trick=False with the others"
            )
        if use_cosine_sim and learnable_codebook:
            raise ValueError(
                f"{name}: use_cosine_sim with learnable_codebook=True is not supported (as in "
                "vector-quantize-pytorch): use an EMA codebook, or l2 distance"
            )
        if directional_reparam and threshold_ema_dead_code == 0:
            raise ValueError(
                f"{name}: directional_reparam needs dead-code replacement: set threshold_ema_dead_code > 0"
            )
        if straight_through and learnable_codebook:
            raise ValueError(
                f"{name}: straight_through (Gumbel) can't be combined with learnable_codebook=True"
            )
        if ema_update and learnable_codebook:
            raise ValueError(
                f"{name}: a learnable codebook can't also be updated by EMA: pass ema_update=False"
            )
        if vq_bridge is not None and not learnable_codebook:
            raise ValueError(f"{name}: vq_bridge needs learnable_codebook=True")
        if sync_update_v > 0 and not learnable_codebook:
            raise ValueError(f"{name}: sync_update_v > 0 needs learnable_codebook=True")
        if affine_param and use_cosine_sim:
            raise ValueError(
                f"{name}: affine_param works with the Euclidean codebook only (use_cosine_sim=False)"
            )

        self.dim, self.heads, self.separate_codebook_per_head = dim, heads, separate_codebook_per_head
        codebook_dim = codebook_dim or dim
        self.codebook_dim, self.codebook_size = codebook_dim, codebook_size
        codebook_input_dim = codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        if self.has_projections:
            linear = nn.Linear(dim, codebook_input_dim)
            self.project_in = (
                nn.Sequential(linear, nn.LayerNorm(codebook_input_dim))
                if layernorm_after_project_in
                else linear
            )
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self.decay, self.eps = decay, eps
        self.kmeans_iters, self.sync_kmeans = kmeans_iters, sync_kmeans
        self.use_cosine_sim = use_cosine_sim
        self.metric = "cosine" if use_cosine_sim else "l2"
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = (
            channel_last,
            accept_image_fmap,
            accept_3d_fmap,
        )
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.stochastic_sample_codes, self.sample_codebook_temp = (
            stochastic_sample_codes,
            sample_codebook_temp,
        )
        self.straight_through, self.rotation_trick = straight_through, rotation_trick
        self.directional_reparam, self.directional_reparam_variance = (
            directional_reparam,
            directional_reparam_variance,
        )
        self.sync_codebook, self.sync_affine_param = sync_codebook, sync_affine_param
        self._ema_update, self.manual_ema_update = ema_update, manual_ema_update
        self.learnable_codebook = learnable_codebook
        self.affine_param = affine_param
        self.affine_param_batch_decay, self.affine_param_codebook_decay = (
            affine_param_batch_decay,
            affine_param_codebook_decay,
        )
        self.sync_update_v = sync_update_v
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.freeze_codebook = freeze_codebook
        self.deterministic = deterministic
        self._warned_nonfinite = False

        self._codebook = Codebook(
            codebook_dim,
            codebook_size,
            heads if separate_codebook_per_head else 1,
            kmeans_init,
            use_cosine_sim,
            learnable_codebook or self.has_codebook_orthogonal_loss,
        )
        self._codebook.vq_bridge = vq_bridge  # under _codebook, as vector-quantize-pytorch's state_dict
        # A Python flag mirrors _codebook.initted so that forward never reads the tensor on the host
        # (no sync, no graph break under torch.compile); state_dict loading refreshes it.
        self._needs_kmeans = bool(kmeans_init)
        self.register_load_state_dict_post_hook(VectorQuantize._after_load)
        self._register_load_state_dict_pre_hook(self._upgrade_old_keys)
        if affine_param:
            c = self._codebook.num_codebooks
            self._codebook.register_buffer("codebook_mean_needs_init", torch.tensor(True))
            self._codebook.register_buffer("codebook_mean", torch.empty(c, 1, codebook_dim))
            self._codebook.register_buffer("codebook_variance_needs_init", torch.tensor(True))
            self._codebook.register_buffer("codebook_variance", torch.empty(c, 1, codebook_dim))
            self._codebook.register_buffer("batch_mean", None)
            self._codebook.register_buffer("batch_variance", None)
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters())
            if in_place_codebook_optimizer is not None
            else None
        )
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

    # ------------------------------------------------------------------ attributes user code reaches for

    @property
    def ema_update(self) -> bool:
        return self._ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """``[K, D]`` (``[heads, K, D]`` with separate codebooks per head)."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self._codebook.embed.copy_(codes if self.separate_codebook_per_head else codes[None])

    # Views kept for code written against earlier fastlatent releases ([K, D] / [K]).
    @property
    def embed(self) -> torch.Tensor:
        return self.codebook

    @property
    def cluster_size(self) -> torch.Tensor:
        sizes = self._codebook.cluster_size
        return sizes if self.separate_codebook_per_head else sizes[0]

    @property
    def embed_sum(self) -> torch.Tensor:
        sums = self._codebook.embed_avg
        return sums if self.separate_codebook_per_head else sums[0]

    @property
    def initted(self) -> torch.Tensor:
        return self._codebook.initted

    def _upgrade_old_keys(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of earlier fastlatent releases: embed [K, D], cluster_size [K], embed_sum [K, D]
        # and initted at top level; vector-quantize-pytorch's layout has them under _codebook, [C, ...].
        renames = {
            "embed": ("_codebook.embed", 2),
            "cluster_size": ("_codebook.cluster_size", 1),
            "embed_sum": ("_codebook.embed_avg", 2),
            "initted": ("_codebook.initted", 0),
        }
        for old, (new, old_dims) in renames.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                value = state_dict.pop(prefix + old)
                state_dict[prefix + new] = value[None] if old_dims and value.dim() == old_dims else value

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module._needs_kmeans = not bool(module._codebook.initted)

    # ------------------------------------------------------------------ layout

    def _to_rows(self, x: torch.Tensor, mask: torch.Tensor | None):
        """x -> ([B, N, dim], restore, mask) where restore maps [B, N, ...] results back."""
        name = type(self).__name__
        if x.dim() == 2:  # one token per batch element: [B, dim]
            if x.shape[-1] != self.dim:
                raise ValueError(f"{name}: expected x of shape [..., {self.dim}], got {list(x.shape)}")
            if mask is not None:
                raise ValueError(
                    f"{name}: mask needs a sequence input [B, N, {self.dim}]; x is {list(x.shape)}"
                )
            return x[:, None], (lambda t, keep_last=True: t[:, 0]), None
        fmap = self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last
        if not fmap:
            if x.shape[-1] != self.dim:
                raise ValueError(f"{name}: expected x of shape [..., {self.dim}], got {list(x.shape)}")
            lead = x.shape[:-1]
            rows = x.reshape(lead[0], -1, self.dim) if x.dim() != 3 else x
            if mask is not None and x.dim() != 3:
                raise ValueError(f"{name}: mask needs x of shape [B, N, {self.dim}], got {list(x.shape)}")
            return rows, (lambda t, keep_last=True: t.reshape(lead + t.shape[2:])), mask
        want = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        layout = (
            f"[B, {self.dim}, H, W]"
            if self.accept_image_fmap
            else f"[B, {self.dim}, T, H, W]"
            if self.accept_3d_fmap
            else f"[B, {self.dim}, *spatial]"
        )
        if (want is not None and x.dim() != want) or x.dim() < 3 or x.shape[1] != self.dim:
            raise ValueError(f"{name}: expected channel-first x of shape {layout}, got {list(x.shape)}")
        if mask is not None and (self.accept_image_fmap or self.accept_3d_fmap):
            raise ValueError(
                f"{name}: mask is not supported with accept_image_fmap/accept_3d_fmap (as in "
                "vector-quantize-pytorch): pass [B, dim, N] with channel_last=False"
            )
        spatial = x.shape[2:]
        rows = x.flatten(2).transpose(1, 2)

        def restore(t, channel_first=True):
            t = t.reshape(t.shape[:1] + spatial + t.shape[2:])
            return t.movedim(-1, 1) if channel_first else t

        return rows, restore, mask

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H*d] -> [C, M, d] rows per codebook."""
        b, n, _ = x.shape
        h, d = self.heads, self.codebook_dim
        if h == 1:
            return x.reshape(1, b * n, d)
        if self.separate_codebook_per_head:
            return x.reshape(b * n, h, d).transpose(0, 1)
        return x.reshape(1, b * n * h, d)

    def _merge_heads(self, t: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """[C, M, ...] -> [B, N, (H ...)] (indices: [B, N, H] for several heads, else [B, N])."""
        h = self.heads
        if h == 1:
            return t.reshape((b, n) + t.shape[2:])
        if self.separate_codebook_per_head:
            t = t.transpose(0, 1)
        return t.reshape((b, n, h) + t.shape[2:])

    def _row_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, N] -> [M] validity of the rows of every codebook."""
        if mask is None:
            return None
        flat = mask.reshape(-1)
        return (
            flat.repeat_interleave(self.heads)
            if self.heads > 1 and not self.separate_codebook_per_head
            else flat
        )

    # ------------------------------------------------------------------ codebook maintenance

    def _syncing(self) -> bool:
        return _distributed() if self.sync_codebook is None else (self.sync_codebook and _distributed())

    def _all_reduce(self, *tensors: torch.Tensor, op=None) -> None:
        if self._syncing():
            for t in tensors:
                dist.all_reduce(t) if op is None else dist.all_reduce(t, op=op)

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self._syncing():
            dist.broadcast(t, src=0)
        return t

    def _smoothed_codes(self) -> torch.Tensor:
        cb = self._codebook
        sizes = cb.cluster_size
        total = sizes.sum(-1, keepdim=True)
        smoothed = (sizes + self.eps) / (total + self.codebook_size * self.eps) * total
        codes = cb.embed_avg / smoothed[..., None]
        return _l2norm(codes) if self.use_cosine_sim else codes

    @torch.no_grad()
    def _init_with_kmeans(self, flat: torch.Tensor, usable: torch.Tensor) -> None:
        cb = self._codebook
        for c in range(flat.shape[0]):
            rows = flat[c][usable[c]] if usable is not None else flat[c]
            if rows.shape[0] == 0:
                raise ValueError(
                    f"{type(self).__name__}(kmeans_init=True): the first training batch has no valid "
                    "rows to initialise the codebook from (empty input, an all-False mask, or only "
                    "NaN/Inf rows): run a batch with data first, or pass kmeans_init=False"
                )
            sync = self._syncing() and self.sync_kmeans
            centres, counts = kmeans(
                rows,
                self.codebook_size,
                self.kmeans_iters,
                init="random",
                metric=self.metric,
                all_reduce=dist.all_reduce if sync else None,
            )
            if self._syncing():
                centres, counts = self._broadcast(centres.contiguous()), self._broadcast(counts.contiguous())
            cb.embed_avg[c].copy_(centres * counts[:, None])
            cb.cluster_size[c].copy_(counts)
        cb.embed.data.copy_(self._smoothed_codes().to(cb.embed.dtype))
        cb.initted.fill_(True)
        self._needs_kmeans = False

    @torch.no_grad()
    def _replace_dead_codes(self, flat: torch.Tensor, usable: torch.Tensor | None) -> None:
        """Re-seed codes whose EMA size fell below the threshold, and codes holding NaN/Inf, from
        distinct random usable rows of this batch (a random subset of the dead codes when there are
        fewer rows than dead codes; the rest wait for later batches)."""
        cb = self._codebook
        bad = ~torch.isfinite(cb.embed.detach()).all(-1)
        cb.num_nonfinite_codes.copy_(bad.sum())
        if self.threshold_ema_dead_code <= 0:
            self._reseed_nonfinite_codes(flat, bad)
            return
        dead = bad | (cb.cluster_size < self.threshold_ema_dead_code)
        if not bool(dead.any()):  # one host sync per training step, only with the option on
            return
        reset = self.threshold_ema_dead_code
        for c in range(flat.shape[0]):
            rows = flat[c][usable[c]] if usable is not None else flat[c]
            num_dead = int(dead[c].sum())
            count = torch.tensor([min(num_dead, rows.shape[0])], device=rows.device)
            self._all_reduce(count, op=dist.ReduceOp.MIN)  # processes must agree on how many and which
            count = int(count)
            if count == 0:
                continue
            which = dead[c].nonzero(as_tuple=True)[0]
            if count < num_dead:
                which = which[
                    self._broadcast(torch.randperm(num_dead, device=which.device)[:count].contiguous())
                ]
            samples = rows[torch.randperm(rows.shape[0], device=rows.device)[:count]].float()
            if self.use_cosine_sim:
                samples = _l2norm(samples)
            samples = self._broadcast(samples.contiguous())
            cb.embed.data[c, which] = samples.to(cb.embed.dtype)
            cb.cluster_size[c, which] = reset
            cb.embed_avg[c, which] = samples * reset

    @torch.no_grad()
    def _reseed_nonfinite_codes(self, flat: torch.Tensor, bad: torch.Tensor) -> None:
        """Without dead-code replacement, codes holding NaN/Inf (a bad checkpoint, an fp16 overflow)
        are still re-seeded: from evenly spaced rows of the batch, with no host sync and no random
        draw (torch.compile-friendly; seeded runs keep their random stream)."""
        cb = self._codebook
        _c, m, _ = flat.shape
        if m == 0:
            return
        k = self.codebook_size
        pick = torch.arange(k, device=flat.device) * m // k
        samples = torch.nan_to_num(flat[:, pick], nan=0.0, posinf=0.0, neginf=0.0)
        if self.use_cosine_sim:
            samples = _l2norm(samples)
        where = bad[..., None]
        cb.embed.data.copy_(torch.where(where, samples.to(cb.embed.dtype), cb.embed.data))
        cb.embed_avg.copy_(torch.where(where, samples, cb.embed_avg))
        cb.cluster_size.copy_(torch.where(bad, torch.ones_like(cb.cluster_size), cb.cluster_size))

    @torch.no_grad()
    def _track_stats(self, flat: torch.Tensor, indices: torch.Tensor, weight, accum: bool) -> None:
        """Per-code counts and sums of this batch into the EMA statistics (indices -1 are skipped)."""
        cb = self._codebook
        c, m, d = flat.shape
        k = self.codebook_size
        if c == 1:
            counts, sums = code_stats(flat[0], indices[0], k, self.deterministic)
            counts, sums = counts[None], sums[None]
        else:  # every codebook's statistics in one pass: code c*K + k
            offset = torch.arange(c, device=indices.device)[:, None] * k
            shifted = torch.where(indices >= 0, indices + offset, -1)
            counts, sums = code_stats(flat.reshape(c * m, d), shifted.reshape(-1), c * k, self.deterministic)
            counts, sums = counts.view(c, k), sums.view(c, k, d)
        self._all_reduce(counts, sums)
        if callable(weight):
            weight = weight(sums, counts)
        if accum:  # accumulated in .grad, folded into the next EMA step (as vector-quantize-pytorch)
            for buffer, new in ((cb.cluster_size, counts), (cb.embed_avg, sums)):
                buffer.grad = new.clone() if buffer.grad is None else buffer.grad + new
            return None
        pending = [(cb.cluster_size, counts), (cb.embed_avg, sums)]
        for buffer, new in pending:
            if buffer.grad is not None:
                new.add_(buffer.grad)
                buffer.grad = None
        if weight is None and not self.manual_ema_update:
            return counts, sums
        rate = (1.0 - self.decay) if weight is None else (1.0 - self.decay) * self._ema_weight(weight)
        cb.cluster_size.lerp_(counts, rate)
        cb.embed_avg.lerp_(sums, rate if not torch.is_tensor(rate) else rate[..., None])
        return None

    def _ema_weight(self, weight) -> torch.Tensor:
        weight = torch.as_tensor(weight, dtype=torch.float32, device=self._codebook.cluster_size.device)
        if weight.dim() == 1:
            weight = weight[None]
        if weight.dim() == 0:
            return weight
        if weight.shape != self._codebook.cluster_size.shape:
            raise ValueError(
                f"{type(self).__name__}: ema_update_weight must be a scalar, [K] or [C, K] = "
                f"{list(self._codebook.cluster_size.shape)}, got {list(weight.shape)}"
            )
        return weight

    @torch.no_grad()
    def _update_codebook(self, flat, indices, usable, weight=None, accum=False, ema_update=None) -> None:
        ema_update = self._ema_update if ema_update is None else ema_update
        if not ema_update and self.threshold_ema_dead_code <= 0:
            self._replace_dead_codes(flat, usable)  # codes holding NaN/Inf only (no host sync)
            return
        cb = self._codebook
        stats_indices = indices if usable is None else indices.masked_fill(~usable, -1)
        if self.affine_param and cb.batch_mean is not None:  # statistics in the codebook's frame
            codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
            batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
            flat = ((flat - cb.batch_mean) * (codebook_std / batch_std) + cb.codebook_mean).float()
        fused = self._track_stats(flat, stats_indices, weight, accum)
        if accum:
            return
        if ema_update and not self.manual_ema_update:
            if fused is not None:
                counts, sums = fused
                for c in range(flat.shape[0]):
                    ema_update_(
                        cb.cluster_size[c],
                        cb.embed_avg[c],
                        cb.embed.data[c],
                        counts[c].contiguous(),
                        sums[c].contiguous(),
                        self.decay,
                        self.eps,
                    )
                if self.use_cosine_sim:
                    cb.embed.data.copy_(_l2norm(cb.embed.data))
            else:
                self.update_ema()
        elif fused is not None:  # statistics only (dead-code tracking without EMA codebook moves)
            counts, sums = fused
            cb.cluster_size.lerp_(counts, 1.0 - self.decay)
            cb.embed_avg.lerp_(sums, 1.0 - self.decay)
        self._replace_dead_codes(flat, usable)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Recompute the codes from the EMA statistics (with ``manual_ema_update=True``)."""
        cb = self._codebook
        cb.embed.data.copy_(self._smoothed_codes().to(cb.embed.dtype))

    @torch.no_grad()
    def _update_affine(self, flat: torch.Tensor, usable: torch.Tensor | None) -> None:
        cb = self._codebook

        def blend(name, value, decay):
            old = getattr(cb, name)
            needs = getattr(cb, name + "_needs_init", None)
            if old is None or (needs is not None and bool(needs)):
                setattr(cb, name, value.detach().clone())
                if needs is not None:
                    needs.fill_(False)
                return
            setattr(cb, name, old * decay + value.detach() * (1 - decay))

        embed = cb.embed.detach().float()
        if self.training:
            blend("codebook_mean", embed.mean(1, keepdim=True), self.affine_param_codebook_decay)
            blend(
                "codebook_variance",
                embed.var(1, unbiased=False, keepdim=True),
                self.affine_param_codebook_decay,
            )
        data = flat if usable is None else torch.stack([flat[c][usable[c]] for c in range(flat.shape[0])])
        if self.sync_affine_param and _distributed():
            n = torch.tensor(float(data.shape[1]), device=data.device)
            dist.all_reduce(n)
            total = data.sum(1, keepdim=True)
            dist.all_reduce(total)
            mean = total / n
            var = (data - mean).pow(2).sum(1, keepdim=True)
            dist.all_reduce(var)
            blend("batch_mean", mean, self.affine_param_batch_decay)
            blend("batch_variance", var / n, self.affine_param_batch_decay)
        else:
            blend("batch_mean", data.mean(1, keepdim=True), self.affine_param_batch_decay)
            blend("batch_variance", data.var(1, unbiased=False, keepdim=True), self.affine_param_batch_decay)

    def _affine_codes(self, embed: torch.Tensor) -> torch.Tensor:
        cb = self._codebook
        codebook_std = cb.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = cb.batch_variance.clamp(min=1e-5).sqrt()
        return (embed - cb.codebook_mean) * (batch_std / codebook_std) + cb.batch_mean

    # ------------------------------------------------------------------ search

    def _search(self, flat: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Nearest code per row: ``flat [C, M, D]``, ``embed [C, K, D]`` -> ``[C, M]``; one launch."""
        x, codes = flat.detach().float(), embed.detach().float()
        if x.shape[0] == 1:
            return nearest_code(x[0], codes[0], self.metric)[0][None]
        return nearest_code(x, codes, self.metric)[0]  # every head's codebook in one batched search

    def _logits(self, flat: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        return _neg_distances(flat, embed, self.use_cosine_sim)

    def _sample(self, flat: torch.Tensor, embed: torch.Tensor, temperature: float) -> torch.Tensor:
        """Gumbel-max over ``logits / temperature`` fused into the search
        (:func:`fastlatent.ops.sample_code`): nothing N x K is stored, every head in one call. The
        Philox seed comes from torch's default generator, so :func:`torch.manual_seed` repeats a run;
        the draws follow vector-quantize-pytorch's distribution, not its random stream."""
        x, codes = flat.detach().float(), embed.detach().float()
        if torch.compiler.is_compiling():
            # the op's Philox seed is read from torch's generator on the host, which a compiled graph
            # cannot do: the same distribution in row blocks of plain PyTorch keeps fullgraph=True working
            parts = []
            for start, stop in _row_chunks(x.shape[1], self.codebook_size):
                logits = self._logits(x[:, start:stop], codes)
                parts.append(_gumbel_perturbed(logits, temperature).argmax(-1))
            return torch.cat(parts, dim=1)
        if x.shape[0] == 1:
            return sample_code(x[0], codes[0], temperature, metric=self.metric)[None]
        return sample_code(x, codes, temperature, metric=self.metric)

    # ------------------------------------------------------------------ public helpers

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (before ``project_out``) for ``indices`` as returned by forward; index -1 gives zeros."""
        embed = self._codebook.embed
        valid = indices >= 0
        idx = indices.clamp_min(0)
        if self.heads == 1 or not self.separate_codebook_per_head:
            codes = F.embedding(idx, embed[0]) * valid[..., None]
            if self.heads > 1:
                codes = codes.flatten(-2)
        else:
            heads = [F.embedding(idx[..., h], embed[h]) * valid[..., h, None] for h in range(self.heads)]
            codes = torch.cat(heads, dim=-1)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes projected out for ``indices``; channel-first layouts come back channel-first."""
        codes = self.get_codes_from_indices(indices)
        if not self.has_projections:
            return codes
        channel_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
        if channel_first:
            return self.project_out(codes.movedim(1, -1)).movedim(-1, 1)
        return self.project_out(codes)

    indices_to_codes = get_output_from_indices

    def update_in_place_optimizer(self) -> None:
        opt = self.in_place_codebook_optimizer
        if opt is None:
            return
        if self._syncing():
            for param in self._codebook.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()

    def _prepare(self, x: torch.Tensor, mask=None):
        rows, restore, mask = self._to_rows(x, mask)
        b, n = rows.shape[:2]
        proj = self.project_in(rows)
        flat = self._codebook.transform_input(self._split_heads(proj))
        return rows, proj, flat, restore, mask, b, n

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Re-seed dead codes from ``x`` (already projected, ``[B, N, heads * codebook_dim]``)."""
        if not self.training:
            return
        flat = self._codebook.transform_input(self._split_heads(x))
        self._replace_dead_codes(flat.float(), None)

    @torch.no_grad()
    def update_indices(
        self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None
    ) -> None:
        """EMA update of the codebook from ``x`` and the given ``indices`` (shape as forward returns)."""
        _, _, flat, _, mask, b, n = self._prepare(x, mask)
        idx = indices.reshape(b, n, self.heads) if self.heads > 1 else indices.reshape(b, n)
        if self.heads > 1:
            idx = (
                idx.permute(2, 0, 1).reshape(self.heads, -1)
                if self.separate_codebook_per_head
                else idx.reshape(1, -1)
            )
        else:
            idx = idx.reshape(1, -1)
        row_mask = self._row_mask(mask)
        usable = torch.isfinite(flat).all(-1)
        if row_mask is not None:
            usable = usable & row_mask
        self._update_codebook(flat.float(), idx.long(), usable)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable | None = None,
        ema_update_weight=None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
        return_stats: bool = False,
    ):
        name = type(self).__name__
        if mask is not None and lens is not None:
            raise ValueError(f"{name}: pass either mask or lens, not both")
        if lens is not None:
            mask = _lens_to_mask(lens, x.shape[1])
        if mask is not None and (
            mask.dtype != torch.bool
            or x.dim() < 3
            or tuple(mask.shape) != (x.shape[0], x.shape[1] if self.channel_last else x.shape[2])
        ):
            expect = (
                [x.shape[0], x.shape[1] if self.channel_last else x.shape[-1]] if x.dim() >= 2 else "[B, N]"
            )
            raise ValueError(
                f"{name}: mask must be a bool tensor of shape {expect} (batch, tokens), "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        if topk is not None:
            topk = min(int(topk), self.codebook_size)
            if (
                topk < 1
                or self.heads != 1
                or (
                    self.training
                    and (self.commitment_use_cross_entropy_loss or self.in_place_codebook_optimizer)
                )
            ):
                raise ValueError(
                    f"{name}: topk must be >= 1 and needs heads=1 (and, in training, no "
                    "commitment_use_cross_entropy_loss or in_place_codebook_optimizer)"
                )
        if codebook_transform_fn is not None and self.heads > 1 and self.separate_codebook_per_head:
            raise ValueError(
                f"{name}: codebook_transform_fn needs a single codebook (separate_codebook_per_head=False)"
            )
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        ema_update = self._ema_update if ema_update is None else ema_update
        input_requires_grad = x.requires_grad
        dtype = x.dtype

        rows, _proj, flat, restore, mask, b, n = self._prepare(x, mask)
        cb = self._codebook
        row_mask = self._row_mask(mask)
        c, m, d = flat.shape
        flat32 = flat.float()

        # Rows with NaN/Inf are searched (they map to code 0) but never reach the codebook statistics.
        usable = None
        if self.training:
            finite = torch.isfinite(flat32).all(-1)
            bad_rows = (~finite).sum() if row_mask is None else (~finite & row_mask).sum()
            cb.num_nonfinite_rows.add_(bad_rows)
            usable = finite if row_mask is None else finite & row_mask
            if not self._warned_nonfinite and not torch.compiler.is_compiling() and bool(bad_rows):
                self._warned_nonfinite = True
                warnings.warn(
                    f"{name}: the input holds NaN/Inf rows; they are quantised to code 0 and kept out "
                    "of the codebook statistics (count in _codebook.num_nonfinite_rows)",
                    stacklevel=2,
                )
            if self._needs_kmeans:
                self._init_with_kmeans(flat32.detach(), usable)
            if self.affine_param:
                self._update_affine(flat32.detach(), usable)

        def current_codes() -> torch.Tensor:
            codes = (cb.embed if cb.learnable else cb.embed.detach()).float()
            if cb.vq_bridge is not None:
                codes = cb.vq_bridge(codes)
            if self.affine_param and cb.batch_mean is not None:
                codes = self._affine_codes(codes)
            return codes

        embed = current_codes()

        # ---- choose codes
        transformed = None
        if codebook_transform_fn is not None:
            transformed = codebook_transform_fn(embed)  # [1, B, N, K, D]: a codebook per token
            transformed = transformed.reshape(1, m, self.codebook_size, d)
            if self.use_cosine_sim:
                transformed = _l2norm(transformed)
        stochastic = self.training and self.stochastic_sample_codes and temperature > 0
        needs_logits = (
            (self.training and (self.straight_through and temperature > 0))
            or topk is not None
            or indices is not None
            or (
                self.training
                and (
                    self.has_codebook_diversity_loss
                    or (self.has_commitment_loss and self.commitment_use_cross_entropy_loss)
                )
            )
        )

        def logits_of(rows_slice, sl=slice(None)):
            if transformed is None:
                return self._logits(rows_slice, embed)
            codes = transformed[:, sl]
            if self.use_cosine_sim:
                return (rows_slice[..., None, :] * codes).sum(-1)
            return -F.pairwise_distance(rows_slice[..., None, :], codes)

        if transformed is not None:
            with torch.no_grad():
                logits = logits_of(flat32)
                if stochastic:
                    logits = _gumbel_perturbed(logits, temperature)
                if topk is not None:
                    embed_ind = logits.topk(topk, dim=-1).indices
                else:
                    embed_ind = logits.argmax(-1)
        elif topk is not None:
            parts = []
            for start, stop in _row_chunks(m, self.codebook_size):
                with torch.no_grad():
                    lg = self._logits(flat32[:, start:stop], embed)
                    if stochastic:
                        lg = _gumbel_perturbed(lg, temperature)
                parts.append(lg.topk(topk, dim=-1).indices)
            embed_ind = torch.cat(parts, dim=1)
        elif stochastic:
            embed_ind = self._sample(flat32, embed, temperature)
        else:
            embed_ind = self._search(flat32, embed)

        def gather(ind):
            if transformed is not None:
                if ind.dim() == 2:
                    return transformed.gather(2, ind[..., None, None].expand(1, m, 1, d))[:, :, 0]
                return transformed.gather(2, ind[..., None].expand(1, m, ind.shape[-1], d))
            if c == 1:
                return F.embedding(ind[0], embed[0])[None]
            return torch.stack([F.embedding(ind[i], embed[i]) for i in range(c)])

        quantize = gather(embed_ind)

        if self.training and self.straight_through and temperature > 0 and topk is None:
            # Gumbel straight-through: softmax(logits / T) carries the gradient (an N x K matrix, by design)
            parts = []
            for start, stop in _row_chunks(m, self.codebook_size):
                probs = (logits_of(flat32[:, start:stop], slice(start, stop)) / temperature).softmax(-1)
                soft = (
                    probs @ embed
                    if transformed is None
                    else (probs[..., None] * transformed[:, start:stop]).sum(-2)
                )
                parts.append(soft - soft.detach())
            quantize = quantize + torch.cat(parts, dim=1)

        # ---- in-place codebook optimiser (one step, then quantise again)
        inplace_loss = zero = flat32.new_zeros(())
        if self.in_place_codebook_optimizer is not None and self.training and not freeze:
            target = flat32.detach()
            if row_mask is not None:
                inplace_loss = F.mse_loss(quantize[:, row_mask], target[:, row_mask])
            else:
                inplace_loss = F.mse_loss(quantize, target)
            inplace_loss.backward()
            if not self.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            embed = current_codes()  # the codes after the optimiser step
            embed_ind = self._search(flat32, embed)
            quantize = gather(embed_ind)
            inplace_loss = inplace_loss.detach()
            update_usage = False
        else:
            update_usage = True

        if self.training and update_usage and not freeze and topk is None:
            if (
                needs_logits and not cb.learnable
            ):  # the losses below see the codes before this step's EMA move
                embed = embed.clone()
            self._update_codebook(
                flat32.detach(), embed_ind, usable, ema_update_weight, accum_ema_update, ema_update
            )

        quantize = quantize.to(dtype)
        flat_in = flat
        if topk is not None:
            flat_in = flat[..., None, :].expand(c, m, topk, d)

        commit_quantize = plain_quantize = quantize
        if self.training:
            if not self.learnable_codebook or freeze:
                commit_quantize = quantize.detach()
            if input_requires_grad and self.route_gradients_to_input:
                if self.rotation_trick:
                    quantize = rotate_to(flat_in, quantize)
                elif self.directional_reparam:
                    quantize = directional_reparam(flat_in, quantize, self.directional_reparam_variance)
                else:
                    quantize = flat_in + (quantize - flat_in).detach()
            if self.sync_update_v > 0:
                quantize = quantize + self.sync_update_v * (quantize - quantize.detach())

        def ce_loss(codes: torch.Tensor) -> torch.Tensor:
            """Cross-entropy of the code logits against ``codes`` [C, M] (-1 ignored), row-chunked."""
            total, count = flat32.new_zeros(()), 0
            for start, stop in _row_chunks(m, self.codebook_size):
                lg = logits_of(flat32[:, start:stop], slice(start, stop))
                target = codes[:, start:stop]
                total = total + F.cross_entropy(
                    lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=-1, reduction="sum"
                )
                count += int((target >= 0).sum()) if target.numel() else 0
            return total / max(count, 1) if count else total * float("nan")

        if indices is not None:
            given = indices.reshape(b, n, self.heads) if self.heads > 1 else indices.reshape(b, n)
            if self.heads > 1:
                given = (
                    given.permute(2, 0, 1).reshape(c, -1)
                    if self.separate_codebook_per_head
                    else given.reshape(1, -1)
                )
            else:
                given = given.reshape(1, -1)
            out = self._finish(quantize, b, n, restore, rows, mask)
            return out, ce_loss(given.long())

        commit_loss = diversity_loss = orthogonal_reg_loss = zero
        loss = zero.clone()
        if self.training and not torch.compiler.is_compiling():
            loss.requires_grad_()  # as vector-quantize-pytorch: backward() works with no loss term on
        if topk is not None and not self.training:
            per = (quantize.float() - flat_in.float()).pow(2).mean(-1)  # [C, M, k]
            commit_loss = per
            loss = per * self.commitment_weight if self.has_commitment_loss else per

        if self.training:
            if self.has_codebook_diversity_loss:
                # vector-quantize-pytorch averages the code distribution over batch (and heads) per
                # sequence position, then takes the mean entropy over positions
                per_head = self.heads if self.heads > 1 and not self.separate_codebook_per_head else 1
                avg = torch.zeros(n, self.codebook_size, device=flat.device)
                for start, stop in _row_chunks(m, self.codebook_size):
                    prob = (
                        logits_of(flat32[:, start:stop], slice(start, stop))
                        * self.codebook_diversity_temperature
                    ).softmax(-1)
                    position = (
                        torch.div(
                            torch.arange(start, stop, device=flat.device), per_head, rounding_mode="floor"
                        )
                        % n
                    )
                    avg = avg.index_add(0, position, prob.sum(0))
                avg = avg / (c * b * per_head)
                diversity_loss = -(-avg * torch.log(avg.clamp_min(1e-5))).sum(-1).mean()
                loss = loss + diversity_loss * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    targets = embed_ind if row_mask is None else embed_ind.masked_fill(~row_mask, -1)
                    commit_loss = ce_loss(targets)
                elif topk is not None:
                    commit_loss = (commit_quantize.float() - flat_in.float()).pow(2).mean(-1)
                    if row_mask is not None:
                        commit_loss = commit_loss * row_mask[None, :, None]
                elif row_mask is not None:
                    commit_loss = F.mse_loss(commit_quantize[:, row_mask], flat[:, row_mask].to(dtype))
                else:
                    commit_loss = F.mse_loss(commit_quantize, flat.to(dtype))
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                codebook = cb.embed
                if self.orthogonal_reg_active_codes_only:
                    if c > 1:
                        raise ValueError(
                            f"{name}: orthogonal_reg_active_codes_only does not support separate "
                            "codebooks per head (as vector-quantize-pytorch)"
                        )
                    codebook = codebook[:, torch.unique(embed_ind)]
                num_codes = codebook.shape[-2]
                if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
                    codebook = codebook[
                        :, torch.randperm(num_codes, device=codebook.device)[: self.orthogonal_reg_max_codes]
                    ]
                orthogonal_reg_loss = orthogonal_loss(codebook)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight

        # ---- outputs in the input's layout
        if topk is not None:
            ind = embed_ind[0].reshape(b, n, topk)
            q_rows = quantize[0].reshape(b, n, topk, d)
        else:
            ind = self._merge_heads(embed_ind, b, n)
            q_rows = self._merge_heads(quantize, b, n)
            if self.heads > 1:
                q_rows = q_rows.flatten(-2)
        q_rows = self.project_out(q_rows)
        if mask is not None:
            keep = mask.reshape(mask.shape + (1,) * (q_rows.dim() - 2))
            fallback = (
                torch.zeros_like(q_rows)
                if self.return_zeros_for_masked_padding
                else rows.reshape(rows.shape[:2] + (1,) * (q_rows.dim() - 3) + rows.shape[-1:]).expand_as(
                    q_rows
                )
            )
            q_rows = torch.where(keep, q_rows, fallback)
            ind = ind.masked_fill(~mask.reshape(mask.shape + (1,) * (ind.dim() - 2)), -1)
        out = restore(q_rows)
        ind = restore(ind, False) if x.dim() != 2 else ind[:, 0]
        if topk is not None and loss.dim() > 1:
            loss = loss[0].reshape(b, n, topk)
            loss = restore(loss, False) if x.dim() != 2 else loss[:, 0]
        if return_stats:
            valid_ind = embed_ind if usable is None else embed_ind.masked_fill(~usable, -1)
            counts = torch.zeros(self.codebook_size, device=flat.device)
            for i in range(c):  # this batch's histogram over every head
                counts += torch.bincount(
                    valid_ind[i].clamp_min(0),
                    weights=(valid_ind[i] >= 0).float(),
                    minlength=self.codebook_size,
                )[: self.codebook_size]
            perplexity, used = _usage(counts)
            q_rows, x_rows = plain_quantize.detach().float(), flat32.detach()
            if row_mask is not None:
                q_rows, x_rows = q_rows[:, row_mask], x_rows[:, row_mask]
            measured = (
                F.mse_loss(q_rows, x_rows) if q_rows.numel() else zero
            )  # unweighted, as VQStats documents
            codebook_loss = measured if self.learnable_codebook else zero
            stats = VQStats(measured, codebook_loss, perplexity, used, cb.num_nonfinite_rows.clone())
            return out, ind, loss, stats
        if return_loss_breakdown:
            return (
                out,
                ind,
                loss,
                LossBreakdown(commit_loss, diversity_loss, orthogonal_reg_loss, inplace_loss),
            )
        return out, ind, loss

    def _finish(self, quantize, b, n, restore, rows, mask):
        q_rows = self._merge_heads(quantize, b, n)
        if self.heads > 1:
            q_rows = q_rows.flatten(-2)
        q_rows = self.project_out(q_rows)
        if mask is not None:
            fallback = torch.zeros_like(q_rows) if self.return_zeros_for_masked_padding else rows
            q_rows = torch.where(mask[..., None], q_rows, fallback)
        return restore(q_rows)

    @torch.no_grad()
    def usage(self) -> dict:
        """Codebook usage from the EMA cluster sizes: perplexity and fraction of live codes."""
        sizes = self._codebook.cluster_size.clamp_min(0)
        perplexity, _ = _usage(sizes.sum(0))
        live = self._codebook.cluster_size >= max(self.threshold_ema_dead_code, 1e-3)
        return {
            "perplexity": float(perplexity),
            "codes_used": float(live.float().mean()),
            "nonfinite_rows": int(self._codebook.num_nonfinite_rows),
        }
