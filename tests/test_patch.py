"""fastlatent.patch / unpatch on diffusers' AutoencoderKL (SD-VAE structure), a taming-style VQGAN decoder and
plain torch models: outputs within tolerance, state-dict keys unchanged, unpatch bit-identical."""

import copy

import pytest
import taming_style
import torch
from test_blocks import randomise
from torch import nn

import fastlatent
from fastlatent import patching
from fastlatent.nn import AttnBlock, GroupNormAct, ResnetBlock, TamingResnetBlock

# Patched against unpatched, fp32: the only change is the GroupNorm kernel (fp64 sums, fp32 output), a few
# fp32 ulps per norm, amplified through ~30 convolutions: measured max |diff| ~6e-6 on outputs of size ~3.
DECODE_ATOL, DECODE_RTOL = 1e-4, 1e-4


def small_sd_vae():
    """AutoencoderKL with the SD-VAE structure (4 levels, 2 resnets per level, 4 latent channels, mid-block
    attention), widths (128, 256, 512, 512) / 4 and norm_num_groups 32 / 2 so that it runs on 2 CPU cores."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        sample_size=64,
    )
    return randomise(vae).eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_patch_autoencoder_kl_matches_unpatched():
    vae = small_sd_vae()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    before = state(vae)
    tensors = vae.state_dict(keep_vars=True)
    with torch.no_grad():
        dec_ref = vae.decode(z).sample
        enc_ref = vae.encode(x).latent_dist.parameters
    patched = fastlatent.patch(vae, report=False)
    assert patched is vae
    report = vae.fastlatent_patch_report
    assert dict(report.swapped) == {
        patching.KIND_RESNET: 24,
        patching.KIND_ATTENTION: 2,
        patching.KIND_PAIR: 2,
        patching.KIND_UPSAMPLE: 3,
    }
    assert report.left_alone == []
    assert not any(type(m) is nn.GroupNorm for m in vae.modules())
    # the only SiLUs left are the blocks' time-embedding activations, unused in a VAE
    temb_acts = {id(m.nonlinearity) for m in vae.modules() if isinstance(m, ResnetBlock)}
    assert all(id(m) in temb_acts for m in vae.modules() if type(m) is nn.SiLU)
    assert isinstance(vae.decoder.mid_block.attentions[0], AttnBlock)
    assert isinstance(vae.decoder.up_blocks[0].resnets[2], ResnetBlock)
    after = vae.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[k] is tensors[k] for k in tensors)
    with torch.no_grad():
        dec = vae.decode(z).sample
        enc = vae.encode(x).latent_dist.parameters
    torch.testing.assert_close(dec, dec_ref, atol=DECODE_ATOL, rtol=DECODE_RTOL)
    torch.testing.assert_close(enc, enc_ref, atol=DECODE_ATOL, rtol=DECODE_RTOL)
    assert not torch.equal(dec, dec_ref)  # the fused kernels did run

    restored = fastlatent.unpatch(vae)
    assert restored is vae and not hasattr(vae, "fastlatent_patch_report")
    assert sum(type(m) is nn.GroupNorm for m in vae.modules()) == 2 * 24 + 2 + 2
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, dec_ref)
        assert torch.equal(vae.encode(x).latent_dist.parameters, enc_ref)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())


def test_patch_autoencoder_kl_state_dict_loads_both_ways():
    vae = small_sd_vae()
    sd = state(vae)
    fresh = fastlatent.patch(copy.deepcopy(vae), report=False)
    randomise(fresh, seed=7)
    fresh.load_state_dict(sd)  # an unpatched checkpoint loads into the patched model, strictly
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.decode(z).sample, vae.decode(z).sample, atol=DECODE_ATOL, rtol=DECODE_RTOL
        )
    vae.load_state_dict(fresh.state_dict())  # and the other way


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patch_autoencoder_kl_half_precision_channels_last(dtype):
    vae = small_sd_vae()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        exact = vae.decode(z).sample
        vae = vae.to(dtype).to(memory_format=torch.channels_last)
        zl = z.to(dtype).contiguous(memory_format=torch.channels_last)
        eager = vae.decode(zl).sample
        fastlatent.patch(vae, report=False)
        fused = vae.decode(zl).sample
    assert fused.dtype == dtype
    err_eager = (eager.float() - exact).abs().max()
    err_fused = (fused.float() - exact).abs().max()
    # as accurate as diffusers in the same dtype (both against the fp32 model)
    assert err_fused <= 1.5 * err_eager, (err_fused, err_eager)


def test_patch_keeps_training_and_trains_the_original_weights():
    vae = small_sd_vae().train()
    decoder = vae.decoder
    z = torch.randn(1, 4, 8, 8)
    ref = copy.deepcopy(decoder)
    fastlatent.patch(decoder, report=False)
    assert all(m.training for m in decoder.modules())
    out, out_ref = decoder(z), ref(z)
    torch.testing.assert_close(out, out_ref, atol=DECODE_ATOL, rtol=DECODE_RTOL)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    ref_grads = dict(ref.named_parameters())
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for name, p in decoder.named_parameters():
        # gradients sum over every pixel of up to 64x64 maps: compared relative to their largest entry, with a
        # floor relative to the largest gradient of all for to_k.bias, whose exact gradient is 0 (softmax
        # ignores a shift shared by all keys) and which holds only rounding noise
        ref_grad = ref_grads[name].grad
        err = (p.grad - ref_grad).abs().max()
        assert err <= 1e-4 * ref_grad.abs().max() + 1e-5 * scale, (name, err)
    with torch.no_grad():
        for p in decoder.parameters():
            p -= 0.01 * p.grad
    decoder.eval()
    trained = state(decoder)
    fastlatent.unpatch(decoder)
    assert not any(m.training for m in decoder.modules())
    assert all(torch.equal(v, trained[k]) for k, v in decoder.state_dict().items())


def test_unpatch_after_parameters_were_replaced():
    # load_state_dict(assign=True) puts new Parameter objects into the patched modules only; unpatch must
    # hand them to the restored originals
    vae = small_sd_vae()
    fastlatent.patch(vae, report=False)
    new = {k: torch.randn_like(v) for k, v in vae.state_dict().items()}
    vae.load_state_dict(new, assign=True)
    fastlatent.unpatch(vae)
    assert all(torch.equal(v, new[k]) for k, v in vae.state_dict().items())


def test_patch_twice_and_activation_fusion_off():
    vae = small_sd_vae()
    fastlatent.patch(vae, report=False)
    fastlatent.patch(vae, report=False)
    assert sum(vae.fastlatent_patch_report.swapped.values()) == 0
    fastlatent.unpatch(vae)
    assert not any(isinstance(m, (GroupNormAct, patching.FusedAway)) for m in vae.modules())

    fastlatent.patch(vae, activation_fusion=False, report=False)
    assert dict(vae.fastlatent_patch_report.swapped) == {patching.KIND_NORM: 2 * 24 + 2 + 2}
    assert not any(isinstance(m, (ResnetBlock, AttnBlock)) for m in vae.modules())
    assert all(m.activation is None for m in vae.modules() if isinstance(m, GroupNormAct))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = vae.decode(z).sample
        fastlatent.unpatch(vae)
        torch.testing.assert_close(out, vae.decode(z).sample, atol=DECODE_ATOL, rtol=DECODE_RTOL)


def test_patch_report_prints(capsys):
    vae = small_sd_vae()
    fastlatent.patch(vae.decoder)
    printed = capsys.readouterr().out
    assert "fastlatent.patch: 19 modules swapped" in printed
    assert f"14  {patching.KIND_RESNET}" in printed and f"1  {patching.KIND_PAIR}" in printed
    fastlatent.patch(vae.decoder, report=False)
    assert capsys.readouterr().out == ""


def test_patch_lone_block_returns_replacement():
    resnet = pytest.importorskip("diffusers.models.resnet")
    block = randomise(
        resnet.ResnetBlock2D(in_channels=32, temb_channels=None, groups=8, time_embedding_norm="group")
    ).eval()
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        ref = block(x, None)
        fused = fastlatent.patch(block, report=False)
        assert isinstance(fused, ResnetBlock)
        torch.testing.assert_close(fused(x, None), ref, atol=2e-5, rtol=1e-4)
        back = fastlatent.unpatch(fused)
        assert back is block and torch.equal(back(x, None), ref)


def test_patch_leaves_unsupported_blocks_alone_and_says_why():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    model = nn.ModuleDict(
        {
            "mish": ResnetBlock2D(in_channels=16, temb_channels=None, groups=4, non_linearity="mish"),
            "cross": Attention(16, cross_attention_dim=8, heads=2, dim_head=8, norm_num_groups=4),
        }
    )
    fastlatent.patch(model, report=False)
    report = model.fastlatent_patch_report
    reasons = {name: why for name, _, why in report.left_alone}
    assert "nonlinearity must be nn.SiLU" in reasons["mish"]
    assert reasons["cross"] == "has cross-attention"
    # their GroupNorms are still swapped one by one
    assert report.swapped[patching.KIND_NORM] == 3
    assert type(model["mish"]) is ResnetBlock2D and isinstance(model["mish"].norm1, GroupNormAct)


def test_patch_taming_decoder_matches_unpatched():
    torch.manual_seed(0)
    dec = taming_style.Decoder(
        ch=32,
        out_ch=3,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        resolution=32,
        z_channels=4,
    )
    dec = randomise(dec).eval()
    z = torch.randn(2, 4, 8, 8)
    keys = list(dec.state_dict())
    with torch.no_grad():
        ref = dec(z)
        fastlatent.patch(dec, report=False)
        report = dec.fastlatent_patch_report
        # 2 mid blocks + 3 levels x 2 blocks; the attention norms (mid + 2 at 8x8) and norm_out (followed by
        # a function, not a module) are swapped without activation
        assert dict(report.swapped) == {
            patching.KIND_TAMING: 8,
            patching.KIND_NORM: 4,
            patching.KIND_TAMING_UPSAMPLE: 2,
        }
        assert isinstance(dec.up[0].block[0], TamingResnetBlock) and isinstance(dec.norm_out, GroupNormAct)
        assert list(dec.state_dict()) == keys
        torch.testing.assert_close(dec(z), ref, atol=DECODE_ATOL, rtol=DECODE_RTOL)
        fastlatent.unpatch(dec)
        assert type(dec.up[0].block[0]) is taming_style.ResnetBlock
        assert torch.equal(dec(z), ref)


def test_patch_probe_rejects_taming_look_alike():
    class ResnetBlock(taming_style.ResnetBlock):
        """taming's class and attribute names, another forward (no activation after norm2)."""

        def forward(self, x, temb):
            h = self.conv1(taming_style.nonlinearity(self.norm1(x)))
            return x + self.conv2(self.dropout(self.norm2(h)))

    block = randomise(ResnetBlock(in_channels=32, dropout=0.0, temb_channels=0)).train()
    model = nn.Sequential(block)
    fastlatent.patch(model, report=False)
    ((name, cls, why),) = model.fastlatent_patch_report.left_alone
    assert name == "0" and "forward differs from taming's ResnetBlock" in why
    assert model[0] is block and block.training  # the probe ran in eval mode and restored the flags
    assert all(m.training for m in block.modules())


