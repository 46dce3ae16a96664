"""Test helper: write diffusers SD 1.x, 2.x or SDXL components as an original CompVis/LDM single-file checkpoint.

Real single-file Stable Diffusion checkpoints (``v1-5-pruned-emaonly.safetensors`` and the like) use the key
names of the original latent-diffusion code, not diffusers'. To test loading such files offline, this module
renames the tiny model's weights into that layout:

* UNet ``model.diffusion_model.*``: a flat ``input_blocks`` / ``middle_block`` / ``output_blocks`` list where
  diffusers has nested ``down_blocks`` / ``mid_block`` / ``up_blocks``; resnet layers are called
  ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``.
* VAE ``first_stage_model.*``: ``encoder.down.{i}.block.{j}``, ``decoder.up.{i}`` numbered from the lowest
  resolution upward (the reverse of diffusers' ``up_blocks``), ``mid.block_1`` / ``mid.attn_1``, and the
  mid attention's q/k/v/proj_out stored as 1x1 convolutions.
* Text encoder ``cond_stage_model.transformer.text_model.*``: the Hugging Face CLIP names under a prefix (SD 1.x);
  SD 2.x's OpenCLIP encoder ``cond_stage_model.model.*`` has its own names (``resblocks``, one ``in_proj`` for
  queries, keys and values, ``text_projection`` stored transposed); SDXL's two are
  ``conditioner.embedders.0.transformer.*`` (CLIP names) and ``conditioner.embedders.1.model.*`` (OpenCLIP's).
* SDXL's pooled-vector and size-id embedding ``add_embedding`` is ``label_emb.0``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers module path -> LDM module path, for the UNet parts that are not inside a block
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_TOP_LEVEL = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
VAE_ATTENTION_LAYERS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split(key: str, depth: int) -> tuple[list[str], str]:
    """Split a parameter name into its first ``depth`` parts and the rest."""
    parts = key.split(".")
    return parts[:depth], ".".join(parts[depth:])


def _rename_first(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of ``rest`` if it is in ``table`` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The LDM name of one diffusers UNet parameter (SD 1.x layout)."""
    renamed = _rename_first(key, UNET_TOP_LEVEL)
    if renamed != key:
        return renamed
    stride = layers_per_block + 1  # LDM entries per resolution level: the layers plus a down/upsampler
    if key.startswith("down_blocks."):
        (_, block, kind, index), rest = _split(key, 4)
        block, index = int(block), int(index)
        if kind == "resnets":
            return f"input_blocks.{block * stride + index + 1}.0.{_rename_first(rest, UNET_RESNET_LAYERS)}"
        if kind == "attentions":
            return f"input_blocks.{block * stride + index + 1}.1.{rest}"
        if kind == "downsamplers":  # rest is "conv.weight" / "conv.bias"
            return f"input_blocks.{block * stride + stride}.0.op.{rest.removeprefix('conv.')}"
    if key.startswith("mid_block."):
        (_, kind, index), rest = _split(key, 3)
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_rename_first(rest, UNET_RESNET_LAYERS)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if key.startswith("up_blocks."):
        (_, block, kind, index), rest = _split(key, 4)
        block, index = int(block), int(index)
        if kind == "resnets":
            return f"output_blocks.{block * stride + index}.0.{_rename_first(rest, UNET_RESNET_LAYERS)}"
        if kind == "attentions":
            return f"output_blocks.{block * stride + index}.1.{rest}"
        if kind == "upsamplers":  # the upsampler follows the last layer's resnet (and attention, if any)
            slot = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{block * stride + layers_per_block}.{slot}.{rest}"
    raise KeyError(f"no LDM name for UNet parameter {key!r}")


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """The LDM name of one diffusers ``AutoencoderKL`` parameter."""
    renamed = _rename_first(key, VAE_TOP_LEVEL)
    if renamed != key:
        return renamed
    coder = key.split(".")[0]
    if ".mid_block." in key:
        (_, _, kind, index), rest = _split(key, 4)
        if kind == "resnets":
            return f"{coder}.mid.block_{int(index) + 1}.{rest}"
        return f"{coder}.mid.attn_1.{_rename_first(rest, VAE_ATTENTION_LAYERS)}"
    if key.startswith("encoder.down_blocks."):
        (_, _, level, kind, index), rest = _split(key, 5)
        if kind == "resnets":
            return f"encoder.down.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"encoder.down.{level}.downsample.{rest}"
    if key.startswith("decoder.up_blocks."):
        (_, _, block, kind, index), rest = _split(key, 5)
        level = num_levels - 1 - int(block)  # LDM counts decoder levels from the lowest resolution
        if kind == "resnets":
            return f"decoder.up.{level}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"decoder.up.{level}.upsample.{rest}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.`` with LDM names."""
    config = unet.config
    with_attention = {i for i, name in enumerate(config.up_block_types) if "CrossAttn" in name}
    return {
        UNET_PREFIX + unet_key_to_ldm(key, config.layers_per_block, with_attention): tensor
        for key, tensor in unet.state_dict().items()
    }


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.``; mid-attention projections become 1x1 convolutions."""
    num_levels = len(vae.config.block_out_channels)
    converted = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, num_levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original AttnBlock uses Conv2d(kernel_size=1)
        converted[VAE_PREFIX + ldm_key] = tensor
    return converted


