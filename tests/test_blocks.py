"""fastlatent.nn blocks: GroupNormAct against nn.GroupNorm + activation, and each decoder block against its
diffusers / taming counterpart loaded with the same state dict."""

import pytest
import taming_style
import torch
import torch.nn.functional as F
from torch import nn

import fastlatent
from fastlatent.nn import AttnBlock, Downsample, GroupNormAct, ResnetBlock, TamingResnetBlock, Upsample

# atol, rtol of the fused output against nn.GroupNorm computed in fp32 and rounded to the dtype
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}
ACTS = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu}


def eager(x, gn: nn.GroupNorm, activation):
    """nn.GroupNorm then the activation, in fp32 (fp64 for fp64 input), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if gn.weight is None else gn.weight.to(compute)
    b = None if gn.bias is None else gn.bias.to(compute)
    y = F.group_norm(x.to(compute), gn.num_groups, w, b, gn.eps)
    return ACTS[activation](y).to(x.dtype)


def randomise(module: nn.Module, seed=0) -> nn.Module:
    """Every parameter random (GroupNorm's ones/zeros would hide a swapped weight and bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.2)
                + (1.0 if p.dim() == 1 else 0.0)
            )
    return module


SHAPES = [
    pytest.param((2, 6, 5, 7), 3, id="2x6x5x7_G3"),
    pytest.param((2, 8, 4, 4), 1, id="groups1"),
    pytest.param((2, 8, 3, 5), 8, id="groups_eq_C"),
    pytest.param((3, 32, 7, 9), 16, id="odd_spatial"),
    pytest.param((1, 16, 1, 1), 4, id="1x1_spatial"),
    pytest.param((0, 8, 4, 4), 2, id="N0"),
    pytest.param((2, 8, 0, 4), 2, id="empty_spatial"),
    pytest.param((4, 8), 2, id="no_spatial"),
    pytest.param((2, 12, 33), 4, id="1d"),
    pytest.param((2, 8, 3, 5, 7), 2, id="3d"),
    pytest.param((1, 64, 33, 17), 32, id="sd_groups32"),
]


@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_group_norm_act_matches_group_norm(shape, groups, dtype, activation):
    gn = randomise(nn.GroupNorm(groups, shape[1], eps=1e-6))
    m = GroupNormAct.from_group_norm(gn, activation)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1).to(dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    if shape[2:3] == (0,):
        # nn.GroupNorm refuses empty spatial dims ("Expected HxW to be greater than 0"); the op returns []
        return
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, eager(x, gn, activation), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,fmt", [((2, 32, 9, 7), torch.channels_last), ((2, 16, 3, 5, 6), torch.channels_last_3d)]
)
def test_group_norm_act_channels_last(shape, fmt, dtype):
    gn = randomise(nn.GroupNorm(8, shape[1]))
    m = GroupNormAct.from_group_norm(gn, "silu")
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, eager(x.contiguous(), gn, "silu"), atol=atol, rtol=rtol)


def test_group_norm_act_non_contiguous_input():
    gn = randomise(nn.GroupNorm(4, 8))
    x = torch.randn(3, 8, 10, 12)[:, :, ::2, 1::3]
    torch.testing.assert_close(
        GroupNormAct.from_group_norm(gn, "silu")(x), eager(x, gn, "silu"), atol=1e-5, rtol=1e-5
    )


def test_group_norm_act_fp16_overflow_prone():
    # |x| near the fp16 maximum: x^2 and sum(x) overflow fp16, so the statistics must be fp32 or wider
    gn = randomise(nn.GroupNorm(4, 16))
    x32 = 6.0e4 + torch.randn(2, 16, 16, 16) * 200
    x = x32.half()
    y = GroupNormAct.from_group_norm(gn, "silu")(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, eager(x, gn, "silu"), atol=4e-3, rtol=2e-3)


