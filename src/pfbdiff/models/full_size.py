"""The full-size Stable Diffusion 1.5 and SDXL architectures with random weights: what the real models cost, and
the real block layouts, without their weights (which cannot be fetched where pfbdiff is tested).

:func:`random_unet` builds a U-Net of :func:`sd15_unet_config` or :func:`sdxl_unet_config` (the published
configs); :func:`sd15_random_components` and :func:`sdxl_random_components` add a full-size VAE and text
encoders of the published widths and depths on the tiny tokenizer, for the speed benchmark.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pfbdiff.models.toy_models import (
    SD1_DOWN_BLOCKS,
    SD1_UP_BLOCKS,
    SD_VAE_SCALING_FACTOR,
    SDXL_DOWN_BLOCKS,
    SDXL_UP_BLOCKS,
    TINY_WORDS,
    build_clip_tokenizer,
    make_sd_scheduler,
    tiny_text_encoder_config,
)

SDXL_VAE_SCALING_FACTOR = 0.13025


def sd15_unet_config() -> dict:
    """The UNet config of Stable Diffusion 1.5 (about 859.5M parameters)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": SD1_DOWN_BLOCKS,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": SD1_UP_BLOCKS,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def random_unet(
    config: dict,
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet2DConditionModel:
    """A UNet of ``config`` with random weights, built directly on ``device``, in eval mode.

    ``device="meta"`` builds the structure without allocating weights (for counting parameters); building on
    ``"cuda"`` and in ``dtype`` avoids an fp32 copy in host memory (3.4 GB for SD 1.5, 10.3 GB for SDXL).
    """
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default_dtype)
    return unet.eval().requires_grad_(False)


def sd15_random_components(seed: int = 0) -> dict:
    """Every SD 1.5 component at full size with random weights (UNet, VAE, a CLIP ViT-L/14-sized text
    encoder on the tiny tokenizer): the real architecture's cost, for the speed benchmark."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    return _in_eval_mode(
        unet=random_unet(sd15_unet_config(), seed), vae=_sd_vae(512, SD_VAE_SCALING_FACTOR), tokenizer=tokenizer,
        text_encoder=CLIPTextModel(_text_config(tokenizer, 768, 12, 12, "quick_gelu")), scheduler=make_sd_scheduler())


def sdxl_unet_config() -> dict:
    """The UNet config of SDXL 1.0 base (about 2.567B parameters): three levels, no cross-attention at the top one,
    1, 2 and 10 transformer layers at the others, two text encoders' 2048-wide tokens, the 1280-wide pooled
    vector and six size ids added to the time embedding."""
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": SDXL_DOWN_BLOCKS,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": SDXL_UP_BLOCKS,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "upcast_attention": False,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }


def _text_config(tokenizer, hidden: int, layers: int, heads: int, activation: str):
    config = tiny_text_encoder_config(tokenizer, hidden_size=hidden)
    config.intermediate_size, config.num_hidden_layers, config.num_attention_heads = 4 * hidden, layers, heads
    config.hidden_act = activation
    return config


def _sd_vae(sample_size: int, scaling_factor: float, **config) -> AutoencoderKL:
    """Stable Diffusion's VAE architecture (SD 1.x, 2.x and SDXL share it; their scaling factors differ)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size, scaling_factor=scaling_factor, **config)


def _in_eval_mode(**components) -> dict:
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if name in components:
            components[name].eval().requires_grad_(False)
    return components


def sdxl_random_components(seed: int = 0) -> dict:
    """Every SDXL base component at full size with random weights: the UNet, the VAE (kept in float32 in half
    precision, as SDXL's asks) and text encoders the size of CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with its
    projection) on the tiny tokenizer: the real architecture's cost, for the speed benchmark."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    return _in_eval_mode(
        unet=random_unet(sdxl_unet_config(), seed), tokenizer=tokenizer, tokenizer_2=tokenizer,
        vae=_sd_vae(1024, SDXL_VAE_SCALING_FACTOR, force_upcast=True),
        text_encoder=CLIPTextModel(_text_config(tokenizer, 768, 12, 12, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 1280, 32, 20, "gelu")),
        scheduler=make_sd_scheduler())
