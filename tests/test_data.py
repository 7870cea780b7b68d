"""Datasets: digits, sample-photo patches, image folders with bad files, precomputed latents."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastlatent.data import (
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    SamplePhotoPatches,
    available_sample_photos,
    encode_dataset,
)

# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return {split: DigitsDataset(split) for split in ("train", "test", "all")}


def test_digits_shapes_range_and_labels(digits):
    train = digits["train"]
    image, label = train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert len(digits["all"]) == 1797
    batch = torch.utils.data.default_collate([train[i] for i in range(5)])
    assert batch[0].shape == (5, 1, 16, 16) and batch[1].dtype == torch.int64


def test_digits_split_is_stratified_disjoint_and_deterministic(digits):
    train, test = digits["train"], digits["test"]
    assert len(train) + len(test) == 1797
    assert not set(train.indices.tolist()) & set(test.indices.tolist())
    all_counts = torch.bincount(digits["all"].labels, minlength=10)
    test_counts = torch.bincount(test.labels, minlength=10)
    assert torch.equal(test_counts, torch.round(all_counts * 0.2).long())
    again = DigitsDataset("test")
    assert torch.equal(again.indices, test.indices) and torch.equal(again.images, test.images)
    other = DigitsDataset("test", seed=1)
    assert not torch.equal(other.indices, test.indices)
    assert len(DigitsDataset("test", test_fraction=0.5)) == int(torch.round(all_counts * 0.5).sum())


def test_digits_resizing_modes():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:5].astype(np.float32)) / 8 - 1
    nearest = DigitsDataset("all", size=24, interpolation="nearest")
    torch.testing.assert_close(nearest.images[:5, 0], raw.repeat_interleave(3, 1).repeat_interleave(3, 2))
    native = DigitsDataset("all", size=8)
    torch.testing.assert_close(native.images[:5, 0], raw)
    cubic = DigitsDataset("all", size=32, interpolation="bicubic")
    assert cubic.images.min() >= -1 and cubic.images.max() <= 1
    assert DigitsDataset("all", size=4).images.shape == (1797, 1, 4, 4)


def test_digits_augmentation_is_seeded_per_epoch():
    data = DigitsDataset("test", augment_shift=2)
    a = torch.stack([data[i][0] for i in range(20)])
    assert torch.equal(a, torch.stack([data[i][0] for i in range(20)]))
    data.set_epoch(1)
    b = torch.stack([data[i][0] for i in range(20)])
    assert not torch.equal(a, b)
    assert not torch.equal(a, data.images[:20])
    assert (a == -1).float().mean() >= (data.images[:20] == -1).float().mean()  # shifted in background


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="val"), "split must be one of"),
        (dict(size=0), "size must be an int >= 1"),
        (dict(test_fraction=1.0), r"test_fraction must be in \(0, 1\)"),
        (dict(interpolation="area"), "interpolation must be one of"),
        (dict(augment_shift=16), "augment_shift must be smaller than size"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataset(**kwargs)


# ---------------------------------------------------------------------------------------------- photos


def test_sample_photo_patches():
    names = available_sample_photos(3)
    assert {"china", "flower"} <= set(names)
    patches = SamplePhotoPatches(patch_size=24, num_patches=50, seed=0, min_scale=0.5)
    image, label = patches[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0
    assert 0 <= int(label) < len(patches.photo_names)
    stack = torch.stack([patches[i][0] for i in range(50)])
    same = SamplePhotoPatches(24, 50, seed=0, min_scale=0.5)
    other = SamplePhotoPatches(24, 50, seed=1, min_scale=0.5)
    assert torch.equal(stack, torch.stack([same[i][0] for i in range(50)]))
    assert not torch.equal(stack, torch.stack([other[i][0] for i in range(50)]))
    assert len({int(patches[i][1]) for i in range(50)}) > 1  # crops come from several photos
    gray = SamplePhotoPatches(patch_size=16, num_patches=10, channels=1)
    assert gray[0][0].shape == (1, 16, 16) and len(gray.photo_names) > len(patches.photo_names)
    only = SamplePhotoPatches(patch_size=16, num_patches=10, photos=["china"])
    assert only.photo_names == ["china"]


def test_sample_photo_patches_resample_each_epoch():
    patches = SamplePhotoPatches(patch_size=16, num_patches=10, resample_each_epoch=True)
    first = torch.stack([patches[i][0] for i in range(10)])
    patches.set_epoch(1)
    assert not torch.equal(first, torch.stack([patches[i][0] for i in range(10)]))
    patches.set_epoch(0)
    assert torch.equal(first, torch.stack([patches[i][0] for i in range(10)]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=0), "patch_size must be an int >= 1"),
        (dict(num_patches=0), "num_patches must be an int >= 1"),
        (dict(channels=4), "channels must be 1 or 3"),
        (dict(min_scale=0.0), "min_scale"),
        (dict(photos=["camera"]), "unknown"),  # greyscale photo with channels=3
        (dict(photos=["nope"]), "unknown"),
        (dict(patch_size=5000), "no photo is available"),
    ],
)
def test_sample_photo_patches_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplePhotoPatches(**({"num_patches": 4} | kwargs))


# ---------------------------------------------------------------------------------------------- folders


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 128, np.float32)],
        axis=2,
    ).astype(np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deep").mkdir(parents=True)
    Image.fromarray(_gradient(40, 30)).save(root / "cats" / "rgb.png")
    Image.fromarray(_gradient(30, 30)).convert("L").save(root / "cats" / "gray.jpg")
    rgba = Image.fromarray(_gradient(32, 32)).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must become the background colour
    rgba.save(root / "cats" / "clear.png")
    palette = Image.fromarray(_gradient(36, 36)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "dogs" / "palette.gif")
    deep = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60
    Image.fromarray(deep).save(root / "dogs" / "deep16.png")
    Image.fromarray(_gradient(50, 20)).convert("CMYK").save(root / "dogs" / "deep" / "cmyk.jpg")
    # Bad files.
    (root / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    jpeg = root / "dogs" / "truncated.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) * 2 // 3])  # header intact, scan data cut
    Image.fromarray(_gradient(6, 6)).save(root / "cats" / "tiny.png")
    # A real TIFF in a pixel format PIL can't represent (float32 RGB).
    tifffile = pytest.importorskip("tifffile")
    float_rgb = np.random.default_rng(0).random((32, 32, 3), np.float32)
    tifffile.imwrite(root / "dogs" / "float_rgb.tif", float_rgb, photometric="rgb")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(_gradient(32, 32)).save(root / ".hidden" / "skip.png")
    return root


def test_image_folder_skips_and_reports_bad_files(messy_folder):
    with pytest.warns(RuntimeWarning, match=r"skipped 4 of 10 files") as caught:
        data = ImageFolderDataset(messy_folder, size=16)
    message = str(caught[0].message)
    skipped = {path.name: why for path, why in data.skipped}
    assert set(skipped) == {"corrupt.png", "truncated.jpg", "tiny.png", "float_rgb.tif"}
    assert skipped["corrupt.png"].startswith("cannot open")
    assert skipped["float_rgb.tif"].startswith("cannot open")
    assert skipped["truncated.jpg"].startswith("cannot decode: truncated or corrupt")
    assert "too small (6x6, min_size is 8)" in skipped["tiny.png"]
    assert all(name in message for name in skipped)
    assert sorted(p.name for p in data.files) == [
        "clear.png",
        "cmyk.jpg",
        "deep16.png",
        "gray.jpg",
        "palette.gif",
        "rgb.png",
    ]
    assert data.classes == ["cats", "dogs"] and data.num_classes == 2
    by_name = {p.name: i for i, p in enumerate(data.files)}
    assert int(data[by_name["rgb.png"]][1]) == 0 and int(data[by_name["cmyk.jpg"]][1]) == 1
    for i in range(len(data)):
        image, label = data[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    clear = data[by_name["clear.png"]][0]
    torch.testing.assert_close(clear, torch.ones_like(clear))  # white background behind transparency
    gray = data[by_name["gray.jpg"]][0]
    torch.testing.assert_close(gray[0], gray[1])  # greyscale replicated to RGB
    deep = data[by_name["deep16.png"]][0]
    assert deep.max() > 0.5 and deep.std() > 0.1  # 16-bit rescaled, not clipped to white


def test_image_folder_greyscale_crops_and_header_mode(messy_folder):
    with pytest.warns(RuntimeWarning):
        gray = ImageFolderDataset(messy_folder, size=12, channels=1, min_size=4, labels=None)
    assert {p.name for p, _ in gray.skipped} == {"corrupt.png", "truncated.jpg", "float_rgb.tif"}  # tiny fits
    assert gray[0][0].shape == (1, 12, 12) and gray.classes == [] and int(gray.labels.max()) == 0
    with pytest.warns(RuntimeWarning):
        random_crops = ImageFolderDataset(messy_folder, size=16, crop="random", flip=True, seed=3)
    wide = [i for i, p in enumerate(random_crops.files) if p.name == "cmyk.jpg"][0]
    views = {tuple(random_crops[wide][0].flatten()[:50].tolist()) for _ in range(2)}
    assert len(views) == 1  # same epoch, same crop
    epochs = set()
    for epoch in range(6):
        random_crops.set_epoch(epoch)
        epochs.add(tuple(random_crops[wide][0].flatten().tolist()))
    assert len(epochs) > 1
    with pytest.warns(RuntimeWarning) as caught:
        header_only = ImageFolderDataset(messy_folder, size=16, verify="header")
    # The header check catches the fake PNG and the tiny image; the truncated JPEG fails when read.
    assert {p.name for p, _ in header_only.skipped} == {"corrupt.png", "tiny.png", "float_rgb.tif"}
    truncated = [i for i, p in enumerate(header_only.files) if p.name == "truncated.jpg"][0]
    with pytest.raises(RuntimeError, match="could not read .*truncated.jpg"):
        header_only[truncated]
    assert caught


def test_image_folder_reports_unconvertible_modes(tmp_path, monkeypatch):
    import fastlatent.data as data_module

    Image.fromarray(_gradient(20, 20)).save(tmp_path / "rgb.png")
    Image.fromarray(_gradient(20, 20)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    convert = data_module._to_mode

    def picky(image, channels, background):  # as a Pillow build without this conversion would behave
        if image.mode == "CMYK":
            raise ValueError("conversion from CMYK to RGB not supported")
        return convert(image, channels, background)

    monkeypatch.setattr(data_module, "_to_mode", picky)
    with pytest.warns(RuntimeWarning, match="cmyk.jpg: cannot convert mode 'CMYK' to RGB"):
        data = ImageFolderDataset(tmp_path, size=8)
    assert [p.name for p in data.files] == ["rgb.png"]


def test_image_folder_flat_and_non_recursive(tmp_path):
    for i in range(3):
        Image.fromarray(_gradient(20 + i, 24)).save(tmp_path / f"{i}.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(_gradient(20, 20)).save(tmp_path / "sub" / "x.png")
    flat = ImageFolderDataset(tmp_path, size=8, recursive=False)
    assert len(flat) == 3 and flat.classes == [] and flat.skipped == []
    assert len(ImageFolderDataset(tmp_path, size=8)) == 4
    squashed = ImageFolderDataset(tmp_path, size=8, crop="none")
    assert squashed[0][0].shape == (3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", size=8)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        ImageFolderDataset(tmp_path / "file.txt", size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(empty, size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="none of the 1 image files"):
        ImageFolderDataset(bad, size=8)
    for kwargs, match in [
        (dict(size=0), "size"),
        (dict(channels=2), "channels"),
        (dict(crop="left"), "crop"),
        (dict(verify="none"), "verify"),
        (dict(labels="names"), "labels"),
        (dict(background=(0, 0)), "background"),
    ]:
        with pytest.raises(ValueError, match=match):
            ImageFolderDataset(bad, **({"size": 8} | kwargs))


# ---------------------------------------------------------------------------------------------- latents


def test_latent_dataset_roundtrip_and_errors(tmp_path):
    latents = torch.randn(6, 4, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = LatentDataset(latents, labels, num_classes=3)
    x, y = data[4]
    assert torch.equal(x, latents[4]) and int(y) == 1 and not data.is_tokens
    data.save(tmp_path / "latents.safetensors")
    loaded = LatentDataset.load(tmp_path / "latents.safetensors")
    assert torch.equal(loaded.data, latents) and torch.equal(loaded.labels, labels)
    assert loaded.num_classes == 3
    tokens = LatentDataset(torch.randint(0, 16, (5, 9)))
    assert tokens.is_tokens and tokens.num_classes == 1 and int(tokens.labels.sum()) == 0
    for args, match in [
        ((torch.randn(3),), "at least 2 dims"),
        ((torch.zeros(3, 4, dtype=torch.int32),), "floating point"),
        ((torch.zeros(3, 4, 2, dtype=torch.int64),), r"int64 \[N, L\]"),
        ((torch.full((3, 4), -1),), "tokens must be >= 0"),
        ((latents, labels[:3]), r"labels must be an int64 tensor of shape \[6\]"),
        ((latents, labels.float()), "int64"),
        ((latents, labels, 2), r"labels must lie in \[0, num_classes=2\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            LatentDataset(*args)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a file written by LatentDataset.save"):
        LatentDataset.load(tmp_path / "other.safetensors")


def test_encode_dataset(digits):
    test = digits["test"]
    pooled = encode_dataset(
        lambda x: torch.nn.functional.avg_pool2d(x, 4), test, batch_size=100, device="cpu"
    )
    assert pooled.data.shape == (len(test), 1, 4, 4) and pooled.num_classes == 10
    assert torch.equal(pooled.labels, test.labels)
    torch.testing.assert_close(pooled.data[7], torch.nn.functional.avg_pool2d(test.images[7:8], 4)[0])
    tokens = encode_dataset(lambda x: (x.flatten(1)[:, :10] > 0).long(), test, batch_size=64, device="cpu")
    assert tokens.is_tokens and tokens.data.shape == (len(test), 10)
    with pytest.raises(ValueError, match="batch size"):
        encode_dataset(lambda x: x[:1], test, batch_size=64, device="cpu")
