"""TwoStagePipeline over small stand-in autoencoders that implement the stage-1 protocol."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models import (
    ConfigMixin,
    DiT,
    LatentDiffusion,
    TokenGPT,
    TwoStagePipeline,
    UNet,
    load_pretrained,
    register_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@register_model
class PipelineTestKL(nn.Module, ConfigMixin):
    """Continuous stand-in: average-pool by f and a 1x1 conv down, a 1x1 conv and nearest upsampling back."""

    is_discrete = False

    def __init__(
        self,
        channels: int = 3,
        latent_channels: int = 2,
        downsample_factor: int = 2,
        scaling_factor: float = 0.5,
        shift_factor: float = 0.25,
    ):
        super().__init__()
        self.latent_channels, self.downsample_factor = latent_channels, downsample_factor
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.down = nn.Conv2d(channels, latent_channels, 1)
        self.up = nn.Conv2d(latent_channels, channels, 1)

    def encode(self, x):
        return self.down(F.avg_pool2d(x, self.downsample_factor))

    def decode(self, z):
        return F.interpolate(self.up(z), scale_factor=self.downsample_factor, mode="nearest")

    @property
    def last_layer_weight(self):
        return self.up.weight


@register_model
class PipelineTestVQ(nn.Module, ConfigMixin):
    """Discrete stand-in: nearest code of the pooled pixels (residual over ``num_quantizers`` codebooks)."""

    is_discrete = True

    def __init__(
        self, channels: int = 3, codebook_size: int = 16, downsample_factor: int = 2, num_quantizers: int = 1
    ):
        super().__init__()
        self.latent_channels, self.codebook_size = channels, codebook_size
        self.downsample_factor, self.num_quantizers = downsample_factor, num_quantizers
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        self.codebooks = nn.Parameter(torch.randn(num_quantizers, codebook_size, channels))

    def encode_indices(self, x):
        residual = F.avg_pool2d(x, self.downsample_factor).permute(0, 2, 3, 1)  # [B, h, w, C]
        indices = []
        for codebook in self.codebooks:
            idx = (
                torch.cdist(residual.reshape(-1, residual.shape[-1]), codebook)
                .argmin(-1)
                .view(residual.shape[:-1])
            )
            residual = residual - codebook[idx]
            indices.append(idx)
        stacked = torch.stack(indices, dim=-1)
        return stacked if self.num_quantizers > 1 else stacked[..., 0]

    def decode_indices(self, indices):
        if self.num_quantizers == 1:
            indices = indices[..., None]
        z = sum(codebook[indices[..., q]] for q, codebook in enumerate(self.codebooks)).permute(0, 3, 1, 2)
        return self.decode(z)

    def encode(self, x):
        return self.decode_indices(self.encode_indices(x))

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.downsample_factor, mode="nearest")


def kl_pipeline():
    torch.manual_seed(0)
    ae = PipelineTestKL()
    denoiser = DiT(
        input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3
    )
    for p in denoiser.parameters():
        nn.init.normal_(p, std=0.1)
    return TwoStagePipeline(ae, LatentDiffusion(denoiser, objective="flow"))


def test_continuous_pipeline_encode_decode_sample():
    pipe = kl_pipeline()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = pipe.encode(images)
    with torch.no_grad():
        z = pipe.autoencoder.encode(images)
        torch.testing.assert_close(latents, (z - 0.25) * 0.5)
        torch.testing.assert_close(pipe.decode(latents), pipe.autoencoder.decode(z))
    assert pipe.image_size == [8, 8]
    samples = pipe.sample(
        3, labels=[0, 1, 2], steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (3, 3, 8, 8)
    prior_latents = pipe.prior.sample(
        3, labels=[0, 1, 2], steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(samples, pipe.decode(prior_latents))
    with pytest.raises(ValueError, match="prior models 4x4"):
        pipe.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"latents must be a float tensor \[B, 2, h, w\]"):
        pipe.decode(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("num_quantizers", [1, 2])
def test_discrete_pipeline_flattens_token_grids(num_quantizers):
    torch.manual_seed(0)
    ae = PipelineTestVQ(num_quantizers=num_quantizers)
    prior = TokenGPT(vocab_size=16, seq_len=16 * num_quantizers, num_classes=2, dim=32, depth=1, num_heads=2)
    pipe = TwoStagePipeline(ae, prior)
    assert pipe.token_grid == [4, 4] + ([2] if num_quantizers == 2 else [])
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    tokens = pipe.encode(images)
    assert tokens.shape == (2, 16 * num_quantizers) and tokens.dtype == torch.int64
    grid = ae.encode_indices(images)
    assert torch.equal(tokens, grid.reshape(2, -1))  # row-major: (row, column[, quantizer])
    torch.testing.assert_close(pipe.decode(tokens), ae.decode_indices(grid))
    samples = pipe.sample(
        2, labels=[0, 1], temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="steps is for diffusion priors"):
        pipe.sample(1, labels=0, steps=10)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 15\]"):
        pipe.decode(tokens + 16)
    with pytest.raises(ValueError, match="token grid"):
        pipe.encode(torch.zeros(1, 3, 16, 16))


def test_pipeline_validates_that_the_stages_agree():
    ae = PipelineTestKL(latent_channels=4)
    prior = LatentDiffusion(
        DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="prior models 2 latent channels .* latent_channels=4"):
        TwoStagePipeline(ae, prior)
    with pytest.raises(TypeError, match="needs a latent prior"):
        TwoStagePipeline(ae, TokenGPT(16, 16, dim=32, depth=1, num_heads=2))
    vq = PipelineTestVQ(codebook_size=16)
    with pytest.raises(
        ValueError, match=r"vocab_size \(32\) must equal the autoencoder's codebook_size \(16\)"
    ):
        TwoStagePipeline(vq, TokenGPT(32, 16, dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="not a square grid"):
        TwoStagePipeline(vq, TokenGPT(16, 12, dim=32, depth=1, num_heads=2))
    with pytest.raises(
        ValueError, match=r"token_grid \[4, 4\] holds 16 tokens but the prior's seq_len is 12"
    ):
        TwoStagePipeline(vq, TokenGPT(16, 12, dim=32, depth=1, num_heads=2), token_grid=[4, 4])
    assert TwoStagePipeline(
        vq, TokenGPT(16, 12, dim=32, depth=1, num_heads=2), token_grid=[3, 4]
    ).image_size == [6, 8]
    with pytest.raises(TypeError, match="needs a token prior"):
        TwoStagePipeline(vq, prior)
    with pytest.raises(TypeError, match="lacks the stage-1 protocol"):
        TwoStagePipeline(nn.Linear(2, 2), prior)


def test_pipeline_save_load_roundtrip(tmp_path):
    pipe = kl_pipeline()
    pipe.save(tmp_path / "pipe")
    meta = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert meta["format"] == "fastlatent.TwoStagePipeline" and meta["token_grid"] is None
    assert isinstance(load_pretrained(tmp_path / "pipe" / "prior"), LatentDiffusion)
    loaded = TwoStagePipeline.load(tmp_path / "pipe")
    assert (
        isinstance(loaded.autoencoder, PipelineTestKL)
        and loaded.autoencoder.config == pipe.autoencoder.config
    )
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.encode(images), pipe.encode(images))
    kwargs = dict(labels=1, steps=3, guidance=1.5)
    torch.testing.assert_close(
        loaded.sample(2, generator=torch.Generator().manual_seed(4), **kwargs),
        pipe.sample(2, generator=torch.Generator().manual_seed(4), **kwargs),
    )

    torch.manual_seed(0)
    vq_pipe = TwoStagePipeline(
        PipelineTestVQ(num_quantizers=2),
        TokenGPT(16, 24, num_classes=2, dim=32, depth=1, num_heads=2),
        token_grid=[3, 4, 2],
    )
    vq_pipe.save(tmp_path / "vq")
    vq_loaded = TwoStagePipeline.load(tmp_path / "vq")
    assert vq_loaded.token_grid == [3, 4, 2]
    torch.testing.assert_close(
        vq_loaded.sample(2, labels=[0, 1], generator=torch.Generator().manual_seed(0)),
        vq_pipe.sample(2, labels=[0, 1], generator=torch.Generator().manual_seed(0)),
    )


def test_pipeline_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.json not found"):
        TwoStagePipeline.load(tmp_path)
    kl_pipeline().save(tmp_path)
    meta = json.loads((tmp_path / "pipeline.json").read_text())
    (tmp_path / "pipeline.json").write_text(json.dumps(dict(meta, prior="../elsewhere")))
    with pytest.raises(ValueError, match="prior must name a sub-folder"):
        TwoStagePipeline.load(tmp_path)
    (tmp_path / "pipeline.json").write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        TwoStagePipeline.load(tmp_path)
    (tmp_path / "pipeline.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TwoStagePipeline.load(tmp_path)


def test_unet_prior_in_a_pipeline():
    torch.manual_seed(0)
    denoiser = UNet(
        in_channels=2,
        base_channels=16,
        channel_mult=[1, 2],
        layers_per_block=1,
        attention_levels=[],
        norm_num_groups=8,
    )
    pipe = TwoStagePipeline(PipelineTestKL(), LatentDiffusion(denoiser, objective="eps", latent_size=4))
    assert pipe.sample(2, steps=2).shape == (2, 3, 8, 8)
