"""``PFBDiffPipeline``: PFB-Diff with the shape of a diffusers pipeline.

    pipe = PFBDiffPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = pipe.invert(image, source_prompt="a cat sitting on a bench")
    dog = pipe.edit(inv, mask_image=mask, prompt="a dog", preset="object").images[0]
    fox = pipe.edit(inv, mask_image=mask, prompt="a fox", preset="object").images[0]   # reuses the inversion
    out = pipe(image=image, mask_image=mask, source_prompt="...", prompt="...", preset="background").images[0]

``invert`` encodes the image, runs the DDIM inversion and records the source features once; ``edit`` runs the
PFB-Diff loop (``loop.py``) from an inversion; ``__call__`` does both.

Real photos: a photo larger than the model's native size is inverted and edited as a crop around the mask
(``regions.py``); the result is scaled back and pasted into the untouched photo with a feathered, colour-matched
alpha (``compositing.py``); ``auto_mask`` estimates the region from the prompts (``automask.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from . import automask, compositing, edit_masks, regions, tensors
from . import images as imgs
from .attention import AttentionMasking, attention_masking_installed, token_regions
from .blending import noised_reference
from .errors import PFBDiffError
from .inversion import Inversion, ddim_invert
from .loop import (
    BlendPlan,
    Prompts,
    cached_source_features,
    pfb_sampling_loop,
    plain_sampling_loop,
    recomputed_source_features,
)
from .masks import EditMask
from .presets import PRESETS, EditConfig, get_preset
from .sampling import DDIMGrid
from .tokens import positions_of
from .unet_features import FeatureUNet


@dataclass
class PFBDiffOutput(BaseOutput):
    """``images``: the edited images (PIL list, numpy array or tensor); ``latents``: the final latents.

    ``masks``: the paste-back alpha of each image (PIL "L", input size; ``None`` with paste-back off);
    ``auto_masks``: the estimated edit masks (``auto_mask=True``); ``crop_box``: the edited box of the input,
    [left, top, right, bottom].
    """

    images: list | np.ndarray | torch.Tensor
    latents: torch.Tensor | None = None
    masks: list | None = None
    auto_masks: list | None = None
    crop_box: list | None = None


class PFBDiffPipeline(DiffusionPipeline):
    """Text-driven local image editing with Progressive Feature Blending (Huang et al., arXiv 2306.16894)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.feature_unet = FeatureUNet(unet)

    @classmethod
    def from_pretrained(cls, model, *, torch_dtype=None, device=None, allow_pickle=False, config=None, **_ignored):
        """Load from a hub id, a local diffusers folder or a single ``.safetensors`` file (see ``loading.py``)."""
        from .loading import load_components

        return cls(**load_components(model, torch_dtype=torch_dtype, device=device, allow_pickle=allow_pickle, config=config))

    # -- components ----------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_calls(self) -> int:
        """U-Net evaluations made by this pipeline so far (inversion, source and target branches)."""
        return self.feature_unet.calls

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latent of images in [-1, 1]; the posterior mean, so inversion is deterministic (spec §11.12)."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()

    def ddim_grid(self, num_inference_steps: int) -> DDIMGrid:
        return DDIMGrid.from_scheduler_config(self.scheduler.config, num_inference_steps)

    # -- inversion -----------------------------------------------------------------------------------------
    def invert(self, image, source_prompt="", num_inference_steps: int = 50, strength: float = 1.0, record_blocks=None,
               callback=None, *, mask_image=None, crop="auto", crop_padding: int | None = None, grow: int = 0,
               feather: int | None = None, feather_placement: str = compositing.DEFAULT_PLACEMENT) -> Inversion:
        """Encode ``image`` (one or a list), DDIM-invert it with ``source_prompt`` and record source features.

        ``record_blocks`` (block numbers L) defaults to every block any preset blends; an edit that needs
        another block re-runs the source branch for it. ``callback(k)`` is called after inversion step k.

        Crop-to-mask (``regions.py``): ``crop="auto"`` inverts only a box around ``mask_image`` (grown by
        ``grow`` px, widened by the ``feather`` band, padded by ``crop_padding`` px of context), scaled to the
        model's native pixel count, when the image has more pixels than that; ``True`` always, ``False`` never.
        Without a mask a large image is scaled down whole. Later edits must keep their mask inside that box.
        """
        if not 0.0 < strength <= 1.0:
            raise PFBDiffError(f"strength must be in (0, 1], got {strength}; e.g. --strength 0.8")
        pil_images = [imgs.load_image(i) for i in _as_list(image)]
        grid = self.ddim_grid(num_inference_steps)
        num_steps = max(1, int(grid.num_steps * strength))
        sizes = [im.size for im in pil_images]
        if len(set(sizes)) > 1:
            raise PFBDiffError(f"images edited together must have one size, got {sorted(set(sizes))}; edit them separately")
        plan = self._plan_region(sizes[0], mask_image, crop, crop_padding, grow, feather, feather_placement)
        model_size = plan.model_size
        pixels = torch.cat([tensors.image_to_tensor(im.crop(tuple(plan.box.as_list())), model_size) for im in pil_images])
        source_prompts = _broadcast(source_prompt, len(pil_images), "source_prompt")
        embeddings = self.encode_prompt(source_prompts)
        blocks = self._default_record_blocks() if record_blocks is None else frozenset(record_blocks)
        with self.progress_bar(total=num_steps) as bar:

            def on_step(k):
                bar.update()
                if callback is not None:
                    callback(k)

            latents, features = ddim_invert(
                self.feature_unet, self.encode_images(pixels).to(self.unet.dtype), embeddings, grid, num_steps, blocks,
                callback=on_step,
            )
        return Inversion(latents, features, blocks, grid, embeddings, source_prompts, pixels, sizes,
                         crop_box=plan.box, source_images=pil_images)

    def _plan_region(self, size, mask_image, crop, crop_padding, grow, feather, placement) -> regions.RegionPlan:
        """The box of the image to invert and its model size (``regions.plan_region``)."""
        support, margin = None, 0
        if mask_image is not None:
            union = None
            for source in _as_list(mask_image):
                with warnings.catch_warnings():  # a resized mask is reported once, by edit()
                    warnings.simplefilter("ignore", UserWarning)
                    loaded = imgs.load_mask(source, size)
                grown = compositing.grow_mask(loaded, grow)
                union = grown if union is None else np.maximum(union, grown)
            support = regions.support_box(union)
            width = compositing.auto_feather(union) if feather is None else int(feather)
            margin = compositing.feather_reach(width, placement)
        native = regions.native_side(self.unet, self.vae_scale_factor)
        min_side = regions.min_model_side(self.feature_unet.num_levels, self.vae_scale_factor)
        return regions.plan_region(size, support, margin=margin, crop=crop, padding=crop_padding, native=native,
                                   multiple=self.vae_scale_factor, min_side=min_side)

    def _default_record_blocks(self) -> frozenset[int]:
        return frozenset(b for cfg in PRESETS.values() for b in self.blend_plan(cfg).source_blocks)

    # -- editing -------------------------------------------------------------------------------------------
    def blend_plan(self, config: EditConfig) -> BlendPlan:
        unet = self.feature_unet
        points = config.blend_blocks if config.blend_blocks is not None else unet.blocks_at_levels(config.blend_levels)
        before_middle = unet.middle_index - 1
        source_of = {before_middle: unet.middle_index} if config.reference_middle and before_middle in points else {}
        return BlendPlan(
            blend_points=frozenset(points),
            source_of=source_of,
            blend_skips=config.blend_skips,
            t_combine=config.t_combine,
            latent_blend=config.latent_blend,
            reference_latent_index=config.reference_latent_index,
        )

    def edit(
        self,
        inversion: Inversion,
        mask_image=None,
        prompt="",
        *,
        preset: str | EditConfig = "object",
        inside=None,
        outside=None,
        word_masks: dict | None = None,
        negative_prompt=None,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        attention_observer=None,
        return_dict: bool = True,
        paste_back: bool = True,
        feather: int | None = None,
        feather_placement: str = compositing.DEFAULT_PLACEMENT,
        colour_match: str = "local",
        auto_mask: bool = False,
        auto_mask_threshold: float = automask.DEFAULT_THRESHOLD,
        auto_mask_draws: int = automask.DEFAULT_DRAWS,
        auto_mask_seed: int = automask.DEFAULT_SEED,
        **overrides,
    ):
        """Edit an inverted image: regenerate the masked region from ``prompt`` with PFB-Diff.

        ``mask_image``: white = regenerate, black = keep (soft values allowed). ``inside`` / ``outside``:
        words of ``prompt`` (or token positions) confined to the mask / to the rest. ``word_masks``: a word →
        mask map for multi-object edits (each word confined to its own mask; the edit mask defaults to
        their union). ``attention_observer(L, probabilities)`` sees every masked cross-attention map.
        ``overrides``: any :class:`EditConfig` field (``grow``: pixels of the input image, + grows, − shrinks).

        Putting the result back (``compositing.py``): with ``paste_back`` (default) every pixel outside the
        feathered mask is the input's own, bit for bit; ``feather`` px (default: from the mask's size, 0 for
        a soft mask, 0 when ``halo`` snapped it to the subject) soften the edge, placed ``"inside"`` (default) /
        ``"center"`` / ``"outside"`` it;
        ``colour_match`` (``"local"``, ``"mean"``, ``"none"``) matches the generation's colours to the input
        around the edge. ``auto_mask`` estimates the region from the prompts (``automask.py``), clipped to
        ``mask_image`` when one is given; it is returned as ``auto_masks``. Latent outputs are unaffected.
        """
        config = preset.replace(**overrides) if isinstance(preset, EditConfig) else get_preset(preset, **overrides)
        if inside is not None:
            config = config.replace(inside=tuple(inside))
        if outside is not None:
            config = config.replace(outside=tuple(outside))
        grid = inversion.grid
        num_steps = max(1, int(grid.num_steps * config.strength))
        if num_steps > inversion.num_steps:
            raise PFBDiffError(
                f"the edit needs {num_steps} inverted steps but the inversion has {inversion.num_steps}; "
                f"invert with strength >= {config.strength} or lower the edit's strength"
            )
        images_in = inversion.batch_size
        prompts_list = _broadcast(prompt, images_in, "prompt")
        target_prompts = [p for p in prompts_list for _ in range(num_images_per_prompt)]

        if feather is None and config.halo:
            feather = 0  # the mask's edge is the subject's outline: a feather would blend the old background back
        finish = compositing.PasteBack(paste_back, feather, feather_placement, colour_match)
        latent_size = tuple(inversion.latents[0].shape[-2:])
        auto = dict(threshold=auto_mask_threshold, draws=auto_mask_draws, seed=auto_mask_seed) if auto_mask else None
        mask_set = self._masks(inversion, mask_image, word_masks, config, latent_size, prompts_list, auto)
        mask, word_regions = mask_set.edit, mask_set.words
        mask = EditMask(mask.latent.repeat_interleave(num_images_per_prompt, 0), mask.resize_mode)
        regions = token_regions(self.tokenizer, config, inversion.source_prompt, prompts_list, mask, word_regions,
                                num_images_per_prompt)

        prompts = Prompts(
            source=inversion.source_embeddings.repeat_interleave(num_images_per_prompt, 0),
            target=self.encode_prompt(target_prompts),
            unconditional=None,
        )
        if guidance_scale > 1.0:
            negatives = _broadcast(negative_prompt or "", images_in, "negative_prompt")
            prompts.unconditional = self.encode_prompt([n for n in negatives for _ in range(num_images_per_prompt)])

        plan = self.blend_plan(config)
        source_latents = [z.repeat_interleave(num_images_per_prompt, 0) for z in inversion.latents[: num_steps + 1]]
        source_features = self._source_features(inversion, plan, config, num_images_per_prompt)
        x = self._start_latent(config, source_latents[-1], generator)
        latent_reference = None
        if config.latent_reference == "noised":
            clean = source_latents[0]

            def fresh_noise():
                return _randn(tuple(clean.shape), generator, clean.device, clean.dtype)

            latent_reference = noised_reference(clean, grid, fresh_noise)

        attention_blocks = config.attention_blocks
        if attention_blocks is None:
            attention_blocks = self.feature_unet.attention_blocks_at_levels(config.attention_levels)
        masking = AttentionMasking(regions, latent_size, attention_blocks, mask_uncond=config.mask_uncond)
        masking.observer = attention_observer

        with self.progress_bar(total=num_steps) as bar, attention_masking_installed(self.feature_unet, masking):

            def on_step(n, t, latents):
                bar.update()
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, num_steps - 1 - n, t, {"latents": latents}) or {}
                    latents = result.get("latents", latents)
                return latents

            x = pfb_sampling_loop(
                self.feature_unet, x, source_latents, source_features, grid, mask, prompts, plan, guidance_scale,
                masking=masking, batch_cfg=config.batch_cfg, on_step=on_step, latent_reference=latent_reference,
            )
        return self._finish(x, inversion, num_images_per_prompt, output_type, return_dict, mask_set, finish)

    def __call__(
        self,
        image,
        mask_image=None,
        prompt="",
        source_prompt="",
        *,
        preset: str | EditConfig = "object",
        num_inference_steps: int = 50,
        strength: float | None = None,
        crop="auto",
        crop_padding: int | None = None,
        **edit_kwargs,
    ):
        """Invert ``image`` and edit it in one call (see :meth:`invert` and :meth:`edit`).

        ``crop`` / ``crop_padding`` choose the part of the image that is inverted and edited (:meth:`invert`);
        everything else is passed on to :meth:`edit`.
        """
        config = preset if isinstance(preset, EditConfig) else get_preset(preset)
        if strength is not None:
            edit_kwargs["strength"] = strength
        edit_kwargs = {k: v for k, v in edit_kwargs.items() if v is not None}
        overrides = {k: v for k, v in edit_kwargs.items() if k in EditConfig.__dataclass_fields__}
        config = config.replace(**{k: tuple(v) if k in ("inside", "outside") else v for k, v in overrides.items()})
        rest = {k: v for k, v in edit_kwargs.items() if k not in overrides}
        for prompt_text in _as_list(prompt):  # name a misspelt word before the costly inversion
            positions_of(self.tokenizer, prompt_text, config.inside + config.outside)
        region = mask_image if mask_image is not None else list((rest.get("word_masks") or {}).values()) or None
        inversion = self.invert(
            image, source_prompt, num_inference_steps, strength=config.strength,
            record_blocks=self.blend_plan(config).source_blocks if config.cache_source else (),
            callback=rest.pop("inversion_callback", None), mask_image=region, crop=crop, crop_padding=crop_padding,
            grow=config.mask_reach, feather=rest.get("feather"), feather_placement=rest.get("feather_placement", compositing.DEFAULT_PLACEMENT),
        )
        return self.edit(inversion, mask_image, prompt, preset=config, **rest)

    @torch.no_grad()
    def text_to_image(self, prompt, *, height: int, width: int, num_inference_steps=50, guidance_scale=7.5,
                      negative_prompt=None, generator=None, latents=None, output_type="pil", batch_cfg=True):
        """Plain DDIM text-to-image on the same grid: the baseline for cost and for the no-op property."""
        prompts_list = _as_list(prompt)
        grid = self.ddim_grid(num_inference_steps)
        prompts = Prompts(source=None, target=self.encode_prompt(prompts_list), unconditional=None)
        if guidance_scale > 1.0:
            prompts.unconditional = self.encode_prompt(_broadcast(negative_prompt or "", len(prompts_list), "negative_prompt"))
        if latents is None:
            shape = (len(prompts_list), self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = _randn(shape, generator, self.unet.device, self.unet.dtype)
        x = plain_sampling_loop(self.feature_unet, latents, grid, prompts, guidance_scale, batch_cfg=batch_cfg)
        out = self.decode_latents(x)
        return PFBDiffOutput(images=tensors.convert_output(out, output_type), latents=x)

    # -- helpers -------------------------------------------------------------------------------------------
    def _masks(self, inversion, mask_image, word_masks, config, latent_size, prompts, auto) -> edit_masks.EditMasks:
        size, n = inversion.original_sizes[0], inversion.batch_size

        def load(source, name):
            return [imgs.load_mask(m, size, name=name) for m in _broadcast_masks(source, n)]

        user = load(mask_image, "mask") if mask_image is not None else None
        per_word = {word: load(m, f"mask for {word!r}") for word, m in (word_masks or {}).items()}
        return edit_masks.build(self, inversion, user, per_word, config, latent_size, prompts, auto)

    def _source_features(self, inversion, plan, config, repeats):
        needed = plan.source_blocks
        if config.cache_source and needed <= inversion.recorded_blocks:
            return cached_source_features(inversion.features, repeats)
        if config.cache_source and needed:
            warnings.warn(
                f"blocks {sorted(needed - inversion.recorded_blocks)} were not recorded during inversion; "
                "re-running the source branch each step (pass record_blocks to invert() to avoid this)"
            )
        recompute = recomputed_source_features(self.feature_unet, inversion.latents, inversion.source_embeddings, needed)
        return lambda n, t: {k: v.repeat_interleave(repeats, 0) for k, v in recompute(n, t).items()}

    def _start_latent(self, config, inverted, generator):
        if config.start == "inverted":
            return inverted.clone()
        return _randn(tuple(inverted.shape), generator, inverted.device, inverted.dtype)

    def _finish(self, latents, inversion, repeats, output_type, return_dict, mask_set, finish: compositing.PasteBack):
        """Decode, scale the edited box back to the input's pixels and paste it into the input (``compositing``)."""
        decoded = self.decode_latents(latents)
        box = edit_masks.inverted_box(inversion)
        size = inversion.original_sizes[0]
        alphas = None
        if finish.enabled and inversion.source_images:
            alphas = [finish.alpha(m, box, bound) for m, bound in
                      zip(mask_set.full, mask_set.bound or [None] * len(mask_set.full))]
        if output_type == "latent":
            images = latents
        else:
            pil = []
            for i, generated in enumerate(tensors.tensor_to_pil(decoded)):
                image = i // repeats
                generated = tensors.restore_size(generated, box.size)
                if (alphas is None and box.covers(size)) or not inversion.source_images:
                    pil.append(generated)
                    continue
                source = np.asarray(inversion.source_images[image])
                alpha = alphas[image] if alphas is not None else None
                pil.append(Image.fromarray(compositing.composite(
                    source, np.asarray(generated), box, mask_set.full[image][box.slices], alpha, finish.colour_match,
                    ring_width=finish.ring_width)))
            images = pil if output_type == "pil" else tensors.convert_output(_pil_to_tensor(pil), output_type)
        if not return_dict:
            return (images,)
        masks = None
        if alphas is not None:
            masks = [_to_grey(edit_masks.on_canvas(alphas[i // repeats], box, size)) for i in range(len(alphas) * repeats)]
        auto_masks = None
        if mask_set.auto is not None:
            auto_masks = [_to_grey(m) for m in mask_set.auto]
        return PFBDiffOutput(images=images, latents=latents, masks=masks, auto_masks=auto_masks, crop_box=box.as_list())


def _to_grey(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8), mode="L")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _broadcast(value, n: int, name: str) -> list:
    values = _as_list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise PFBDiffError(f"{name} has {len(values)} entries for {n} images; give one, or one per image")
    return values


def _broadcast_masks(value, n: int) -> list:
    return _broadcast(value, n, "mask_image") if isinstance(value, (list, tuple)) else [value] * n


def _randn(shape, generator, device, dtype):
    return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device, dtype)


def _pil_to_tensor(images) -> torch.Tensor:
    arrays = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)
