"""Attention masking (docs/method.md §5): chosen words may only be attended to inside (or outside) chosen regions.

In the cross-attention layers of the target branch, the logit of pixel p for text token j is set to the most
negative finite number wherever token j is not allowed at p, *before* the softmax. The remaining tokens (start
token, other words, padding) are renormalised, so every row of attention probabilities still sums to one and
a masked word's probability is exactly zero outside its region.

The design follows prompt-to-prompt's attention-control object: one small controller,
:class:`AttentionMasking`, holds the token → allowed-region map and the on/off gate, and every masked
cross-attention layer calls it through a :class:`MaskedCrossAttention` processor (diffusers' extension
point). Where nothing is blocked the layer's original processor runs, so masking off is a bitwise no-op.

Regional prompts (:class:`RegionPrompt`, docs/method.md §5) go one step further for multi-object edits: inside
a word's region the conditional rows do not read the edit's prompt at all, but a prompt of the region's own
(its own start, end and padding tokens too), as regional-prompting tools do. A text encoder reads a prompt as a
whole, so in "a red circle and a green square" even the words "green square" and the end tokens carry the red
circle; masking words cannot keep that out of the square's region, a prompt of its own can.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable

import torch

from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.tokens import new_words, positions_of, split_at_token_limit, subject_words
from pfbdiff.errors import PFBDiffError


@dataclass
class TokenRegion:
    """Text-token positions that may only be attended to where ``region`` is 1 (B×1×h×w at latent size).

    ``positions`` holds the same positions for every image, or one tuple of positions per image when the
    prompts of a batch place the words differently.
    """

    positions: tuple
    region: EditMask

    def positions_of_image(self, image: int) -> tuple[int, ...]:
        if self.positions and isinstance(self.positions[0], tuple):
            return self.positions[image]
        return self.positions


@dataclass
class RegionPrompt:
    """Inside ``region`` (B×1×h×w at latent size), the conditional rows' cross-attention reads ``tokens``
    (rows × tokens × width: the encoded prompt of the region) instead of the edit's prompt; with ``share`` < 1,
    its output there is that share of the region prompt's and the rest the edit prompt's."""

    tokens: torch.Tensor
    region: EditMask
    share: float = 1.0


class AttentionMasking:
    """The controller every masked cross-attention layer consults.

    The conditional rows are masked, and the unconditional ones too only with ``mask_uncond`` (reference
    quirk 4). Before each U-Net pass the loop sets ``unconditional_rows``: how many leading rows of the
    batch are unconditional (half of a batched guidance pass, all of a sequential unconditional pass).
    ``observer``, if set, receives ``(L, probabilities)`` of every masked layer; it is how tests and
    visualisations see the attention maps.

    ``word_boost`` (docs/method.md §5) adds that many logits to a confined word's attention inside its own region,
    in the conditional rows, while the loop's ``timestep`` is above ``word_boost_until``: in the early steps,
    where the layout is decided, each word is pulled to its region as well as kept out of the rest (as
    DenseDiffusion modulates attention). It acts on the cells its region covers by more than
    ``word_boost_cover`` (0.5: wherever the word is allowed; 0.99: the cells wholly inside the region). Once the
    layout is settled (``timestep`` at or below ``word_boost_until``) a word whose region has a ``core``
    (``word_inset``) may only be attended to there, so the object's edges are drawn inside the mask.

    ``kept_apart`` (a region, B×1×h×w at latent size: the kept one) hides that region's keys from the other
    queries of the self-attention layers, in the conditional rows (:class:`KeptApartSelfAttention`).
    """

    def __init__(self, regions: list[TokenRegion], latent_size: tuple[int, int], blocks, *, mask_uncond=False,
                 region_prompts: list[RegionPrompt] = (), word_boost: float = 0.0, word_boost_until: float = 0.0,
                 word_boost_cover: float = 0.5, kept_apart: EditMask | None = None):
        self.regions = regions
        self.kept_apart = kept_apart
        self.region_prompts = list(region_prompts)
        self.latent_size = tuple(latent_size)
        self.blocks = frozenset(blocks)
        self.mask_uncond = mask_uncond
        self.word_boost = float(word_boost)
        self.word_boost_until = word_boost_until
        self.word_boost_cover = float(word_boost_cover)
        self.timestep = float("inf")  # set by the loop before each pass
        self.active = False
        self.unconditional_rows = 0
        self.observer: Callable[[int, torch.Tensor], None] | None = None
        self._bias_cache: dict[tuple, torch.Tensor | None] = {}

    @property
    def device(self) -> torch.device:
        """Where the regions live (and the biases are built)."""
        masks = [r.region for r in self.regions] + [p.region for p in self.region_prompts] + [self.kept_apart]
        return next((mask.latent.device for mask in masks if mask is not None), torch.device("cpu"))

    def applies(self, index: int) -> bool:
        return self.active and bool(self.regions or self.region_prompts) and index in self.blocks

    def applies_to_self_attention(self, index: int) -> bool:
        return self.active and self.kept_apart is not None and index in self.blocks

    def kept_apart_bias(self, num_pixels: int, batch: int, dtype) -> torch.Tensor | None:
        """Self-attention logit bias (batch × pixels × pixels): the most negative finite value where a query outside
        ``kept_apart`` meets a key inside it, in the conditional rows; ``None`` when nothing is blocked."""
        key = ("kept apart", num_pixels, batch, self.unconditional_rows, dtype)
        if key not in self._bias_cache:
            kept = self.kept_apart.binary_at(self.spatial_size(num_pixels)).reshape(-1, num_pixels)
            kept = kept.repeat(batch // kept.shape[0], 1)
            blocked = ~kept[:, :, None] & kept[:, None, :]
            blocked[: self.unconditional_rows] = False
            bias = None
            if bool(blocked.any()):
                bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
                bias = bias.masked_fill(blocked, torch.finfo(dtype).min)
            self._bias_cache[key] = bias
        return self._bias_cache[key]

    def spatial_size(self, num_pixels: int) -> tuple[int, int]:
        """The (H, W) of a flattened feature map, found among the U-Net's successive halvings of the latent."""
        h, w = self.latent_size
        while h * w > num_pixels:
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != num_pixels:
            raise ValueError(f"cannot place {num_pixels} pixels in the latent grid {self.latent_size}")
        return h, w

    def bias(self, num_pixels: int, num_tokens: int, batch: int, dtype, *, boosted: bool = True) -> torch.Tensor | None:
        """Additive logit bias (batch × pixels × tokens): 0 where allowed, the most negative finite value where
        blocked, plus the word boost while it is on (``boosted=False``: without it); ``None`` when nothing is
        blocked (then the layer runs unchanged)."""
        if not self.regions:
            return None
        boosting = boosted and self.boosting
        key = (num_pixels, num_tokens, batch, self.unconditional_rows, dtype, boosting, self.settled)
        if key not in self._bias_cache:
            self._bias_cache[key] = self._build_bias(num_pixels, num_tokens, batch, dtype, boosting)
        return self._bias_cache[key]

    def _build_bias(self, num_pixels, num_tokens, batch, dtype, boosting):
        size = self.spatial_size(num_pixels)
        images = self.regions[0].region.latent.shape[0]
        allowed = torch.ones(images, num_pixels, num_tokens, dtype=torch.bool, device=self.device)
        for token_region in self.regions:
            region = token_region.region
            region = region.core if self.settled and region.core is not None else region
            inside = region.binary_at(size).reshape(images, num_pixels)
            for image in range(images):
                for position in token_region.positions_of_image(image):
                    if position < num_tokens:
                        allowed[image, :, position] &= inside[image]
        allowed = allowed.repeat(batch // images, 1, 1)
        if not self.mask_uncond:
            allowed[: self.unconditional_rows] = True
        boost = self._boost(size, num_pixels, num_tokens, images, dtype) if boosting else None
        if bool(allowed.all()) and boost is None:
            return None
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        if boost is not None:
            bias += boost.repeat(batch // images, 1, 1)
            bias[: self.unconditional_rows] = 0
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    @property
    def settled(self) -> bool:
        """Whether the layout is settled at this step (past the word boost's gate): words act on their regions' cores."""
        return self.timestep <= self.word_boost_until

    @property
    def boosting(self) -> bool:
        """Whether the word boost is on at this step."""
        return self.word_boost != 0 and self.timestep > self.word_boost_until

    def _boost(self, size, num_pixels, num_tokens, images, dtype) -> torch.Tensor | None:
        """``word_boost`` on each confined word's tokens in the cells its region covers by more than
        ``word_boost_cover`` (images × pixels × tokens); a region allowed at every pixel says nothing about where
        the word belongs and gets none (``None``: nothing boosted, so a layer with nothing blocked either runs
        unchanged)."""
        boost = torch.zeros(images, num_pixels, num_tokens, dtype=dtype, device=self.device)
        for token_region in self.regions:
            allowed = token_region.region.binary_at(size).reshape(images, num_pixels)
            pulled = token_region.region.covering(size, self.word_boost_cover).reshape(images, num_pixels)
            for image in range(images):
                if bool(allowed[image].all()):
                    continue
                for position in token_region.positions_of_image(image):
                    if position < num_tokens:
                        boost[image, :, position] += self.word_boost * pulled[image].to(dtype)
        return boost if bool(boost.any()) else None


class MaskedCrossAttention:
    """Attention processor for one cross-attention layer of block L; defers to the original when idle.

    It computes what diffusers' standard processor computes (group norm, cross norm, residual, rescale), with
    the word bias added to the logits. A mask the model passes itself (a text padding mask) is added to the
    bias, so both apply: masking never switches off silently. Layers that upcast their scores to float32
    (``upcast_attention``, SD 2.1-v) get the bias in float32, whatever the model's dtype.
    """

    def __init__(self, controller: AttentionMasking, index: int, original):
        self.controller = controller
        self.index = index
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        controller = self.controller
        if encoder_hidden_states is None or hidden_states.ndim != 3 or not controller.applies(self.index):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, num_pixels, _ = hidden_states.shape
        score_dtype = torch.float32 if attn.upcast_attention else hidden_states.dtype
        bias = controller.bias(num_pixels, encoder_hidden_states.shape[1], batch, score_dtype)
        if bias is None:
            out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        else:
            out = self._masked(attn, hidden_states, encoder_hidden_states, attention_mask, bias)
        return self._regional(attn, hidden_states, out, temb, **kwargs)

    def _regional(self, attn, hidden_states, out, temb, **kwargs):
        """``out`` with the conditional rows, inside each region prompt's region, from cross-attention to the
        region's own prompt (the layer's original processor, so the same arithmetic)."""
        controller = self.controller
        first = controller.unconditional_rows  # the conditional rows follow the unconditional ones
        if not controller.region_prompts or first >= out.shape[0]:
            return out
        conditional, result = hidden_states[first:], out[first:]
        size = controller.spatial_size(hidden_states.shape[1])
        for prompt in controller.region_prompts:
            inside = prompt.region.binary_at(size).flatten(1)[..., None]  # rows × pixels × 1
            own = self.original(attn, conditional, prompt.tokens, None, temb, **kwargs)
            if prompt.share != 1.0:
                own = torch.lerp(result, own, prompt.share)
            result = torch.where(inside, own, result)
        return torch.cat([out[:first], result])

    def _masked(self, attn, hidden_states, encoder_hidden_states, attention_mask, bias):
        """diffusers' standard attention with ``bias`` (and the model's own mask) added to the logits."""
        bias = bias.repeat_interleave(attn.heads, dim=0)
        if attention_mask is not None:
            given = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], hidden_states.shape[0])
            bias = (bias + given.to(bias.dtype)).clamp_min(torch.finfo(bias.dtype).min)

        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, bias)
        if self.controller.observer is not None:
            self.controller.observer(self.index, probabilities.unflatten(0, (-1, attn.heads)))
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class KeptApartSelfAttention:
    """Self-attention processor of block L for background edits: in the conditional rows a query outside the kept
    region does not read the kept region's keys (docs/method.md §5). Defers to the original when idle.

    The new background is drawn without reading the subject, so it does not grow a copy of it; the unconditional
    rows still read it, so guidance pushes the background away from the subject's look as well."""

    def __init__(self, controller: AttentionMasking, index: int, original):
        self.controller = controller
        self.index = index
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        bias = None
        if (encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
                and self.controller.applies_to_self_attention(self.index)):
            bias = self.controller.kept_apart_bias(hidden_states.shape[1], hidden_states.shape[0], hidden_states.dtype)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask if bias is None else bias,
                             temb, **kwargs)


