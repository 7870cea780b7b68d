"""Seam-free, memory-bounded tiled VAE decode and encode.

``vae.decode`` of a 4096x4096 image holds activations of 256 channels at full resolution (several GiB each)
and runs out of accelerator memory. diffusers' ``enable_tiling()`` decodes overlapping tiles independently and
blends them; each tile then normalises with its own GroupNorm statistics and its attention sees only itself,
so
colour and contrast shift from tile to tile and seams show.

:func:`tiled_decode` and :func:`tiled_encode` compute what the untiled VAE computes, tile by tile:

* The network is cut into *stages* at every GroupNorm (and at the mid-block attention). A stage is a short
  chain of per-pixel ops and convolutions, e.g. ``conv1(silu(norm1(x)))`` or
  ``conv2(silu(norm2(h))) + shortcut(x)``; it is computed over one tile plus the halo its convolutions need.
* Every GroupNorm normalises with the statistics of the whole image: a pass over the tiles of its input
  computes per-tile ``(mean, M2)`` with the fused :func:`fastlatent.ops.group_norm_stats`, merged by Chan's
  formula in float64 (no cancellation, whatever the image size), then each tile is normalised with
  :func:`fastlatent.ops.group_norm_apply` (GroupNorm + activation fused).
* The mid-block attention attends over the whole latent: keys and values of every latent pixel are computed
  tile
  by tile into one buffer, queries stay per tile (``F.scaled_dot_product_attention`` in query chunks).
* Activations that outlive a tile (a stage output read by the next stage and by a residual add) are kept per
  tile
  with the halo the consumers read, on the host (``store="host"``, pinned memory when the model is on CUDA),
  on
  the device (``store="device"``), or not at all (``store="recompute"``: each stage recomputes its input chain
  from
  the latents, so nothing image-sized is kept but the work grows with the number of GroupNorms).

The schedule is derived from the module structure (diffusers' attribute names: ``decoder.conv_in``,
``decoder.mid_block.resnets/attentions``, ``decoder.up_blocks[i].resnets/upsamplers``, ``conv_norm_out``,
``conv_act``, ``conv_out``, ``post_quant_conv``; ``encoder.down_blocks[i].resnets/downsamplers``,
``quant_conv``), not from class checks, so it works on diffusers' ``AutoencoderKL``, the same model after
:func:`fastlatent.patch`, and :class:`fastlatent.models.AutoencoderKL`.
"""

from fastlatent.tiling.api import MODES, STORES, tiled_decode, tiled_encode
from fastlatent.tiling.schedule import TiledRunInfo

__all__ = ["tiled_decode", "tiled_encode", "TiledRunInfo", "STORES", "MODES"]
