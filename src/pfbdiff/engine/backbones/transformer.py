"""Where PFB-Diff's features live in a flow-matching transformer (SD3, Flux): the image tokens after each block.

A transformer has no resolution levels: every block works on the same grid of image tokens, one token per
``patch × patch`` latent pixels (SD3's patch embedding; Flux's pipeline packs 2 × 2 latent pixels into one token),
in row-major order. :class:`FeatureTransformer` lists the blocks in the order they run (SD3's joint blocks;
Flux's double-stream blocks, then its single-stream ones), numbered from 1 as the U-Net's are, and calls
``on_block(L, h)`` after each with ``h`` the block's image tokens laid out as a feature map (B × C × h × w on the
token grid). So the U-Net's hooks work unchanged: :class:`~pfbdiff.engine.blending.FeatureBlender` blends
``m ⊙ h + (1 − m) ⊙ h_src`` with the edit mask area-resized to the token grid, and
:class:`~pfbdiff.engine.inversion.FeatureRecorder` records. Text tokens are never handed out: the prompts of
the source and the edit differ, so there is nothing of the source's to blend them with (docs/method.md §14).

PFB-Diff's "blend the deep levels, leave the shallow ones free to harmonise" becomes a window in depth:
:meth:`FeatureTransformer.window` gives the first fraction of the blocks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from pfbdiff.engine.backbones.unet import BlockCallback
from pfbdiff.errors import PFBDiffError

#: Latent pixels per token side where the pipeline, not the model, patches the latent (Flux packs 2 × 2).
FLUX_PACKING = 2


@dataclass(frozen=True)
class TransformerBlock:
    """One block of the transformer, numbered L in run order from 1."""

    index: int
    kind: str  # "joint" (SD3), "double" or "single" (Flux's two streams)
    module: torch.nn.Module


class FeatureTransformer:
    """A diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` whose blocks call ``on_block``.

    Calling it runs the model's own forward (so its arithmetic is diffusers'), with a forward hook on every
    block that hands the block's image tokens to ``on_block`` as a feature map and puts back what it returns.
    Without ``on_block`` no hook is installed at all.
    """

    def __init__(self, transformer):
        self.model = transformer
        single = getattr(transformer, "single_transformer_blocks", None)
        if single is None:
            named = [("joint", block) for block in transformer.transformer_blocks]
        else:
            named = [("double", block) for block in transformer.transformer_blocks]
            named += [("single", block) for block in single]
        self.blocks = tuple(TransformerBlock(i, kind, module) for i, (kind, module) in enumerate(named, start=1))
        self.flux = single is not None

    def window(self, depth: float) -> tuple[int, ...]:
        """The first ``depth`` (a fraction in [0, 1]) of the blocks, rounded up: the blend points of a window."""
        if not 0.0 <= depth <= 1.0:
            raise PFBDiffError.about("blend_depth", f"must be a fraction of the blocks in [0, 1], got {depth}, e.g. 0.5")
        return tuple(block.index for block in self.blocks[: math.ceil(depth * len(self.blocks))])

    def token_grid(self, hidden_states: torch.Tensor, img_ids: torch.Tensor | None = None) -> tuple[int, int]:
        """(rows, columns) of the image tokens: from the latent's size and SD3's patch, or Flux's image ids
        (one ``(0, row, column)`` per packed token)."""
        if self.flux:
            if img_ids is None:
                raise PFBDiffError("a Flux transformer needs img_ids to place its tokens on a grid")
            ids = img_ids[-1] if img_ids.ndim == 3 else img_ids
            return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        patch = self.model.config.patch_size
        return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch

    def __call__(self, *, on_block: BlockCallback | None = None, **forward_kwargs) -> torch.Tensor:
        """The model's output (``sample``) for ``forward_kwargs`` (the model's own arguments), ``on_block(L, h)``
        seeing and replacing each block's image tokens."""
        with self._hooks(on_block, self.token_grid(forward_kwargs["hidden_states"], forward_kwargs.get("img_ids"))):
            return self.model(**forward_kwargs, return_dict=False)[0]

    @contextlib.contextmanager
    def _hooks(self, on_block: BlockCallback | None, grid: tuple[int, int]):
        handles = []
        if on_block is not None:
            for block in self.blocks:
                handles.append(block.module.register_forward_hook(_image_token_hook(block.index, on_block, grid)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def token_mask(mask, grid: tuple[int, int]) -> torch.Tensor:
    """The edit mask (an :class:`~pfbdiff.engine.edit_mask.EditMask`) laid out like packed image tokens,
    B × tokens × 1 in row-major order: Flux's latent layout, for its latent blending."""
    return mask.at(grid).flatten(2).transpose(1, 2)


def _image_token_hook(index: int, on_block: BlockCallback, grid: tuple[int, int]):
    """A forward hook for a block returning ``(text tokens, image tokens)``: ``on_block`` sees the image tokens
    as a B × C × rows × columns map; the block's output is left as it is when ``on_block`` returns it unchanged."""

    def hook(module, inputs, output):
        text, image = output
        batch, tokens, channels = image.shape
        as_map = image.transpose(1, 2).reshape(batch, channels, *grid)
        replaced = on_block(index, as_map)
        if replaced is as_map:
            return None
        return text, replaced.reshape(batch, channels, tokens).transpose(1, 2)

    return hook
