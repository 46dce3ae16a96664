"""What the ShapesWorld training builds: the component configs, fresh or trained components, and the data stream.

The configs are those of the bundled model (see :mod:`pfbdiff.shapes.train`). :func:`training_batch` renders
the train-split scenes of one training step, fixed by (seed, stage, step), and :func:`sample_latents` draws
from the VAE posterior with a seeded generator, so that a resumed run sees exactly the data and noise of an
uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pfbdiff.shapes.world import VOCABULARY, caption, render, sample_scene

# Second word of each stage's data-stream entropy (see training_batch); never reuse a code.
STAGE_CODES = {"vae": 1, "unet": 2, "decoder": 3}
EMPTY_CAPTION = ""
FAMILIES = ("sd1", "sdxl", "sd3")
#: The SD3-layout flow model reads this many tokens from each text part (its captions are short).
FLOW_TEXT_LENGTH = 32
#: Its T5 width: the joint-attention width, as wide as the two CLIPs side by side (128 + POOLED_WIDTH).
FLOW_T5_WIDTH = 192
# The SDXL-layout model's second (projecting) text encoder: its width is that of the pooled vector.
POOLED_WIDTH = 64
SIZE_ID_WIDTH = 8  # sinusoidal width of each of SDXL's six size ids
IMAGE_SIZE = 64  # ShapesWorld scenes are 64 x 64, the size every SDXL size id names

# ------------------------------------------------------------------------------------------------ model configs


def vae_config() -> dict:
    """AutoencoderKL: 64 x 64 x 3 <-> 16 x 16 x 4 (three levels, so a downscale factor of 4)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (24, 48, 64),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 1.0,  # measured after training
    }


def unet_config(cross_attention_dim: int = 128, family: str = "sd1") -> dict:
    """UNet2DConditionModel on 16 x 16 x 4 latents; cross-attention at 16 x 16, 8 x 8 and in the 4 x 4 mid block.

    ``attention_head_dim`` is the number of heads here (the SD 1.x naming quirk of diffusers). ``family="sdxl"``
    lays the same channels out as SDXL does: no cross-attention at the top (16 x 16) level, cross-attention at
    8 x 8, 4 x 4 and in the mid block, linear projections, and the pooled text vector and six size ids added to
    the time embedding (``cross_attention_dim`` is then both text encoders' widths together).
    """
    config = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "attention_head_dim": 4,
        "cross_attention_dim": cross_attention_dim,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if family == "sdxl":
        from pfbdiff.models.toy_models import SDXL_DOWN_BLOCKS, SDXL_UP_BLOCKS

        config.update(
            down_block_types=SDXL_DOWN_BLOCKS, up_block_types=SDXL_UP_BLOCKS, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SIZE_ID_WIDTH,
            projection_class_embeddings_input_dim=6 * SIZE_ID_WIDTH + POOLED_WIDTH,
        )
    elif family != "sd1":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return config


def transformer_config() -> dict:
    """SD3Transformer2DModel on 16 x 16 x 4 latents: patches of 2 x 2 (an 8 x 8 token grid), 8 joint blocks of
    width 128 (4 heads of 32), text read at the T5 width, the two CLIP pooled vectors joined."""
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 8,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": FLOW_T5_WIDTH,
        "caption_projection_dim": 128,
        "pooled_projection_dim": 128 + POOLED_WIDTH,
        "pos_embed_max_size": 16,
    }


def flow_scheduler_config() -> dict:
    """Rectified flow without a noise-level shift (the images are small: 64 tokens)."""
    return {"num_train_timesteps": 1000, "shift": 1.0}


def text_encoder_config(tokenizer, hidden_size: int = 128, layers: int = 3):
    """A small CLIP text transformer whose vocabulary and special token ids match ``tokenizer``.

    The SDXL-layout model has two: the first with 4 layers (SDXL reads the penultimate layer, so the first three
    are the ones used, as in the SD-1-layout model), the second ``POOLED_WIDTH`` wide with 2 layers.
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def scheduler_config() -> dict:
    """DDIM with SD's beta range, rescaled to zero terminal SNR, v-prediction and trailing timesteps."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ components