def test_group_norm_act_constant_group_with_large_mean_gives_bias():
    # Every element of each group equals 3e4 (fp16 rounds the spread away): the variance is 0, so the exact
    # output is the bias. Regression test: applying the norm as x * (rstd * w) + (b - mean * rstd * w) gave
    # errors of |mean| * rstd * 2^-24 ~ 0.9 here (rstd = 1/sqrt(eps) = 316); nn.GroupNorm in fp32 is off by
    # 0.44. The kernels centre first, (x - mean) * rstd * w + b, which is exact.
    gn = randomise(nn.GroupNorm(4, 16))
    x = torch.full((2, 16, 8, 8), 3.0e4, dtype=torch.float16)
    expected = fastlatent.reference.group_norm(x.double(), gn.weight, gn.bias, 4, gn.eps)
    got = GroupNormAct.from_group_norm(gn, None)(x)
    torch.testing.assert_close(got.double(), expected, atol=4e-3, rtol=2e-3)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_act_state_dict_round_trip(affine):
    gn = nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    if affine:
        randomise(gn)
    m = GroupNormAct(4, 12, eps=1e-6, affine=affine, activation="silu")
    assert list(m.state_dict()) == list(gn.state_dict())
    m.load_state_dict(gn.state_dict())
    back = nn.GroupNorm(4, 12, eps=1e-6, affine=affine)
    back.load_state_dict(m.state_dict())
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(m(x), F.silu(back(x)), atol=1e-5, rtol=1e-5)
    if affine:
        assert torch.equal(back.weight, gn.weight) and torch.equal(back.bias, gn.bias)
        with pytest.raises(RuntimeError, match="size mismatch"):
            m.load_state_dict(nn.GroupNorm(4, 8).state_dict())


def test_group_norm_act_defaults_and_repr():
    m = GroupNormAct(8, 32)
    gn = nn.GroupNorm(8, 32)
    assert torch.equal(m.weight, gn.weight) and torch.equal(m.bias, gn.bias)
    assert m.eps == gn.eps and m.activation == "silu"
    assert repr(m) == "GroupNormAct(8, 32, eps=1e-05, affine=True, activation=silu)"
    shared = GroupNormAct.from_group_norm(gn.eval(), "gelu")
    assert shared.weight is gn.weight and shared.bias is gn.bias and not shared.training


def test_group_norm_act_errors():
    with pytest.raises(
        ValueError, match="num_channels must be divisible by num_groups.*num_channels=10, num_groups=4"
    ):
        GroupNormAct(4, 10)
    with pytest.raises(ValueError, match="num_channels must be divisible"):
        GroupNormAct(0, 8)
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'gelu', got 'relu'"):
        GroupNormAct(4, 8, activation="relu")
    with pytest.raises(TypeError, match="gn must be an nn.GroupNorm, got BatchNorm2d"):
        GroupNormAct.from_group_norm(nn.BatchNorm2d(8))
    m = GroupNormAct(4, 8)
    with pytest.raises(ValueError, match=r"x must be \[N, 8, \*spatial\], got shape \[2, 6, 3, 3\]"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"got shape \[8\]"):
        m(torch.randn(8))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        m(torch.randint(0, 3, (2, 8, 3, 3)))


@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_act_gradients_match_eager(activation, channels_last):
    gn = randomise(nn.GroupNorm(4, 16, eps=1e-6))
    m = GroupNormAct(4, 16, eps=1e-6, activation=activation)
    m.load_state_dict(gn.state_dict())
    x = torch.randn(3, 16, 7, 5) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(3, 16, 7, 5)
    (m(x1) * g).sum().backward()
    (ACTS[activation](gn(x2)) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.weight.grad, gn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bias.grad, gn.bias.grad, atol=1e-4, rtol=1e-4)


def test_group_norm_act_gradcheck_fp64():
    m = randomise(GroupNormAct(2, 4, eps=1e-6, activation="silu")).double()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: GroupNormAct.forward(m, x, r), (x, r, m.weight, m.bias)
    )
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


# ---------------------------------------------------------------- blocks against diffusers, same weights


def _load_same(src: nn.Module, dst: nn.Module) -> nn.Module:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=True)
    assert not missing and not unexpected
    dst.train(src.training)
    return dst


RESNET_CONFIGS = [
    pytest.param(
        dict(in_channels=64, out_channels=64, temb_channels=None, groups=32, time_embedding_norm="group"),
        id="sd_vae_decoder",
    ),
    pytest.param(
        dict(in_channels=32, out_channels=64, temb_channels=None, groups=16, time_embedding_norm="group"),
        id="vae_shortcut",
    ),
    pytest.param(dict(in_channels=32, out_channels=32, temb_channels=48, groups=8), id="unet_temb"),
    pytest.param(
        dict(
            in_channels=32,
            out_channels=48,
            temb_channels=48,
            groups=8,
            groups_out=4,
            time_embedding_norm="scale_shift",
            output_scale_factor=2.0,
        ),
        id="scale_shift",
    ),
    pytest.param(
        dict(
            in_channels=32,
            out_channels=32,
            temb_channels=16,
            groups=8,
            skip_time_act=True,
            non_linearity="gelu",
            eps=1e-5,
        ),
        id="gelu_skip_time_act",
    ),
    pytest.param(dict(in_channels=16, out_channels=16, temb_channels=16, groups=4, up=True), id="up"),
    pytest.param(
        dict(
            in_channels=16,
            out_channels=24,
            temb_channels=16,
            groups=4,
            down=True,
            use_in_shortcut=True,
            conv_shortcut_bias=False,
        ),
        id="down_shortcut_nobias",
    ),
]


