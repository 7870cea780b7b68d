"""Regions of a stage's pixel grid: the half-open rectangles a tile computes and reads."""

from __future__ import annotations

import torch

Region = tuple  # (y0, y1, x0, x1): half-open rows and columns in a stage's own pixel grid


def union(a: Region | None, b: Region | None) -> Region | None:
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def clamp(r: Region, size: tuple[int, int]) -> Region:
    return (max(r[0], 0), min(r[1], size[0]), max(r[2], 0), min(r[3], size[1]))


def contains(outer: Region, inner: Region) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def crop(t: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    """The part ``want`` of a tensor that holds the region ``have``."""
    return t[:, :, want[0] - have[0] : want[1] - have[0], want[2] - have[2] : want[3] - have[2]]
