"""Small flow-matching transformers of SD3's and Flux's shape, built in code, for tests and benchmarks.

The counterpart of :mod:`pfbdiff.models.toy_models` for the transformer families. :func:`tiny_flow_components`
returns every component diffusers' ``StableDiffusion3Pipeline`` (``family="sd3"``) or ``FluxPipeline``
(``family="flux"``) takes, with random weights and tiny widths but the real layout:

* SD3: joint blocks; two projecting CLIP text encoders whose penultimate states are joined side by side and
  padded to the T5 width, a T5 encoder whose states follow them in the sequence, the two CLIP pooled vectors
  joined; a static noise-level shift of 3.
* Flux: double-stream then single-stream blocks on latents packed 2 × 2; one CLIP whose pooled vector is the
  pooled input, T5 states as the text sequence; Flux's resolution-dependent shift.

The T5 tokenizer is SentencePiece-shaped (:func:`build_t5_tokenizer`): every listed word is one ``▁word`` piece,
any other word falls apart into letters, no start token, ``</s>`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pfbdiff.models.toy_models import TINY_WORDS, build_clip_tokenizer, tiny_text_encoder_config, tiny_vae_config

FLOW_FAMILIES = ("sd3", "flux")
#: The tiny T5's token limit (SD3 reads 256 T5 tokens by default, Flux 512; a toy's captions are short).
TINY_T5_LENGTH = 32
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def build_t5_tokenizer(words: Iterable[str] = TINY_WORDS, model_max_length: int = TINY_T5_LENGTH):
    """A T5-style fast tokenizer built offline: Unigram pieces with SentencePiece's ``▁`` word marker."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)]
    vocab += [(char, -4.0) for char in LETTERS + ",.;:!?'()-"]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _t5(tokenizer, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))


def flow_scheduler(family: str) -> FlowMatchEulerDiscreteScheduler:
    """The family's flow grid: SD3's static shift 3; Flux's shift growing with the image's token count."""
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                           base_shift=0.5, max_shift=1.15)


def tiny_flow_components(family: str = "sd3", seed: int = 0, *, sample_size: int = 16, width: int = 16,
                         layers: int = 2, heads: int = 2, head_width: int = 8, single_layers: int | None = None,
                         words: Iterable[str] = TINY_WORDS) -> dict:
    """Random-weight SD3 or Flux components, every network in eval mode without gradients.

    ``sample_size`` is the latent side (images are 8 × larger); ``width`` the narrowest text width (the second
    CLIP and T5 are wider, as in the real models); ``layers`` the number of (double-stream, for Flux) blocks, of
    ``heads`` × ``head_width`` channels; Flux adds ``single_layers`` single-stream ones (default: as many).
    """
    if family not in FLOW_FAMILIES:
        raise ValueError(f"family must be one of {FLOW_FAMILIES}, got {family!r}")
    words = tuple(words)
    tokenizer, t5_tokenizer = build_clip_tokenizer(words), build_t5_tokenizer(words)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**tiny_vae_config(sample_size * 8), "scaling_factor": 1.0, "shift_factor": 0.0})
    if family == "sd3":
        clip_l = CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer, hidden_size=width))
        clip_g = CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer, hidden_size=2 * width))
        t5_width = 4 * width  # wider than the two CLIP widths side by side, as T5-XXL is
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
            attention_head_dim=head_width, num_attention_heads=heads, joint_attention_dim=t5_width,
            caption_projection_dim=heads * head_width, pooled_projection_dim=3 * width, pos_embed_max_size=sample_size)
        components = dict(text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
                          text_encoder_3=_t5(t5_tokenizer, t5_width), tokenizer_3=t5_tokenizer)
    else:
        t5_width = 2 * width
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers if single_layers is None
            else single_layers, attention_head_dim=head_width,
            num_attention_heads=heads, joint_attention_dim=t5_width, pooled_projection_dim=width,
            guidance_embeds=False, axes_dims_rope=_rope_axes(head_width))
        components = dict(text_encoder=CLIPTextModel(tiny_text_encoder_config(tokenizer, hidden_size=width)),
                          tokenizer=tokenizer, text_encoder_2=_t5(t5_tokenizer, t5_width), tokenizer_2=t5_tokenizer)
    components.update(transformer=transformer, vae=vae, scheduler=flow_scheduler(family))
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return components


def _rope_axes(head_width: int) -> list[int]:
    """Flux's rotary axes (id, row, column) for a head width: 16/56/56 of 128 in Flux.1, scaled."""
    side = (head_width * 7 // 16) // 2 * 2
    return [head_width - 2 * side, side, side]


#: The reduced architectures ``pfbdiff bench speed`` times on a CPU (their real counterparts are 1536 / 3072
#: wide with 24 / 19 + 38 blocks): the same kinds of block, fewer and narrower.
REDUCED = {"sd3": dict(layers=6, heads=6, head_width=64, width=128),
           "flux": dict(layers=4, single_layers=8, heads=6, head_width=64, width=128)}


def reduced_flow_components(family: str, seed: int = 0, sample_size: int = 64) -> dict:
    """Random-weight SD3 or Flux components of :data:`REDUCED` width and depth, for speed measurements."""
    return tiny_flow_components(family, seed, sample_size=sample_size, **REDUCED[family])
