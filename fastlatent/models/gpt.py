"""``TokenGPT``: a class-conditional causal transformer over discrete latent tokens (VQ / FSQ / LFQ indices).

The sequence the transformer reads is ``[c, x_0, ..., x_{L-2}]``: a class token ``c`` (the learned embedding
of the label, or of the null class ``num_classes``; a learned start token for an unconditional model) followed
by the token embeddings, plus learned position embeddings; position ``i`` predicts ``x_i`` (VQGAN's
transformer, LlamaGen's class token). Pre-LN blocks, causal ``F.scaled_dot_product_attention``, a final
LayerNorm and a linear head.

Sampling decodes one position at a time with a key/value cache (:class:`KVCache`), so producing ``L`` tokens
costs ``L`` single-position forwards. Classifier-free guidance runs the null class and the requested class in
one doubled batch and combines the logits as ``logits_u + g (logits_c - logits_u)``; then temperature, top-k
and top-p (nucleus) filtering, in that order (as Hugging Face's ``generate``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.base import ConfigMixin, evaluating, register_model
from fastlatent.models.dit import sampling_labels
from fastlatent.models.latent_diffusion import training_labels, unpack_prior_batch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest per row set to ``-inf`` (ties with the k-th are kept).

    Args:
        logits: ``[..., V]``.
        k: int >= 1; ``k >= V`` keeps everything.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {k!r}")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability reaches ``p``.

    A token is dropped when the probability of the tokens strictly more likely than it (in sorted order)
    already reaches ``p``; the most likely token is always kept.

    Args:
        logits: ``[..., V]``.
        p: in (0, 1]; 1 keeps everything.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def guided_logits(logits: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """``[2n, V]`` logits stacked ``[uncond; cond]`` -> ``u + g (c - u)`` ``[n, V]`` (unchanged without
    guidance)."""
    if guidance is None:
        return logits
    uncond, cond = logits.chunk(2)
    return uncond + guidance * (cond - uncond)


class KVCache:
    """Keys and values of the positions decoded so far, per layer: ``[B, heads, seq_len, head_dim]`` each.

    Built by :meth:`TokenGPT.new_cache`; :meth:`TokenGPT.forward` with ``cache=`` appends to it.
    """

    def __init__(
        self,
        depth: int,
        batch: int,
        num_heads: int,
        seq_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, num_heads, seq_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.batch = batch
        self.capacity = seq_len
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        start = 0
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + n] = k
            cache.values[layer][:, :, start : start + n] = v
            # cast on read: under autocast q/k/v may be in a lower precision than the cache
            k = cache.keys[layer][:, :, : start + n].to(q.dtype)
            v = cache.values[layer][:, :, : start + n].to(q.dtype)
        if start == 0:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif n == 1:  # one new position attends to everything cached: no mask
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # new positions start..start+n-1 after a cached prefix: a causal mask offset by start
            allowed = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, int(dim * mlp_ratio)),
            nn.GELU(),
            nn.Linear(int(dim * mlp_ratio), dim),
            nn.Dropout(dropout),
        )
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln1(x), cache, layer))
        return x + self.mlp(self.ln2(x))


@register_model
class TokenGPT(nn.Module, ConfigMixin):
    """Autoregressive prior over token sequences ``[B, L]`` with class conditioning and classifier-free
    guidance.

    Args:
        vocab_size: V, the tokenizer's codebook size.
        seq_len: L, tokens per image (``h * w``, times the quantizer depth for residual VQ).
        num_classes: class count; 0 for an unconditional model. Label ``num_classes`` is the null class.
        dim: transformer width (divisible by ``num_heads``).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        dropout: dropout on embeddings, attention, residual branches.
        label_dropout: probability that a training label becomes the null class (for guidance).

    ``training_step((tokens [B, L] int64, labels [B]), step)`` -> ``{"loss": next-token cross-entropy,
    "accuracy"}``; ``sample(n, labels, temperature, top_k, top_p, guidance, generator) -> [n, L]`` int64.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int = 0,
        dim: int = 256,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        label_dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("dim", dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenGPT: {name} must be an int >= 1, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"TokenGPT: num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}"
            )
        if dim % num_heads:
            raise ValueError(f"TokenGPT: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"TokenGPT: mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"TokenGPT: dropout must be in [0, 1), got {dropout!r}")
        if not (isinstance(label_dropout, (int, float)) and 0.0 <= label_dropout < 1.0):
            raise ValueError(f"TokenGPT: label_dropout must be in [0, 1), got {label_dropout!r}")
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.label_dropout = float(label_dropout)

        self.tok_emb = nn.Embedding(vocab_size, dim)
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes + 1, dim)
            self.start_token = None
        else:
            self.class_emb = None
            self.start_token = nn.Parameter(torch.zeros(1, dim))
        self.pos_emb = nn.Parameter(torch.zeros(seq_len, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.start_token is not None:
            nn.init.normal_(self.start_token, std=0.02)
        for block in self.blocks:
            for residual_out in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * self.depth))

    def new_cache(self, batch: int) -> KVCache:
        """An empty key/value cache for ``batch`` sequences, in the model's dtype and device."""
        weight = self.head.weight
        return KVCache(
            self.depth,
            batch,
            self.num_heads,
            self.seq_len,
            self.dim // self.num_heads,
            weight.device,
            weight.dtype,
        )

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Next-token logits.

        Without a cache (or with an empty one), the input is the class token followed by ``tokens [B, T]``
        (``0 <= T < L``) and the result is ``[B, T + 1, V]``: position ``i`` predicts token ``i``. With a
        cache holding ``P > 0`` positions, ``tokens [B, T]`` are the tokens at positions ``P .. P+T-1`` of the
        model's input (``labels`` unused) and the result ``[B, T, V]`` predicts tokens ``P .. P+T-1``.
        The cache, when given, is extended by the positions processed.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            what = (
                f"{tokens.dtype} {list(tokens.shape)}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            raise ValueError(f"TokenGPT: tokens must be an int64 tensor [B, T], got {what}")
        b, t = tokens.shape
        start = 0 if cache is None else cache.length
        if cache is not None and cache.batch != b:
            raise ValueError(f"TokenGPT: the cache holds {cache.batch} sequences, tokens has {b}")
        h = self.tok_emb(tokens)
        if start == 0:
            if self.class_emb is None:
                if labels is not None:
                    raise ValueError(
                        "TokenGPT: this model is unconditional (num_classes=0); labels must be None"
                    )
                first = self.start_token.expand(b, 1, -1)
            else:
                if (
                    not isinstance(labels, torch.Tensor)
                    or labels.shape != (b,)
                    or labels.dtype != torch.int64
                ):
                    what = (
                        f"{labels.dtype} {list(labels.shape)}"
                        if isinstance(labels, torch.Tensor)
                        else type(labels).__name__
                    )
                    raise ValueError(
                        f"TokenGPT: labels must be an int64 tensor [B] = [{b}] (num_classes="
                        f"{self.num_classes} is the null class), got {what}"
                    )
                first = self.class_emb(labels)[:, None]
            h = torch.cat([first.to(h.dtype), h], dim=1)
        end = start + h.shape[1]
        if end > self.seq_len:
            raise ValueError(
                f"TokenGPT: at most seq_len = {self.seq_len} positions (the class token and "
                f"{self.seq_len - 1} tokens), got {end}"
            )
        h = self.drop(h + self.pos_emb[start:end].to(h.dtype))
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer)
        if cache is not None:
            cache.length = end
        return self.head(self.ln_f(h))

    def training_step(self, batch, step: int) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on ``batch = (tokens [B, L] int64, labels [B])``."""
        where = "TokenGPT.training_step"
        tokens, labels = unpack_prior_batch(where, batch)
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.dim() != 2
            or tokens.shape[1] != self.seq_len
            or tokens.dtype.is_floating_point
            or tokens.is_complex()
            or tokens.dtype == torch.bool
        ):
            what = (
                f"{tokens.dtype} {list(tokens.shape)}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            raise ValueError(f"{where}: tokens must be an integer tensor [B, {self.seq_len}], got {what}")
        tokens = tokens.long()
        if tokens.numel() and bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(
                f"{where}: tokens must be in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}), "
                f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        labels = training_labels(
            where, labels, tokens.shape[0], self.num_classes, self.label_dropout, tokens.device
        )
        logits = self(tokens[:, :-1], labels)
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), tokens.reshape(-1))
        accuracy = (logits.detach().argmax(-1) == tokens).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def sample(
        self,
        n: int,
        labels=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draws ``n`` token sequences with the KV cache.

        Args:
            n: how many.
            labels: None (a conditional model then samples the null class), an int for all, or ``n`` class
                indices.
            temperature: > 0; logits are divided by it (after guidance).
            top_k: keep the k most likely tokens (None: all).
            top_p: nucleus sampling mass in (0, 1] (None: all).
            guidance: classifier-free guidance scale g on the logits: ``u + g (c - u)``; None for none.
            generator: a ``torch.Generator`` on the model's device, for reproducible draws.

        Returns:
            ``[n, seq_len]`` int64 tokens on the model's device.
        """
        where = "TokenGPT.sample"
        device = self.head.weight.device
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not (temperature > 0 and math.isfinite(temperature))
        ):
            raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"{where}: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (
            isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
        ):
            raise ValueError(f"{where}: top_p must be None or in (0, 1], got {top_p!r}")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"{where}: generator is on {generator.device} but the model is on {device}; use a "
                f"generator on {device.type}"
            )
        labels, guided = sampling_labels(where, labels, n, self.num_classes, guidance, device)
        if guided:
            labels = torch.cat([torch.full_like(labels, self.num_classes), labels])
        out = torch.empty(n, self.seq_len, dtype=torch.int64, device=device)
        with evaluating(self):
            cache = self.new_cache(labels.shape[0] if labels is not None else n)
            batch = cache.batch
            logits = self(torch.empty(batch, 0, dtype=torch.int64, device=device), labels, cache)[:, -1]
            for i in range(self.seq_len):
                step_logits = guided_logits(logits.float(), guidance if guided else None) / temperature
                if top_k is not None:
                    step_logits = top_k_filter(step_logits, top_k)
                if top_p is not None:
                    step_logits = top_p_filter(step_logits, top_p)
                token = torch.multinomial(step_logits.softmax(dim=-1), 1, generator=generator)  # [n, 1]
                out[:, i] = token[:, 0]
                if i + 1 < self.seq_len:
                    feed = torch.cat([token, token]) if guided else token
                    logits = self(feed, cache=cache)[:, -1]
        return out
