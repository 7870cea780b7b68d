"""The public tiled decode and encode: argument checks, then the graph and the scheduler."""

from __future__ import annotations

import torch
from torch import nn

from fastlatent.tiling.graph import decoder_graph, encoder_graph
from fastlatent.tiling.schedule import TiledRunInfo, TileScheduler, max_halo

STORES = ("host", "device", "recompute")
MODES = ("exact",)
# mode="fast" (GroupNorm statistics estimated from a downscaled decode, then one pass) was removed: on a
# random
# SD-VAE layout it was less accurate than diffusers' tiling (max error 2.23 against 1.10) and no faster than
# exact mode (1.88 s against 1.95 s on the CPU), because each tile then recomputed its whole receptive field.
REMOVED_FAST_MODE = (
    "mode='fast' was removed: it was no faster than the exact mode and less accurate than "
    "diffusers' tiling. Drop mode= (the exact mode is the only one) and fast_downscale=; "
    "store='recompute' gives the smallest memory"
)


def _model_dtype_device(vae: nn.Module, part: str):
    module = getattr(vae, part, None)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"fastlatent.tiled_{'decode' if part == 'decoder' else 'encode'}: vae must have a "
            f"`{part}` module (a diffusers-compatible AutoencoderKL), got {type(vae).__name__}"
        )
    p = next(module.parameters(), None)
    if p is None:
        raise ValueError(f"fastlatent.tiled: vae.{part} has no parameters")
    return p.dtype, p.device