def text_encoder_to_ldm(text_encoder, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's weights under ``prefix`` with the Hugging Face names."""
    converted = {}
    for key, tensor in text_encoder.state_dict().items():
        # Recent transformers drop the ``text_model.`` level inside CLIPTextModel; older ones keep it.
        converted[prefix + key.removeprefix("text_model.")] = tensor
    return converted


OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_TOP_LEVEL = {"embeddings.token_embedding.weight": "token_embedding.weight",
                       "embeddings.position_embedding.weight": "positional_embedding",
                       "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def text_encoder_to_open_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights with OpenCLIP's names under ``prefix`` (SD 2.x, SDXL's second encoder)."""
    weights = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    converted = {prefix + new: weights.pop(old) for old, new in OPEN_CLIP_TOP_LEVEL.items()}
    if "text_projection.weight" in weights:  # OpenCLIP multiplies by the projection from the right
        converted[prefix + "text_projection"] = weights.pop("text_projection.weight").T
    weights.pop("embeddings.position_ids", None)
    for layer in range(text_encoder.config.num_hidden_layers):
        old, new = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            converted[f"{new}attn.in_proj_{kind}"] = torch.cat(
                [weights.pop(f"{old}self_attn.{part}_proj.{kind}") for part in ("q", "k", "v")])
            for old_name, new_name in OPEN_CLIP_LAYER_NAMES.items():
                converted[f"{new}{new_name}.{kind}"] = weights.pop(f"{old}{old_name}.{kind}")
    assert not weights, f"weights left without an OpenCLIP name: {sorted(weights)}"
    return converted


def components_to_ldm(components: dict, family: str = "sd1") -> dict[str, torch.Tensor]:
    """One LDM-layout state dict holding the UNet, VAE and text encoder(s) of ``components`` (``family``: "sd1",
    "sd2" or "sdxl")."""
    if family == "sdxl":
        text = {**text_encoder_to_ldm(components["text_encoder"], SDXL_CLIP_PREFIX),
                **text_encoder_to_open_clip(components["text_encoder_2"], SDXL_OPEN_CLIP_PREFIX)}
    elif family == "sd2":
        text = text_encoder_to_open_clip(components["text_encoder"], OPEN_CLIP_PREFIX)
    else:
        text = text_encoder_to_ldm(components["text_encoder"])
    state_dict = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"]), **text}
    # safetensors refuses tensors that share memory or are views, so store independent contiguous copies
    return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state_dict.items()}


def write_ldm_safetensors(components: dict, path: str | Path, family: str = "sd1") -> Path:
    """Write ``components`` as a single-file LDM ``.safetensors`` checkpoint and return its path."""
    path = Path(path)
    save_file(components_to_ldm(components, family), str(path))
    return path


def write_ldm_pickle(components: dict, path: str | Path) -> Path:
    """Write ``components`` as a pickle ``.ckpt`` in the original ``{"state_dict": ...}`` wrapping."""
    path = Path(path)
    torch.save({"state_dict": components_to_ldm(components)}, path)
    return path
