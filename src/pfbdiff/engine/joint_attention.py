"""Attention masking inside joint attention (docs/method.md §15): the cross-attention rule on SD3 and Flux.

SD3's and Flux's blocks have no cross-attention layer: image and text tokens are joined into one sequence and
attend to each other (Flux's single-stream blocks take the joined sequence as it is). PFB-Diff's rule carries
over as a bias on one quarter of the joint attention matrix: an image query outside a word's region gets the most
negative finite logit for that word's text keys, so its attention to the word is exactly zero and the rest of its
row is renormalised. Image queries to image keys are left alone (but for ``kept_apart``, below), and so are
text queries unless ``text_queries`` is set: then a word's own text queries see only the image keys inside its
region (the direction joint attention adds; the word's text state becomes about its region alone, as KV-Edit's
and regional Flux prompting's masks do). With ``kept_apart`` (background edits) the image × image quarter gets
the U-Net self-attention's rule: in the conditional rows an image query outside the kept region cannot read the
image keys inside it (:meth:`~pfbdiff.engine.attention.AttentionMasking.kept_apart_bias`).

Regional prompts (docs/method.md §5) ride at the end of the text: each region's own prompt is appended to the edit's
(the other rows get as many tokens, which nothing reads). In the conditional rows an image query inside a region
reads its region's prompt instead of the edit's, one outside every region reads the edit's alone, and a region's
prompt reads itself and the image inside its region (:func:`region_prompts_blocked`).

The word → region map and the gates are the U-Net's :class:`~pfbdiff.engine.attention.AttentionMasking`
controller, built on the token grid (its ``latent_size`` is the grid, so its maps need no halving). The processor
sits on a block's attention: where nothing is blocked the block's own processor runs, a bitwise no-op; elsewhere
the joint attention is computed here (SD3's stock processor ignores masks, and the word boost needs the logits).

The word boost (docs/method.md §5) raises a confined word's logits inside its region. In a U-Net's cross-attention
the softmax runs over the text alone; here it runs over image and text keys together, so the boost is made to
take its weight from the other text tokens only (:func:`text_share_kept`), not from the image.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from pfbdiff.engine.attention import AttentionMasking


class MaskedJointAttention:
    """Attention processor of one transformer block L; ``text_first`` is the sequence order (Flux: text, then
    image; SD3: image, then text)."""

    def __init__(self, controller: AttentionMasking, index: int, original, *, text_first: bool,
                 text_queries: bool = False, shared: dict | None = None):
        self.controller = controller
        self.index = index
        self.original = original
        self.text_first = text_first
        self.text_queries = text_queries
        # the joint bias is the same in every masked block of a step: built once, kept in a dict all of them share
        self.shared = {} if shared is None else shared

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        bias = None
        if self.controller.applies(self.index) or self.controller.applies_to_self_attention(self.index):
            image, text = self._parts(hidden_states, encoder_hidden_states)
            bias = self._joint_bias(image, text, hidden_states, attention_mask)
        if bias is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        boost = None
        if self.controller.boosting and self.controller.applies(self.index):
            added = self._boost_added(image, text, hidden_states)
            boost = None if added is None else (image, text, added)
        return joint_attention(attn, hidden_states, encoder_hidden_states, bias, text_first=self.text_first,
                               rotary=args[0] if args else kwargs.get("image_rotary_emb"), boost=boost)

    def _parts(self, hidden_states, encoder_hidden_states) -> tuple[slice, slice]:
        """Where the image and the text tokens sit in the joined sequence."""
        rows, columns = self.controller.latent_size
        image_tokens = rows * columns
        joined = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        text_tokens = joined - image_tokens
        if self.text_first:
            return slice(text_tokens, joined), slice(0, text_tokens)
        return slice(0, image_tokens), slice(image_tokens, joined)

    def _step_key(self, text: slice, hidden_states) -> tuple:
        return (text.stop, hidden_states.shape[0], self.controller.unconditional_rows, hidden_states.dtype,
                self.controller.boosting)

    def _joint_bias(self, image: slice, text: slice, hidden_states, given) -> torch.Tensor | None:
        """The batch × 1 × joined × joined logit bias: the controller's word bias (image tokens × text tokens)
        where image queries meet text keys, plus a mask the model passed itself; ``None`` when nothing is
        blocked."""
        key = self._step_key(text, hidden_states)
        if key not in self.shared:
            self.shared[key] = self._build_joint_bias(image, text, hidden_states.shape[0], hidden_states.dtype)
        bias = self.shared[key]
        if bias is not None and given is not None:
            bias = (bias + given.to(bias.dtype)).clamp_min(torch.finfo(bias.dtype).min)
        return bias

    def _boost_added(self, image: slice, text: slice, hidden_states) -> torch.Tensor | None:
        """What the word boost adds to the image × text logits (batch × image × text; ``None``: nothing), once per
        step."""
        key = ("boost", *self._step_key(text, hidden_states))
        if key not in self.shared:
            sizes = (image.stop - image.start, text.stop - text.start, hidden_states.shape[0], hidden_states.dtype)
            boosted = self.controller.bias(*sizes)
            unboosted = self.controller.bias(*sizes, boosted=False)
            self.shared[key] = boosted if unboosted is None else boosted - unboosted
        return self.shared[key]

    def _build_joint_bias(self, image: slice, text: slice, batch: int, dtype) -> torch.Tensor | None:
        image_tokens = image.stop - image.start
        words = self.controller.bias(image_tokens, text.stop - text.start, batch, dtype) \
            if self.controller.applies(self.index) else None
        kept_apart = self.controller.kept_apart_bias(image_tokens, batch, dtype) \
            if self.controller.applies_to_self_attention(self.index) else None
        regional = self.controller.region_prompts if self.controller.applies(self.index) else []
        if words is None and kept_apart is None and not regional:
            return None
        joined = max(image.stop, text.stop)
        bias = torch.zeros(batch, 1, joined, joined, dtype=dtype, device=self.controller.device)
        if words is not None:
            bias[:, 0, image, text] = words
            if self.text_queries:
                bias[:, 0, text, image] = words.transpose(1, 2)
        if kept_apart is not None:
            bias[:, 0, image, image] = kept_apart
        if regional:
            blocked = region_prompts_blocked(self.controller, image, text, joined, batch)
            bias = bias.masked_fill(blocked[:, None], torch.finfo(dtype).min)
        return bias


def region_prompts_blocked(controller: AttentionMasking, image: slice, text: slice, joined: int,
                           batch: int) -> torch.Tensor:
    """Where the regions' own prompts, appended to the text in ``controller.region_prompts``' order, block the
    joint attention (batch × joined × joined, True: blocked). In the conditional rows an image query inside a region
    reads that region's prompt and not the edit's, and each region's prompt reads only itself and the image inside
    its region; the edit's prompt never reads them, and in the other rows (unconditional, source) nothing but the
    appended tokens themselves does."""
    prompts = controller.region_prompts
    start = text.stop - sum(prompt.tokens.shape[1] for prompt in prompts)
    edits_prompt, appended = slice(text.start, start), slice(start, text.stop)
    blocked = torch.zeros(batch, joined, joined, dtype=torch.bool, device=controller.device)
    blocked[:, :, appended] = True
    blocked[:, appended, :] = True
    blocked[:, appended, appended] = False  # the other rows' appended tokens: finite rows, read by nothing
    rows = slice(controller.unconditional_rows, batch)
    for prompt in prompts:
        own = slice(start, start + prompt.tokens.shape[1])
        start = own.stop
        inside = prompt.region.binary_at(controller.latent_size).flatten(1)
        inside = inside.repeat((batch - controller.unconditional_rows) // inside.shape[0], 1)  # rows × image tokens
        blocked[rows, image, own] = ~inside[:, :, None]
        blocked[rows, image, edits_prompt] |= inside[:, :, None]
        blocked[rows, own, :] = True
        blocked[rows, own, own] = False
        blocked[rows, own, image] = ~inside[:, None, :]
    return blocked


def text_share_kept(logits: torch.Tensor, boosted: torch.Tensor, unboosted: torch.Tensor) -> torch.Tensor:
    """The image queries' bias on the text keys with the word boost taken from the other text tokens only.

    ``logits`` are the image queries' logits for the text keys (… × image × text), ``boosted`` and ``unboosted``
    the word bias with and without the boost. Each query's text bias is lowered by what the boost added to its
    text keys' total weight (a log-sum-exp), so the query gives the text the same share of its attention as
    without the boost, and the image keys theirs: within the text, a boosted word's odds against every other
    text token still grow by e^boost, as in a U-Net's cross-attention, whose softmax runs over the text alone.
    """
    work = torch.promote_types(logits.dtype, torch.float32)
    logits, boosted, unboosted = logits.to(work), boosted.to(work), unboosted.to(work)
    added = torch.logsumexp(logits + boosted, -1, keepdim=True) - torch.logsumexp(logits + unboosted, -1, keepdim=True)
    return boosted - added


def joint_attention(attn, image: torch.Tensor, text: torch.Tensor | None, bias: torch.Tensor, *, text_first: bool,
                    rotary=None, boost: tuple | None = None):
    """The block's joint attention with an additive ``bias`` on the logits, for SD3 (image tokens, then text) and
    Flux (text, then image; ``rotary`` its position embedding; a single-stream block passes the joined sequence
    as ``image`` and no ``text``). ``boost`` (image slice, text slice, what the boost adds to those logits) keeps
    each image query's share of attention to the text while the word boost is on (:func:`text_share_kept`). Returns
    what the block expects: the image part, and the text part unless the block has none."""
    def heads(tokens):  # batch × tokens × width → batch × heads × tokens × head width
        return tokens.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def normed(norm, tokens):
        return tokens if norm is None else norm(tokens)

    query = normed(attn.norm_q, heads(attn.to_q(image)))
    key = normed(attn.norm_k, heads(attn.to_k(image)))
    value = heads(attn.to_v(image))
    if text is not None:
        parts = [(query, normed(attn.norm_added_q, heads(attn.add_q_proj(text)))),
                 (key, normed(attn.norm_added_k, heads(attn.add_k_proj(text)))),
                 (value, heads(attn.add_v_proj(text)))]
        query, key, value = (torch.cat(pair[::-1] if text_first else pair, dim=2) for pair in parts)
    if rotary is not None:
        query, key = apply_rotary_emb(query, rotary), apply_rotary_emb(key, rotary)
    if boost is not None:
        image_part, text_part, added = boost
        logits = query[:, :, image_part] @ key[:, :, text_part].transpose(-1, -2) * query.shape[-1] ** -0.5
        bias = bias.expand(-1, attn.heads, -1, -1).clone()
        boosted = bias[:, :, image_part, text_part]  # a mask the model passed is in both, and stays
        kept = text_share_kept(logits, boosted, boosted - added[:, None])
        bias[:, :, image_part, text_part] = kept.clamp_min(torch.finfo(bias.dtype).min).to(bias.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias).transpose(1, 2).flatten(2).to(query.dtype)
    if text is None:
        return out if getattr(attn, "pre_only", False) else attn.to_out[1](attn.to_out[0](out))
    text_tokens = text.shape[1]
    image_out, text_out = (out[:, text_tokens:], out[:, :text_tokens]) if text_first else \
        (out[:, : image.shape[1]], out[:, image.shape[1]:])
    image_out = attn.to_out[1](attn.to_out[0](image_out))
    return image_out, (text_out if attn.context_pre_only else attn.to_add_out(text_out))


@contextlib.contextmanager
def joint_attention_masking_installed(feature_transformer, controller: AttentionMasking, *, text_queries=False):
    """Install a :class:`MaskedJointAttention` on the attention of every controlled block, then restore."""
    saved, shared = [], {}
    for block in feature_transformer.blocks:
        if block.index in controller.blocks:
            attention = block.module.attn
            saved.append((attention, attention.processor))
            attention.set_processor(MaskedJointAttention(controller, block.index, attention.processor,
                                                         text_first=feature_transformer.flux,
                                                         text_queries=text_queries, shared=shared))
    try:
        yield controller
    finally:
        for attention, processor in saved:
            attention.set_processor(processor)
