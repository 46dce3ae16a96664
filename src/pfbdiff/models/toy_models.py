"""Small Stable-Diffusion-shaped models built in code, for tests, benchmarks and demos.

No pretrained weights can be fetched in the places pfbdiff is tested, so this module builds models that have
Stable Diffusion 1.x's *shape* with random weights:

* :func:`build_clip_tokenizer` writes a real byte-level BPE vocabulary (CLIP's conventions) in which every
  listed word is one token and every other word falls apart into several pieces, then loads it with
  ``transformers.CLIPTokenizer``.
* :func:`tiny_sd_components` returns ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``.
  The UNet has exactly SD 1.x's block layout (three cross-attention down blocks and a plain one, a
  cross-attention mid block, a plain up block and three cross-attention up blocks, two layers per block), so
  code that walks SD's attention layers sees the same structure; only the channel counts are tiny.
* :func:`save_tiny_model` writes those components as a standard diffusers Stable Diffusion folder.

The full-size architectures with random weights (SD 1.5, SDXL), for smoke tests and speed benchmarks, are in
:mod:`pfbdiff.models.full_size`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# --------------------------------------------------------------------------------------------------- tokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CLIP_MAX_LENGTH = 77

# Words that are single tokens in the tiny vocabulary. Deliberately NOT listed, so that they split into several
# BPE pieces the way rare words do in CLIP's real vocabulary: "giraffe", "giraffes", "zebra", "zebras",
# "tiger", "elephant", "sunglasses", "bicycle", "pumpkin".
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "and", "with", "at", "is", "to", "by", "its",
    "photo", "picture", "painting", "image", "close", "up", "view",
    "cat", "cats", "dog", "dogs", "rabbit", "bird", "horse", "cow", "sheep", "bear", "fox", "lion", "man",
    "woman", "boy", "girl", "person", "car", "boat", "house", "tree", "flower", "flowers", "apple", "cake",
    "bench", "chair", "table", "grass", "field", "road", "street", "beach", "sea", "sky", "snow", "water",
    "forest", "mountain", "park", "room", "wall", "window", "background",
    "hat", "shirt", "glasses", "scarf", "bag", "ball", "bowl", "cup", "vase",
    "red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "purple", "gray",
    "big", "small", "old", "young", "cute", "wooden", "sitting", "standing", "lying", "running", "wearing",
    "holding", "eating", "next", "front", "top",
    "circle", "square", "triangle", "shape", "shapes",
)


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2/CLIP byte-level BPE does.

    Printable latin-1 bytes map to themselves; the rest (control chars, space, ...) are moved to code points
    from 256 upward so that no vocabulary entry contains whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def _word_symbols(word: str, byte_chars: dict[int, str]) -> list[str]:
    """The initial BPE symbols of one word: its bytes as unicode chars, the last one marked end-of-word."""
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def _apply_merges(symbols: list[str], merge_ranks: dict[tuple[str, str], int]) -> list[str]:
    """Run BPE on one word: repeatedly join the adjacent pair with the best (lowest) merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(merge_ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        best_rank, best_index = min(ranked)
        if best_rank == float("inf"):
            break
        symbols[best_index : best_index + 2] = [symbols[best_index] + symbols[best_index + 1]]
    return symbols


def _merges_for_words(words: Iterable[str], byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which each word becomes a single token.

    Each word is tokenized with the merges found so far, and new merges joining its first two remaining
    pieces are appended until it is one token. A merge appended later has a worse rank than every earlier
    one, so it never changes how an earlier word (already a single token by then) is split.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges(_word_symbols(word, byte_chars), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _apply_merges(pieces, ranks)
    return merges


def _clip_vocab(merges: Sequence[tuple[str, str]], byte_chars: dict[int, str]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + ``</w>``, merge results, then the two special tokens."""
    tokens = list(byte_chars.values())
    tokens += [char + END_OF_WORD for char in byte_chars.values()]
    tokens += [left + right for left, right in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_clip_tokenizer(words: Iterable[str] = TINY_WORDS, directory: str | Path | None = None,
                         model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Write a CLIP-style byte-level BPE vocabulary for ``words`` and load it as a ``CLIPTokenizer``.

    ``vocab.json`` and ``merges.txt`` (and, after loading, the files of ``save_pretrained``) are written into
    ``directory`` so the tokenizer reloads with ``CLIPTokenizer.from_pretrained(directory)``; without a
    directory a temporary one is used and removed. Words are lower-cased, as CLIP's normalizer does.
    ``model_max_length`` is the token limit (CLIP's 77 unless a small model reads fewer).
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="pfbdiff-tokenizer-") as scratch:
            return build_clip_tokenizer(words, scratch, model_max_length)

    unique_words = list(dict.fromkeys(word.strip().lower() for word in words if word.strip()))
    byte_chars = bytes_to_unicode()
    merges = _merges_for_words(unique_words, byte_chars)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(_clip_vocab(merges, byte_chars), ensure_ascii=False), "utf-8")
    merge_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", "utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(
        directory,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # CLIP pads with the end-of-text token
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


# --------------------------------------------------------------------------------------------------- scheduler


def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The DDIM scheduler settings Stable Diffusion v1 was trained and is sampled with."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": prediction_type,
    }


def make_sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """A fresh ``DDIMScheduler`` with Stable Diffusion v1 settings."""
    return DDIMScheduler.from_config(sd_scheduler_config(prediction_type))


# --------------------------------------------------------------------------------------------------- tiny model

SD1_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# SDXL's three levels: no cross-attention at the top (full-resolution) one
SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SD_VAE_SCALING_FACTOR = 0.18215
TINY_LATENT_SIZE = 16  # latents of 16x16, i.e. 128x128 images through the factor-8 VAE


FAMILIES = ("sd1", "sd2", "sdxl")


def tiny_unet_config(cross_attention_dim: int = 32, sample_size: int = TINY_LATENT_SIZE, family: str = "sd1") -> dict:
    """SD 1.x's (or 2.x's) UNet layout with tiny channel counts.

    ``attention_head_dim`` is, for SD 1.x/2.x configs in diffusers, the number of heads (a historical naming
    quirk); 2 heads keep per-head maps meaningful while staying cheap. ``family="sd2"`` adds what SD 2.x's
    U-Net does differently: linear projections in and out of each transformer, a head count per level, and
    attention scores upcast to float32 (``upcast_attention``, as SD 2.1-768-v ships).
    """
    config = {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": SD1_DOWN_BLOCKS,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": SD1_UP_BLOCKS,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "attention_head_dim": 2,
        "cross_attention_dim": cross_attention_dim,
    }
    if family == "sd2":
        config.update(use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4, 8, 8))
    elif family == "sdxl":  # three levels, no cross-attention at the top one, the pooled text and size ids added
        config.update(
            down_block_types=SDXL_DOWN_BLOCKS, up_block_types=SDXL_UP_BLOCKS, block_out_channels=(32, 64, 64),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
            cross_attention_dim=3 * cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 2 * cross_attention_dim,
        )
    elif family != "sd1":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return config


def tiny_vae_config(sample_size: int = TINY_LATENT_SIZE * 8) -> dict:
    """A small ``AutoencoderKL`` with SD's downscale factor 8 (four resolution levels) and 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 4,
        "sample_size": sample_size,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
    }


def tiny_text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, family: str = "sd1") -> CLIPTextConfig:
    """A two-layer CLIP text transformer whose vocabulary and special ids match ``tokenizer`` (with SD 2.x's
    OpenCLIP activation for ``family="sd2"``)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu" if family == "sd2" else "quick_gelu",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def _scale_unet_output_to_unit_std(unet: UNet2DConditionModel, cross_attention_dim: int, seed: int) -> None:
    """Rescale ``conv_out`` so that a random UNet predicts noise of about unit standard deviation.

    An epsilon-predicting UNet outputs roughly N(0, 1); matching that keeps DDIM sampling and inversion with
    the random tiny model in the same numeric range as with real weights.
    """
    probe = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=probe)
    context = torch.randn(1, CLIP_MAX_LENGTH, unet.config.cross_attention_dim, generator=probe)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: a pooled vector and the six size ids
        added = {"text_embeds": torch.randn(1, 2 * cross_attention_dim, generator=probe),
                 "time_ids": torch.tensor([[float(size * 8)] * 2 + [0.0] * 2 + [float(size * 8)] * 2])}
    output = unet(latents, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    scale = 1.0 / output.std().clamp_min(1e-6)
    unet.conv_out.weight.mul_(scale)
    unet.conv_out.bias.mul_(scale)


def tiny_sd_components(
    seed: int = 0,
    prediction_type: str = "epsilon",
    cross_attention_dim: int = 32,
    *,
    words: Iterable[str] = TINY_WORDS,
    tokenizer_directory: str | Path | None = None,
    sample_size: int = TINY_LATENT_SIZE,
    family: str = "sd1",
) -> dict:
    """Random-weight Stable Diffusion 1.x (or, with ``family="sd2"``, 2.x) components with tiny channels.

    Returns a dict with ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and ``scheduler``, in eval mode.
    The same ``seed`` always gives the same weights. ``sample_size`` is the latent size (images are 8x larger).
    Weights are fp32 (torch's default dtype; no cast is made, which would make diffusers warn).
    """
    tokenizer = build_clip_tokenizer(words, tokenizer_directory)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim, sample_size, family))
    vae_config = tiny_vae_config(sample_size * 8)
    if family == "sdxl":  # SDXL's VAE latents are scaled differently, and it overflows in float16
        vae_config.update(scaling_factor=0.13025, force_upcast=True)
    vae = AutoencoderKL(**vae_config)
    text_encoder = CLIPTextModel(tiny_text_encoder_config(tokenizer, hidden_size=cross_attention_dim, family=family))
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
                  "scheduler": make_sd_scheduler(prediction_type)}
    if family == "sdxl":  # a second (projecting) text encoder, twice as wide as the first as OpenCLIP-bigG is wider
        components["tokenizer_2"] = tokenizer  # than CLIP-L; its pooled output goes to the time embedding
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            tiny_text_encoder_config(tokenizer, hidden_size=2 * cross_attention_dim, family=family))
    _scale_unet_output_to_unit_std(unet, cross_attention_dim, seed)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in components:
            components[name].eval().requires_grad_(False)
    return components


def save_tiny_model(directory: str | Path, **kwargs) -> Path:
    """Build tiny components (``kwargs`` go to :func:`tiny_sd_components`) and save a diffusers SD folder.

    The folder, with safetensors weights, loads with ``StableDiffusionPipeline.from_pretrained(directory)``.
    """
    directory = Path(directory)
    components = tiny_sd_components(**kwargs)
    if "text_encoder_2" in components:
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline(**components)
    else:
        pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_model_path() -> Path:
    """A tiny random-weight model saved once under the user cache: the ``tiny`` model name (for trying the
    pipeline and the CLI offline; its edits are not meaningful pictures)."""
    cache = Path(os.environ.get("PFBDIFF_CACHE", Path.home() / ".cache" / "pfbdiff")) / "tiny-random-sd"
    if not (cache / "model_index.json").exists():
        save_tiny_model(cache, seed=0)
    return cache