@contextlib.contextmanager
def attention_masking_installed(feature_unet, controller: AttentionMasking):
    """Install a :class:`MaskedCrossAttention` on every cross-attention of the controlled blocks (and, with
    ``kept_apart``, a :class:`KeptApartSelfAttention` on their self-attentions), then restore."""
    saved = []
    for block in feature_unet.blocks:
        if block.index in controller.blocks:
            for module in block.cross_attentions:
                saved.append((module, module.processor))
                module.set_processor(MaskedCrossAttention(controller, block.index, module.processor))
            for module in block.self_attentions if controller.kept_apart is not None else ():
                saved.append((module, module.processor))
                module.set_processor(KeptApartSelfAttention(controller, block.index, module.processor))
    try:
        yield controller
    finally:
        for module, processor in saved:
            module.set_processor(processor)


def confined_words(tokenizer, config, source_prompt: str, prompt: str, word_regions) -> tuple[list, list]:
    """(inside, outside) words of one prompt: the ones given (``config.inside`` / ``config.outside``), else the
    preset's automatic choice (``auto_words``: the new words inside, or the kept subject's words outside)."""
    inside, outside = list(config.inside), list(config.outside)
    seen, _ = split_at_token_limit(tokenizer, prompt)  # words past the token limit are not there to confine
    if not (inside or outside or word_regions) and config.auto_words == "new-inside":
        inside = new_words(tokenizer, source_prompt, seen)
    elif not (inside or outside or word_regions) and config.auto_words == "subject-outside":
        outside = subject_words(tokenizer, source_prompt, seen)
    return inside, outside