def _resnet_inputs(cfg, channels_last=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg["in_channels"], 10, 9, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    temb = (
        None
        if cfg["temb_channels"] is None
        else torch.randn(2, cfg["temb_channels"], generator=gen).to(dtype)
    )
    return x, temb


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cfg", RESNET_CONFIGS)
def test_resnet_block_matches_diffusers(cfg, channels_last):
    resnet = pytest.importorskip("diffusers.models.resnet")
    torch.manual_seed(0)
    ref = randomise(resnet.ResnetBlock2D(**cfg)).eval()
    ours = _load_same(ref, ResnetBlock(**cfg))
    assert list(ours.state_dict()) == list(ref.state_dict())
    x, temb = _resnet_inputs(cfg, channels_last)
    with torch.no_grad():
        expected = ref(x, temb)
        got = ours(x, temb)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    shared = ResnetBlock.from_diffusers(ref)
    assert {k: v for k, v in shared.state_dict(keep_vars=True).items()}.keys() == ref.state_dict().keys()
    assert all(
        a is b
        for a, b in zip(shared.state_dict(keep_vars=True).values(), ref.state_dict(keep_vars=True).values())
    )
    with torch.no_grad():
        torch.testing.assert_close(shared(x, temb), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [RESNET_CONFIGS[1], RESNET_CONFIGS[3]])
def test_resnet_block_training_gradients_match_diffusers(cfg):
    resnet = pytest.importorskip("diffusers.models.resnet")
    ref = randomise(resnet.ResnetBlock2D(**cfg)).train()
    ours = _load_same(ref, ResnetBlock(**cfg))
    x, temb = _resnet_inputs(cfg)
    g = torch.randn(ref(x, temb).shape, generator=torch.Generator().manual_seed(5))
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    (ref(x1, temb) * g).sum().backward()
    (ours(x2, temb) * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=5e-5, rtol=1e-4)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=2e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_block_half_precision_close_to_fp32(dtype):
    resnet = pytest.importorskip("diffusers.models.resnet")
    cfg = dict(RESNET_CONFIGS[0].values[0])
    ref = randomise(resnet.ResnetBlock2D(**cfg)).eval()
    ours = _load_same(ref, ResnetBlock(**cfg)).to(dtype)
    x, _ = _resnet_inputs(cfg)
    with torch.no_grad():
        expected = ref(x, None)
        err_eager = (ref.to(dtype)(x.to(dtype), None).float() - expected).abs().max()
        err_ours = (ours(x.to(dtype), None).float() - expected).abs().max()
    # the fused block is no less accurate than diffusers' own block run in the same dtype
    assert err_ours <= 1.5 * err_eager + 1e-3, (err_ours, err_eager)


def test_resnet_block_argument_errors():
    with pytest.raises(ValueError, match="non_linearity must be one of .* got 'mish'"):
        ResnetBlock(in_channels=8, groups=4, non_linearity="mish")
    with pytest.raises(ValueError, match="time_embedding_norm must be"):
        ResnetBlock(in_channels=8, groups=4, time_embedding_norm="ada_group")
    with pytest.raises(ValueError, match="temb_channels must be None"):
        ResnetBlock(in_channels=8, groups=4, time_embedding_norm="group", temb_channels=16)
    with pytest.raises(ValueError, match="num_channels must be divisible by num_groups"):
        ResnetBlock(in_channels=24, groups=32)
    block = ResnetBlock(in_channels=8, groups=4, temb_channels=16)
    with pytest.raises(ValueError, match="temb is required"):
        block(torch.randn(1, 8, 4, 4), None)


def test_resnet_block_from_diffusers_refuses_other_activations():
    resnet = pytest.importorskip("diffusers.models.resnet")
    with pytest.raises(ValueError, match="nonlinearity must be nn.SiLU or exact nn.GELU"):
        ResnetBlock.from_diffusers(resnet.ResnetBlock2D(in_channels=8, groups=4, non_linearity="mish"))


@pytest.mark.parametrize("kind", ["up", "down_pad0", "down_pad1", "down_pool", "up_size"])
def test_resamplers_match_diffusers(kind):
    pytest.importorskip("diffusers")
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    if kind.startswith("up"):
        ref, ours = Upsample2D(16, use_conv=True, out_channels=8), Upsample(16, use_conv=True, out_channels=8)
    elif kind == "down_pool":
        ref, ours = Downsample2D(16, use_conv=False, name="op"), Downsample(16, use_conv=False)
    else:
        pad = 0 if kind == "down_pad0" else 1
        ref = Downsample2D(16, use_conv=True, out_channels=8, padding=pad, name="op")
        ours = Downsample(16, use_conv=True, out_channels=8, padding=pad)
    _load_same(randomise(ref), ours)
    x = torch.randn(2, 16, 9, 8)
    kwargs = {"output_size": (20, 17)} if kind == "up_size" else {}
    # "up" folds the upsampling into the conv (merged weights: a few fp32 ulps of the summed products)
    atol = 1e-5 if kind == "up" else 1e-6
    torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs), atol=atol, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \[N, 16, H, W\]"):
        ours(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("channels,dim_head,rescale", [(64, 64, 1.0), (64, 16, 1.0), (32, 32, 2.0)])
def test_attn_block_matches_diffusers(channels, dim_head, rescale):
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    # as UNetMidBlock2D builds it for the VAE (heads = C // attention_head_dim)
    ref = attention_processor.Attention(
        channels,
        heads=channels // dim_head,
        dim_head=dim_head,
        rescale_output_factor=rescale,
        eps=1e-6,
        norm_num_groups=16,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    ref = randomise(ref).eval()
    ours = _load_same(
        ref,
        AttnBlock(channels, dim_head=dim_head, norm_num_groups=16, eps=1e-6, rescale_output_factor=rescale),
    )
    assert list(ours.state_dict()) == [
        "group_norm.weight",
        "group_norm.bias",
        "to_q.weight",
        "to_q.bias",
        "to_k.weight",
        "to_k.bias",
        "to_v.weight",
        "to_v.bias",
        "to_out.0.weight",
        "to_out.0.bias",
    ]
    for channels_last in (False, True):
        x = torch.randn(2, channels, 7, 6)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = ref(x)
            got = ours(x)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(AttnBlock.from_diffusers(ref)(x), expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="encoder_hidden_states and attention_mask must be None"):
        ours(x, encoder_hidden_states=torch.randn(2, 3, channels))


def test_attn_block_from_diffusers_refuses_cross_attention():
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    cross = attention_processor.Attention(32, cross_attention_dim=16, heads=2, dim_head=16, norm_num_groups=8)
    with pytest.raises(ValueError, match="AttnBlock.from_diffusers: has cross-attention"):
        AttnBlock.from_diffusers(cross)
    no_norm = attention_processor.Attention(32, heads=2, dim_head=16)
    with pytest.raises(ValueError, match="group_norm must be an nn.GroupNorm"):
        AttnBlock.from_diffusers(no_norm)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(in_channels=32, out_channels=32, temb_channels=0),
        dict(in_channels=32, out_channels=64, temb_channels=0),
        dict(in_channels=32, out_channels=64, temb_channels=0, conv_shortcut=True),
        dict(in_channels=64, out_channels=32, temb_channels=24),
    ],
)
def test_taming_resnet_block_matches_taming(cfg):
    ref = randomise(taming_style.ResnetBlock(dropout=0.0, **cfg)).eval()
    ours = _load_same(ref, TamingResnetBlock(**cfg))
    x = torch.randn(2, cfg["in_channels"], 9, 10)
    temb = torch.randn(2, cfg["temb_channels"]) if cfg["temb_channels"] else None
    with torch.no_grad():
        expected = ref(x, temb)
        torch.testing.assert_close(ours(x, temb), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(
            TamingResnetBlock.from_taming(ref)(x, temb), expected, atol=2e-5, rtol=1e-4
        )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_upsample_folds_into_the_conv(layout, dtype):
    up = randomise(Upsample(12, use_conv=True, out_channels=20)).to(dtype).eval()
    x = torch.randn(2, 12, 7, 10).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.no_grad():
        got = up(x)
        again = up(x)
    assert torch.equal(got, again)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= tol * scale
    # a weight changed in place is noticed, through `.data` too (no version counter moves: issue 17)
    for double in (lambda: up.conv.weight.mul_(2), lambda: up.conv.weight.data.mul_(2)):
        with torch.no_grad():
            double()
            doubled = up(x)
            want = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert (doubled.float() - want.float()).abs().max() <= 4 * tol * scale


def test_upsample_fold_gradients_match_the_two_step_form():
    up = randomise(Upsample(6, use_conv=True, out_channels=5)).double().train()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 10, 8, dtype=torch.float64)
    grads = torch.autograd.grad((up(x) * g).sum(), (x, up.conv.weight, up.conv.bias))
    ref = torch.autograd.grad(
        (up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")) * g).sum(),
        (x, up.conv.weight, up.conv.bias),
    )
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
