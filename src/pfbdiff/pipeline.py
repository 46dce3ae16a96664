"""``PFBDiffPipeline``: PFB-Diff with the shape of a diffusers pipeline; the facade over the method's parts.

    pipe = PFBDiffPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    inv = pipe.invert(image, source_prompt="a cat sitting on a bench")
    dog = pipe.edit(inv, mask_image=mask, prompt="a dog", preset="object").images[0]
    fox = pipe.edit(inv, mask_image=mask, prompt="a fox", preset="object").images[0]   # reuses the inversion
    out = pipe(image=image, mask_image=mask, source_prompt="...", prompt="...", preset="background").images[0]

``invert`` encodes the image, runs the DDIM inversion and records the source features once
(``engine/inversion.py``); ``edit`` runs the PFB-Diff sampling loop (``engine/loop.py``) from an inversion;
``__call__`` does both. The pipeline holds the models and the order of calls; the method lives in ``engine/``,
the pixel work around it (crop plan, masks, paste-back) in ``photo/``.

Real photos: a photo larger than the model's native size is inverted and edited as a crop around the mask
(``photo/regions.py``); the result is scaled back and pasted into the untouched photo with a feathered,
colour-matched alpha (``photo/compositing.py``); ``auto_mask`` estimates the region from the prompts
(``engine/automask.py``).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)

from pfbdiff import checks
from pfbdiff.engine import automask, conditioning
from pfbdiff.engine.attention import (
    AttentionMasking,
    attention_masking_installed,
    background_prompts,
    regional_prompts,
    token_regions,
)
from pfbdiff.engine.backbones.unet import FeatureUNet
from pfbdiff.engine.blending import noised_reference
from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.inversion import Inversion, ddim_invert
from pfbdiff.engine.loop import (
    BlendPlan,
    Prompts,
    pfb_sampling_loop,
    plain_sampling_loop,
    source_features_of,
)
from pfbdiff.engine.presets import PRESETS, EditConfig
from pfbdiff.engine.sampling import DDIMGrid, edit_steps
from pfbdiff.engine.tokens import positions_of, split_at_token_limit
from pfbdiff.errors import PFBDiffError
from pfbdiff.io import tensors
from pfbdiff.models import catalog
from pfbdiff.photo import compositing, regions
from pfbdiff.photo_editing import (
    PFBDiffOutput,
    PhotoEditing,
    _as_list,
    _broadcast,
    _randn,
    _rows,
    _start_latent,
)


class PFBDiffPipeline(PhotoEditing, DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Text-driven local image editing with Progressive Feature Blending (Huang et al., arXiv 2306.16894).

    LoRAs and textual-inversion embeddings load through diffusers' own mixins (``load_lora_weights``,
    ``set_adapters``, ``fuse_lora``, ``load_textual_inversion``); the feature walker runs the layers they
    install, and an embedding's token is a word like any other for attention masking.
    """

    _optional_components = ["text_encoder_2", "tokenizer_2"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        # SDXL's unconditional rows are zeros when the negative prompt is empty (its model_index.json says so)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.feature_unet = FeatureUNet(unet)
        # the steps and guidance the model is meant to be run with (its folder's pfbdiff.json; from_pretrained reads
        # it), used where a call leaves them out
        self.recommended_settings = dict(catalog.DEFAULT_RECOMMENDED)
        if text_encoder_2 is not None and getattr(vae.config, "force_upcast", False) and vae.dtype == torch.float16:
            vae.to(torch.float32)  # SDXL's VAE overflows in float16; the U-Net stays in half precision

    @classmethod
    def from_pretrained(cls, model, **kwargs):
        """Load from a hub id, a local diffusers folder or a single ``.safetensors`` file.

        Takes ``torch_dtype``, ``device``, ``allow_pickle``, ``config`` (the configs of a single file) and the
        diffusers arguments ``models/loading.py`` honours (``variant``, ``use_safetensors``, ``revision``,
        ``cache_dir``, ``local_files_only``); any other argument is refused.
        """
        from pfbdiff.models.loading import load_components

        components = load_components(model, **kwargs)
        if "transformer" in components:  # SD3 or Flux: the flow pipeline of the family
            from pfbdiff.flow_pipeline import flow_pipeline_class

            pipeline_class = flow_pipeline_class(components)
        else:
            sdxl = components.get("text_encoder_2") is not None
            pipeline_class = PFBDiffXLPipeline if sdxl and not issubclass(cls, PFBDiffXLPipeline) else cls
        pipe = pipeline_class(**components)
        pipe.recommended_settings = catalog.recommended_settings(os.fspath(model), pipe.recommended_settings)
        return pipe

    def enable_model_cpu_offload(self, *args, **kwargs):
        """Not supported: the feature walker runs the U-Net's blocks one by one, never ``unet.forward``, which is
        where accelerate's model-offload hook moves the U-Net to the GPU."""
        raise PFBDiffError("model CPU offload is not supported by pfbdiff yet (its U-Net walker bypasses the "
                           "offload hook); load the model on one device, in float16 to save memory")

    # -- components ----------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser(self):
        """The network that denoises: the U-Net."""
        return self.unet

    @property
    def native_side(self) -> int:
        """The side of the pixel count the model is trained at (512 for SD 1.x, 1024 for SDXL)."""
        return regions.native_side(self.unet, self.vae_scale_factor)

    def _model_sides(self) -> dict:
        return dict(native=self.native_side,
                    multiple=regions.size_multiple(self.unet, self.vae_scale_factor),
                    min_side=regions.min_model_side(self.feature_unet.num_levels, self.vae_scale_factor))

    def _word_positions(self, prompt: str, phrases) -> tuple[int, ...]:
        return positions_of(self.tokenizer, prompt, phrases)

    def _auto_mask_estimator(self, inversion: Inversion, prompts: list[str], *, draws: int, threshold: float,
                             seed: int):
        """DiffEdit-style masks of the inverted box from the prompts' noise-prediction difference."""
        def estimate(box):
            target = self.encode_prompt(prompts).borrowing(inversion.source_embeddings)
            return automask.estimate_masks(
                self.feature_unet, inversion.latents[0], inversion.source_embeddings, target, inversion.grid,
                [box.size] * len(prompts), draws=draws, threshold=threshold, seed=seed)
        return estimate

    def inversion_options(self, config: EditConfig) -> dict:
        """The :meth:`invert` arguments an edit with ``config`` needs: the source features it takes from the
        inversion (none when it re-runs the source branch) and SDXL's size-id policy."""
        return dict(record_blocks=self.blend_plan(config).source_blocks if config.cache_source else frozenset(),
                    size_ids=config.size_ids)

    @property
    def unet_evaluations(self) -> int:
        """U-Net rows evaluated so far (a batched guidance pass counts its rows)."""
        return self.feature_unet.evaluations

    @property
    def unet_calls(self) -> int:
        """U-Net evaluations made by this pipeline so far (inversion, source and target branches)."""
        return self.feature_unet.calls

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int] | None = None, *, negative: bool = False,
                      original_size: tuple[int, int] | None = None) -> Conditioning:
        """The conditioning of ``prompts``. For SDXL: both text encoders' penultimate hidden states side by side,
        the second one's pooled vector, and size ids for a ``size`` = (height, width) image (default: the model's
        native size) made from an image of ``original_size`` (default: seen whole); ``negative`` rows with an
        empty prompt are zeros where the model asks for it."""
        prompts = self._as_encoded(prompts)
        for prompt in dict.fromkeys(prompts):
            _, cut = split_at_token_limit(self.tokenizer, prompt)
            if cut is not None:
                warnings.warn(f"the prompt is longer than the text encoder's {self.tokenizer.model_max_length} tokens, "
                              f"so the model does not see its end: {cut!r}", stacklevel=2)
        if self.text_encoder_2 is None:
            return conditioning.encode_sd(self.tokenizer, self.text_encoder, prompts, self.unet.dtype)
        return conditioning.encode_sdxl(
            ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)), prompts, self.unet.dtype,
            size or (regions.native_side(self.unet, self.vae_scale_factor),) * 2, original_size=original_size,
            zeros_for_empty=negative and self.config.force_zeros_for_empty_prompt)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latent of images in [-1, 1]; the posterior mean, so inversion is deterministic (docs/method.md §10, property 12)."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()

    def ddim_grid(self, num_inference_steps: int) -> DDIMGrid:
        return DDIMGrid.from_scheduler_config(self.scheduler.config, num_inference_steps)

    # -- inversion -----------------------------------------------------------------------------------------
    def invert(self, image, source_prompt="", num_inference_steps: int | None = None, strength: float = 1.0,
               record_blocks=None,
               callback=None, *, mask_image=None, plan: regions.RegionPlan | None = None, crop="auto",
               crop_padding: int | None = None, grow: int = 0, feather: int | None = None,
               feather_placement: str = compositing.DEFAULT_PLACEMENT, size_ids: str = "model") -> Inversion:
        """Encode ``image`` (one or a list), DDIM-invert it with ``source_prompt`` and record source features.

        ``record_blocks`` (block numbers L) defaults to every block any preset blends; an edit that needs
        another block re-runs the source branch for it. ``callback(k)`` is called after inversion step k.
        The part of the image that is inverted is ``plan``, or :meth:`crop_plan` of ``mask_image`` with
        ``crop``, ``crop_padding``, ``grow``, ``feather`` and ``feather_placement``; later edits must keep their
        mask inside it.
        """
        pil_images, plan, pixels, source_prompts = self._inversion_inputs(
            image, source_prompt, strength, mask_image=mask_image, plan=plan, crop=crop, crop_padding=crop_padding,
            grow=grow, feather=feather, feather_placement=feather_placement)
        grid = self.ddim_grid(self._or_recommended("num_inference_steps", num_inference_steps))
        box = (plan.box.height, plan.box.width) if size_ids == "box" else None
        embeddings = self.encode_prompt(source_prompts, tuple(pixels.shape[-2:]), original_size=box)
        blocks = self._default_record_blocks() if record_blocks is None else frozenset(record_blocks)
        inverted_steps = edit_steps(grid.num_steps, strength)
        with self.progress_bar(total=inverted_steps) as bar:

            def on_step(k):
                bar.update()
                if callback is not None:
                    callback(k)

            latents, features = ddim_invert(
                self.feature_unet, self.encode_images(pixels).to(self.unet.dtype), embeddings, grid, inverted_steps,
                blocks, callback=on_step,
            )
        return Inversion(latents, features, blocks, grid, embeddings, source_prompts, pixels, [im.size for im in pil_images],
                         crop_box=plan.box, source_images=pil_images, size_ids=size_ids)

    def _default_record_blocks(self) -> frozenset[int]:
        return frozenset(b for cfg in PRESETS.values() if cfg.cache_source for b in self.blend_plan(cfg).source_blocks)

    # -- editing -------------------------------------------------------------------------------------------
    def blend_plan(self, config: EditConfig) -> BlendPlan:
        unet = self.feature_unet
        points = (unet.numbered_blocks(config.blend_blocks, "blend_blocks") if config.blend_blocks is not None
                  else unet.blocks_at_levels(config.blend_levels))
        before_middle = unet.middle_index - 1
        source_of = {before_middle: unet.middle_index} if config.reference_middle and before_middle in points else {}
        return BlendPlan(
            blend_points=frozenset(points),
            source_of=source_of,
            blend_skips=config.blend_skips,
            t_combine=config.t_combine,
            latent_blend=config.latent_blend,
            layout_until=config.word_boost_until,
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
        region_prompts: dict | None = None,
        negative_prompt=None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        attention_observer=None,
        return_dict: bool = True,
        paste_back: bool = True,
        feather: int | None = None,
        feather_placement: str = compositing.DEFAULT_PLACEMENT,
        colour_match: str | None = None,
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
        their union). ``region_prompts``: a word of ``word_masks`` → the prompt its region reads instead of
        ``prompt`` (regional prompting, docs/method.md §5; giving them turns ``own_region_prompts`` on, whose
        default is the word itself). ``attention_observer(L, probabilities)`` sees every masked cross-attention map.
        ``overrides``: any :class:`EditConfig` field (``grow``: pixels of the input image, + grows, − shrinks).
        ``guidance_scale`` defaults to the model's recommended scale (:attr:`recommended_settings`).

        Putting the result back (``photo/compositing.py``): with ``paste_back`` (default) every pixel outside the
        feathered mask is the input's own, bit for bit; ``feather`` px (default: from the mask's size, 0 for
        a soft mask, 0 when ``halo`` snapped it to the subject) soften the edge, placed ``"inside"`` (default) /
        ``"center"`` / ``"outside"`` it;
        ``colour_match`` (``"local"``, ``"mean"``, ``"none"``; default ``"local"``, ``"none"`` when ``halo`` snapped
        the mask to the subject) matches the generation's colours to the input around the edge. ``auto_mask`` estimates the region from the prompts (``engine/automask.py``), clipped to
        ``mask_image`` when one is given; it is returned as ``auto_masks``. Latent outputs are unaffected.
        """
        # 1. the settings and the step count K
        config, guidance_scale, steps, put_back = self._edit_settings(
            inversion, preset, {**overrides, "inside": inside, "outside": outside}, guidance_scale, feather,
            paste_back, feather_placement, colour_match)
        grid = inversion.grid

        # 2. the masks of each input image
        prompts_in = _broadcast(prompt, inversion.batch_size, "prompt")
        masks = self.prepare_masks(inversion, mask_image, prompts_in, preset=config, word_masks=word_masks,
                                   auto_mask=auto_mask, auto_mask_threshold=auto_mask_threshold,
                                   auto_mask_draws=auto_mask_draws, auto_mask_seed=auto_mask_seed)

        # 3. one row per output image: each input image num_images_per_prompt times
        repeats = num_images_per_prompt
        masks = masks.repeated(repeats)
        prompts_list = _rows(prompts_in, repeats)
        source_prompts = _rows(inversion.source_prompt, repeats)
        source_latents = [z.repeat_interleave(repeats, 0) for z in inversion.latents[: steps + 1]]
        source_features = source_features_of(self.feature_unet, inversion, self.blend_plan(config).source_blocks,
                                             config.cache_source, repeats)

        # 4. text conditioning: source, target and (with guidance) unconditional prompts
        #    (every branch with the inversion's SDXL size ids; the pooled vector from the pooled_from prompt)
        source = inversion.source_embeddings.repeat_interleave(repeats)
        target = self.encode_prompt(prompts_list).borrowing(source, pooled=config.pooled_from == "source")
        prompts = Prompts(source=source, target=target, unconditional=None)
        if guidance_scale > 1.0:
            negatives = self._negative_rows(negative_prompt, config, inversion, prompts_list, masks.words, repeats)
            prompts.unconditional = self.encode_prompt(negatives, negative=True).borrowing(source)

        # 5. attention masking: which tokens may be attended to where
        latent_size = tuple(inversion.latents[0].shape[-2:])
        if config.attention_blocks is not None:
            attention_blocks = self.feature_unet.numbered_blocks(config.attention_blocks, "attention_blocks",
                                                                 attention=True)
        else:
            attention_blocks = self.feature_unet.attention_blocks_at_levels(config.attention_levels)
        own_prompts = regional_prompts(lambda texts: self.encode_prompt(texts).tokens, masks.words, region_prompts,
                                       len(prompts_list), config=config)
        own_prompts += background_prompts(lambda texts: self.encode_prompt(texts).tokens, self.tokenizer, config,
                                          source_prompts, prompts_list, masks.words, masks.edit)
        masking = AttentionMasking(
            token_regions(self.tokenizer, self._as_encoded(config), self._as_encoded(source_prompts),
                          self._as_encoded(prompts_list), masks.edit, self._as_encoded(masks.words)),
            latent_size, attention_blocks, mask_uncond=config.mask_uncond, region_prompts=own_prompts,
            word_boost=config.word_boost, word_boost_until=config.word_boost_until,
            word_boost_cover=config.word_boost_cover, kept_apart=masks.kept_apart(config))
        masking.observer = attention_observer

        # 6. the start latent and the latent-blend reference
        x = _start_latent(config.start, source_latents[-1], masks.edit, generator)
        latent_reference = None
        if config.latent_reference == "noised":
            clean = source_latents[0]
            latent_reference = noised_reference(
                clean, grid, lambda: _randn(tuple(clean.shape), generator, clean.device, clean.dtype))

        # 7. the PFB-Diff sampling loop
        with self.progress_bar(total=steps) as bar, attention_masking_installed(self.feature_unet, masking):

            def on_step(n, t, latents):
                bar.update()
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, steps - 1 - n, t, {"latents": latents}) or {}
                    latents = result.get("latents", latents)
                return latents

            x = pfb_sampling_loop(
                self.feature_unet, x, source_latents, source_features, grid, masks.edit, prompts,
                self.blend_plan(config), guidance_scale, masking=masking, batch_cfg=config.batch_cfg, on_step=on_step,
                latent_reference=latent_reference,
            )

        # 8. decode and put the result back into the photo
        return self._output(x, inversion, masks, put_back, repeats, output_type, return_dict)

    @torch.no_grad()
    def text_to_image(self, prompt, *, height: int, width: int, num_inference_steps=None, guidance_scale=None,
                      negative_prompt=None, generator=None, latents=None, output_type="pil", batch_cfg=True):
        """Plain DDIM text-to-image on the same grid: the baseline for cost and for the no-op property."""
        prompts_list = _as_list(prompt)
        grid = self.ddim_grid(self._or_recommended("num_inference_steps", num_inference_steps))
        guidance_scale = self._or_recommended("guidance_scale", guidance_scale)
        checks.finite_number("guidance_scale", guidance_scale)
        prompts = Prompts(source=None, target=self.encode_prompt(prompts_list, (height, width)), unconditional=None)
        if guidance_scale > 1.0:
            negatives = _broadcast(negative_prompt or "", len(prompts_list), "negative_prompt")
            prompts.unconditional = self.encode_prompt(negatives, (height, width), negative=True)
        if latents is None:
            shape = (len(prompts_list), self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = _randn(shape, generator, self.unet.device, self.unet.dtype)
        x = plain_sampling_loop(self.feature_unet, latents, grid, prompts, guidance_scale, batch_cfg=batch_cfg)
        out = self.decode_latents(x)
        return PFBDiffOutput(images=tensors.convert_output(out, output_type), latents=x)

    # -- helpers -------------------------------------------------------------------------------------------
class PFBDiffXLPipeline(StableDiffusionXLLoraLoaderMixin, PFBDiffPipeline):
    """The same pipeline for SDXL models: only its LoRA loader differs (an SDXL LoRA may also change the second
    text encoder). :meth:`PFBDiffPipeline.from_pretrained` picks it for an SDXL model."""


def load_pipeline(model, *, quiet: bool = False, loras=(), embeddings=(), **kwargs) -> PFBDiffPipeline:
    """A :class:`PFBDiffPipeline` for ``model`` (arguments of :meth:`PFBDiffPipeline.from_pretrained`), with
    ``loras`` (``{"path", "scale"}``) and textual-inversion ``embeddings`` (``{"path", "token"}``) applied.

    ``quiet=True`` is for callers with their own progress display (the CLI, the UI, batch runs): no "Loading
    weights" bars from diffusers or transformers while loading, and no denoising bar when the pipeline runs.
    """
    from pfbdiff.models import adapters
    from pfbdiff.models.loading import library_progress_bars_off

    with library_progress_bars_off() if quiet else contextlib.nullcontext():
        pipe = PFBDiffPipeline.from_pretrained(model, **kwargs)
        adapters.apply(pipe, loras, embeddings, allow_pickle=kwargs.get("allow_pickle", False))
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    return pipe


