"""Datasets that need no download, users' image folders, and precomputed latents.

Every image dataset yields ``(image, label)``: ``image`` float32 ``[C, S, S]`` in ``[-1, 1]``, ``label`` an
int64 scalar, so the default DataLoader collate gives ``([B, C, S, S], [B])`` as the training protocol
expects.

- :class:`DigitsDataset`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upsampled.
- :class:`SamplePhotoPatches`: random crops of the photographs shipped with scikit-learn and scikit-image.
- :class:`ImageFolderDataset`: a folder of image files; unusable files are reported and skipped.
- :class:`LatentDataset` and :func:`encode_dataset`: latents or tokens with labels, for prior training.

Random augmentation is a function of ``(seed, epoch, index)`` (the trainer calls ``set_epoch``), so it is
identical whatever the DataLoader worker count and after a resume.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DigitsDataset",
    "SamplePhotoPatches",
    "ImageFolderDataset",
    "LatentDataset",
    "encode_dataset",
    "available_sample_photos",
    "IMAGE_EXTENSIONS",
]

SPLITS = ("train", "test", "all")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic")


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def _check_int(owner: str, name: str, value, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _resize(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """``[N, C, H, W]`` float -> ``[N, C, size, size]``; antialiased when shrinking, clamped to [-1, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < max(images.shape[-2:])
    if interpolation == "nearest":
        out = F.interpolate(images, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(
            images, size=(size, size), mode=interpolation, align_corners=False, antialias=shrinking
        )
    return out.clamp_(-1.0, 1.0)  # bicubic overshoots


# ---------------------------------------------------------------------------------------------- digits


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits (UCI optdigits test set: 1,797 real 8x8 images, 10 classes).

    The images (16 grey levels) are scaled to ``[-1, 1]`` (0 -> -1 background, 16 -> 1 ink) and resized to
    ``size x size`` once at construction: ``interpolation="bilinear"`` (default; smooth strokes, what a
    generative model can learn), ``"nearest"`` (blocky, exact pixel replication when ``size`` is a
    multiple of 8) or ``"bicubic"`` (sharper, clamped to [-1, 1]). Sizes below 8 are antialiased.

    The train/test split is stratified: in every class, ``round(test_fraction * class_count)`` images
    chosen by a generator seeded with ``seed`` go to the test split. ``split="all"`` is all 1,797 images.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: output side length.
        test_fraction: share of each class held out for ``"test"``, in (0, 1).
        seed: seeds the split and the augmentation.
        interpolation: see above.
        augment_shift: random translation of up to this many output pixels in x and y (background
            filled), drawn per ``(seed, epoch, index)``; 0 disables it (default).

    Attributes:
        images: float32 ``[N, 1, size, size]``; labels: int64 ``[N]``; indices: positions in
        ``sklearn.datasets.load_digits()``; num_classes: 10.
    """

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        size: int = 16,
        test_fraction: float = 0.2,
        seed: int = 0,
        interpolation: str = "bilinear",
        augment_shift: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"DigitsDataset: split must be one of {SPLITS}, got {split!r}")
        size = _check_int("DigitsDataset", "size", size, 1)
        augment_shift = _check_int("DigitsDataset", "augment_shift", augment_shift, 0)
        if augment_shift >= size:
            raise ValueError(
                f"DigitsDataset: augment_shift must be smaller than size ({size}), got {augment_shift}"
            )
        if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
            raise ValueError(f"DigitsDataset: test_fraction must be in (0, 1), got {test_fraction!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"DigitsDataset: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        # scikit-learn takes ~3.5 s to import: only the datasets that need it pay for it.
        from sklearn.datasets import load_digits

        digits = load_digits()
        all_images = torch.from_numpy(digits.images.astype(np.float32))  # [1797, 8, 8] in [0, 16]
        all_labels = torch.from_numpy(digits.target.astype(np.int64))
        indices = self._split_indices(all_labels, split, test_fraction, seed)
        images = all_images[indices].unsqueeze(1) / 8.0 - 1.0
        self.images = _resize(images, size, interpolation).contiguous()
        self.labels = all_labels[indices].contiguous()
        self.indices = indices
        self.split, self.size, self.seed, self.augment_shift = split, size, seed, augment_shift
        self.epoch = 0

    @staticmethod
    def _split_indices(labels: torch.Tensor, split: str, test_fraction: float, seed: int) -> torch.Tensor:
        if split == "all":
            return torch.arange(len(labels))
        generator = torch.Generator().manual_seed(seed)
        test = []
        for c in range(int(labels.max()) + 1):
            members = (labels == c).nonzero(as_tuple=True)[0]
            order = members[torch.randperm(len(members), generator=generator)]
            test.append(order[: round(test_fraction * len(members))])
        in_test = torch.zeros(len(labels), dtype=torch.bool)
        in_test[torch.cat(test)] = True
        return (in_test if split == "test" else ~in_test).nonzero(as_tuple=True)[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment_shift:
            dy, dx = _item_rng(self.seed, self.epoch, int(index)).integers(
                -self.augment_shift, self.augment_shift + 1, size=2
            )
            image = _shift(image, int(dy), int(dx), fill=-1.0)
        return image, self.labels[index]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, size={self.size}, n={len(self)})"


def _shift(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """Translate ``[C, H, W]`` by ``(dy, dx)`` pixels, filling the uncovered border with ``fill``."""
    _, h, w = image.shape
    out = torch.full_like(image, fill)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


# ---------------------------------------------------------------------------------------------- photos

# Photographs (no synthetic test patterns, no mostly-black frames) shipped inside the packages.
_SKLEARN_PHOTOS = ("china", "flower")
_SKIMAGE_COLOR_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "stereo_motorcycle",
)
_SKIMAGE_GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock", "grass", "gravel", "brick")


@functools.cache  # a few MB, decoded once per process instead of once per dataset
def _load_sample_photo(name: str) -> np.ndarray | None:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` (read-only), or None when the photo isn't available offline."""
    if name in _SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image  # slow to import, see load_digits above

        image = np.array(load_sample_image(f"{name}.jpg"))
        image.flags.writeable = False
        return image
    try:
        import skimage.data
    except ImportError:
        return None
    loader = getattr(skimage.data, name, None)
    if loader is None:
        return None
    try:
        image = loader()
    except Exception:  # files that scikit-image would have to download (pooch), or a changed API
        return None
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        return None
    image.flags.writeable = False
    return image


def available_sample_photos(channels: int = 3) -> list[str]:
    """Names of the photographs :class:`SamplePhotoPatches` can use offline for ``channels`` (1 or 3)."""
    names = _SKLEARN_PHOTOS + _SKIMAGE_COLOR_PHOTOS + (_SKIMAGE_GRAY_PHOTOS if channels == 1 else ())
    return [n for n in names if _load_sample_photo(n) is not None]


class SamplePhotoPatches(Dataset):
    """Random square patches of the sample photographs shipped with scikit-learn and scikit-image.

    For autoencoder training without downloads: china and flower (scikit-learn), astronaut, coffee,
    chelsea, rocket, immunohistochemistry and the left stereo_motorcycle view (scikit-image), plus, for
    ``channels=1``, the greyscale photos (camera, coins, moon, page, text, clock, grass, gravel, brick).
    Colour photos are converted to luma (ITU-R 601) for one channel. Photos a scikit-image version lacks
    or would download are left out.

    Patch ``i`` is a crop of a photo chosen with probability proportional to its area, at a scale drawn
    uniformly from ``[min_scale, 1]`` (a ``patch_size / scale`` crop resized down, antialiased, to
    ``patch_size``: more content per patch), optionally mirrored. The crops are fixed by ``seed``, or drawn
    anew per epoch with ``resample_each_epoch=True``.

    Args:
        patch_size: output side length.
        num_patches: dataset length.
        seed: seeds the crop positions.
        channels: 3 (RGB) or 1.
        photos: names to use (default: all available for ``channels``).
        min_scale: in (0, 1]; 1 takes patches at the photos' own resolution.
        flip: mirror half the patches horizontally.
        resample_each_epoch: new crops every epoch (``set_epoch``), for more variety in long runs.

    Yields ``(patch [channels, patch_size, patch_size] in [-1, 1], photo index int64)``.
    """

    def __init__(
        self,
        patch_size: int = 32,
        num_patches: int = 10_000,
        seed: int = 0,
        channels: int = 3,
        photos: Sequence[str] | None = None,
        min_scale: float = 1.0,
        flip: bool = True,
        resample_each_epoch: bool = False,
    ):
        patch_size = _check_int("SamplePhotoPatches", "patch_size", patch_size, 1)
        num_patches = _check_int("SamplePhotoPatches", "num_patches", num_patches, 1)
        if channels not in (1, 3):
            raise ValueError(f"SamplePhotoPatches: channels must be 1 or 3, got {channels!r}")
        if not (isinstance(min_scale, (int, float)) and 0.0 < min_scale <= 1.0):
            raise ValueError(f"SamplePhotoPatches: min_scale must be in (0, 1], got {min_scale!r}")
        known = _SKLEARN_PHOTOS + _SKIMAGE_COLOR_PHOTOS + (_SKIMAGE_GRAY_PHOTOS if channels == 1 else ())
        if photos is None:
            names = list(known)
        else:
            names = list(photos)
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(
                    f"SamplePhotoPatches: photos must be a non-empty list of names from {known} "
                    f"(greyscale ones only with channels=1), got unknown {unknown or names}"
                )
        self.photo_names: list[str] = []
        self.photos: list[torch.Tensor] = []  # uint8 [C, H, W]
        too_small = []
        for name in names:
            array = _load_sample_photo(name)
            if array is None:
                if photos is not None:
                    raise ValueError(
                        f"SamplePhotoPatches: photo {name!r} is not available offline in this "
                        f"installation; available: {available_sample_photos(channels)}"
                    )
                continue
            image = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))  # the cache is read-only
            image = image.permute(2, 0, 1) if image.ndim == 3 else image[None]
            if channels == 1 and image.shape[0] == 3:
                luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
                image = (image.float() * luma).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            if min(image.shape[-2:]) < patch_size:
                too_small.append(name)
                continue
            self.photo_names.append(name)
            self.photos.append(image.contiguous())
        if not self.photos:
            raise ValueError(
                f"SamplePhotoPatches: no photo is available at patch_size={patch_size} "
                f"(too small: {too_small}; scikit-learn and scikit-image must be installed)"
            )
        self.patch_size, self.num_patches, self.seed, self.channels = patch_size, num_patches, seed, channels
        self.min_scale, self.flip, self.resample_each_epoch = float(min_scale), flip, resample_each_epoch
        self.epoch = 0
        self._layout = self._draw_layout(0)

    def _draw_layout(self, epoch: int) -> np.ndarray:
        """int64 ``[num_patches, 5]``: photo, crop size, top, left, flip."""
        rng = np.random.default_rng([self.seed, epoch])
        heights = np.array([p.shape[1] for p in self.photos])
        widths = np.array([p.shape[2] for p in self.photos])
        areas = (heights * widths).astype(np.float64)
        photo = rng.choice(len(self.photos), size=self.num_patches, p=areas / areas.sum())
        scale = rng.uniform(self.min_scale, 1.0, size=self.num_patches)
        crop = np.minimum(
            np.round(self.patch_size / scale).astype(np.int64), np.minimum(heights[photo], widths[photo])
        )
        top = (rng.random(self.num_patches) * (heights[photo] - crop + 1)).astype(np.int64)
        left = (rng.random(self.num_patches) * (widths[photo] - crop + 1)).astype(np.int64)
        flip = (rng.random(self.num_patches) < 0.5) & self.flip
        return np.stack([photo, crop, top, left, flip.astype(np.int64)], axis=1)

    def set_epoch(self, epoch: int) -> None:
        if self.resample_each_epoch and int(epoch) != self.epoch:
            self._layout = self._draw_layout(int(epoch))
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_patches

    def __getitem__(self, index: int):
        photo, crop, top, left, flip = (int(v) for v in self._layout[index])
        patch = self.photos[photo][:, top : top + crop, left : left + crop].float() / 127.5 - 1.0
        if crop != self.patch_size:
            patch = _resize(patch[None], self.patch_size, "bilinear")[0]
        if flip:
            patch = patch.flip(-1)
        return patch.contiguous(), torch.tensor(photo, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"SamplePhotoPatches(patch_size={self.patch_size}, num_patches={self.num_patches}, "
            f"channels={self.channels}, photos={self.photo_names})"
        )