def build_unet_stage(out: Path, seed: int, family: str = "sd1") -> dict:
    """The trained components of a fresh model (weights seeded): ``tokenizer``, ``text_encoder``, ``unet``,
    ``scheduler``, and for ``family="sdxl"`` also ``tokenizer_2`` and ``text_encoder_2``; for ``family="sd3"``
    SD3's: two projecting CLIPs, a T5 and its tokenizer, a ``transformer`` and a flow-matching scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pfbdiff.models.toy_models import build_clip_tokenizer

    if family == "sd3":
        return _build_sd3_stage(out, seed)
    tokenizer = build_clip_tokenizer(VOCABULARY, out / "tokenizer")
    torch.manual_seed(seed)
    components = {"tokenizer": tokenizer, "scheduler": DDIMScheduler.from_config(scheduler_config())}
    if family == "sdxl":
        components["text_encoder"] = CLIPTextModel(text_encoder_config(tokenizer, layers=4))
        components["tokenizer_2"] = tokenizer
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            text_encoder_config(tokenizer, hidden_size=POOLED_WIDTH, layers=2))
        width = components["text_encoder"].config.hidden_size + POOLED_WIDTH
    else:
        components["text_encoder"] = CLIPTextModel(text_encoder_config(tokenizer))
        width = components["text_encoder"].config.hidden_size
    components["unet"] = UNet2DConditionModel(**unet_config(width, family))
    return components


def _build_sd3_stage(out: Path, seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from pfbdiff.models.toy_flow_models import build_t5_tokenizer
    from pfbdiff.models.toy_models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(VOCABULARY, out / "tokenizer", model_max_length=FLOW_TEXT_LENGTH)
    t5_tokenizer = build_t5_tokenizer(VOCABULARY, FLOW_TEXT_LENGTH)
    torch.manual_seed(seed)
    t5 = T5Config(vocab_size=len(t5_tokenizer), d_model=FLOW_T5_WIDTH, d_kv=48, d_ff=4 * FLOW_T5_WIDTH, num_layers=2,
                  num_heads=4, relative_attention_num_buckets=16, pad_token_id=t5_tokenizer.pad_token_id,
                  eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id)
    return {
        "tokenizer": tokenizer, "tokenizer_2": tokenizer, "tokenizer_3": t5_tokenizer,
        "text_encoder": CLIPTextModelWithProjection(text_encoder_config(tokenizer)),
        "text_encoder_2": CLIPTextModelWithProjection(text_encoder_config(tokenizer, hidden_size=POOLED_WIDTH,
                                                                          layers=2)),
        "text_encoder_3": T5EncoderModel(t5),
        "transformer": SD3Transformer2DModel(**transformer_config()),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler_config()),
    }


TRAINED = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def denoiser(components: dict) -> torch.nn.Module:
    """The network that is trained to denoise: the U-Net, or the SD3-layout model's transformer."""
    return components["unet"] if "unet" in components else components["transformer"]


def trained_modules(components: dict) -> list[torch.nn.Module]:
    """The modules the U-Net stage trains, in a fixed order (the order of the EMA and checkpoint lists)."""
    return [components[name] for name in TRAINED if name in components]


def caption_conditioning(components: dict, captions: list[str]):
    """The captions' text conditioning as the model's family reads it (:mod:`pfbdiff.engine.conditioning`):
    SD's last hidden states, or SDXL's two penultimate layers, pooled vector and the 64 x 64 size ids.
    Gradients flow (the training calls it too)."""
    from pfbdiff.engine.conditioning import Conditioning, encode_sd, encode_sdxl

    dtype = denoiser(components).dtype
    if "transformer" in components:  # SD3's joined text, by diffusers' own encoder
        from diffusers import StableDiffusion3Pipeline

        text = StableDiffusion3Pipeline(vae=None, **{k: v for k, v in components.items() if k != "vae"})
        tokens, _, pooled, _ = text.encode_prompt(
            prompt=list(captions), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=FLOW_TEXT_LENGTH, device=components["transformer"].device)
        return Conditioning(tokens.to(dtype), pooled.to(dtype))
    if "text_encoder_2" in components:
        encoders = [(components["tokenizer"], components["text_encoder"]),
                    (components["tokenizer_2"], components["text_encoder_2"])]
        return encode_sdxl(encoders, list(captions), dtype, (IMAGE_SIZE, IMAGE_SIZE))
    return encode_sd(components["tokenizer"], components["text_encoder"], list(captions), dtype)


def load_vae(out: Path):
    """The trained VAE of the run folder ``out`` (``<out>/vae``), frozen in eval mode."""
    from diffusers import AutoencoderKL

    folder = out / "vae"
    if not (folder / "config.json").exists():
        raise SystemExit(f"no trained VAE in {folder}: run --stage vae first")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ data