def test_patch_sequential_group_norm_silu():
    torch.manual_seed(0)
    model = randomise(
        nn.Sequential(
            nn.GroupNorm(4, 16),
            nn.SiLU(),
            nn.Conv2d(16, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.GroupNorm(2, 8),
            nn.GELU(),
        )
    ).eval()
    x = torch.randn(2, 16, 9, 11)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        fastlatent.patch(model, report=False)
        assert dict(model.fastlatent_patch_report.swapped) == {patching.KIND_PAIR: 2, patching.KIND_NORM: 1}
        assert isinstance(model[0], GroupNormAct) and model[0].activation == "silu"
        assert isinstance(model[1], patching.FusedAway)
        assert (
            isinstance(model[3], GroupNormAct) and model[3].activation is None and type(model[4]) is nn.ReLU
        )
        assert model[5].activation == "gelu" and isinstance(model[6], patching.FusedAway)
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        fastlatent.unpatch(model)
        assert [type(m) for m in model] == [
            nn.GroupNorm,
            nn.SiLU,
            nn.Conv2d,
            nn.GroupNorm,
            nn.ReLU,
            nn.GroupNorm,
            nn.GELU,
        ]
        assert torch.equal(model(x), ref)


def test_patch_channels_last_model():
    model = randomise(nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1))).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        fastlatent.patch(model, report=False)
        out = model(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_shared_module_and_subclass():
    class MyNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    shared = nn.GroupNorm(2, 8)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared), "mine": MyNorm(2, 8)})
    fastlatent.patch(model, report=False)
    assert model["a"] is model["b"][0] and isinstance(model["a"], GroupNormAct)
    assert type(model["mine"]) is MyNorm
    ((name, cls, why),) = model.fastlatent_patch_report.left_alone
    assert (name, cls) == ("mine", "MyNorm") and "subclass" in why
    fastlatent.unpatch(model)
    assert model["a"] is shared and model["b"][0] is shared


