"""Stage-1 losses: LPIPS wrapper (backbone from the torch hub cache, clear error without it), PatchGAN, GAN
losses, the adaptive generator weight, AutoencoderLoss and AutoencoderTask (the trainer's protocol)."""

import math

import lpips
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models import AutoencoderKL, FSQAutoencoder, VQAutoencoder
from fastlatent.models.losses import (
    LPIPS,
    AutoencoderLoss,
    AutoencoderTask,
    PatchGANDiscriminator,
    adaptive_generator_weight,
    hinge_d_loss,
    lpips_backbone_path,
    reconstruction_metrics,
    vanilla_d_loss,
)

TINY = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=[16, 32],
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=False,
)


def loss_without_lpips(**kwargs):
    config = dict(perceptual_weight=0.0, disc_in_channels=1, disc_ndf=8, disc_layers=2, disc_start=3)
    return AutoencoderLoss(**{**config, **kwargs})


# ---------------------------------------------------------------------------------------------- LPIPS


def test_lpips_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af.pth.*TORCH_HOME") as info:
        LPIPS("vgg")
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        AutoencoderLoss(lpips_net="alex")
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("resnet")


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips builds torchvision trunks with pretrained=
def test_lpips_loads_backbone_from_the_hub_cache(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    backbone = torchvision.models.squeezenet1_1(weights=None)  # 1.2M parameters: the cheapest LPIPS trunk
    path = lpips_backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(backbone.state_dict(), path)
    ours = LPIPS("squeeze")
    reference = lpips.LPIPS(pretrained=True, net="squeeze", pnet_rand=True, verbose=False).eval()
    for k, module in enumerate(reference.net.children()):
        for name, child in module.named_children():
            child.load_state_dict(backbone.features[int(name)].state_dict())
    x, y = torch.rand(2, 3, 24, 20) * 2 - 1, torch.rand(2, 3, 24, 20) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y).reshape(2))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torchvision checkpoint"):
        LPIPS("squeeze")


def test_lpips_random_backbone_module_behaviour():
    metric = LPIPS("vgg", pretrained_backbone=False)
    assert list(metric.parameters()) == [] and metric.state_dict() == {}
    metric.train()
    assert not metric.__dict__["_lpips"].training  # the linear heads' dropout stays off
    x = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_()
    y = torch.rand(3, 1, 16, 16) * 2 - 1
    d = metric(x, y)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(metric(y, y), torch.zeros(3), atol=1e-6, rtol=0)
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 16x16"):
        metric(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        metric(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        metric(torch.zeros(1, 3, 16, 16), torch.zeros(2, 3, 16, 16))


# ---------------------------------------------------------------------------------------------- GAN parts


def test_patchgan_layout_and_validation():
    d = PatchGANDiscriminator(in_channels=3, ndf=8, n_layers=3)
    # taming's NLayerDiscriminator names: conv, lrelu, (conv, norm, lrelu) x n_layers, conv
    keys = [k for k in d.state_dict() if k.endswith("weight")]
    assert keys == [
        "main.0.weight",
        "main.2.weight",
        "main.3.weight",
        "main.5.weight",
        "main.6.weight",
        "main.8.weight",
        "main.9.weight",
        "main.11.weight",
    ]
    assert d.main[2].bias is None and d.main[11].bias is not None  # no conv bias before a batch norm
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="with n_layers=3 images must be at least 24x24"):
        d(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        d(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchGANDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="n_layers must be an int >= 1"):
        PatchGANDiscriminator(n_layers=0)
    assert PatchGANDiscriminator(1, 8, 2, norm="group")(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 2, 2)


def test_d_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.5) / 3)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(hinge)
    sp = lambda t: torch.log1p(torch.exp(t))  # noqa: E731
    vanilla = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(float(vanilla))


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 1, 3, padding=1)
    h = torch.randn(2, 4, 6, 6)
    out = last(h)
    target = torch.randn(2, 1, 6, 6)
    nll = (out - target).abs().mean()
    g = -(out * 3.0).mean()
    weight = adaptive_generator_weight(nll, g, last.weight)
    # by hand: d|out - t|/dw = sign(out - t) conv h / N;  d(-3 out)/dw = -3 conv h / N
    n = out.numel()
    grad_out_nll = torch.sign(out - target) / n
    grad_out_g = torch.full_like(out, -3.0 / n)
    gw = lambda go: torch.nn.grad.conv2d_weight(h, last.weight.shape, go, padding=1)  # noqa: E731
    expected = gw(grad_out_nll).norm() / (gw(grad_out_g).norm() + 1e-4)
    torch.testing.assert_close(weight, expected.detach())
    assert not weight.requires_grad
    # the clamp: a GAN loss that barely moves the last layer gets at most max_weight
    tiny_g = (out * 1e-12).mean()
    assert float(adaptive_generator_weight(nll * 100, tiny_g, last.weight)) == 1e4
    assert float(adaptive_generator_weight(nll, tiny_g, last.weight, max_weight=50.0)) == 50.0
    with torch.no_grad():
        assert float(adaptive_generator_weight(nll.detach(), g.detach(), last.weight)) == 0.0
    other = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="does not depend on last_layer_weight"):
        adaptive_generator_weight(nll, g, other)


