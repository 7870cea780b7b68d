"""Stage-1 autoencoders: AutoencoderKL against diffusers' AutoencoderKL holding the same weights
(from_diffusers, diffusers-named and ldm-named safetensors files), the latent scale, input validation; VQ/FSQ
autoencoders' discrete protocol."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from fastlatent.models import (
    AutoencoderKL,
    Decoder,
    Encoder,
    diffusers_to_ldm_vae_state_dict,
    ldm_to_diffusers_vae_state_dict,
    load_pretrained,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SD_CONFIG = dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32
)
# SD-VAE layout (4 levels, f8, 2 layers per block, mid attention, quant convs) at CPU-friendly widths
SMALL_SD = dict(block_out_channels=[32, 64, 64, 64], layers_per_block=2, latent_channels=4, norm_num_groups=8)


def diffusers_vae(
    seed=0,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    **extra,
):
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    vae = diffusers.AutoencoderKL(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        **extra,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # GroupNorm ones/zeros and zero-ish biases would hide swapped weight/bias or misrouted tensors
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.02))
    return vae.eval()


def assert_same_outputs(ours: AutoencoderKL, vae, x):
    ours.eval()
    with torch.no_grad():
        expected = vae.encode(x).latent_dist
        got = ours.posterior(x)
        torch.testing.assert_close(got.mean, expected.mean, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.std, expected.std, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.kl(), expected.kl(), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(
            ours.encode(x, sample=True, generator=torch.Generator().manual_seed(3)),
            expected.sample(torch.Generator().manual_seed(3)),
            atol=2e-5,
            rtol=1e-4,
        )
        z = expected.mean
        torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x).reconstruction, vae(x).sample, atol=2e-5, rtol=1e-4)


def assert_same_weights(ours: AutoencoderKL, vae):
    """Loaded from a file: every tensor bit-identical to diffusers' (outputs then follow from the test
    above)."""
    own, theirs = ours.state_dict(), vae.state_dict()
    assert list(own) == list(theirs)
    for key in own:
        assert torch.equal(own[key], theirs[key]), key


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="sd_layout_f8"),
        pytest.param(
            dict(
                block_out_channels=(16, 32, 32),
                layers_per_block=1,
                latent_channels=8,
                mid_block_add_attention=False,
                use_quant_conv=False,
                use_post_quant_conv=False,
                in_channels=1,
                out_channels=2,
                norm_num_groups=16,
            ),
            id="f4_no_attention_no_quant_conv",
        ),
    ],
)
def test_kl_from_diffusers_matches_diffusers(kwargs):
    vae = diffusers_vae(**kwargs)
    ours = AutoencoderKL.from_diffusers(vae)
    assert list(ours.state_dict()) == list(vae.state_dict())
    channels = kwargs.get("in_channels", 3)
    x = torch.rand(2, channels, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert_same_outputs(ours, vae, x)
    assert ours.scaling_factor == pytest.approx(vae.config.scaling_factor) and ours.shift_factor == 0.0
    assert ours.downsample_factor == 2 ** (len(vae.config.block_out_channels) - 1)


def test_sd_config_state_dict_keys_and_shapes_match_diffusers():
    with torch.device("meta"):
        ours = AutoencoderKL(**SD_CONFIG)
        vae = diffusers.AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, **SD_CONFIG
        )
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours_shapes == theirs
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # the SD 1.x VAE
    assert ours.downsample_factor == 8
    # module structure that tiled decoding walks
    assert len(ours.decoder.up_blocks) == 4 and ours.decoder.up_blocks[0].upsamplers is not None
    assert ours.decoder.up_blocks[3].upsamplers is None and ours.encoder.down_blocks[3].downsamplers is None
    assert ours.encoder.mid_block.attentions[0] is not None and len(ours.decoder.mid_block.resnets) == 2
    # names of the original CompVis checkpoints, checked against diffusers' own ldm converter
    ldm = diffusers_to_ldm_vae_state_dict(vae.state_dict())
    for key, shape in [
        ("encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
        ("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
        ("decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
        ("decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
        ("decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)),
        ("encoder.norm_out.weight", (512,)),
        ("quant_conv.weight", (8, 8, 1, 1)),
    ]:
        assert tuple(ldm[key].shape) == shape, key
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == theirs


def test_state_dict_file_in_diffusers_naming(tmp_path):
    vae = diffusers_vae(seed=4)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    ours = AutoencoderKL.from_single_file(path, norm_num_groups=8, scaling_factor=0.18215)
    assert ours.config["block_out_channels"] == [32, 64, 64, 64] and ours.config["layers_per_block"] == 2
    assert ours.scaling_factor == 0.18215
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert_same_outputs(ours, vae, x)
    # load_state_dict_file into an existing model
    fresh = AutoencoderKL(**SMALL_SD)
    assert fresh.load_state_dict_file(path) == []
    assert_same_weights(fresh, vae)


def test_ldm_naming_round_trip(tmp_path):
    vae = diffusers_vae(seed=6)
    ldm = diffusers_to_ldm_vae_state_dict(vae.state_dict())
    assert "encoder.down.0.block.0.norm1.weight" in ldm and "decoder.mid.attn_1.proj_out.weight" in ldm
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in ldm)
    # diffusers' own converter maps our ldm names back onto its model exactly
    theirs = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    own = vae.state_dict()
    assert theirs.keys() == own.keys() and all(torch.equal(theirs[k], own[k]) for k in own)
    assert ldm_to_diffusers_vae_state_dict(ldm).keys() == own.keys()
    # a CompVis checkpoint as shipped: training-only loss/EMA keys next to the VAE's
    shipped = {
        **{k: v.contiguous() for k, v in ldm.items()},
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
        "model_ema.decay": torch.tensor(0.999),
    }
    path = tmp_path / "kl-f8.safetensors"
    save_file(shipped, str(path))
    ours = AutoencoderKL.from_single_file(path, norm_num_groups=8)
    x = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert_same_outputs(ours, vae, x)
    fresh = AutoencoderKL(**SMALL_SD)
    assert sorted(fresh.load_state_dict_file(path)) == [
        "loss.discriminator.main.0.weight",
        "loss.logvar",
        "model_ema.decay",
    ]
    assert_same_weights(fresh, vae)
    # a full SD checkpoint holds the VAE under first_stage_model.
    full = tmp_path / "sd.safetensors"
    save_file(
        {
            **{f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()},
            "model.diffusion_model.x.weight": torch.zeros(2),
        },
        str(full),
    )
    assert_same_weights(AutoencoderKL.from_single_file(full, norm_num_groups=8), vae)
    # and back out to ldm names
    torch.testing.assert_close(ours.ldm_state_dict(), ldm, atol=0, rtol=0)


def test_state_dict_file_errors(tmp_path):
    vae = diffusers_vae()
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    model = AutoencoderKL(**SMALL_SD)
    missing = dict(state)
    del missing["decoder.conv_out.bias"]
    missing["decoder.extra.weight"] = torch.zeros(1)
    save_file(missing, str(tmp_path / "m.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"(?s)missing keys \(1\): decoder.conv_out.bias.*unexpected keys \(1\): "
        r"decoder.extra.weight",
    ):
        model.load_state_dict_file(tmp_path / "m.safetensors")
    wide = AutoencoderKL(block_out_channels=[32, 64, 64, 128], layers_per_block=2, norm_num_groups=8)
    save_file(state, str(tmp_path / "s.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches .*encoder.down_blocks.3.resnets.0.conv1.weight"):
        wide.load_state_dict_file(tmp_path / "s.safetensors")
    torch.save(state, tmp_path / "v.ckpt")
    with pytest.raises(ValueError, match=r"must be a .safetensors file"):
        model.load_state_dict_file(tmp_path / "v.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="cannot read .*broken.safetensors as safetensors"):
        model.load_state_dict_file(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        AutoencoderKL.from_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match=r"unknown config arguments \['groups'\]"):
        AutoencoderKL.from_single_file(tmp_path / "s.safetensors", groups=8)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="does not look like an SD-VAE|no encoder.down_blocks"):
        AutoencoderKL.from_single_file(tmp_path / "f.safetensors")
    odd = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], act_fn="gelu"
    )
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL.from_diffusers(odd)
    with pytest.raises(TypeError, match="diffusers AutoencoderKL"):
        AutoencoderKL.from_diffusers(torch.nn.Linear(2, 2))


def tiny_kl(**kwargs):
    config = dict(
        in_channels=1,
        out_channels=1,
        block_out_channels=[16, 32],
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    return AutoencoderKL(**{**config, **kwargs})


def test_kl_constructor_validation():
    with pytest.raises(
        ValueError, match=r"block_out_channels\[1\]=60 must be divisible by norm_num_groups=32"
    ):
        AutoencoderKL(block_out_channels=[64, 60], norm_num_groups=32)
    with pytest.raises(ValueError, match="block_out_channels must have 1 to 6 entries"):
        AutoencoderKL(block_out_channels=[])
    with pytest.raises(TypeError, match="block_out_channels must be a list"):
        AutoencoderKL(block_out_channels=64)
    with pytest.raises(ValueError, match="layers_per_block must be an int >= 1"):
        AutoencoderKL(layers_per_block=0)
    with pytest.raises(ValueError, match="latent_channels must be an int >= 1"):
        AutoencoderKL(latent_channels=0)
    with pytest.raises(ValueError, match="in_channels must be an int >= 1"):
        AutoencoderKL(in_channels=0, block_out_channels=[32], norm_num_groups=8)
    with pytest.raises(ValueError, match="norm_num_groups must be an int >= 1"):
        AutoencoderKL(norm_num_groups=0)
    with pytest.raises(ValueError, match="scaling_factor must be a finite number"):
        tiny_kl(scaling_factor=float("nan"))
    with pytest.raises(TypeError, match="use_quant_conv must be a bool"):
        tiny_kl(use_quant_conv="yes")
    model = tiny_kl()
    with pytest.raises(ValueError, match="scaling_factor must be non-zero"):
        model.scaling_factor = 0.0


def test_kl_input_validation():
    model = tiny_kl()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, H, W\], got \[2, 3, 8, 8\]"):
        model.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of the downsampling factor 2, got 9x8"):
        model.encode(torch.zeros(2, 1, 9, 8))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor .* torch.uint8"):
        model.encode(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(
        TypeError, match="x has dtype torch.float64 but the model's parameters are torch.float32"
    ):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must have shape \[B, 2, H, W\]"):
        model.decode(torch.zeros(2, 4, 4, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model.encode([[0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.zeros(1, 1, 8, 8))
    assert out.reconstruction.shape == (1, 1, 8, 8)


def test_kl_forward_protocol_and_training_sample():
    model = tiny_kl()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    out = model.train()(x, generator=torch.Generator().manual_seed(0))
    posterior = out.stats["posterior"]
    assert out.latents.shape == (3, 2, 8, 8) and out.reconstruction.shape == x.shape
    assert not torch.equal(out.latents, posterior.mean)  # training decodes a posterior sample
    torch.testing.assert_close(out.losses["kl"], posterior.kl().mean())
    expected_kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(out.losses["kl"], expected_kl)
    out.reconstruction.mean().backward()
    assert (
        model.last_layer_weight is model.decoder.conv_out.weight and model.last_layer_weight.grad is not None
    )
    assert torch.equal(model.eval()(x).latents, model.encode(x))
    assert model.is_discrete is False and model.latent_channels == 2


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = tiny_kl(mid_block_add_attention=True)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)

    def grads():
        model.zero_grad()
        model(x, sample_posterior=False).reconstruction.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_fit_latent_scale_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = tiny_kl()
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    shift, scale = model.fit_latent_scale(images)
    z = model.encode(images).detach().double()
    assert shift == pytest.approx(float(z.mean()), rel=1e-6) and scale == pytest.approx(
        1 / float(z.std()), rel=1e-6
    )
    prior = (z - model.shift_factor) * model.scaling_factor
    assert float(prior.mean()) == pytest.approx(0.0, abs=1e-6) and float(prior.std()) == pytest.approx(
        1.0, rel=1e-6
    )
    # the same from (images, labels) batches as a DataLoader yields, merged exactly across batches
    batches = [
        (images[i : i + 5], torch.zeros(len(images[i : i + 5]), dtype=torch.long)) for i in range(0, 12, 5)
    ]
    fresh = tiny_kl()
    fresh.load_state_dict(model.state_dict())
    assert fresh.fit_latent_scale(batches) == pytest.approx((shift, scale), rel=1e-9)
    assert fresh.fit_latent_scale(iter(batches), max_batches=1)[0] == pytest.approx(
        float(model.encode(images[:5]).detach().double().mean()), rel=1e-6
    )
    model.save_pretrained(tmp_path / "kl")
    loaded = load_pretrained(tmp_path / "kl")
    assert loaded.scaling_factor == model.scaling_factor and loaded.shift_factor == model.shift_factor
    torch.testing.assert_close(loaded.encode(images), model.encode(images))
    with pytest.raises(ValueError, match="need at least 2"):
        model.fit_latent_scale([])
    with pytest.raises(TypeError, match="data must be an image tensor or an iterable"):
        model.fit_latent_scale(3)


def test_encoder_decoder_standalone_and_errors():
    enc = Encoder(
        in_channels=1,
        out_channels=3,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    dec = Decoder(
        in_channels=3,
        out_channels=1,
        block_out_channels=[8, 16, 16],
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    h = enc(torch.zeros(2, 1, 16, 16))
    assert h.shape == (2, 6, 4, 4) and dec(h[:, :3]).shape == (2, 1, 16, 16)
    assert enc.conv_norm_out.activation == "silu" and isinstance(enc.conv_act, torch.nn.Identity)
    with pytest.raises(ValueError, match="latent_embeds"):
        dec(h[:, :3], latent_embeds=h)


# ---------------------------------------------------------------------------------------------- discrete

from fastlatent.models import FSQAutoencoder, VQAutoencoder  # noqa: E402

DIGITS = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=[16, 32],
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=False,
)
DISCRETE = {
    "fsq": lambda: FSQAutoencoder(**DIGITS, levels=[5, 4, 3]),
    "lfq": lambda: FSQAutoencoder(**DIGITS, quantizer="lfq", codebook_size=64),
    "bsq": lambda: FSQAutoencoder(**DIGITS, quantizer="bsq", codebook_size=32),
    "vq": lambda: VQAutoencoder(**DIGITS, latent_channels=4, codebook_size=32),
    "rvq": lambda: VQAutoencoder(
        **DIGITS,
        latent_channels=4,
        codebook_size=16,
        quantizer="rvq",
        num_quantizers=3,
        learnable_codebook=True,
        decay=0.0,
    ),
}
EXPECTED = {
    "fsq": (3, 60, set()),
    "lfq": (6, 64, {"entropy", "commitment"}),
    "bsq": (5, 32, {"entropy", "commitment"}),
    "vq": (4, 32, {"commitment"}),
    "rvq": (4, 16, {"commitment", "codebook"}),
}


@pytest.mark.parametrize("kind", list(DISCRETE))
def test_discrete_protocol_round_trip(kind):
    torch.manual_seed(0)
    model = DISCRETE[kind]()
    latent_channels, codebook_size, loss_terms = EXPECTED[kind]
    assert (
        model.is_discrete
        and model.codebook_size == codebook_size
        and model.latent_channels == latent_channels
    )
    assert model.downsample_factor == 2 and model.scaling_factor == 1.0 and model.shift_factor == 0.0
    x = torch.rand(4, 1, 8, 12) * 2 - 1
    out = model.train()(x)
    assert set(out.losses) == loss_terms and all(
        v.dim() == 0 and v.requires_grad for v in out.losses.values()
    )
    index_shape = (4, 4, 6, 3) if kind == "rvq" else (4, 4, 6)
    assert out.stats["indices"].shape == index_shape and out.stats["indices"].dtype == torch.int64
    assert 1.0 <= float(out.stats["perplexity"]) <= codebook_size and 0.0 < float(out.stats["usage"]) <= 1.0
    assert out.latents.shape == (4, latent_channels, 4, 6) and out.reconstruction.shape == x.shape
    (out.reconstruction.square().mean() + sum(out.losses.values(), torch.zeros(()))).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through gradient reaches the encoder
    model.eval()
    with torch.no_grad():
        indices = model.encode_indices(x)
        assert indices.shape == index_shape and int(indices.min()) >= 0 and int(indices.max()) < codebook_size
        z = model.encode(x)
        torch.testing.assert_close(model.decode_indices(indices), model.decode(z), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x).reconstruction, model.decode(z))


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_discrete_save_load(kind, tmp_path):
    model = DISCRETE[kind]().eval()
    model.save_pretrained(tmp_path / kind)
    loaded = load_pretrained(tmp_path / kind)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert type(loaded) is type(model)
    assert torch.equal(loaded.encode_indices(x), model.encode_indices(x))


def test_vq_encode_never_updates_the_codebook():
    model = DISCRETE["vq"]().train()
    before = model.quantizer.embed.clone()
    model.encode(torch.rand(2, 1, 8, 8))
    model.encode_indices(torch.rand(2, 1, 8, 8))
    assert torch.equal(model.quantizer.embed, before) and model.training and model.quantizer.training
    model(torch.rand(2, 1, 8, 8))
    assert not torch.equal(model.quantizer.embed, before)  # the EMA update runs in forward


def test_discrete_validation():
    with pytest.raises(ValueError, match="quantizer must be one of .*'fsq', 'lfq', 'bsq'.*got 'vq'"):
        FSQAutoencoder(**DIGITS, quantizer="vq")
    with pytest.raises(ValueError, match="quantizer must be one of .*'vq', 'rvq'.*got 'fsq'"):
        VQAutoencoder(**DIGITS, quantizer="fsq")
    with pytest.raises(ValueError, match="levels must be a non-empty list"):
        FSQAutoencoder(**DIGITS, levels=[])
    with pytest.raises(ValueError, match="levels must all be >= 2"):
        FSQAutoencoder(**DIGITS, levels=[8, 1])
    with pytest.raises(ValueError, match="codebook_size must be a power of 2 >= 2 for quantizer='lfq'"):
        FSQAutoencoder(**DIGITS, quantizer="lfq", codebook_size=100)
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        FSQAutoencoder(**DIGITS, quantizer="bsq")
    with pytest.raises(ValueError, match="levels applies to quantizer='fsq' only"):
        FSQAutoencoder(**DIGITS, quantizer="lfq", codebook_size=64, levels=[8, 8])
    with pytest.raises(ValueError, match="codebook_size is prod\\(levels\\)"):
        FSQAutoencoder(**DIGITS, codebook_size=64)
    with pytest.raises(ValueError, match="quantizer_kwargs may not set \\['entropy_loss_weight'\\]"):
        FSQAutoencoder(
            **DIGITS, quantizer="lfq", codebook_size=64, quantizer_kwargs={"entropy_loss_weight": 1}
        )
    with pytest.raises(TypeError, match="bad quantizer_kwargs for 'lfq'"):
        FSQAutoencoder(**DIGITS, quantizer="lfq", codebook_size=64, quantizer_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="num_quantizers=2 needs quantizer='rvq'"):
        VQAutoencoder(**DIGITS, num_quantizers=2)
    with pytest.raises(ValueError, match="codebook_size must be an int >= 1"):
        VQAutoencoder(**DIGITS, codebook_size=0)
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\]"):
        VQAutoencoder(**DIGITS, decay=2.0)
    with pytest.raises(
        ValueError, match=r"block_out_channels\[0\]=12 must be divisible by norm_num_groups=8"
    ):
        FSQAutoencoder(**{**DIGITS, "block_out_channels": [12, 32]})
    model = DISCRETE["fsq"]()
    with pytest.raises(ValueError, match=r"indices must be in \[0, 60\), got values in \[0, 60\]"):
        model.decode_indices(torch.tensor([[[0, 60]]]))
    with pytest.raises(ValueError, match=r"indices must have shape \[B, h, w\], got \[2, 2\]"):
        model.decode_indices(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        model.decode_indices(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"indices must have shape \[B, h, w, 3\]"):
        DISCRETE["rvq"]().decode_indices(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, H, W\]"):
        model.encode_indices(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of the downsampling factor 2, got 7x8"):
        model(torch.zeros(1, 1, 7, 8))
    with pytest.raises(ValueError, match=r"z must have shape \[B, 3, H, W\]"):
        model.decode(torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("kind", ["vq", "rvq"])
def test_vq_loss_terms_equal_the_quantizers_own(kind):
    torch.manual_seed(1)
    model = DISCRETE[kind]().train()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    h = model._pre_quant(x)
    twin = copy.deepcopy(model.quantizer)  # forward moves an EMA codebook: the twin sees the same codes
    _, _, losses = model._quantize(h)
    _, _, _, stats = twin(h, return_stats=True)
    stats = stats if kind == "rvq" else [stats]
    torch.testing.assert_close(losses["commitment"], sum(s.commitment_loss for s in stats))
    if kind == "rvq":  # learnable codebook: the codebook term has its own gradient, into the codebooks only
        torch.testing.assert_close(losses["codebook"], sum(s.codebook_loss for s in stats))
        codebook = model.quantizer.layers[0]._codebook.embed
        grads = torch.autograd.grad(
            losses["codebook"], [codebook, model.quant_conv.weight], allow_unused=True
        )
        assert grads[0].abs().sum() > 0 and (grads[1] is None or not grads[1].any())