def test_patch_errors():
    with pytest.raises(
        TypeError,
        match="fastlatent.patch: model must be an nn.Module, a diffusers "
        "DiffusionPipeline or a diffusers scheduler, got str",
    ):
        fastlatent.patch("model")
    with pytest.raises(TypeError, match="fastlatent.unpatch: model must be an nn.Module"):
        fastlatent.unpatch(None)


def test_compile_fullgraph_patched_block():
    resnet = pytest.importorskip("diffusers.models.resnet")
    block = randomise(resnet.ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=4)).eval()
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    with torch.no_grad():
        ref = block(x, temb)
        fused = fastlatent.patch(block, report=False)
        compiled = torch.compile(fused, fullgraph=True)
        torch.testing.assert_close(compiled(x, temb), ref, atol=2e-5, rtol=1e-4)
    x.requires_grad_()
    compiled(x, temb).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_patch_unet2d_and_vq_model_match_unpatched():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # time embeddings, multi-head spatial attention (heads = C // attention_head_dim) and skip connections
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    vq = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        num_vq_embeddings=64,
        block_out_channels=(32, 64),
        norm_num_groups=16,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    unet, vq = randomise(unet).eval(), randomise(vq, seed=1).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        ref_unet, ref_vq = unet(x, t).sample, vq(x).sample
        fastlatent.patch(unet, report=False)
        fastlatent.patch(vq, report=False)
        # AttnDownBlock2D: 1, AttnUpBlock2D: 2, mid block: 1
        assert unet.fastlatent_patch_report.swapped[patching.KIND_ATTENTION] == 4
        assert unet.fastlatent_patch_report.left_alone == vq.fastlatent_patch_report.left_alone == []
        assert not any(type(m) is nn.GroupNorm for m in (*unet.modules(), *vq.modules()))
        torch.testing.assert_close(unet(x, t).sample, ref_unet, atol=DECODE_ATOL, rtol=DECODE_RTOL)
        torch.testing.assert_close(vq(x).sample, ref_vq, atol=DECODE_ATOL, rtol=DECODE_RTOL)
        fastlatent.unpatch(unet)
        assert torch.equal(unet(x, t).sample, ref_unet)


def test_taming_upsample_look_alike_with_another_forward_is_left_alone():
    class Upsample(nn.Module):  # taming's names, bilinear instead of nearest
        def __init__(self):
            super().__init__()
            self.with_conv = True
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear"))

    model = nn.Sequential(Upsample())
    fastlatent.patch(model, report=False)
    assert type(model[0]).__name__ == "Upsample" and not isinstance(model[0], fastlatent.nn.Upsample)
    [(name, cls, why)] = model.fastlatent_patch_report.left_alone
    assert name == "0" and "forward differs from taming's Upsample on a probe input" in why
