"""The PFB-Diff sampling loop (docs/method.md §1), step by step as in the paper's algorithm.

For n = K−1 down to 0 (t = τ[n]):

1. source features F_src(n): recorded during inversion (or, on request, by re-running the source branch);
2. target branch: the unconditional and conditional predictions in one batched U-Net call; while
   t > t_combine, both blend F_src into the chosen blocks and apply the attention mask;
3. classifier-free guidance;
4. the DDIM update from τ[n] to τ[n−1];
5. while n / N > s, latent blending outside the mask with a source reference latent (by default the inverted
   source latent Z[n−1]); once the layout is settled, outside the mask's latent core where it has one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from pfbdiff.engine.attention import AttentionMasking
from pfbdiff.engine.backbones.unet import FeatureUNet
from pfbdiff.engine.blending import FeatureBlender, blend_latents, inverted_reference, latent_blend_is_open
from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.inversion import FeatureRecorder
from pfbdiff.engine.sampling import DDIMGrid, classifier_free_guidance, ddim_step


@dataclass
class BlendPlan:
    """The resolved mechanism settings of one edit (block numbers, gates, quirks)."""

    blend_points: frozenset[int] = frozenset()
    source_of: dict[int, int] = field(default_factory=dict)  # blend point → source block (reference quirk 1)
    blend_skips: bool = False
    t_combine: int = 0
    latent_blend: float = 0.5  # s
    layout_until: int = 0  # t at or below which the layout is settled: the latent blend keeps to the mask's latent core
    reference_latent_index: bool = False

    @property
    def source_blocks(self) -> frozenset[int]:
        return frozenset(self.source_of.get(p, p) for p in self.blend_points)


@dataclass
class Prompts:
    """The text conditioning of the branches, one row per edited image."""

    source: Conditioning | None
    target: Conditioning
    unconditional: Conditioning | None  # None when guidance is off (scale ≤ 1)


def cached_source_features(features: list[dict[int, torch.Tensor]], repeats: int) -> Callable:
    """F_src(n) from the inversion's recording, repeated for several edits per image."""

    def at_step(n: int, t: int) -> dict[int, torch.Tensor]:
        return {k: v.repeat_interleave(repeats, dim=0) for k, v in features[n].items()}

    return at_step


def recomputed_source_features(unet: FeatureUNet, latents, source_embeddings, blocks) -> Callable:
    """F_src(n) by running the source branch U-Net(Z[n], τ[n], c_src) again (the reference's compute path)."""

    def at_step(n: int, t: int) -> dict[int, torch.Tensor]:
        recorder = FeatureRecorder(blocks)
        unet(latents[n], t, source_embeddings, on_block=recorder)
        return recorder.features

    return at_step


def source_features_of(unet: FeatureUNet, inversion, needed: frozenset[int], cache: bool, repeats: int) -> Callable:
    """F_src(n) of the ``needed`` blocks for ``repeats`` edits of each inverted image: from the inversion's
    recording when ``cache`` and it holds them all, else by re-running the source branch each step."""
    if cache and needed <= inversion.recorded_blocks:
        return cached_source_features(inversion.features, repeats)
    if cache and needed:
        warnings.warn(
            f"blocks {sorted(needed - inversion.recorded_blocks)} were not recorded during inversion; "
            "re-running the source branch each step (pass record_blocks to invert() to avoid this)"
        )
    recompute = recomputed_source_features(unet, inversion.latents, inversion.source_embeddings, needed)
    return lambda n, t: {k: v.repeat_interleave(repeats, 0) for k, v in recompute(n, t).items()}


def guided_prediction(unet, x, t, prompts: Prompts, hook, guidance_scale, *, batch_cfg=True, blend_skips=False, masking=None):
    """The target branch: classifier-free-guided U-Net output, unconditional and conditional rows batched
    (or, as in the reference code, one pass after the other)."""

    def run(sample, context, unconditional_rows):
        if masking is not None:
            masking.unconditional_rows = unconditional_rows
        return unet(sample, t, context, on_block=hook, blend_skips=blend_skips)

    if prompts.unconditional is None:
        return run(x, prompts.target, 0)
    if batch_cfg:
        uncond, cond = run(torch.cat([x, x]), Conditioning.cat([prompts.unconditional, prompts.target]), x.shape[0]).chunk(2)
    else:
        uncond = run(x, prompts.unconditional, x.shape[0])
        cond = run(x, prompts.target, 0)
    return classifier_free_guidance(uncond, cond, guidance_scale)


@torch.no_grad()
def pfb_sampling_loop(
    unet: FeatureUNet,
    x: torch.Tensor,
    source_latents: list[torch.Tensor],
    source_features: Callable[[int, int], dict[int, torch.Tensor]],
    grid: DDIMGrid,
    mask: EditMask,
    prompts: Prompts,
    plan: BlendPlan,
    guidance_scale: float,
    masking: AttentionMasking | None = None,
    batch_cfg: bool = True,
    on_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
    latent_reference: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the K = len(source_latents) − 1 edit steps from ``x`` and return the final latent.

    ``latent_reference(n)`` is what the latent blend of step n keeps outside the mask (default: the inverted
    source latents, see :func:`~pfbdiff.engine.blending.inverted_reference`).
    """
    num_steps = len(source_latents) - 1
    reference = latent_reference or inverted_reference(source_latents, plan.reference_latent_index)
    for n in reversed(range(num_steps)):
        t = grid.timesteps[n]
        blending = t > plan.t_combine
        hook = None
        if masking is not None:
            masking.active = False  # the source branch is never masked
        if blending and plan.blend_points:
            hook = FeatureBlender(source_features(n, t), mask, plan.blend_points, plan.source_of)
        if masking is not None:
            masking.active, masking.timestep = blending, t
        out = guided_prediction(unet, x, t, prompts, hook, guidance_scale, batch_cfg=batch_cfg, blend_skips=plan.blend_skips,
                                masking=masking)
        x = ddim_step(out, x, grid.alpha(t), grid.alpha_prev(n), grid.prediction_type)
        if latent_blend_is_open(n, grid.num_steps, plan.latent_blend):
            x = blend_latents(x, reference(n), mask.latent_blended(settled=t <= plan.layout_until))
        if on_step is not None:
            x = on_step(n, t, x)
    if masking is not None:
        masking.active = False
    return x


@torch.no_grad()
def plain_sampling_loop(unet: FeatureUNet, x, grid: DDIMGrid, prompts: Prompts, guidance_scale, num_steps=None, batch_cfg=True):
    """Plain DDIM text-to-image sampling with the same grid: the reference the edit is compared against."""
    for n in reversed(range(num_steps or grid.num_steps)):
        t = grid.timesteps[n]
        out = guided_prediction(unet, x, t, prompts, None, guidance_scale, batch_cfg=batch_cfg)
        x = ddim_step(out, x, grid.alpha(t), grid.alpha_prev(n), grid.prediction_type)
    return x
