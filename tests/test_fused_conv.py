"""fastlatent.nn's fused GroupNorm-conv mode: switching, where it applies, and (on a GPU) that patched models
decode the same with the fused kernel as without it."""

import pytest
import torch
from torch import nn

import fastlatent
from fastlatent.nn import GroupNormAct, fused_conv, fused_conv_mode, norm_act_conv, set_fused_conv
from fastlatent.nn import conv_fusion as fused_conv_module

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _restore_mode():
    previous = fused_conv_mode()
    yield
    set_fused_conv(previous)


def _norm_conv(cin=32, cout=16, groups=8, device="cpu", dtype=torch.float32, activation="silu"):
    torch.manual_seed(0)
    norm = GroupNormAct(groups, cin, 1e-6, activation=activation).to(device)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    conv = nn.Conv2d(cin, cout, 3, padding=1).to(device, dtype)
    return norm.eval(), conv.eval()


def test_mode_switch_and_context_manager():
    assert fused_conv_mode() == "off"
    with fused_conv("on"):
        assert fused_conv_mode() == "on"
        with fused_conv():
            assert fused_conv_mode() == "auto"
        assert fused_conv_mode() == "on"
    assert fused_conv_mode() == "off"
    with pytest.raises(ValueError, match=r"mode must be 'off', 'on' or 'auto', got 'fast'"):
        set_fused_conv("fast")


@pytest.mark.parametrize("mode", ["off", "on", "auto"])
def test_cpu_runs_unfused_in_every_mode(mode):
    norm, conv = _norm_conv()
    x, r = torch.randn(2, 32, 9, 7), torch.randn(2, 16, 9, 7)
    set_fused_conv(mode)
    with torch.no_grad():
        out = norm_act_conv(norm, conv, x, r)
        assert torch.equal(out, conv(norm(x)) + r)
    assert fused_conv_module._auto_choice == {}


def test_only_plain_3x3_convolutions_qualify():
    norm, conv = _norm_conv()
    assert fused_conv_module.is_plain_conv3x3(conv)
    for kwargs in ({"stride": 2}, {"dilation": 2, "padding": 2}, {"groups": 2}, {"padding_mode": "reflect"}):
        args = {"padding": 1, **kwargs}
        assert not fused_conv_module.is_plain_conv3x3(nn.Conv2d(32, 16, 3, **args))
    assert not fused_conv_module.is_plain_conv3x3(nn.Conv2d(32, 16, 1))


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_modes_agree(dtype):
    norm, conv = _norm_conv(128, 96, 32, "cuda", dtype)
    x = torch.randn(2, 128, 40, 56, device="cuda", dtype=dtype)
    r = torch.randn(2, 96, 40, 56, device="cuda", dtype=dtype)
    with torch.no_grad():
        set_fused_conv("off")
        unfused = norm_act_conv(norm, conv, x, r)
        set_fused_conv("on")
        fused = norm_act_conv(norm, conv, x, r)
        set_fused_conv("auto")
        auto = norm_act_conv(norm, conv, x, r)
    assert len(fused_conv_module._auto_choice) == 1
    scale = unfused.float().abs().max() + 1
    assert (fused.float() - unfused.float()).abs().max() <= 4e-2 * scale
    assert (auto.float() - unfused.float()).abs().max() <= 4e-2 * scale


@pytest.mark.cuda
def test_cuda_training_keeps_the_unfused_path():
    norm, conv = _norm_conv(64, 64, 16, "cuda", torch.bfloat16)
    x = torch.randn(1, 64, 16, 16, device="cuda", dtype=torch.bfloat16)
    set_fused_conv("on")
    assert not fused_conv_module._fusable(norm, conv, x, None)  # parameters require grad
    with torch.no_grad():
        assert fused_conv_module._fusable(norm, conv, x, None)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_patched_sd_vae_decodes_the_same_with_the_fused_kernel(mode):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = (
        diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
        )
        .to("cuda", torch.bfloat16)
        .eval()
    )
    z = torch.randn(1, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exact = vae.float().decode(z.float()).sample
        vae = vae.to(torch.bfloat16)
        eager = vae.decode(z).sample
        fastlatent.patch(vae, report=False)
        set_fused_conv(mode)
        fused = vae.decode(z).sample
    err_eager = (eager.float() - exact).abs().max()
    err_fused = (fused.float() - exact).abs().max()
    # bf16 end to end: as accurate as diffusers in bf16, against the fp32 model
    assert err_fused <= 1.5 * err_eager + 1e-2, (err_fused, err_eager)
