"""Baseline editors for ShapesBench, written as short functions over a :class:`~pfbdiff.PFBDiffPipeline`.

They reuse the engine's pieces (the pipeline's encoders, ``sampling.ddim_move`` / ``ddim_step`` /
``split_prediction``, ``loop.guided_prediction`` / ``plain_sampling_loop``, ``blending.blend_latents``,
``masks.EditMask``) so every method shares one definition of a DDIM step, of guidance and of the latent mask.

* :data:`LATENT_BLENDING` — the official code's latent-blending baseline ("our_baseline", docs/method.md §11): PFB-Diff
  with no feature blending, no attention masking and the latent blend open at every step, i.e. Blended Latent
  Diffusion on the DDIM-inverted source trajectory. Run it with ``pipe.edit(..., **LATENT_BLENDING)``.
* :func:`blended_latent_diffusion` — Blended Latent Diffusion as published (Avrahami et al. 2023): start from
  the source latent forward-noised to the first timestep (pure noise under a zero-terminal-SNR schedule),
  and after every step replace the latent outside the mask by the source latent forward-noised with *fresh*
  noise to the new level, ``√ᾱ z0 + √(1−ᾱ) ε``. (The paper's optional background-reconstruction fine-tuning
  of the decoder is not done.)
* :func:`masked_sdedit` — SDEdit (img2img): noise the source latent to a fraction ``strength`` of the
  schedule, denoise with the target prompt, decode, and paste the source pixels back outside the mask. Both
  the raw decode and the pasted image are returned.
* :func:`diffedit_mask` / :func:`diffedit` — DiffEdit (Couairon et al. 2023) as in the official repository's
  re-implementation (docs/method.md §11): a mask from |ε(x_t, c_src) − ε(x_t, c_tgt)| averaged over a few forward-noised
  copies at 50 % noise and over channels, clipped at 3.5× its mean, scaled to [0, 1] and thresholded at 0.5;
  then a DDIM inversion with the empty prompt and target sampling with latent blending at every step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pfbdiff.engine.blending import blend_latents
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.loop import Prompts, guided_prediction, plain_sampling_loop
from pfbdiff.engine.presets import EditConfig
from pfbdiff.engine.sampling import ddim_move, ddim_step, edit_steps, split_prediction
from pfbdiff.io import tensors

#: ``pipe.edit`` overrides of the latent-blending baseline (no feature blending, no masking, blend every step over the
#: whole mask, no latent core, the inverted start; on a flow transformer an empty blend window).
LATENT_BLENDING = dict(blend_blocks=(), blend_depth=0.0, attention_masking=False, text_queries=False, kept_apart=False,
                       latent_blend=-1.0, latent_inset=0.0, start="inverted")
#: The same as Blended Latent Diffusion runs it on a flow: from noise, the source carried to each σ with fresh
#: noise, ``(1 − σ) z₀ + σ ε``, as the latent-blend reference.
FLOW_BLENDED_LATENTS = dict(LATENT_BLENDING, start="noise", latent_reference="noised")
#: A KV-Edit-like setting on a flow: every block's image tokens blended outside the mask, the source's pooled
#: vector, the latent blend at every step (what KV-Edit keeps by reusing the source's keys and values), with the
#: preset's word masking in one direction, nothing kept apart, no latent core and the inverted start, whatever the
#: preset adds.
KV_EDIT_LIKE = dict(blend_depth=1.0, pooled_from="source", latent_blend=-1.0, text_queries=False, kept_apart=False,
                    latent_inset=0.0, start="inverted")


@dataclass
class BaselineResult:
    """``image``: the method's result (H×W×3 uint8); ``raw``: before paste-back (same as image if none);
    ``mask``: the mask the method computed itself (DiffEdit), H×W bool, else None."""

    image: np.ndarray
    raw: np.ndarray
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------------------------- helpers


def _noise(shape, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def encode_source(pipe, image: np.ndarray) -> torch.Tensor:
    """VAE latent (posterior mean, scaled) of an H×W×3 uint8 image whose sides suit the VAE."""
    pixels = tensors.image_to_tensor(Image.fromarray(np.asarray(image, np.uint8)))
    return pipe.encode_images(pixels).to(pipe.denoiser.dtype)


def latent_mask(pipe, mask: np.ndarray, latent: torch.Tensor) -> EditMask:
    """The H×W pixel mask at latent resolution (area-averaged, as the pipeline's default ``soft`` mask)."""
    pixels = torch.from_numpy(np.asarray(mask, np.float32))[None, None].to(latent.device, latent.dtype)
    return EditMask.from_pixels(pixels, tuple(latent.shape[-2:]))


def target_prompts(pipe, prompt: str, guidance_scale: float) -> Prompts:
    unconditional = pipe.encode_prompt([""]) if guidance_scale > 1.0 else None
    return Prompts(source=None, target=pipe.encode_prompt([prompt]), unconditional=unconditional)


def decode_uint8(pipe, latents: torch.Tensor) -> np.ndarray:
    return np.asarray(tensors.tensor_to_pil(pipe.decode_latents(latents))[0])


def pipeline_edit(pipe, inversion, **edit_kwargs) -> BaselineResult:
    """``pipe.edit`` of one image: its result (with the pipeline's own paste-back unless ``paste_back=False``)
    and the plain decode of the final latent (before any paste-back)."""
    if "paste_back" in edit_kwargs and "paste_back" not in inspect.signature(pipe.edit).parameters:
        edit_kwargs.pop("paste_back")  # a pipeline without compositing returns the decode as it is
    edited = pipe.edit(inversion, **edit_kwargs)
    return BaselineResult(np.asarray(edited.images[0]), decode_uint8(pipe, edited.latents))


def paste_back(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Source pixels outside the (binary) mask, ``result`` inside."""
    return np.where(np.asarray(mask, bool)[..., None], result, source).astype(np.uint8)


# --------------------------------------------------------------------------------------------- baselines


@torch.no_grad()
def blended_latent_diffusion(pipe, image, mask, prompt, *, steps: int, guidance_scale: float, generator) -> BaselineResult:
    """Blended Latent Diffusion (forward-noised source blended after every step; module docstring)."""
    grid = pipe.ddim_grid(steps)
    z0 = encode_source(pipe, image)
    region = latent_mask(pipe, mask, z0)
    prompts = target_prompts(pipe, prompt, guidance_scale)
    x = ddim_move(z0, _noise(z0.shape, generator, z0), grid.alpha(grid.timesteps[-1]))
    for n in reversed(range(grid.num_steps)):
        t = grid.timesteps[n]
        out = guided_prediction(pipe.feature_unet, x, t, prompts, None, guidance_scale)
        x = ddim_step(out, x, grid.alpha(t), grid.alpha_prev(n), grid.prediction_type)
        background = ddim_move(z0, _noise(z0.shape, generator, z0), grid.alpha_prev(n))
        x = blend_latents(x, background, region)
    result = decode_uint8(pipe, x)
    return BaselineResult(result, result)


@torch.no_grad()
def masked_sdedit(pipe, image, mask, prompt, *, steps: int, strength: float, guidance_scale: float, generator) -> BaselineResult:
    """SDEdit from ``strength`` of the schedule with the target prompt, then paste-back outside the mask."""
    grid = pipe.ddim_grid(steps)
    k = edit_steps(grid.num_steps, strength)
    z0 = encode_source(pipe, image)
    x = ddim_move(z0, _noise(z0.shape, generator, z0), grid.alpha(grid.timesteps[k - 1]))
    x = plain_sampling_loop(pipe.feature_unet, x, grid, target_prompts(pipe, prompt, guidance_scale), guidance_scale, num_steps=k)
    raw = decode_uint8(pipe, x)
    return BaselineResult(paste_back(raw, np.asarray(image), mask), raw)


@torch.no_grad()
def masked_flow_sdedit(pipe, image, mask, prompt, *, steps: int, strength: float, guidance_scale: float,
                       generator) -> BaselineResult:
    """SDEdit on a flow: the source latent carried to σ_K = ``strength`` of the grid with fresh noise,
    ``(1 − σ) z₀ + σ ε``, Euler steps down with the target prompt (classifier-free guided), paste-back."""
    from pfbdiff.engine.flow import along_path, integrate

    z0 = encode_source(pipe, image)
    grid = pipe.flow_grid(steps, tuple(z0.shape[-2:]))
    sigmas = grid.sigmas[: edit_steps(grid.num_steps, strength) + 1]
    x = along_path(z0, _noise(z0.shape, generator, z0), sigmas[-1])
    velocity = pipe.target_velocity([prompt], guidance_scale)
    x = integrate(lambda z, sigma: velocity(z, sigma), x, tuple(reversed(sigmas)), "euler")[-1]
    raw = decode_uint8(pipe, x)
    return BaselineResult(paste_back(raw, np.asarray(image), mask), raw)


@torch.no_grad()
def diffedit_mask(pipe, z0, source_prompt, prompt, *, generator, copies: int = 3, noise_level: float = 0.5,
                  clip: float = 3.5, threshold: float = 0.5) -> torch.Tensor:
    """DiffEdit's automatic mask at latent resolution (1×1×h×w, 0/1 float); one batched U-Net call per copy."""
    grid = pipe.ddim_grid(1)  # only for the schedule and the prediction type
    t = int(round(noise_level * (grid.num_train_timesteps - 1)))
    alpha = grid.alpha(t)
    context = pipe.encode_prompt([source_prompt, prompt])
    differences = []
    for _ in range(copies):
        xt = ddim_move(z0, _noise(z0.shape, generator, z0), alpha)
        both = torch.cat([xt, xt])
        _, eps = split_prediction(pipe.feature_unet(both, t, context), both, alpha, grid.prediction_type)
        differences.append((eps[0] - eps[1]).abs().mean(dim=0))
    d = torch.stack(differences).mean(dim=0).float()
    d = d.clamp(max=clip * float(d.mean()))
    if float(d.max()) <= 0.0:  # identical predictions: nothing singles out a region, so edit everything
        return torch.ones(1, 1, *d.shape, device=z0.device)
    return (d / d.max() > threshold).float()[None, None]


@torch.no_grad()
def diffedit(pipe, image, source_prompt, prompt, *, steps: int, guidance_scale: float, generator,
             encode_ratio: float = 1.0, paste_back: bool = True, **mask_options) -> BaselineResult:
    """DiffEdit: automatic mask, empty-prompt DDIM inversion, latent blending at every step (run through
    ``pipe.edit``, so ``paste_back`` chooses the pipeline's composite outside the automatic mask)."""
    z0 = encode_source(pipe, image)
    latent = diffedit_mask(pipe, z0, source_prompt, prompt, generator=generator, **mask_options)
    factor = image.shape[0] // latent.shape[-2]
    pixel_mask = np.kron(latent[0, 0].cpu().numpy(), np.ones((factor, factor), np.float32)) > 0.5
    inversion = pipe.invert(Image.fromarray(np.asarray(image, np.uint8)), "", steps, strength=encode_ratio, record_blocks=())
    config = EditConfig(auto_words=None, strength=encode_ratio, **LATENT_BLENDING)
    result = pipeline_edit(pipe, inversion, mask_image=pixel_mask.astype(np.float32), prompt=prompt, preset=config,
                           guidance_scale=guidance_scale, generator=generator, paste_back=paste_back)
    result.mask = pixel_mask
    return result