def negative_prompts(tokenizer, config, negatives: list[str], source_prompts, prompts, word_regions) -> list[str]:
    """The negative prompt of each row: the one given, followed, with ``config.kept_words_negative``, by the words
    confined outside the mask (the kept subject's). Guidance, cond − uncond, then points away from the subject:
    the new region is not drawn as a larger copy of it, while the kept region is held by the latent blend, the
    blended features and the paste-back (docs/method.md §5)."""
    if not (config.attention_masking and config.kept_words_negative):
        return negatives
    rows = []
    for negative, source, prompt in zip(negatives, source_prompts, prompts):
        given = [negative] if negative else []
        rows.append(", ".join(given + kept_subject_words(tokenizer, config, source, prompt, word_regions)))
    return rows


def kept_subject_words(tokenizer, config, source_prompt: str, prompt: str, word_regions) -> list[str]:
    """The words of ``prompt`` confined outside the mask (:func:`confined_words`; the kept subject's in a background
    edit), as text: raw token positions have none."""
    _, outside = confined_words(tokenizer, config, source_prompt, prompt, word_regions)
    return [word for word in outside if isinstance(word, str)]


def token_regions(tokenizer, config, source_prompts, prompts, mask: EditMask, word_regions: dict, *,
                  positions_of_words: Callable[[str, list], tuple[int, ...]] | None = None) -> list[TokenRegion]:
    """The token → allowed-region map of an edit (one row per prompt): inside words in ``mask``, outside words in
    its complement, each word of a multi-object edit in its own region. Words are chosen with ``tokenizer`` (a
    CLIP tokenizer); ``positions_of_words(prompt, words)`` places them in the text sequence the model reads
    (default: ``tokenizer``'s own positions)."""
    if not config.attention_masking:
        return []
    if positions_of_words is None:
        def positions_of_words(prompt, phrases):
            return positions_of(tokenizer, prompt, phrases)
    words = [confined_words(tokenizer, config, source, prompt, word_regions)
             for source, prompt in zip(source_prompts, prompts)]
    regions = []
    for group, region in ((0, mask), (1, mask.complement())):
        positions = [positions_of_words(prompt, w[group]) for prompt, w in zip(prompts, words)]
        if any(positions):
            regions.append(TokenRegion(tuple(positions), region))
    for word, region in word_regions.items():
        positions = [positions_of_words(prompt, [word]) for prompt in prompts]
        regions.append(TokenRegion(tuple(positions), region))
    return regions


