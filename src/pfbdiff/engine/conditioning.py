"""The text conditioning of a batch of U-Net rows, as one record the whole method passes along.

For Stable Diffusion 1.x/2.x it is the text encoder's token embeddings (rows × tokens × width). SDXL adds two
things its U-Net reads besides the tokens: the pooled text vector and the size/crop ids (``time_ids``), both
added to the time embedding. Every branch of an edit (inversion, source, target, unconditional) carries its own
record, and rows are joined (:meth:`cat`) and repeated exactly like the latents they go with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    tokens: torch.Tensor  # rows × tokens × width: what cross-attention attends to
    pooled: torch.Tensor | None = None  # rows × width₂: SDXL's pooled text vector
    time_ids: torch.Tensor | None = None  # rows × 6: SDXL's (original size, crop top-left, target size)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """The rows of ``parts`` one after the other (a batched guidance pass: unconditional, then conditional)."""
        def joined(name):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(joined("tokens"), joined("pooled"), joined("time_ids"))

    def map(self, function) -> Conditioning:
        """``function`` applied to every tensor of the record (repeat rows, select rows, cast)."""
        return Conditioning(*(None if value is None else function(value)
                              for value in (self.tokens, self.pooled, self.time_ids)))

    def repeat_interleave(self, repeats: int) -> Conditioning:
        return self.map(lambda value: value.repeat_interleave(repeats, dim=0))

    def to(self, dtype: torch.dtype) -> Conditioning:
        """Token and pooled embeddings in ``dtype``; the ids stay as they are."""
        return Conditioning(self.tokens.to(dtype), None if self.pooled is None else self.pooled.to(dtype),
                            self.time_ids)

    def borrowing(self, other: Conditioning, *, pooled: bool = False) -> Conditioning:
        """These rows' tokens with ``other``'s size ids, and with ``pooled`` its pooled vector too (rows matched
        one to one). Every edit branch borrows the inversion's size ids, so the recorded source features were
        computed under the ids the edit runs with; the pooled vector is the ``pooled_from`` setting."""
        return Conditioning(self.tokens, other.pooled if pooled else self.pooled, other.time_ids)

    def with_tokens_appended(self, tokens: list[torch.Tensor]) -> Conditioning:
        """These rows with more token embeddings after their own (regional prompts in joint attention)."""
        return Conditioning(torch.cat([self.tokens, *tokens], dim=1), self.pooled, self.time_ids)

    def padded_to(self, length: int) -> Conditioning:
        """These rows with zero token embeddings after their own up to ``length`` tokens, to share a call with
        rows that carry appended ones."""
        missing = length - self.tokens.shape[1]
        if missing <= 0:
            return self
        return self.with_tokens_appended([self.tokens.new_zeros(len(self), missing, self.tokens.shape[2])])

    def added_cond_kwargs(self) -> dict | None:
        """What an SDXL U-Net takes beside the tokens (``None`` for SD 1.x/2.x)."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """The prompts' token ids, padded and cut to the tokenizer's length, as the text encoders read them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_sd(tokenizer, text_encoder, prompts: list[str], dtype: torch.dtype) -> Conditioning:
    """Stable Diffusion 1.x/2.x: the text encoder's last hidden states."""
    return Conditioning(text_encoder(token_ids(tokenizer, prompts, text_encoder.device))[0].to(dtype))


def encode_sdxl(encoders, prompts: list[str], dtype: torch.dtype, size: tuple[int, int], *,
                original_size: tuple[int, int] | None = None, zeros_for_empty: bool = False) -> Conditioning:
    """SDXL: the penultimate hidden states of both ``encoders`` ((tokenizer, text encoder) pairs) side by side,
    the second (projecting) encoder's pooled vector, and size ids for a ``size`` = (height, width) image, crop at
    (0, 0), made from an image of ``original_size`` (default: ``size``, an image seen whole). With
    ``zeros_for_empty`` (the negative prompt of a model whose config asks for it) rows with an empty prompt are
    zeros."""
    hidden, pooled = [], None
    for tokenizer, encoder in encoders:
        output = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the projecting encoder's text embedding
    tokens, pooled = torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)
    if zeros_for_empty:
        empty = torch.tensor([prompt == "" for prompt in prompts], device=tokens.device)
        tokens, pooled = tokens.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
    ids = [*(original_size or size), 0, 0, *size]
    time_ids = torch.tensor([ids], dtype=dtype, device=tokens.device)
    return Conditioning(tokens, pooled, time_ids.repeat(len(prompts), 1))
