"""Hostile-input probes that once found silent wrong results, unsafe resumes or confusing errors (issue 17).

Each test names the defect it guards against; each failed on the code before its fix.
"""

import pytest
import torch
import torch.nn.functional as F
from test_blocks import randomise
from torch import nn
from torch.autograd import gradgradcheck

import fastlatent
from fastlatent import ops
from fastlatent.data import ImageFolderDataset


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


# ------------------------------------------------------------------ caches that miss writes through .data


def test_patched_autoencoder_kl_sees_weight_writes_through_data():
    # EMA code writes weights through `.data`, which moves no version counter: a fold cache keyed on the
    # version kept decoding with the old Upsample weights (a full AutoencoderKL decode differed by up to 2.1)
    from test_patch import small_sd_vae

    vae = small_sd_vae()
    original = small_sd_vae()
    z = torch.randn(1, 4, 8, 8)
    fastlatent.patch(vae, report=False)
    with torch.no_grad():
        vae.decode(z)  # a first decode, as a training loop's sample step would
        new = {k: v + 0.05 * torch.randn_like(v) for k, v in vae.state_dict().items()}
        for name, p in vae.named_parameters():
            p.data.copy_(new[name])  # p.data.copy_(ema): no version bump
        for name, p in original.named_parameters():
            p.copy_(new[name])
        patched, unpatched = vae.decode(z).sample, original.decode(z).sample
    torch.testing.assert_close(patched, unpatched, atol=1e-4, rtol=1e-4)


def test_upsample_sees_in_place_scaling_through_data():
    up = randomise(fastlatent.nn.Upsample(4, use_conv=True)).eval()
    x = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        up(x)
        up.conv.weight.data.mul_(-3.0)
        up.conv.bias.data.add_(1.0)
        want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(up(x), want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ second-order gradients


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_group_norm_double_backward(activation):
    # the fused backward kernel has no autograd formula: torch only warned and second-order terms were zero
    torch.manual_seed(0)
    x, w, b, r = _f64(2, 6, 3, 4), _f64(6), _f64(6), _f64(2, 6, 3, 4)
    assert gradgradcheck(lambda *a: ops.group_norm(*a[:3], 3, 1e-5, activation, a[3]), (x, w, b, r))
    xl = _f64(2, 6, 3, 4).detach().to(memory_format=torch.channels_last).requires_grad_()
    assert gradgradcheck(lambda t: ops.group_norm(t, None, None, 2, 1e-5, activation), (xl,))


def test_group_norm_conv3x3_double_backward():
    torch.manual_seed(0)
    inputs = (_f64(2, 6, 4, 5), _f64(6), _f64(6), _f64(5, 6, 3, 3), _f64(5), _f64(2, 5, 4, 5))

    def fn(x, gw, gb, cw, cb, r):
        return ops.group_norm_conv3x3(x, gw, gb, 3, cw, cb, activation="silu", residual=r)

    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_group_norm_apply_and_stats_double_backward(activation):
    torch.manual_seed(0)
    x = (_f64(2, 6, 3, 5).detach() * 2 + 1).requires_grad_()
    mean, rstd = torch.randn(2, 3), torch.rand(2, 3) + 0.5
    assert gradgradcheck(
        lambda t, w, b: ops.group_norm_apply(t, mean, rstd, w, b, activation), (x, _f64(6), _f64(6))
    )
    # the statistics are fp32 outputs: a Hessian-vector product against float64 autograd instead
    a, c = torch.randn(2, 3), torch.randn(2, 3)

    def hvp(mean, m2):
        (g,) = torch.autograd.grad((mean * a).sum() + (m2**2 * c).sum(), x, create_graph=True)
        return torch.autograd.grad((g**2).sum(), x)[0]

    xg = x.reshape(2, 3, -1)
    ref_mean = xg.mean(-1)
    torch.testing.assert_close(
        hvp(*ops.group_norm_stats(x, 3)),
        hvp(ref_mean, ((xg - ref_mean[..., None]) ** 2).sum(-1)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("preserve_symmetry", [False, True])
def test_fsq_double_backward(preserve_symmetry):
    z = _f64(7, 3)
    assert gradgradcheck(lambda t: ops.fsq_quantize(t, [5, 4, 3], preserve_symmetry)[0], (z,))


def test_lfq_and_bsq_double_backward():
    torch.manual_seed(0)
    z = _f64(7, 4)
    assert gradgradcheck(lambda t: ops.lfq_quantize(t, 0.5)[0], (z,))
    assert gradgradcheck(lambda t: ops.lfq_entropy(t, 1.0, 3.0), (z,))
    assert gradgradcheck(lambda t: ops.bsq_quantize(t)[0], (z,))
    assert gradgradcheck(lambda t: ops.bsq_entropy(t, 2.0), (z,))


def test_r1_penalty_through_a_patched_discriminator():
    # an R1 penalty on a GroupNorm discriminator: the first conv's weight gradient was off by 4.7 (true max 6)
    torch.manual_seed(0)

    def disc():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(4, 8),
            nn.SiLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.Conv2d(8, 1, 1),
        ).double()

    def r1_weight_grad(model):
        x = torch.randn(
            2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True
        )
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), model[0].weight)[0]

    patched = disc()
    fastlatent.patch(patched, report=False)
    assert sum(patched.fastlatent_patch_report.swapped.values()) == 2
    torch.testing.assert_close(r1_weight_grad(patched), r1_weight_grad(disc()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ in-place ops and autograd versions


def _ema_state(k=5, d=3, requires_grad=False):
    codebook = torch.randn(k, d).requires_grad_(requires_grad)
    return torch.ones(k), torch.randn(k, d), codebook, torch.rand(k) * 4, torch.randn(k, d)


def test_ema_update_bumps_version_counters():
    # a graph that saved the codebook used the EMA-updated values without torch's in-place error
    cluster_size, embed_sum, codebook, counts, sums = _ema_state()
    before = [t._version for t in (cluster_size, embed_sum, codebook, counts, sums)]
    ops.ema_update_(cluster_size, embed_sum, codebook, counts, sums, 0.9)
    after = [t._version for t in (cluster_size, embed_sum, codebook, counts, sums)]
    assert [a > b for a, b in zip(after, before)] == [True, True, True, False, False]
    # through the raw op too (torch.ops callers, torch.compile's functionalised graphs)
    torch.ops.fastlatent.ema_update_.default(cluster_size, embed_sum, codebook, counts, sums, 0.9, 1e-5)
    assert codebook._version > after[2]


def test_ema_update_of_a_saved_codebook_raises_at_backward():
    x = torch.randn(4, 3, requires_grad=True)
    cluster_size, embed_sum, codebook, counts, sums = _ema_state()
    loss = (x @ codebook.T).pow(2).sum()  # saves the codebook for x's gradient
    ops.ema_update_(cluster_size, embed_sum, codebook, counts, sums, 0.9)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 1e39, -1.0])
def test_ema_update_rejects_eps_that_is_not_a_finite_float32(eps):
    state = _ema_state()
    with pytest.raises(ValueError, match="eps must be a finite float32 value >= 0"):
        ops.ema_update_(*state, 0.9, eps)
    with pytest.raises(ValueError, match="eps must be a finite float32 value >= 0"):
        ops.ema_update_(*(t.to("meta") for t in state), 0.9, eps)


# ------------------------------------------------------------------ image folders


def _png(path, side=16):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (200, 30, 90)).save(path)


def test_image_folder_labels_never_shift_when_a_class_has_no_usable_file(tmp_path):
    # folder b held only undecodable files: it vanished from the classes and c got label 1, not 2
    for name in ("a", "c"):
        _png(tmp_path / name / "x.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3"):
        with pytest.raises(ValueError, match=r"class folder\(s\) \['b'\] .* hold no usable image"):
            ImageFolderDataset(tmp_path, 8)
    _png(tmp_path / "b" / "good.png")
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        data = ImageFolderDataset(tmp_path, 8)
    assert data.classes == ["a", "b", "c"]
    labels = {p.parent.name: int(label) for p, label in zip(data.files, data.labels)}
    assert labels == {"a": 0, "b": 1, "c": 2}


def test_image_folder_reports_dangling_links_and_folders_named_like_images(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.warns(RuntimeWarning, match="skipped 2 of 3"):
        data = ImageFolderDataset(tmp_path, 8)
    reasons = {p.name: why for p, why in data.skipped}
    assert reasons["gone.png"].startswith("dangling symbolic link")
    assert reasons["dir.png"] == "a folder, not an image file"


# ------------------------------------------------------------------ kmeans


@pytest.mark.parametrize("magnitude", [1.0, 1e19, 1e30, 3e38])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_clusters_huge_values(magnitude, metric):
    # at >= 1e19 the fp32 squared distances overflowed and every row went to one cluster
    gen = torch.Generator().manual_seed(0)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    x = directions.repeat_interleave(20, 0) + 0.01 * torch.randn(60, 2, generator=gen, dtype=torch.float64)
    x = (x * magnitude / x.abs().max()).float()
    centres, counts = ops.kmeans(x, 3, num_iters=5, generator=torch.Generator().manual_seed(1), metric=metric)
    assert sorted(counts.tolist()) == [20.0, 20.0, 20.0]
    assert torch.isfinite(centres).all()
    if metric == "l2":
        want = torch.stack([x[i * 20 : (i + 1) * 20].double().mean(0) for i in range(3)])
        got = centres.double()[torch.cdist(want, centres.double()).argmin(1)]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (
            torch.randn(8, 2, dtype=torch.complex64),
            TypeError,
            "real floating-point tensor .* torch.complex64",
        ),
        (torch.arange(16).reshape(8, 2), TypeError, "real floating-point tensor .* got torch.int64"),
        (torch.ones(8, 2, dtype=torch.bool), TypeError, "got torch.bool"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), ValueError, "NaN or Inf"),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), ValueError, "NaN or Inf"),
        (
            torch.tensor([[0.0, 1.0], [1e300, 0.0]], dtype=torch.float64),
            ValueError,
            "beyond the float32 range",
        ),
    ],
)
def test_kmeans_rejects_non_real_or_non_finite_input(x, error, match):
    with pytest.raises(error, match=match):
        ops.kmeans(x, 2)


# ------------------------------------------------------------------ concurrent runs, resumes of another run


def test_a_second_run_into_a_live_run_directory_refuses(tmp_path):
    # a second run into the same --out deleted the live run's .step_*.tmp (the file it was writing)
    import subprocess
    import sys

    from test_training import PairDataset, Regressor, small_config

    from fastlatent.training import Trainer
    from fastlatent.training.run_lock import RunDirectoryBusy

    config = small_config(tmp_path, steps=2)
    run = tmp_path / "run"
    temporary = run / "checkpoints" / ".step_00000002.pt.abc.tmp"
    temporary.parent.mkdir(parents=True)
    temporary.write_bytes(b"being written")
    hold = (
        "import sys; from fastlatent.training.run_lock import RunLock\n"
        "with RunLock(sys.argv[1], 'training run'):\n    print('ready', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        busy = rf"in use by another training run \(process {holder.pid} on"
        with pytest.raises(RunDirectoryBusy, match=busy):
            Trainer(Regressor(), **config).fit(PairDataset())
        assert temporary.exists()
    finally:
        holder.communicate("", timeout=60)
    Trainer(Regressor(), **config).fit(PairDataset())  # the holder has exited: its lock went with it
    assert not temporary.exists()


def test_resume_refuses_a_checkpoint_of_a_different_model(tmp_path):
    # an lfq autoencoder resumed an fsq 5,5,5 run (the quantisers hold no parameters): exit 0, wrong run
    from test_training import small_config

    from fastlatent import models
    from fastlatent.training import Trainer

    def task(**quantizer):
        torch.manual_seed(0)
        ae = models.FSQAutoencoder(
            in_channels=1,
            out_channels=1,
            block_out_channels=[8],
            layers_per_block=1,
            norm_num_groups=4,
            **quantizer,
        )
        return models.AutoencoderTask(ae, models.AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0))

    images = torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8) * 2 - 1, torch.zeros(8, dtype=torch.long))
    fsq = Trainer(task(quantizer="fsq", levels=[5, 5, 5]), **small_config(tmp_path, steps=2, batch_size=4))
    fsq.fit(images)
    lfq = Trainer(task(quantizer="lfq", codebook_size=8), **small_config(tmp_path, steps=4, batch_size=4))
    with pytest.raises(ValueError, match=r"written by a different run \(.*quantizer: 'fsq' -> 'lfq'"):
        lfq.fit(images)
    precision = Trainer(
        task(quantizer="fsq", levels=[5, 5, 5]),
        **small_config(tmp_path, steps=4, batch_size=4, precision="bf16"),
    )
    with pytest.raises(ValueError, match=r"trainer.precision: 'fp32' -> 'bf16'"):
        precision.fit(images)


# ------------------------------------------------------------------ tampered model folders


def _saved_autoencoder(tmp_path):
    from fastlatent import models

    model = models.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=4,
    )
    return model.save_pretrained(tmp_path / "ae")


def _tamper(folder, **changes):
    import json

    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


def test_tampered_config_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    # "layers_per_block": 100000 in a 150-byte config.json built the model first: 5.3 GB RSS after 60 s
    from fastlatent import models

    folder = _saved_autoencoder(tmp_path)
    _tamper(folder, layers_per_block=100000)
    built = []
    original = models.AutoencoderKL.__init__

    def counting_init(self, *args, **kwargs):
        built.append(torch.get_default_device())
        original(self, *args, **kwargs)

    monkeypatch.setattr(models.AutoencoderKL, "__init__", counting_init)
    with pytest.raises(ValueError, match=r"more parameters than the \d+ tensors of model.safetensors"):
        models.load_pretrained(folder)
    assert [d.type for d in built] == ["meta"]  # the real model was never built


def test_config_weights_shape_mismatch_is_refused_before_allocating(tmp_path):
    from fastlatent import models

    folder = _saved_autoencoder(tmp_path)
    _tamper(folder, block_out_channels=[8, 4096])
    fit = r"model.safetensors does not fit config.json \(shape mismatch: .*4096"
    with pytest.raises(ValueError, match=fit):
        models.load_pretrained(folder)


# ------------------------------------------------------------------ clear errors


def test_merge_group_stats_rejects_negative_or_non_finite_counts():
    part = (torch.zeros(1, 2), torch.ones(1, 2))
    for counts in ([4, -2], [4, float("inf")], [4, float("nan")], [True, 4]):
        with pytest.raises(ValueError, match=r"counts must be finite numbers >= 0, got counts\[\d\]"):
            ops.merge_group_stats([part, part], counts)
    with pytest.raises(ValueError, match="same length"):
        ops.merge_group_stats([part, part], [4])


def test_tiled_decode_refuses_latents_that_require_grad():
    # the tiles run under no_grad: the gradient was silently dropped
    from test_patch import small_sd_vae

    vae = small_sd_vae()
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="latents requires grad, but the tiled path is not differentiable"):
        fastlatent.tiled_decode(vae, z, tile_size=4)
    with torch.no_grad():
        assert fastlatent.tiled_decode(vae, z, tile_size=4).shape == (1, 3, 64, 64)


def test_lfq_autoencoder_with_too_many_codes_fails_at_construction():
    from fastlatent import models

    with pytest.raises(ValueError, match=r"codebook_size must be <= 2\^18 for quantizer='lfq'"):
        models.FSQAutoencoder(
            quantizer="lfq",
            codebook_size=2**20,
            block_out_channels=[8],
            layers_per_block=1,
            norm_num_groups=4,
        )


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"steps": 5.7}', r"option steps: expected an integer, got 5.7"),
        ('{"steps": true}', r"option steps: expected a value, not true"),
        ('{"block_out_channels": [8, 16.5]}', r"option block_out_channels: expected an integer, got 16.5"),
    ],
)
def test_config_files_do_not_coerce_values(tmp_path, capsys, content, match):
    # "steps": 5.7 trained 5 steps and true trained 1
    import re

    from fastlatent.cli import main

    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(SystemExit):
        main(["train-ae", "--config", str(path), "--out", str(tmp_path / "o")])
    assert re.search(match, capsys.readouterr().err)