def training_batch(seed: int, stage: str, step: int, batch_size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Rendered train-split scenes of one step, fixed by (seed, stage, step).

    Returns the images (N x 3 x 64 x 64 in [-1, 1]), their captions and their object masks (N x 1 x 64 x 64,
    1 on object pixels), which the U-Net stage pools into per-latent-pixel loss weights.
    """
    rng = np.random.default_rng([seed, STAGE_CODES[stage], step])
    scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
    renders = [render(scene) for scene in scenes]
    images = torch.from_numpy(np.stack([r.image for r in renders])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    objects = torch.from_numpy(np.stack([r.labels > 0 for r in renders])).float().unsqueeze(1)
    return images, [caption(scene) for scene in scenes], objects


class TrainingBatches(torch.utils.data.Dataset):
    """Item ``i``: the :func:`training_batch` of step ``first_step + i``, for a ``DataLoader`` whose worker
    processes render the coming steps while the current one trains (the items come back in step order)."""

    def __init__(self, seed: int, stage: str, first_step: int, batch_size: int) -> None:
        self.seed, self.stage, self.first_step, self.batch_size = seed, stage, first_step, batch_size

    def __len__(self) -> int:
        return 2 ** 40  # a stream: the training stops it

    def __getitem__(self, index: int):
        return training_batch(self.seed, self.stage, self.first_step + index, self.batch_size)


def batch_stream(seed: int, stage: str, first_step: int, batch_size: int, workers: int):
    """The training batches from ``first_step`` on, rendered by ``workers`` processes (0: in this one)."""
    loader = torch.utils.data.DataLoader(TrainingBatches(seed, stage, first_step, batch_size), batch_size=None,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    return iter(loader)


def sample_latents(posterior, generator: torch.Generator) -> torch.Tensor:
    """A draw from the VAE posterior with the noise of ``generator`` (drawn on the CPU, so that resumed runs
    repeat it on any device)."""
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device)
    return posterior.mean + posterior.std * noise


@torch.no_grad()
def warm_start_sd3_from_sd1(components: dict, model_dir: Path) -> None:
    """Start the SD3-layout model's first CLIP from the exported SD-1-layout model's text encoder (the same width
    and layers; its first position embeddings, the SD3 model reading fewer tokens). The transformer, the second
    CLIP and T5 start fresh: a transformer shares nothing with a U-Net."""
    from transformers import CLIPTextModel

    sd1_text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").float()
    source = getattr(sd1_text, "text_model", sd1_text).state_dict()  # transformers 5 has no text_model level here
    target = components["text_encoder"].text_model.state_dict()
    for name, value in source.items():
        if name.endswith("position_embedding.weight"):
            value = value[: target[name].shape[0]]
        elif name.endswith("position_ids"):
            value = value[:, : target[name].shape[1]]
        target[name].copy_(value)


@torch.no_grad()
def warm_start_from_sd1(components: dict, model_dir: Path) -> None:
    """Start an SDXL-layout model from an exported SD-1-layout one (the bundled model), so that it need not
    learn ShapesWorld from scratch.

    What exists in both layouts is copied: the first text encoder's three layers, the U-Net's convolutions,
    resnets, time embedding and the attention of the 8 x 8 level and the mid block (a 1 x 1 projection
    convolution becomes the equal linear map; the cross-attention keys and values read the second encoder's new
    columns with zero weights). What SDXL adds starts as a no-op: the new 4 x 4 attention blocks and the
    pooled/size embedding output zero, so the warm-started model first behaves as the SD-1 one without its
    16 x 16 attention, which SDXL's layout lacks.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    source_text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").float().state_dict()
    missing = components["text_encoder"].load_state_dict(source_text, strict=False).missing_keys
    assert all(".layers.3." in key for key in missing), missing
    source = UNet2DConditionModel.from_pretrained(model_dir / "unet").float().state_dict()
    unet = components["unet"]
    for name, value in unet.state_dict().items():
        old = source.get(name)
        if old is None:
            continue
        if old.shape == value.shape or old.numel() == value.numel():
            value.copy_(old.reshape(value.shape))
        elif name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            value.zero_()[:, :old.shape[1]] = old
    for name, module in unet.named_modules():
        fresh = (name.startswith(("down_blocks.2.attentions", "up_blocks.0.attentions")) and name.endswith("proj_out")
                 or name == "add_embedding.linear_2")
        if fresh:
            module.weight.zero_()
            module.bias.zero_()
