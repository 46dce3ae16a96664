"""Assertions and fixtures' makers shared by the tests."""

import pytest
import torch
from PIL import Image

from pfbdiff.errors import PFBDiffError


def assert_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    """The error is a PFBDiffError whose one-line message contains every fragment."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, PFBDiffError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def pixel(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    return tuple(image.getpixel((x, y)))


def random_lora(components, folder):
    """A random (non-zero) LoRA on every attention projection of ``components``' U-Net, saved as diffusers saves
    one (the same file layout for SD 1.x/2.x and SDXL U-Net LoRAs)."""
    import torch
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = components["unet"]
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def assert_confined_to(seen, latent_mask, positions):
    """Every observed cross-attention map (``seen``: block → heads × pixels × tokens of one conditional row) gives
    the tokens at ``positions`` exactly zero attention outside ``latent_mask``'s region, and some attention inside
    it somewhere."""
    import torch

    from pfbdiff.engine.attention import AttentionMasking
    from pfbdiff.engine.edit_mask import EditMask

    assert seen, "no cross-attention was masked"
    grid = AttentionMasking([], tuple(latent_mask.shape[-2:]), ())  # the engine's map sizes for each pixel count
    inside_somewhere = False
    for index, probabilities in seen.items():
        size = grid.spatial_size(probabilities.shape[-2])
        inside = EditMask(latent_mask[:1]).binary_at(size).reshape(-1)
        on_words = probabilities[..., positions]
        assert torch.all(on_words[:, ~inside] == 0), index
        inside_somewhere |= bool((on_words[:, inside] > 0).any())
    assert inside_somewhere


#: Tiny flow transformers' latent side: 8 × 8 latent pixels → a 4 × 4 token grid in both families.
LATENT = 8


def tiny_sd3_transformer():
    """An SD3-shaped transformer (three joint blocks, patch 2) with seeded random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()


def tiny_flux_transformer():
    """A Flux-shaped transformer (two double-stream, two single-stream blocks) with seeded random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  guidance_embeds=False, axes_dims_rope=[2, 2, 4]).eval()


def tiny_sentencepiece_tokenizer(model_max_length: int = 16):
    """A T5-style tokenizer (Unigram pieces with a "▁" word marker, no start token, "</s>" at the end) built
    offline: "giraffes" is three pieces, and "cat" right after a bracket is spelt letter by letter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁a", "▁cat", "▁gira", "ffe", "s", "▁on", "▁bench", "▁red", "▁(", ")", "▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces]
    vocab += [(letter, -4.0) for letter in "abcefghinorst"]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def within_outgrowth(mask, preset: str = "object"):
    """The user's ``mask`` grown by how far the preset's paste-back may follow a new object past its edge
    (``photo/new_content.py``): an edit changes nothing outside it."""
    import numpy as np

    from pfbdiff.engine.presets import get_preset
    from pfbdiff.photo.compositing import grow_mask
    from pfbdiff.photo.morphology import share_of_size

    mask = (np.asarray(mask) > 0).astype(np.float32)
    return grow_mask(mask, share_of_size(mask, get_preset(preset).outgrow)) > 0
