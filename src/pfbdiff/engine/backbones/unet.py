"""Where PFB-Diff's features live: a U-Net forward pass that exposes every block output.

The paper blends the U-Net's intermediate feature maps. To name them, this project numbers the blocks of a
Stable-Diffusion U-Net with a global, 1-based index L (docs/method.md §3): L1 = ``conv_in``; then each
(ResNet [+ cross-attention transformer]) unit and each downsampler of the encoder; the middle block; then each
unit of the decoder, where a decoder level's upsampler belongs to its last unit. SD 1.x has 25 such blocks.

:class:`FeatureUNet` walks a diffusers ``UNet2DConditionModel`` block by block in that order (the same
operations as diffusers' own forward) and calls ``on_block(L, h)`` after each block. Whatever the callback
returns flows on along the main path; the copy pushed on the skip stack is the block's own output (the
reference behaviour, docs/method.md §4) unless ``blend_skips`` is set. Nothing here hard-codes SD 1.x shapes: blocks
are described by their resolution *level* (0 = latent resolution, 1 = half of it, ...), so a blending config
written in levels carries over to other U-Nets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.errors import PFBDiffError

#: Blocks of the SD 1.x (and 2.x) U-Net, whose numbers the paper-* presets use (docs/method.md §3).
SD1_BLOCK_COUNT = 25

BlockCallback = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UNetBlock:
    """One numbered block of the U-Net (docs/method.md §3)."""

    index: int  # L, 1-based
    part: str  # "encoder", "middle" or "decoder"
    level: int  # resolution level of the block's output: 0 = latent size, 1 = half, ...
    name: str  # diffusers module path, e.g. "down_blocks.1.attentions.0"
    attention_level: int | None = None  # level at which its cross-attention runs, None if it has none
    cross_attentions: tuple = field(default=(), repr=False, compare=False)  # the attn2 modules inside it
    self_attentions: tuple = field(default=(), repr=False, compare=False)  # the attn1 modules beside them


def _attention_modules(transformer, which: str) -> tuple:
    """The ``which`` ("attn1": self-, "attn2": cross-attention) modules of a transformer's blocks that have both."""
    if transformer is None:
        return ()
    return tuple(getattr(block, which) for block in transformer.transformer_blocks
                 if getattr(block, "attn2", None) is not None)