# ---------------------------------------------------------------------------------------------- task


def test_no_gan_term_before_disc_start_and_weights_by_hand():
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY)
    loss = loss_without_lpips(kl_weight=0.5, reconstruction="l2", reconstruction_weight=2.0)
    task = AutoencoderTask(ae, loss)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = task.training_step((x, torch.zeros(2, dtype=torch.long)), step=2)
    assert "disc_loss" not in out and "g_loss" not in out and "d_weight" not in out
    expected = 2.0 * out["rec_loss"] + 0.5 * out["kl"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    later = task.training_step((x, torch.zeros(2, dtype=torch.long)), step=3)
    assert {"disc_loss", "g_loss", "d_weight", "logits_real", "logits_fake"} <= set(later)
    assert later["d_weight"] > 0


def test_disc_loss_gradients_stay_in_the_discriminator():
    torch.manual_seed(0)
    task = AutoencoderTask(VQAutoencoder(**TINY, latent_channels=4, codebook_size=16), loss_without_lpips())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = task.training_step(x, step=5)
    d_params = task.discriminator_parameters()
    assert d_params and all(any(p is q for q in task.loss.discriminator.parameters()) for p in d_params)
    out["disc_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in task.autoencoder.parameters())
    assert all(p.grad is not None for p in d_params)
    for p in d_params:
        p.grad = None
    out["loss"].backward()
    assert all(p.grad is None for p in d_params)  # the generator's GAN term does not train D either
    assert task.autoencoder.encoder.conv_in.weight.grad is not None
    assert (
        AutoencoderTask(task.autoencoder, loss_without_lpips(disc_weight=0.0)).discriminator_parameters()
        == []
    )


def test_task_validation_errors():
    ae = FSQAutoencoder(**TINY)
    with pytest.raises(ValueError, match="discriminator takes 3 channels but the autoencoder outputs 1"):
        AutoencoderTask(ae, AutoencoderLoss(perceptual_weight=0.0))
    with pytest.raises(TypeError, match="loss must be an AutoencoderLoss"):
        AutoencoderTask(ae, nn.MSELoss())
    with pytest.raises(TypeError, match="stage-1 protocol"):
        AutoencoderTask(nn.Linear(2, 2), loss_without_lpips())
    with pytest.raises(ValueError, match="reconstruction must be 'l1' or 'l2'"):
        AutoencoderLoss(reconstruction="huber")
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        AutoencoderLoss(disc_loss="wgan", perceptual_weight=0)
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        AutoencoderLoss(kl_weight=-1.0, perceptual_weight=0)
    with pytest.raises(ValueError, match="disc_start must be an int >= 0"):
        AutoencoderLoss(disc_start=-5, perceptual_weight=0)
    task = AutoencoderTask(ae, loss_without_lpips(disc_weight=0.0))
    with pytest.raises(TypeError, match=r"batch must be images \[B, C, H, W\] or \(images, labels\)"):
        task.training_step([{"image": 1}], 0)


def test_lfq_entropy_and_perplexity_reach_the_metrics():
    torch.manual_seed(0)
    ae = FSQAutoencoder(**TINY, quantizer="lfq", codebook_size=16)
    task = AutoencoderTask(
        ae, loss_without_lpips(disc_weight=0.0, entropy_weight=0.1, commitment_weight=0.25)
    )
    out = task.training_step(torch.rand(2, 1, 16, 16) * 2 - 1, step=0)
    expected = out["rec_loss"] + 0.1 * out["entropy"] + 0.25 * out["commitment"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert 1.0 <= float(out["perplexity"]) <= 16 and 0 < float(out["usage"]) <= 1


def test_tiny_fsq_autoencoder_learns():
    torch.manual_seed(0)
    ae = FSQAutoencoder(**{**TINY, "block_out_channels": [8, 16], "norm_num_groups": 4}, levels=[8, 8, 8])
    task = AutoencoderTask(ae, loss_without_lpips(disc_weight=0.0))
    data = torch.rand(8, 1, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    with torch.no_grad():
        first = task.validation_step(data)
    for step in range(20):
        out = task.training_step((data, torch.zeros(8, dtype=torch.long)), step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    last = task.validation_step(data)
    # seeds 0-2 reach 0.60-0.70 of the first loss and +2.7 to +3.4 dB in 20 steps
    assert float(last["rec_loss"]) < 0.8 * float(first["rec_loss"])
    assert float(last["psnr"]) > float(first["psnr"]) + 1.5
    assert task.training  # validation_step restored the mode


def test_perceptual_term_with_random_backbone():
    torch.manual_seed(0)
    ae = AutoencoderKL(**TINY)
    loss = AutoencoderLoss(perceptual_weight=1.0, pretrained_lpips=False, disc_weight=0.0)
    task = AutoencoderTask(ae, loss)
    out = task.training_step(torch.rand(2, 1, 16, 16) * 2 - 1, step=0)
    torch.testing.assert_close(
        out["loss"].detach(), out["rec_loss"] + out["perceptual_loss"] + 1e-6 * out["kl"]
    )
    assert not any(k.startswith("loss.perceptual") for k in task.state_dict())
    F.mse_loss(out["loss"], torch.zeros(())).backward()


def test_reconstruction_metrics_clamp_the_reconstruction_and_floor_the_mse():
    x = torch.zeros(2, 1, 4, 4)
    recon = torch.stack([torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 3.0)])  # the second clamps to 1
    metrics = reconstruction_metrics(x, recon)
    torch.testing.assert_close(metrics["mse"], torch.tensor((0.25 + 1.0) / 2))
    torch.testing.assert_close(
        metrics["psnr"], torch.tensor((10 * math.log10(16.0) + 10 * math.log10(4.0)) / 2)
    )
    same = reconstruction_metrics(x, x)["psnr"]
    torch.testing.assert_close(same, torch.tensor(10 * math.log10(4e10)))  # floored, not inf


def test_validation_step_restores_each_submodules_own_mode():
    torch.manual_seed(0)
    ae = AutoencoderKL(**{**TINY, "block_out_channels": [8, 16], "norm_num_groups": 4})
    task = AutoencoderTask(ae, loss_without_lpips(disc_weight=0.5)).train()
    task.loss.discriminator.eval()  # e.g. frozen before disc_start: validation must not switch it on
    out = task.validation_step(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert set(out) == {"rec_loss", "mse", "psnr"} and not out["mse"].requires_grad
    assert task.training and ae.training and not task.loss.discriminator.training
