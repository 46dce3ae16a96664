"""The PFB-Diff sampling loop on a rectified flow (docs/method.md §16): the paper's algorithm (§1) with the DDIM
update replaced by a step of the flow ODE, for transformers walked by
:class:`~pfbdiff.engine.backbones.transformer.FeatureTransformer`.

The source latents Z[0..N] come from integrating the flow from the photo (σ = 0) to noise (σ = 1,
:func:`~pfbdiff.engine.flow.integrate`). For n = N−1 down to 0, from σ[n+1] to σ[n]:

1. source features F_src(n+1): the source branch's image tokens at (Z[n+1], σ[n+1]): recorded by an Euler
   inversion where they fit in memory, else computed in the same batch as the target (the source rows ride in
   front of the target's, and :class:`SourceRowsBlender` blends the target rows with them block by block; a
   transformer's tokens at every block would take tens of GB to cache at 1024², docs/method.md §14);
2. the target velocity, with F_src blended into the blend window's blocks while σ > ``sigma_combine``;
3. an Euler step to σ[n];
4. while n / N > s, latent blending outside the mask with Z[n].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pfbdiff.engine.attention import AttentionMasking
from pfbdiff.engine.blending import FeatureBlender, blend, latent_blend_is_open
from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.inversion import FeatureRecorder

#: ``velocity(x, sigma, on_block)``: the model's velocity at (x, σ), its blocks' image tokens seen by ``on_block``.
Velocity = Callable[[torch.Tensor, float, Callable | None], torch.Tensor]


class SourceRowsBlender:
    """The ``on_block`` hook of a call whose first ``rows`` rows are the source branch: at each blend point the
    other rows (the target's, with their guidance copies) are blended with the source rows' own tokens of that
    very block, which are left as they are."""

    def __init__(self, rows: int, mask: EditMask, points):
        self.rows = rows
        self.mask = mask
        self.points = frozenset(points)

    def __call__(self, index: int, h: torch.Tensor) -> torch.Tensor:
        if index not in self.points:
            return h
        source = h[: self.rows]
        blended = FeatureBlender({index: source}, self.mask, self.points)(index, h[self.rows:])
        return torch.cat([source, blended])


def recomputed_flow_features(source_velocity: Velocity, source_latents, sigmas, blocks) -> Callable:
    """F_src at step n: the chosen blocks' image tokens of the source branch at (Z[n], σ[n])."""

    def at(n: int) -> dict[int, torch.Tensor]:
        recorder = FeatureRecorder(blocks)
        source_velocity(source_latents[n], sigmas[n], recorder)
        return recorder.features

    return at


def flow_source_features(recorded: list[dict], window, repeats: int, recompute: Callable | None = None) -> Callable:
    """F_src(n) of the blend ``window``: from the inversion's ``recorded`` tokens (one dict per step, repeated for
    ``repeats`` edits of each image) where they are; elsewhere from ``recompute(n)``, or ``None``, which makes the
    loop run the source rows in the target's own call."""

    def at(n: int):
        if n < len(recorded):
            return {b: recorded[n][b].repeat_interleave(repeats, 0) for b in window}
        return None if recompute is None else recompute(n)

    return at


def guided_flow_velocity(velocity_of, target: Conditioning, unconditional: Conditioning | None,
                         guidance_scale: float, masking: AttentionMasking, *, batch_cfg: bool = True,
                         source: Conditioning | None = None, timestep_of: Callable | None = None):
    """The target branch, ``velocity(x, σ, on_block, source_latent=None)``: word-masked, classifier-free guided
    (``unconditional`` rows, SD3) or with the scale as the model's guidance input (Flux, no ``unconditional``).
    ``velocity_of(conditioning, guidance)`` is the model's velocity for those rows (one guidance per row). With a
    ``source_latent`` the source branch's rows (``source``'s conditioning, guidance 1 as in the inversion) run in
    front of the target's in the same call, unmasked, and only the target's velocity is returned.
    ``timestep_of(σ)`` tells the masking controller the step's timestep (its word-boost gate). Where ``target``
    carries regional prompts' tokens after its own, the other rows get zero tokens to match, which the masking
    keeps unread."""

    def run(rows: list[tuple[torch.Tensor, Conditioning, float]], sigma, on_block, unmasked: int):
        latents, conditions, scales = zip(*rows)
        conditions = [condition.padded_to(target.tokens.shape[1]) for condition in conditions]
        guidance = torch.cat([torch.full((len(z),), float(g)) for z, g in zip(latents, scales)])
        masking.active, masking.unconditional_rows = True, unmasked
        if timestep_of is not None:
            masking.timestep = timestep_of(sigma)
        try:
            return velocity_of(Conditioning.cat(list(conditions)), guidance)(torch.cat(latents), sigma, on_block)
        finally:
            masking.active = False

    def guided(x, sigma, on_block=None, source_latent=None):
        lead = [] if source_latent is None else [(source_latent, source, 1.0)]
        skip = len(x) if lead else 0  # the source rows come first and are not the target's
        if unconditional is None:
            return run([*lead, (x, target, guidance_scale)], sigma, on_block, skip)[skip:]
        if batch_cfg or lead:
            rows = [*lead, (x, unconditional, guidance_scale), (x, target, guidance_scale)]
            uncond, cond = run(rows, sigma, on_block, skip + len(x))[skip:].chunk(2)
        else:
            uncond = run([(x, unconditional, guidance_scale)], sigma, on_block, len(x))
            cond = run([(x, target, guidance_scale)], sigma, on_block, 0)
        return uncond + guidance_scale * (cond - uncond)

    return guided


@torch.no_grad()
def flow_pfb_loop(target_velocity: Velocity, x: torch.Tensor, source_latents: list[torch.Tensor], sigmas,
                  source_features: Callable[[int], dict], mask: EditMask, latent_mask: torch.Tensor, *,
                  blend_points=(), sigma_combine: float = 0.0, latent_blend: float = 0.5,
                  settled_mask: torch.Tensor | None = None, sigma_settled: float = 0.0,
                  on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                  inverted_latents: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Run the N = len(sigmas) − 1 edit steps from ``x`` (at σ = ``sigmas[-1]``) and return the latent at σ = 0.

    ``sigmas`` ascend from 0 to 1, and ``source_latents[k]`` (the latent-blend references) lie at ``sigmas[k]``.
    ``source_features(n)`` gives F_src at Z[n], or ``None`` where it is not at hand: then the source branch runs in
    the target's call, ``target_velocity(x, σ, hook, source_latent)`` with ``inverted_latents[n]`` as the source
    rows. ``latent_mask`` is the edit mask laid out like ``x`` (1 = edit), what the latent blend regenerates, and
    ``settled_mask`` its latent core laid out alike, which takes its place once the layout is settled (a step that
    starts at σ ≤ ``sigma_settled``, ``EditMask.latent_blended``). ``on_step(n, velocity, x)`` sees each
    step's target velocity and result.
    """
    num_steps = len(sigmas) - 1
    for n in reversed(range(num_steps)):
        sigma_from, sigma_to = sigmas[n + 1], sigmas[n]
        if blend_points and sigma_from > sigma_combine:
            features = source_features(n + 1)
            if features is None:  # the source rows ride in front of the target's
                velocity = target_velocity(x, sigma_from, SourceRowsBlender(len(x), mask, blend_points),
                                           inverted_latents[n + 1])
            else:
                velocity = target_velocity(x, sigma_from, FeatureBlender(features, mask, blend_points))
        else:
            velocity = target_velocity(x, sigma_from, None)
        x = x + (sigma_to - sigma_from) * velocity
        if latent_blend_is_open(n, num_steps, latent_blend):
            settled = settled_mask is not None and sigma_from <= sigma_settled
            x = blend(x, source_latents[n], (settled_mask if settled else latent_mask).to(x.dtype))
        if on_step is not None:
            on_step(n, velocity, x)
    return x