# ---------------------------------------------------------------------------------------------- folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
CROPS = ("center", "random", "none")
# Greyscale modes with more than 8 bits, which PIL's convert("L") would clip instead of rescale.
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_mode(image, channels: int, background: tuple[int, int, int]):
    """PIL image -> ``"RGB"`` (channels 3) or ``"L"`` (1); transparency composited on ``background``."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            peak = 1.0 if array.size == 0 or array.max() <= 1.0 else array.max()
        else:
            peak = 65535.0 if mode.startswith("I;16") or (array.size and array.max() > 255) else 255.0
        image = Image.fromarray(np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB" if channels == 3 else "L")


class ImageFolderDataset(Dataset):
    """The images under a folder, resized to ``size x size``.

    Files are found by extension (``IMAGE_EXTENSIONS``, case-insensitive; hidden files skipped), in sorted
    path order. At construction every file is opened (``verify="full"``: fully decoded, which catches
    truncated and corrupt files; ``"header"``: only the header, fast for huge folders, and a file that
    fails later raises an error naming it). Files that can't be decoded, whose mode can't be converted
    to RGB/greyscale, or whose shorter side is below ``min_size`` are skipped: they are listed in
    :attr:`skipped` as ``(path, reason)`` and in one warning.

    Modes: palette, CMYK, 1-bit and greyscale images are converted; transparency (RGBA, LA, palette with a
    transparent colour) is composited onto ``background``; 16-bit and float greyscale are rescaled, not
    clipped. EXIF orientation is applied. Resizing: the shorter side to ``size`` (bicubic, antialiased),
    then a ``"center"`` or ``"random"`` (per ``(seed, epoch, index)``) square crop; ``crop="none"``
    squashes the whole image to the square.

    Labels: with ``labels="folders"`` (default) and every image inside a sub-folder of ``root``, the label
    is the index of its top-level sub-folder in sorted order (:attr:`classes`: the sub-folders holding image
    files), as torchvision's ImageFolder; otherwise all labels are 0. A class folder whose files are all
    skipped raises ValueError naming it (it would otherwise shift every later label). Folders and dangling
    symbolic links named like images are listed in :attr:`skipped` too.

    Args:
        root: the folder. size: output side. channels: 3 (RGB) or 1 (greyscale).
        recursive: include sub-folders. min_size: shortest acceptable side (default ``size // 2``).
        crop: ``"center"``, ``"random"`` or ``"none"``. flip: random horizontal mirroring.
        labels: ``"folders"`` or ``None``. seed: seeds random crops and flips.
        verify: ``"full"`` or ``"header"``. num_threads: threads for the construction-time check.
        background: RGB fill behind transparent pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        channels: int = 3,
        recursive: bool = True,
        min_size: int | None = None,
        crop: str = "center",
        flip: bool = False,
        labels: str | None = "folders",
        seed: int = 0,
        verify: str = "full",
        num_threads: int | None = None,
        background: Sequence[int] = (255, 255, 255),
    ):
        size = _check_int("ImageFolderDataset", "size", size, 1)
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderDataset: channels must be 1 or 3, got {channels!r}")
        min_size = (
            max(1, size // 2)
            if min_size is None
            else _check_int("ImageFolderDataset", "min_size", min_size, 1)
        )
        if crop not in CROPS:
            raise ValueError(f"ImageFolderDataset: crop must be one of {CROPS}, got {crop!r}")
        if labels not in ("folders", None):
            raise ValueError(f"ImageFolderDataset: labels must be 'folders' or None, got {labels!r}")
        if verify not in ("full", "header"):
            raise ValueError(f"ImageFolderDataset: verify must be 'full' or 'header', got {verify!r}")
        background = tuple(int(v) for v in background)
        if len(background) != 3 or not all(0 <= v <= 255 for v in background):
            raise ValueError(f"ImageFolderDataset: background must be 3 ints in [0, 255], got {background}")
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"ImageFolderDataset: root {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"ImageFolderDataset: root {root} is not a folder")
        self.root, self.size, self.channels, self.min_size = root, size, channels, min_size
        self.crop, self.flip, self.seed, self.background = crop, flip, seed, background
        self.epoch = 0

        candidates = sorted(self._find_files(root, recursive))
        if not candidates:
            raise ValueError(
                f"ImageFolderDataset: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}"
                + ("" if recursive else " (recursive=False: sub-folders not searched)")
            )
        workers = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(lambda p: self._check_file(p, verify == "full"), candidates))
        self.files: list[Path] = [p for p, problem in zip(candidates, problems) if problem is None]
        self.skipped: list[tuple[Path, str]] = [
            (p, problem) for p, problem in zip(candidates, problems) if problem is not None
        ]
        if self.skipped:
            listed = "\n  ".join(f"{p}: {why}" for p, why in self.skipped[:20])
            more = f"\n  ... and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            warnings.warn(
                f"ImageFolderDataset: skipped {len(self.skipped)} of {len(candidates)} files in "
                f"{root}:\n  {listed}{more}",
                RuntimeWarning,
                stacklevel=2,
            )
        if not self.files:
            raise ValueError(
                f"ImageFolderDataset: none of the {len(candidates)} image files in {root} is "
                f"usable (see the warning above; first: {self.skipped[0][0]}: "
                f"{self.skipped[0][1]})"
            )

        top_levels = [p.relative_to(root).parts for p in self.files]
        if labels == "folders" and all(len(parts) > 1 for parts in top_levels):
            # Classes are the top-level folders holding image files, usable or skipped: a folder whose files
            # all fail must not vanish and shift every later label.
            self.classes = sorted(
                {p.relative_to(root).parts[0] for p in candidates if len(p.relative_to(root).parts) > 1}
            )
            empty = sorted(set(self.classes) - {parts[0] for parts in top_levels})
            if empty:
                raise ValueError(
                    f"ImageFolderDataset: class folder(s) {empty} in {root} hold no usable "
                    f"image (all their files were skipped, see the warning above); fix or "
                    f"remove them, or pass labels=None"
                )
            index = {name: i for i, name in enumerate(self.classes)}
            self.labels = torch.tensor([index[parts[0]] for parts in top_levels], dtype=torch.int64)
        else:
            self.classes = []
            self.labels = torch.zeros(len(self.files), dtype=torch.int64)

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), 1)

    @staticmethod
    def _find_files(root: Path, recursive: bool):
        entries = root.rglob("*") if recursive else root.iterdir()
        for path in entries:
            rel = path.relative_to(root).parts
            if any(part.startswith(".") for part in rel):
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                yield path  # folders and dangling links named like images too: _check_file reports them

    def _check_file(self, path: Path, full: bool) -> str | None:
        if path.is_symlink() and not path.exists():
            return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
        if path.is_dir():
            return "a folder, not an image file"
        if not path.is_file():
            return "not a regular file"
        # PIL raises many exception types for bad files; each stage reports what it could not do.
        try:
            image = Image.open(path)
        except Exception as exc:
            return f"cannot open: not an image or an unsupported pixel format ({type(exc).__name__}: {exc})"
        with image:
            width, height = image.size
            if min(width, height) < self.min_size:
                return f"too small ({width}x{height}, min_size is {self.min_size})"
            if not full:
                return None
            try:
                image.load()
            except Exception as exc:
                return f"cannot decode: truncated or corrupt ({type(exc).__name__}: {exc})"
            try:
                _to_mode(image, self.channels, self.background)
            except Exception as exc:
                return (
                    f"cannot convert mode {image.mode!r} to {'RGB' if self.channels == 3 else 'L'} "
                    f"({type(exc).__name__}: {exc})"
                )
        return None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load_image(self, index: int):
        """The PIL image of item ``index``, converted and resized (before the tensor conversion)."""
        path = self.files[index]
        try:
            with Image.open(path) as raw:
                raw.load()
                image = _to_mode(ImageOps.exif_transpose(raw), self.channels, self.background)
        except Exception as exc:
            raise RuntimeError(
                f"ImageFolderDataset: could not read {path}: {type(exc).__name__}: {exc}"
            ) from exc
        rng = _item_rng(self.seed, self.epoch, index) if (self.crop == "random" or self.flip) else None
        resample = Image.Resampling.BICUBIC
        if self.crop == "none":
            image = image.resize((self.size, self.size), resample)
        else:
            width, height = image.size
            scale = self.size / min(width, height)
            new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
            image = image.resize((new_w, new_h), resample)
            if self.crop == "center":
                left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            else:
                left = int(rng.integers(0, new_w - self.size + 1))
                top = int(rng.integers(0, new_h - self.size + 1))
            image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        array = np.asarray(self.load_image(index), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor[None]
        return tensor.float() / 127.5 - 1.0, self.labels[index]

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, size={self.size}, channels={self.channels}, "
            f"n={len(self)}, skipped={len(self.skipped)}, classes={len(self.classes)})"
        )