def _check_common(op, name, x, channels, dtype, device, tile_size, store, mode, fast_downscale, query_chunk):
    if mode == "fast" or fast_downscale is not None:
        raise ValueError(f"fastlatent.{op}: {REMOVED_FAST_MODE}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastlatent.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastlatent.{op}: {name} must be 4-D [B, C, H, W], got shape {list(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        # the tiles run under no_grad (their activations are freed or moved off the device): no gradient
        raise ValueError(
            f"fastlatent.{op}: {name} requires grad, but the tiled path is not differentiable; "
            f"pass {name}.detach() (or run under torch.no_grad()), or use the untiled model for a gradient"
        )
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"fastlatent.{op}: {name} must have B, H, W >= 1, got shape {list(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"fastlatent.{op}: {name} must have {channels} channels (the vae's), got shape {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"fastlatent.{op}: {name} must be a floating tensor, got {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(
            f"fastlatent.{op}: {name} must have the vae's dtype {dtype}, got {x.dtype} (cast it, or the "
            "vae, first)"
        )
    if x.device != device:
        raise RuntimeError(f"fastlatent.{op}: {name} must be on the vae's device {device}, got {x.device}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"fastlatent.{op}: tile_size must be a positive int, got {tile_size!r}")
    if store not in STORES:
        raise ValueError(f"fastlatent.{op}: store must be one of {STORES}, got {store!r}")
    if mode not in MODES:
        raise ValueError(f"fastlatent.{op}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"fastlatent.{op}: attention_chunk must be a positive int, got {query_chunk!r}")


def _run(op, build, x, tile_size, store, query_chunk, progress, info):
    info = TiledRunInfo() if info is None else info
    with torch.no_grad():
        graph = build(x, tile_size, query_chunk)
        halo = max_halo(graph, store)
        info.halo = halo
        if tile_size < halo:
            raise ValueError(
                f"fastlatent.{op}: tile_size={tile_size} is smaller than the receptive-field halo of "
                f"{halo} pixels that each tile reads around itself (store={store!r}); "
                f"use tile_size >= {halo}"
            )
        last = graph.stages[-1]
        out = torch.empty((x.shape[0], last.channels) + last.size, dtype=x.dtype, device=x.device)
        run = TileScheduler(graph, store, x.shape[0], x.device, progress, info, op)
        run.run(out)
    return out


def tiled_decode(
    vae: nn.Module,
    latents: torch.Tensor,
    tile_size: int = 64,
    *,
    store: str = "host",
    mode: str = "exact",
    fast_downscale: None = None,
    attention_chunk: int = 1024,
    progress=None,
    info: TiledRunInfo | None = None,
) -> torch.Tensor:
    """Decode latents tile by tile; the result equals ``vae.decode(latents).sample`` to rounding.

    Args:
        vae: a diffusers-compatible ``AutoencoderKL`` (diffusers', the same after :func:`fastlatent.patch`, or
            :class:`fastlatent.models.AutoencoderKL`), in eval mode. Not modified.
        latents: ``[B, latent_channels, h, w]`` in the vae's dtype and on its device (fp32/fp16/bf16, CPU or
            CUDA), already divided by ``scaling_factor`` as for ``vae.decode``.
        tile_size: tile edge in latent pixels (64 = 512 image pixels for the SD-VAE). Sizes need not divide
            ``h``, ``w``.
        store: where activations that outlive a tile live:

            * ``"host"`` (default): host memory, pinned when on CUDA. Each stage is computed once; the cost is
              one device-to-host and one host-to-device copy of each kept activation. Host memory needed:
              about
              three activations at the largest resolution (for the SD-VAE at 4096x4096 in bf16, about 17 GB).
            * ``"device"``: as "host" but kept on the device: fastest, but the kept activations grow with the
              image (device memory then scales like an untiled decode's largest few activations).
            * ``"recompute"``: nothing image-sized is kept; each pass recomputes the stages it needs from the
              latents (with their halo). Memory is the smallest; work grows to several times a decode (one
              pass
              per GroupNorm, each recomputing its prefix: see ``info.stage_evaluations`` and the benchmark).
        mode: ``"exact"``, the only mode: every GroupNorm uses the whole image's statistics, so the output
            equals the untiled decode to floating-point rounding (no seams). ``mode="fast"`` and
            ``fast_downscale`` were removed (no faster, and less accurate than diffusers' tiling) and raise a
            ValueError that says so.
        fast_downscale: removed with ``mode="fast"``; must be left out.
        attention_chunk: queries per attention call in the mid block (keys and values span the whole latent).
        progress: a tqdm progress bar over the tiles of all passes: True, False, or None (shown when stderr is
        a
            terminal).
        info: a :class:`TiledRunInfo` to fill in with the passes, tiles and stage evaluations done.

    Returns:
        ``[B, out_channels, 8h, 8w]`` (for the SD-VAE's 3 upsamplings) in the latents' dtype and device.

    Memory: with ``store="host"``, peak device memory is set by the tile, not the image: the largest stage
    working set, about ``6 * C * (s * (tile_size + 2))**2 * bytes`` for the stage at upsampling factor ``s``
    with
    ``C`` channels (for the SD-VAE: the 256-channel input of the last up block at ``s = 8``: about 0.8 GB at
    tile 64 in bf16), plus two terms that grow with the image but stay small: the attention's keys and values,
    ``2 * C_mid * h * w * bytes`` (C_mid = 512: 0.5 GB at 4096x4096 in bf16), and the output itself
    (``3 * 64 * h * w * bytes``). ``store="recompute"`` has the same bound with a larger halo.

    Raises:
        ValueError: latents of the wrong shape or channel count, a tile smaller than the halo it must read, an
            unknown option, or a model whose structure the tiled path does not know.
        TypeError: latents not in the vae's dtype.
        RuntimeError: latents not on the vae's device.
    """
    dtype, device = _model_dtype_device(vae, "decoder")
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder.conv_in
    _check_common(
        "tiled_decode",
        "latents",
        latents,
        first.in_channels,
        dtype,
        device,
        tile_size,
        store,
        mode,
        fast_downscale,
        attention_chunk,
    )
    return _run(
        "tiled_decode",
        lambda x, t, q: decoder_graph(vae, x, t, q),
        latents,
        tile_size,
        store,
        attention_chunk,
        progress,
        info,
    )


def tiled_encode(
    vae: nn.Module,
    images: torch.Tensor,
    tile_size: int = 512,
    *,
    store: str = "host",
    mode: str = "exact",
    fast_downscale: None = None,
    attention_chunk: int = 1024,
    progress=None,
    info: TiledRunInfo | None = None,
) -> torch.Tensor:
    """Encode images tile by tile; the result equals the untiled encoder's output to rounding.

    Args:
        vae: a diffusers-compatible ``AutoencoderKL`` in eval mode (see :func:`tiled_decode`).
        images: ``[B, in_channels, H, W]`` in the vae's dtype and on its device, H and W multiples of the
            encoder's downsampling factor (8 for the SD-VAE).
        tile_size: tile edge in image pixels, a multiple of the downsampling factor; need not divide H, W.
        store, mode, fast_downscale, attention_chunk, progress, info: as for :func:`tiled_decode`.

    Returns:
        The moments ``[B, 2 * latent_channels, H / 8, W / 8]`` that ``vae.encode`` wraps in its posterior
        (``quant_conv`` applied): ``mean, logvar = moments.chunk(2, dim=1)``; with diffusers,
        ``DiagonalGaussianDistribution(moments)`` is ``vae.encode(images).latent_dist``.

    Memory: as :func:`tiled_decode`, with the stage sizes of the encoder (its widest full-resolution stage has
    ``block_out_channels[0]`` channels).
    """
    dtype, device = _model_dtype_device(vae, "encoder")
    op = "tiled_encode"
    _check_common(
        op,
        "images",
        images,
        vae.encoder.conv_in.in_channels,
        dtype,
        device,
        tile_size,
        store,
        mode,
        fast_downscale,
        attention_chunk,
    )
    factor = 2 ** sum(len(getattr(b, "downsamplers", None) or []) for b in vae.encoder.down_blocks)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(
            f"fastlatent.{op}: images must have H and W divisible by the encoder's downsampling factor "
            f"{factor}, got shape {list(images.shape)} (pad the images first)"
        )
    if tile_size % factor:
        raise ValueError(
            f"fastlatent.{op}: tile_size must be a multiple of the encoder's downsampling factor "
            f"{factor}, got {tile_size}"
        )
    return _run(
        op,
        lambda x, t, q: encoder_graph(vae, x, t, q),
        images,
        tile_size,
        store,
        attention_chunk,
        progress,
        info,
    )
