"""Vector-quantisation layers on the fused kernels: VectorQuantize and ResidualVQ.

Option names and defaults follow lucidrains/vector-quantize-pytorch, so switching is a
change of import for the common settings. Differences are listed in each class docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastlatent.ops import code_stats, ema_update_, kmeans, nearest_code


class VQStats(NamedTuple):
    """What a forward pass measured (returned with ``return_stats=True``)."""

    commitment_loss: torch.Tensor  # unweighted mean squared distance input -> code
    codebook_loss: torch.Tensor  # learnable codebooks only, else 0
    perplexity: torch.Tensor  # exp(entropy of this batch's code histogram)
    codes_used: torch.Tensor  # fraction of the codebook that this batch used


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def _usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class VectorQuantize(nn.Module):
    """Vector quantiser with an EMA (or learnable) codebook, on fused kernels.

    The nearest code is found by :func:`fastlatent.ops.nearest_code` (no N x K distance
    matrix), the EMA statistics by :func:`fastlatent.ops.code_stats` and applied by
    :func:`fastlatent.ops.ema_update_` (no one-hot matmul).

    Args:
        dim: feature size of the input.
        codebook_size: ``K``.
        codebook_dim: size of the codes; when it differs from ``dim`` the input is
            projected in (``nn.Linear``) and the output projected back out.
        decay, eps: EMA decay and Laplace smoothing of the cluster sizes.
        kmeans_init: initialise the codebook with k-means on the first training batch.
        kmeans_iters: Lloyd iterations for that initialisation.
        use_cosine_sim: quantise by cosine similarity on the unit sphere (inputs and codes
            l2-normalised).
        threshold_ema_dead_code: codes whose EMA cluster size falls below this are re-seeded
            from random vectors of the current batch (0 disables it).
        channel_last: input is ``[..., dim]``; ``False``: ``[B, dim, *spatial]`` (``[B, C, T]``,
            ``[B, C, H, W]``, ``[B, C, T, H, W]``). ``accept_image_fmap=True`` means the same
            as ``channel_last=False`` (vector-quantize-pytorch's name).
        commitment_weight: weight of ``mse(x, sg(quantized))`` in the returned loss.
        learnable_codebook: learn the codebook by gradient (adds ``mse(sg(x), quantized)``)
            instead of EMA.
        ema_update: update the codebook by EMA in training (default: not learnable).
        rotation_trick: gradient estimator through the quantiser: the rotation trick (default,
            as vector-quantize-pytorch) or, with ``False``, the straight-through estimator.
        sync_codebook: all-reduce the EMA statistics over ``torch.distributed`` (default: when
            a process group with more than one process is initialised).
        deterministic: bitwise-reproducible EMA statistics on CUDA (sorted reduction); the CPU
            always is.

    Returns from ``forward(x, mask=None, return_stats=False)``:
        ``(quantized, indices, loss)`` and, with ``return_stats=True``, a :class:`VQStats`.
        ``quantized`` has the shape of ``x``, ``indices`` (int64) its shape without the feature
        dim; ``loss`` is the weighted commitment (+ codebook) loss in training, 0 in eval.
        ``mask`` (``[B, N]`` bool, channel-last inputs) marks valid positions: padding gets
        index -1, zeros as output and no say in the EMA statistics or the loss.

    Differences from vector-quantize-pytorch: one head (no ``heads``/``separate_codebook_per_head``);
    no orthogonal/diversity regularisers, no stochastic sampling, no affine or in-place
    optimizer options; the statistics are returned as a :class:`VQStats` rather than a loss
    breakdown; dead-code replacement and k-means init run in the same process group as the EMA.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0.0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        commitment_weight: float = 1.0,
        learnable_codebook: bool = False,
        ema_update: bool | None = None,
        rotation_trick: bool = True,
        sync_codebook: bool | None = None,
        deterministic: bool = True,
    ):
        super().__init__()
        if dim < 1 or codebook_size < 1:
            raise ValueError(f"VectorQuantize: dim and codebook_size must be >= 1, got {dim} and {codebook_size}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"VectorQuantize: decay must be in [0, 1], got {decay}")
        ema_update = (not learnable_codebook) if ema_update is None else ema_update
        if ema_update and learnable_codebook:
            raise ValueError("VectorQuantize: a learnable codebook can't also be updated by EMA (ema_update=True)")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("VectorQuantize: use_cosine_sim with a learnable codebook is not supported")
        codebook_dim = codebook_dim or dim
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.decay, self.eps = decay, eps
        self.kmeans_iters = kmeans_iters
        self.use_cosine_sim = use_cosine_sim
        self.metric = "cosine" if use_cosine_sim else "l2"
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last = channel_last and not accept_image_fmap
        self.commitment_weight = commitment_weight
        self.learnable_codebook = learnable_codebook
        self.ema_update = ema_update
        self.rotation_trick = rotation_trick
        self.sync_codebook = sync_codebook
        self.deterministic = deterministic

        needs_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection else nn.Identity()

        embed = torch.empty(codebook_size, codebook_dim)
        nn.init.kaiming_uniform_(embed)
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed

    # ------------------------------------------------------------------ layout

    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
        """x -> [M, dim] rows, plus what _unflatten needs."""
        if self.channel_last:
            if x.shape[-1] != self.dim:
                raise ValueError(f"VectorQuantize: expected x of shape [..., {self.dim}], got {list(x.shape)}")
            return x.reshape(-1, self.dim), x.shape, -1
        if x.dim() < 3 or x.shape[1] != self.dim:
            raise ValueError(
                f"VectorQuantize: expected channel-first x of shape [B, {self.dim}, *spatial], got {list(x.shape)}")
        moved = x.movedim(1, -1)
        return moved.reshape(-1, self.dim), moved.shape, 1

    def _unflatten(self, rows: torch.Tensor, shape: tuple, channel_dim: int) -> torch.Tensor:
        out = rows.reshape(shape)
        return out if channel_dim == -1 else out.movedim(-1, 1)

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

    @torch.no_grad()
    def _init_with_kmeans(self, rows: torch.Tensor) -> None:
        sync = self._syncing()
        centres, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, init="random", metric=self.metric,
                                 all_reduce=dist.all_reduce if sync else None)
        # Each process samples its own start; take process 0's result everywhere.
        centres, counts = self._broadcast(centres.contiguous()), self._broadcast(counts.contiguous())
        self.embed.data.copy_(centres)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centres * counts[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _replace_dead_codes(self, rows: torch.Tensor) -> None:
        dead = self.cluster_size < self.threshold_ema_dead_code
        if not bool(dead.any()):  # one host sync per step, only with the option on
            return
        # Synced codebooks: `dead` is the same on every process (the EMA sizes are all-reduced); the
        # processes must also agree on how many codes to re-seed (their row counts can differ) and which.
        num_dead = int(dead.sum())
        count = torch.tensor([min(num_dead, rows.shape[0])], device=rows.device)
        self._all_reduce(count, op=dist.ReduceOp.MIN)
        count = int(count)
        if count == 0:
            return
        if count < num_dead:  # fewer rows than dead codes: re-seed a random subset now
            keep = self._broadcast(torch.randperm(num_dead, device=dead.device)[:count].contiguous())
            which = dead.nonzero(as_tuple=True)[0][keep]
            dead = torch.zeros_like(dead)
            dead[which] = True
        samples = rows[torch.randperm(rows.shape[0], device=rows.device)[:count]].float()
        if self.use_cosine_sim:
            samples = F.normalize(samples, dim=-1)
        samples = self._broadcast(samples.contiguous())
        self.embed.data[dead] = samples.to(self.embed.dtype)
        self.cluster_size[dead] = self.threshold_ema_dead_code
        self.embed_sum[dead] = samples * self.threshold_ema_dead_code

    @torch.no_grad()
    def _update_ema(self, rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        counts, sums = code_stats(rows, indices, self.codebook_size, self.deterministic)
        self._all_reduce(counts, sums)
        ema_update_(self.cluster_size, self.embed_sum, self.embed.data, counts, sums, self.decay, self.eps)
        if self.use_cosine_sim:
            self.embed.data.copy_(F.normalize(self.embed.data, dim=-1))
        return counts

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_stats: bool = False):
        rows, shape, channel_dim = self._flatten(x)
        rows = self.project_in(rows)
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1)
        if mask is not None:
            if not self.channel_last or mask.shape != x.shape[:-1] or mask.dtype != torch.bool:
                raise ValueError(f"VectorQuantize: mask must be a bool tensor of shape {list(x.shape[:-1])} "
                                 f"for channel-last input, got {mask.dtype} {list(mask.shape)}")
            valid = mask.reshape(-1)

        if self.training and not bool(self.initted):
            self._init_with_kmeans(rows.detach() if mask is None else rows.detach()[valid])

        codebook = self.embed if self.learnable_codebook else self.embed.detach()
        search_rows = rows.detach().float()
        indices, _ = nearest_code(search_rows, codebook.detach().float(), self.metric)
        if mask is not None:
            indices = indices.masked_fill(~valid, -1)
        quantized = F.embedding(indices.clamp_min(0), codebook).to(rows.dtype)

        zero = rows.new_zeros(())
        commitment = codebook_loss = zero
        counts = None
        if self.training:
            rows_for_loss, q_for_loss = (rows, quantized) if mask is None else (rows[valid], quantized[valid])
            commitment = F.mse_loss(rows_for_loss, q_for_loss.detach()) if rows_for_loss.numel() else zero
            if self.learnable_codebook:
                codebook_loss = F.mse_loss(q_for_loss, rows_for_loss.detach()) if rows_for_loss.numel() else zero
            if self.ema_update:
                counts = self._update_ema(search_rows, indices)
            if self.threshold_ema_dead_code > 0:
                self._replace_dead_codes(search_rows if mask is None else search_rows[valid])
            if rows.requires_grad:
                quantized = rotate_to(rows, quantized) if self.rotation_trick else rows + (quantized - rows).detach()
        loss = commitment * self.commitment_weight + codebook_loss

        out = self.project_out(quantized)
        if mask is not None:
            out = out * valid[:, None]
        out = self._unflatten(out, shape[:-1] + (out.shape[-1],), channel_dim)
        indices = indices.reshape(shape[:-1])
        if not return_stats:
            return out, indices, loss
        if counts is None:
            counts, _ = code_stats(search_rows, indices.reshape(-1), self.codebook_size)
        perplexity, used = _usage(counts)
        return out, indices, loss, VQStats(commitment.detach(), codebook_loss.detach(), perplexity, used)

    @torch.no_grad()
    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (projected out) for ``indices``; channel-first layouts come back channel-first."""
        codes = self.project_out(F.embedding(indices.clamp_min(0), self.embed))
        codes = codes * (indices >= 0)[..., None]
        return codes if self.channel_last else codes.movedim(-1, 1)

    indices_to_codes = get_output_from_indices

    @torch.no_grad()
    def usage(self) -> dict:
        """Codebook usage from the EMA cluster sizes: perplexity and fraction of live codes."""
        perplexity, _ = _usage(self.cluster_size.clamp_min(0))
        live = self.cluster_size >= max(self.threshold_ema_dead_code, 1e-3)
        return {"perplexity": float(perplexity), "codes_used": float(live.float().mean())}


class ResidualVQ(nn.Module):
    """Residual vector quantisation (SoundStream): each quantiser codes what the previous left.

    Args:
        dim: input feature size. num_quantizers: depth ``Q``. codebook_size, codebook_dim and
        the remaining keyword arguments go to every :class:`VectorQuantize`.
        shared_codebook: one codebook for all depths (its EMA sees every depth's residuals).
        quantize_dropout: in training, keep only the first ``q`` quantisers for a batch, ``q``
            drawn uniformly from ``[quantize_dropout_cutoff_index + 1, Q]`` (SoundStream's
            bitrate scalability); dropped depths report index -1 and zero loss.
        channel_last / accept_image_fmap: as in :class:`VectorQuantize`.

    ``forward(x, return_stats=False)`` returns ``(quantized, indices [..., Q], losses [Q])``,
    plus a list of per-depth :class:`VQStats` with ``return_stats=True``.
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        **vq_kwargs,
    ):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"ResidualVQ: num_quantizers must be >= 1, got {num_quantizers}")
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError("ResidualVQ: quantize_dropout_cutoff_index must be in [0, num_quantizers)")
        codebook_dim = codebook_dim or dim
        self.dim, self.num_quantizers = dim, num_quantizers
        self.channel_last = channel_last and not accept_image_fmap
        self.quantize_dropout = quantize_dropout
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        needs_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if needs_projection else nn.Identity()
        first = VectorQuantize(codebook_dim, codebook_size, **vq_kwargs)
        layers = [first] + [first if shared_codebook else VectorQuantize(codebook_dim, codebook_size, **vq_kwargs)
                            for _ in range(num_quantizers - 1)]
        self.layers = nn.ModuleList(layers)
        self.shared_codebook = shared_codebook

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([layer.embed for layer in self.layers])

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        moved = x if self.channel_last else x.movedim(1, -1)
        if moved.shape[-1] != self.dim:
            raise ValueError(f"ResidualVQ: expected feature size {self.dim}, got input of shape {list(x.shape)}")
        residual = self.project_in(moved)
        depth = self.num_quantizers
        if self.training and self.quantize_dropout:
            low = self.quantize_dropout_cutoff_index + 1
            drawn = torch.randint(low, self.num_quantizers + 1, (1,))
            if _distributed():  # every process must run the same quantisers (their EMA syncs are collectives)
                drawn = drawn.to(x.device)
                dist.broadcast(drawn, src=0)
            depth = int(drawn)
        quantized_out = torch.zeros_like(residual)
        all_indices, losses, stats = [], [], []
        for q, layer in enumerate(self.layers):
            if q >= depth:
                all_indices.append(torch.full(residual.shape[:-1], -1, dtype=torch.long, device=x.device))
                losses.append(residual.new_zeros(()))
                continue
            result = layer(residual, return_stats=return_stats)
            quantized, indices, loss = result[:3]
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(indices)
            losses.append(loss)
            if return_stats:
                stats.append(result[3])
        out = self.project_out(quantized_out)
        out = out if self.channel_last else out.movedim(-1, 1)
        indices = torch.stack(all_indices, dim=-1)
        if not self.channel_last:
            indices = indices  # [B, *spatial, Q]: the quantiser axis last, as vector-quantize-pytorch
        result = (out, indices, torch.stack(losses))
        return result + (stats,) if return_stats else result

    @torch.no_grad()
    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the codes of ``indices`` ``[..., Q]`` (index -1 contributes nothing)."""
        total = 0
        for q, layer in enumerate(self.layers):
            idx = indices[..., q]
            total = total + F.embedding(idx.clamp_min(0), layer.embed) * (idx >= 0)[..., None]
        out = self.project_out(total)
        return out if self.channel_last else out.movedim(-1, 1)

    indices_to_codes = get_output_from_indices