# ---------------------------------------------------------------------------------------------- latents


class LatentDataset(Dataset):
    """Precomputed latents ``[N, C, h, w]`` (float) or tokens ``[N, L]`` (int64) with int64 labels ``[N]``.

    Yields ``(latents[i], labels[i])``. Labels must lie in ``[0, num_classes)``; without labels all are 0.
    :meth:`save` / :meth:`load` use safetensors (no pickle).

    Args:
        data: float latents with at least 2 dims, or int64 tokens ``[N, L]`` (>= 0).
        labels: int64 ``[N]`` or None.
        num_classes: number of classes (default ``labels.max() + 1``).
    """

    def __init__(
        self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None
    ):
        if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] == 0:
            shape = list(data.shape) if isinstance(data, torch.Tensor) else ""
            raise ValueError(
                f"LatentDataset: data must be a tensor [N, ...] with N >= 1 and at least 2 "
                f"dims, got {type(data).__name__}{shape}"
            )
        if data.is_floating_point():
            pass
        elif data.dtype == torch.int64:
            if data.ndim != 2:
                raise ValueError(
                    f"LatentDataset: token data must be int64 [N, L], got shape {list(data.shape)}"
                )
            if int(data.min()) < 0:
                raise ValueError("LatentDataset: tokens must be >= 0 (no padding index -1)")
        else:
            raise ValueError(
                f"LatentDataset: data must be floating point (latents) or int64 (tokens), got {data.dtype}"
            )
        n = data.shape[0]
        if labels is None:
            labels = torch.zeros(n, dtype=torch.int64)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise ValueError(
                f"LatentDataset: labels must be an int64 tensor of shape [{n}], got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} "
                f"{list(labels.shape) if isinstance(labels, torch.Tensor) else ''}"
            )
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        num_classes = _check_int("LatentDataset", "num_classes", num_classes, 1)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"LatentDataset: labels must lie in [0, num_classes={num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        self.data = data.detach().cpu().contiguous()
        self.labels = labels.cpu().contiguous()
        self.num_classes = num_classes

    @property
    def is_tokens(self) -> bool:
        return not self.data.is_floating_point()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int):
        return self.data[index], self.labels[index]

    def save(self, path: str | os.PathLike) -> None:
        save_file(
            {"data": self.data, "labels": self.labels},
            str(path),
            metadata={"num_classes": str(self.num_classes), "format": "fastlatent.LatentDataset"},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatentDataset:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            if metadata.get("format") != "fastlatent.LatentDataset" or not {"data", "labels"} <= keys:
                raise ValueError(f"LatentDataset.load: {path} is not a file written by LatentDataset.save")
            return cls(f.get_tensor("data"), f.get_tensor("labels"), int(metadata["num_classes"]))

    def __repr__(self) -> str:
        kind = "tokens" if self.is_tokens else "latents"
        return f"LatentDataset({kind} {list(self.data.shape)}, num_classes={self.num_classes})"


@torch.no_grad()
def encode_dataset(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    num_workers: int = 0,
) -> LatentDataset:
    """Encode every image of ``dataset`` (in order) into a :class:`LatentDataset` for prior training.

    Args:
        encode: images ``[B, C, H, W]`` on ``device`` -> latents ``[B, ...]`` float or tokens ``[B, L]``
            int64, e.g. ``TwoStagePipeline.encode`` (prior-space latents or flattened tokens).
        dataset: yields ``(image, label)``.
        batch_size, num_workers: of the DataLoader.
        device: where ``encode`` runs (default: CUDA when available).
        num_classes: default ``getattr(dataset, "num_classes", None)``.
    """
    batch_size = _check_int("encode_dataset", "batch_size", batch_size, 1)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    outputs, labels = [], []
    for images, batch_labels in loader:
        out = encode(images.to(device))
        if not isinstance(out, torch.Tensor) or out.shape[0] != images.shape[0]:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else ""
            raise ValueError(
                f"encode_dataset: encode must return a tensor with the batch size "
                f"{images.shape[0]} first, got {type(out).__name__}{shape}"
            )
        outputs.append(out.cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    return LatentDataset(torch.cat(outputs), torch.cat(labels), num_classes)