def regional_prompts(encode: Callable[[list[str]], torch.Tensor], word_regions: dict, texts: dict | None,
                   rows: int, *, config) -> list[RegionPrompt]:
    """The :class:`RegionPrompt` of each word region of a multi-object edit: ``texts[word]`` where given, else the
    word itself, encoded by ``encode`` (prompts → token embeddings) for each of the ``rows`` edits. None unless the
    edit masks attention and asks for them (``config.own_region_prompts``, or ``texts`` given)."""
    if not (config.attention_masking and (config.own_region_prompts or texts)):
        return []
    texts = texts or {}
    unknown = [word for word in texts if word not in word_regions]
    if unknown:
        raise PFBDiffError.about("region_prompts", f"names {unknown}, which have no word mask; give each region "
                                 f"prompt under a word of word_masks ({sorted(word_regions)})")
    return [RegionPrompt(encode([texts.get(word, word)] * rows), region) for word, region in word_regions.items()]


def without_words(text: str, words) -> str:
    """``text`` with every whole-word occurrence of ``words`` taken out (case-insensitive), spaces tidied."""
    for word in words:
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


def background_prompts(encode: Callable[[list[str]], torch.Tensor], tokenizer, config, source_prompts, prompts,
                       word_regions, edit_region: EditMask) -> list[RegionPrompt]:
    """The subject-free share of a background edit's new background (``config.background_prompt_share``,
    docs/method.md §5): a :class:`RegionPrompt` on the edit region whose prompt is each row's prompt without the
    words confined outside the mask (the kept subject's).

    A text encoder that reads left to right carries the subject named first into every later token ("… on a
    checkered red background"), so masking the subject's words leaves it in the background's words, end and
    padding tokens, and the model redraws the subject around itself. The same prompt without those words has
    no subject in it, but it is no caption the model was trained on; a share of it (the rest from the whole
    prompt) keeps the new background drawn as asked."""
    if not (config.attention_masking and config.background_prompt_share > 0):
        return []
    texts, taken_out = [], False
    for source, prompt in zip(source_prompts, prompts):
        words = kept_subject_words(tokenizer, config, source, prompt, word_regions)
        texts.append(without_words(prompt, words))
        taken_out |= bool(words)
    return [RegionPrompt(encode(texts), edit_region, config.background_prompt_share)] if taken_out else []
