"""Attention masking inside joint attention (docs/method.md §15): the cross-attention rule on SD3 and Flux.

SD3's and Flux's blocks have no cross-attention layer: image and text tokens are joined into one sequence and
attend to each other (Flux's single-stream blocks take the joined sequence as it is). PFB-Diff's rule carries
over as a bias on one quarter of the joint attention matrix: an image query outside a word's region gets the most
negative finite logit for that word's text keys, so its attention to the word is exactly zero and the rest of its
row is renormalised. Image queries to image keys are left alone, and so are text queries unless
``text_queries`` is set: then a word's own text queries see only the image keys inside its region (the direction
joint attention adds; the word's text state becomes about its region alone, as KV-Edit's and regional Flux
prompting's masks do).

The word → region map and the gates are the U-Net's :class:`~pfbdiff.engine.attention.AttentionMasking`
controller, built on the token grid (its ``latent_size`` is the grid, so its maps need no halving). The processor
sits on a block's attention: where nothing is blocked the block's own processor runs, a bitwise no-op; Flux's own
processor takes the bias as its ``attention_mask``; SD3's stock one ignores masks, so for SD3 the masked
attention is computed here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

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
        controller = self.controller
        bias = None
        if controller.applies(self.index):
            bias = self._joint_bias(hidden_states, encoder_hidden_states, attention_mask)
        if bias is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.text_first:  # Flux's processor hands its attention_mask to the attention kernel
            return self.original(attn, hidden_states, encoder_hidden_states, bias, *args, **kwargs)
        return sd3_joint_attention(attn, hidden_states, encoder_hidden_states, bias)

    def _joint_bias(self, hidden_states, encoder_hidden_states, given) -> torch.Tensor | None:
        """The batch × 1 × joined × joined logit bias: the controller's word bias (image tokens × text tokens)
        where image queries meet text keys, plus a mask the model passed itself; ``None`` when nothing is
        blocked."""
        joined = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        key = (joined, hidden_states.shape[0], self.controller.unconditional_rows, hidden_states.dtype)
        if key not in self.shared:
            self.shared[key] = self._build_joint_bias(joined, hidden_states.shape[0], hidden_states.dtype)
        bias = self.shared[key]
        if bias is not None and given is not None:
            bias = (bias + given.to(bias.dtype)).clamp_min(torch.finfo(bias.dtype).min)
        return bias

    def _build_joint_bias(self, joined: int, batch: int, dtype) -> torch.Tensor | None:
        rows, columns = self.controller.latent_size
        image_tokens = rows * columns
        text_tokens = joined - image_tokens
        words = self.controller.bias(image_tokens, text_tokens, batch, dtype)
        if words is None:
            return None
        bias = torch.zeros(words.shape[0], 1, joined, joined, dtype=words.dtype, device=words.device)
        if self.text_first:
            image, text = slice(text_tokens, None), slice(0, text_tokens)
        else:
            image, text = slice(0, image_tokens), slice(image_tokens, None)
        bias[:, 0, image, text] = words
        if self.text_queries:
            bias[:, 0, text, image] = words.transpose(1, 2)
        return bias


def sd3_joint_attention(attn, image: torch.Tensor, text: torch.Tensor | None, bias: torch.Tensor):
    """SD3's joint attention (image tokens first, then text) with an additive ``bias`` on the logits; returns what
    the block expects: the image part, and the text part unless the block is the last (``context_pre_only``)."""
    def heads(tokens):  # batch × tokens × width → batch × heads × tokens × head width
        return tokens.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    def normed(norm, tokens):
        return tokens if norm is None else norm(tokens)

    query = normed(attn.norm_q, heads(attn.to_q(image)))
    key = normed(attn.norm_k, heads(attn.to_k(image)))
    value = heads(attn.to_v(image))
    if text is not None:
        query = torch.cat([query, normed(attn.norm_added_q, heads(attn.add_q_proj(text)))], dim=2)
        key = torch.cat([key, normed(attn.norm_added_k, heads(attn.add_k_proj(text)))], dim=2)
        value = torch.cat([value, heads(attn.add_v_proj(text))], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias).transpose(1, 2).flatten(2).to(query.dtype)
    image_out = attn.to_out[1](attn.to_out[0](out[:, : image.shape[1]]))
    if text is None:
        return image_out
    text_out = out[:, image.shape[1]:]
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