class FeatureUNet:
    """A diffusers U-Net run block by block, with a hook after every block and a call counter."""

    def __init__(self, unet):
        self.unet = unet
        self.calls = 0  # forward passes
        self.evaluations = 0  # rows evaluated (a batched CFG pass of one image counts 2)
        self.blocks = self._describe()
        self.middle_index = next(b.index for b in self.blocks if b.part == "middle")
        self.num_levels = max(b.level for b in self.blocks) + 1

    # -- the numbering -------------------------------------------------------------------------------------
    def _describe(self) -> tuple[UNetBlock, ...]:
        unet = self.unet
        blocks = [UNetBlock(1, "encoder", 0, "conv_in")]
        level = 0
        for i, down in enumerate(unet.down_blocks):
            attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
            for k, attn in enumerate(attentions):
                name = f"down_blocks.{i}.attentions.{k}" if attn is not None else f"down_blocks.{i}.resnets.{k}"
                blocks.append(self._block(len(blocks) + 1, "encoder", level, name, attn, level))
            if down.downsamplers is not None:
                level += 1
                blocks.append(UNetBlock(len(blocks) + 1, "encoder", level, f"down_blocks.{i}.downsamplers.0"))
        mid_attn = getattr(unet.mid_block, "attentions", None)
        blocks.append(
            UNetBlock(
                len(blocks) + 1,
                "middle",
                level,
                "mid_block",
                level if mid_attn else None,
                tuple(m for t in (mid_attn or []) for m in _attention_modules(t, "attn2")),
                tuple(m for t in (mid_attn or []) for m in _attention_modules(t, "attn1")),
            )
        )
        for i, up in enumerate(unet.up_blocks):
            attentions = getattr(up, "attentions", None) or [None] * len(up.resnets)
            for k, attn in enumerate(attentions):
                last = k == len(up.resnets) - 1
                out_level = level - 1 if last and up.upsamplers is not None else level
                name = f"up_blocks.{i}.attentions.{k}" if attn is not None else f"up_blocks.{i}.resnets.{k}"
                blocks.append(self._block(len(blocks) + 1, "decoder", out_level, name, attn, level))
            if up.upsamplers is not None:
                level -= 1
        return tuple(blocks)

    @staticmethod
    def _block(index, part, level, name, attn, attention_level) -> UNetBlock:
        modules = _attention_modules(attn, "attn2")
        return UNetBlock(index, part, level, name, attention_level if modules else None, modules,
                         _attention_modules(attn, "attn1"))

    def _levels(self, levels, setting: str) -> set[int]:
        """Levels as absolute numbers: 0, 1, ... from the top, −1 the deepest. Levels this U-Net lacks are skipped
        (the presets name four, for U-Nets of three levels too), but a list that selects none is a mistake."""
        found = {lv if lv >= 0 else self.num_levels + lv for lv in levels if -self.num_levels <= lv < self.num_levels}
        if levels and not found:
            raise PFBDiffError.about(setting, f"selects no level of this U-Net, which has levels 0..{self.num_levels - 1}"
                                              f" (or -1..-{self.num_levels} from the deepest), got {tuple(levels)}")
        return found

    @property
    def sd1_layout(self) -> bool:
        """Whether the U-Net has SD 1.x's 25 blocks, the ones block numbers L (and the paper-* presets) count."""
        return len(self.blocks) == SD1_BLOCK_COUNT

    def blocks_at_levels(self, levels, parts=("encoder", "middle", "decoder")) -> tuple[int, ...]:
        """L numbers of the blocks whose *output* is at one of ``levels``."""
        wanted = self._levels(levels, "blend_levels")
        return tuple(b.index for b in self.blocks if b.level in wanted and b.part in parts and b.index > 1)

    def attention_blocks_at_levels(self, levels) -> tuple[int, ...]:
        """L numbers of the blocks whose cross-attention runs at one of ``levels``."""
        wanted = self._levels(levels, "attention_levels")
        return tuple(b.index for b in self.blocks if b.attention_level is not None and b.attention_level in wanted)

    def numbered_blocks(self, numbers, setting: str, *, attention: bool = False) -> tuple[int, ...]:
        """Explicit block numbers L, each of which this U-Net must have (with cross-attention, for ``attention``)."""
        known = {b.index for b in self.blocks if not attention or b.attention_level is not None}
        unknown = sorted(set(numbers) - known)
        if unknown:
            kind = "blocks with cross-attention" if attention else "blocks"
            raise PFBDiffError.about(setting, f"names {unknown}, which are not {kind} of this U-Net ({sorted(known)}); "
                                              "block numbers count an SD 1.x U-Net's blocks (docs/method.md §3), so "
                                              "the paper-* presets run on SD 1.x models only")
        if numbers and not self.sd1_layout:
            warnings.warn(f"{setting} numbers an SD 1.x U-Net's blocks (docs/method.md §3), but this U-Net is laid out "
                          "differently, so they name other blocks here: the paper-* presets reproduce the official "
                          "SD 1.x code only", stacklevel=3)
        return tuple(numbers)

    # -- the forward pass ----------------------------------------------------------------------------------
    def __call__(
        self,
        sample: torch.Tensor,
        timestep,
        conditioning: Conditioning | torch.Tensor,
        on_block: BlockCallback | None = None,
        *,
        blend_skips: bool = False,
    ) -> torch.Tensor:
        """The U-Net's prediction for ``sample`` under ``conditioning`` (a :class:`Conditioning`, or token embeddings
        alone); ``on_block(L, h)`` may replace each block's main-path output."""
        if not isinstance(conditioning, Conditioning):
            conditioning = Conditioning(conditioning)
        encoder_hidden_states, added_cond_kwargs = conditioning.tokens, conditioning.added_cond_kwargs()
        self.calls += 1
        self.evaluations += sample.shape[0]
        unet = self.unet
        hook = on_block or (lambda index, h: h)
        factor = 2**unet.num_upsamplers
        forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])

        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        context = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)
        attn_kwargs = dict(encoder_hidden_states=context, return_dict=False)

        index = 1
        out = unet.conv_in(sample)
        h = hook(index, out)
        skips = [h if blend_skips else out]
        for down in unet.down_blocks:
            attentions = getattr(down, "attentions", None) or [None] * len(down.resnets)
            for resnet, attn in zip(down.resnets, attentions):
                out = resnet(h, emb)
                if attn is not None:
                    out = attn(out, **attn_kwargs)[0]
                index += 1
                h = hook(index, out)
                skips.append(h if blend_skips else out)
            if down.downsamplers is not None:
                out = h
                for downsampler in down.downsamplers:
                    out = downsampler(out)
                index += 1
                h = hook(index, out)
                skips.append(h if blend_skips else out)

        if getattr(unet.mid_block, "has_cross_attention", False):
            out = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            out = unet.mid_block(h, emb)
        index += 1
        h = hook(index, out)

        for i, up in enumerate(unet.up_blocks):
            n = len(up.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
            attentions = getattr(up, "attentions", None) or [None] * n
            for k, (resnet, attn) in enumerate(zip(up.resnets, attentions)):
                out = resnet(torch.cat([h, level_skips.pop()], dim=1), emb)
                if attn is not None:
                    out = attn(out, **attn_kwargs)[0]
                if k == n - 1 and up.upsamplers is not None:
                    for upsampler in up.upsamplers:
                        out = upsampler(out, upsample_size)
                index += 1
                h = hook(index, out)

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    def _time_embedding(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
        )
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb
