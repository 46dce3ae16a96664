"""PFB-Diff on flow-matching transformers: ``PFBDiffSD3Pipeline`` and ``PFBDiffFluxPipeline``.

    pipe = PFBDiffPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")   # picks the SD3 class
    inv = pipe.invert(image, source_prompt="a cat sitting on a bench")
    dog = pipe.edit(inv, mask_image=mask, prompt="a dog sitting on a bench").images[0]

Each class is diffusers' own pipeline of its family (so its text encoding, latent packing, LoRA loading and
single-file loading are diffusers') with PFB-Diff's ``invert`` / ``edit`` / ``__call__`` in place of text-to-image,
the same shape as :class:`~pfbdiff.pipeline.PFBDiffPipeline` and the same photo side
(:class:`~pfbdiff.photo_editing.PhotoEditing`: crop, masks, paste-back). The method (docs/method.md §13–16):

1. ``invert``: the photo's latent is carried up the flow ODE to noise with the source prompt (Euler, midpoint or
   FireFlow, ``flow_solver``), keeping every latent Z[0..K];
2. ``edit``: from Z[K] down, each step recomputes the source branch's image tokens at (Z[n+1], σ[n+1]), blends
   them into the first ``blend_depth`` of the blocks while σ > ``t_combine`` / training steps, masks the chosen
   words inside joint attention (every block), takes an Euler step and blends the latent outside the mask with
   Z[n] while the latent-blend gate is open (:func:`~pfbdiff.engine.flow_loop.flow_pfb_loop`).

SD3 runs classifier-free guidance (unconditional rows unmasked unless ``mask_uncond``); Flux is guidance-distilled:
its guidance scale goes into the model's guidance embedding where it has one, and it has no unconditional rows.
"""

from __future__ import annotations

import functools

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from pfbdiff.engine import automask
from pfbdiff.engine.attention import AttentionMasking, regional_prompts, token_regions
from pfbdiff.engine.backbones.transformer import FeatureTransformer
from pfbdiff.engine.conditioning import Conditioning
from pfbdiff.engine.flow import FlowGrid, along_path, integrate, solver_step
from pfbdiff.engine.flow_loop import (
    flow_pfb_loop,
    flow_source_features,
    guided_flow_velocity,
    recomputed_flow_features,
)
from pfbdiff.engine.inversion import FeatureRecorder, Inversion
from pfbdiff.engine.joint_attention import joint_attention_masking_installed
from pfbdiff.engine.presets import EditConfig
from pfbdiff.engine.sampling import edit_steps
from pfbdiff.engine.tokens import joined_positions
from pfbdiff.errors import PFBDiffError
from pfbdiff.io import tensors
from pfbdiff.photo import compositing
from pfbdiff.photo_editing import PFBDiffOutput, PhotoEditing, _as_list, _broadcast, _randn, _rows, _start_latent

#: The most memory an inversion spends on recorded source tokens (the edit computes what does not fit).
SOURCE_CACHE_BYTES = 2 * 2**30


class FlowEditing(PhotoEditing):
    """PFB-Diff's ``invert`` and ``edit`` on a flow transformer; a family class supplies ``encode_prompt_rows``,
    ``_velocity_inputs``, ``_text_parts`` and ``latent_channels``."""

    #: ``True`` for a guidance-distilled family: the guidance scale is an input of the model, not a second pass.
    distilled_guidance = False
    #: T5 tokens the family reads (diffusers' default for it), at most the tokenizer's own limit.
    t5_length = 256
    #: The steps and guidance scale of diffusers' pipeline of the family, for a model that recommends none.
    default_settings = {"num_inference_steps": 28, "guidance_scale": 7.0}
    preset_family = "flow"

    #: denoiser calls and rows evaluated so far (inversion, source and target branches)
    model_calls = 0
    model_rows = 0

    @functools.cached_property
    def feature_transformer(self) -> FeatureTransformer:
        return FeatureTransformer(self.transformer)

    @property
    def recommended_settings(self) -> dict:
        """The steps and guidance scale the model is meant to be run with (its folder's ``pfbdiff.json``, else
        the family's defaults), used where a call leaves them out."""
        return self.__dict__.setdefault("_recommended_settings", dict(self.default_settings))

    @recommended_settings.setter
    def recommended_settings(self, settings: dict):
        self.__dict__["_recommended_settings"] = dict(settings)

    # -- the family-independent hooks of PhotoEditing -------------------------------------------------------
    @property
    def denoiser(self):
        return self.transformer

    @property
    def unet_calls(self) -> int:
        """Denoiser calls so far (the name the U-Net pipeline's callers read)."""
        return self.model_calls

    @property
    def unet_evaluations(self) -> int:
        """Denoiser rows evaluated so far (a batched guidance pass counts its rows)."""
        return self.model_rows

    def _model_sides(self) -> dict:
        multiple = self.vae_scale_factor * 2  # 2 × 2 latent pixels per token (SD3's patch, Flux's packing)
        return dict(native=self.native_side, multiple=multiple, min_side=multiple)

    @property
    def native_side(self) -> int:
        """The side of the pixel count the model is trained at (1024 for SD3 and Flux)."""
        return self.default_sample_size * self.vae_scale_factor

    def _word_positions(self, prompt: str, phrases) -> tuple[int, ...]:
        return joined_positions(self._text_parts(), prompt, phrases)

    def _auto_mask_estimator(self, inversion, prompts, *, draws, threshold, seed):
        """DiffEdit-style masks of the inverted box from the two prompts' velocities (docs/method.md §17)."""
        def estimate(box):
            both = Conditioning.cat([inversion.source_embeddings, self.encode_prompt_rows(prompts)])
            difference = automask.flow_difference_map(self._velocity(both, 1.0), inversion.latents[0], draws=draws,
                                                      seed=seed)
            return automask.masks_from_difference(difference, [box.size] * len(prompts), threshold)
        return estimate

    def inversion_options(self, config: EditConfig) -> dict:
        """The :meth:`invert` arguments an edit with ``config`` needs: its solver, and the blocks whose source
        tokens it would take from the inversion."""
        window = self.feature_transformer.window(config.blend_depth) if config.cache_source else ()
        return dict(solver=config.flow_solver, record_blocks=frozenset(window))

    def _blocks_to_record(self, record_blocks, solver: str, clean: torch.Tensor, steps: int) -> frozenset[int]:
        """The blocks an inversion records: ``record_blocks`` (default: the default blend window) where the solver
        evaluates on the grid (Euler) and their tokens fit in :data:`SOURCE_CACHE_BYTES`, else none."""
        if record_blocks is None:
            record_blocks = self.feature_transformer.window(EditConfig().blend_depth)
        blocks = frozenset(record_blocks)
        config = self.transformer.config
        tokens = clean.shape[0] * (clean.shape[-2] // 2) * (clean.shape[-1] // 2)
        width = config.num_attention_heads * config.attention_head_dim
        size = tokens * width * len(blocks) * steps * clean.element_size()
        return blocks if solver == "euler" and size <= SOURCE_CACHE_BYTES else frozenset()

    # -- the model ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE latent of images in [-1, 1] (the posterior mean, so inversion is deterministic), shifted and
        scaled as the family's VAE asks."""
        config = self.vae.config
        mean = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return (mean - (config.shift_factor or 0.0)) * config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        return self.vae.decode(latents).sample.float()

    def flow_grid(self, num_inference_steps: int, latent_size: tuple[int, int]) -> FlowGrid:
        """The σ grid of an N-step run on latents of ``latent_size`` (Flux shifts it by the token count)."""
        tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
        return FlowGrid.from_scheduler_config(self.scheduler.config, num_inference_steps, image_seq_len=tokens)

    def _t5_tokens(self, tokenizer) -> int:
        return min(self.t5_length, tokenizer.model_max_length)

    def _velocity(self, condition: Conditioning, guidance_scale):
        """``velocity(x, σ, on_block)`` of the conditioning's rows on latents laid out as images (B × C × h × w);
        ``guidance_scale`` (Flux's guidance input) is one number or one per row."""

        def velocity(x, sigma, on_block=None):
            self.model_calls += 1
            self.model_rows += x.shape[0]
            inputs = self._velocity_inputs(x, sigma, condition, guidance_scale)
            out = self.feature_transformer(on_block=on_block, **inputs)
            return self._as_image_latent(out, x)

        return velocity

    def _as_image_latent(self, out, x):
        return out

    # -- inversion ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, image, source_prompt="", num_inference_steps: int | None = None, strength: float = 1.0,
               record_blocks=None, callback=None, *, mask_image=None, plan=None, crop="auto",
               crop_padding: int | None = None, grow: int = 0, feather: int | None = None,
               feather_placement: str = compositing.DEFAULT_PLACEMENT, solver: str = "euler",
               size_ids: str = "model") -> Inversion:
        """Encode ``image`` (one or a list) and carry it up the flow to noise with ``source_prompt``.

        The same arguments as :meth:`PFBDiffPipeline.invert <pfbdiff.pipeline.PFBDiffPipeline.invert>`, with
        ``solver`` ("euler", "midpoint" or "fireflow", docs/method.md §13). An Euler inversion evaluates the
        source branch exactly where the edit will, so it records the image tokens of ``record_blocks`` (default:
        the default blend window) when they fit in :data:`SOURCE_CACHE_BYTES`; the edit computes the rest in its
        own batch.
        """
        pil_images, plan, pixels, source_prompts = self._inversion_inputs(
            image, source_prompt, strength, mask_image=mask_image, plan=plan, crop=crop, crop_padding=crop_padding,
            grow=grow, feather=feather, feather_placement=feather_placement)
        clean = self.encode_images(pixels).to(self.transformer.dtype)
        grid = self.flow_grid(self._or_recommended("num_inference_steps", num_inference_steps), clean.shape[-2:])
        embeddings = self.encode_prompt_rows(source_prompts)
        inverted_steps = edit_steps(grid.num_steps, strength)
        step, carry = solver_step(solver), None
        blocks = self._blocks_to_record(record_blocks, solver, clean, inverted_steps)
        velocity, latents, features = self._velocity(embeddings, 1.0), [clean], []

        def recording(z, sigma):  # Euler's one evaluation per step is the source branch at (Z[k], σ[k])
            recorder = FeatureRecorder(blocks)
            output = velocity(z, sigma, recorder if blocks else None)
            features.append(recorder.features)
            return output

        with self.progress_bar(total=inverted_steps) as bar:
            for k in range(inverted_steps):
                z, carry = step(recording, latents[-1], grid.sigmas[k], grid.sigmas[k + 1], carry)
                latents.append(z)
                bar.update()
                if callback is not None:
                    callback(k)
        return Inversion(latents, features if blocks else [], blocks, grid, embeddings, source_prompts, pixels,
                         [im.size for im in pil_images], crop_box=plan.box, source_images=pil_images,
                         size_ids=size_ids)

    # -- editing --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, inversion: Inversion, mask_image=None, prompt="", *, preset: str | EditConfig = "object",
             inside=None, outside=None, word_masks: dict | None = None, region_prompts: dict | None = None,
             negative_prompt=None, guidance_scale: float | None = None, num_images_per_prompt: int = 1, generator=None,
             output_type: str = "pil", callback_on_step_end=None, return_dict: bool = True, paste_back: bool = True,
             feather: int | None = None, feather_placement: str = compositing.DEFAULT_PLACEMENT,
             colour_match: str | None = None, auto_mask: bool = False,
             auto_mask_threshold: float = automask.DEFAULT_THRESHOLD, auto_mask_draws: int = automask.DEFAULT_DRAWS,
             auto_mask_seed: int = automask.DEFAULT_SEED, **overrides):
        """Edit an inverted image: regenerate the masked region from ``prompt`` with PFB-Diff on the flow.

        The arguments mean what they mean to :meth:`PFBDiffPipeline.edit <pfbdiff.pipeline.PFBDiffPipeline.edit>`;
        ``overrides`` are :class:`EditConfig` fields, of which the flow ones are ``blend_depth``, ``text_queries``
        and ``flow_solver`` (the inversion's). Regional prompts (``region_prompts`` or ``own_region_prompts``) ride
        after the edit's prompt in the joint attention (:func:`~pfbdiff.engine.joint_attention.region_prompts_blocked`).
        """
        # 1. the settings and the step count K
        config, guidance_scale, steps, put_back = self._edit_settings(
            inversion, preset, {**overrides, "inside": inside, "outside": outside}, guidance_scale, feather,
            paste_back, feather_placement, colour_match)
        if config.background_prompt_share:  # a joint attention has no cross-attention output of its own to share
            raise PFBDiffError.about("background_prompt_share", "is a U-Net setting (SD 1.x, SD 2.x, SDXL); on SD3 "
                                     "and Flux set it to 0")

        # 2. the masks of each input image, and 3. one row per output image
        prompts_in = _broadcast(prompt, inversion.batch_size, "prompt")
        repeats = num_images_per_prompt
        masks = self.prepare_masks(inversion, mask_image, prompts_in, preset=config, word_masks=word_masks,
                                   auto_mask=auto_mask, auto_mask_threshold=auto_mask_threshold,
                                   auto_mask_draws=auto_mask_draws, auto_mask_seed=auto_mask_seed).repeated(repeats)
        prompts_list = _rows(prompts_in, repeats)
        source_prompts = _rows(inversion.source_prompt, repeats)
        sigmas = inversion.grid.sigmas[: steps + 1]
        source_latents = [z.repeat_interleave(repeats, 0) for z in inversion.latents[: steps + 1]]

        # 4. text conditioning: source, target and (SD3 with guidance) unconditional rows
        source = inversion.source_embeddings.repeat_interleave(repeats)
        target = self.encode_prompt_rows(prompts_list).borrowing(source, pooled=config.pooled_from == "source")
        unconditional = None
        if guidance_scale > 1.0 and not self.distilled_guidance:
            negatives = self._negative_rows(negative_prompt, config, inversion, prompts_list, masks.words, repeats)
            unconditional = self.encode_prompt_rows(negatives)

        # 5. attention masking inside joint attention, in every block; regional prompts after the edit's prompt
        grid = (source_latents[0].shape[-2] // 2, source_latents[0].shape[-1] // 2)
        own_prompts = regional_prompts(lambda texts: self.encode_prompt_rows(texts).tokens, masks.words,
                                       region_prompts, len(prompts_list), config=config)
        if own_prompts:
            target = target.with_tokens_appended([prompt.tokens for prompt in own_prompts])
        masking = AttentionMasking(
            token_regions(self.tokenizer, config, source_prompts, prompts_list, masks.edit, masks.words,
                          positions_of_words=self._word_positions),
            grid, [block.index for block in self.feature_transformer.blocks], mask_uncond=config.mask_uncond,
            region_prompts=own_prompts, word_boost=config.word_boost, word_boost_until=config.word_boost_until,
            word_boost_cover=config.word_boost_cover, kept_apart=masks.kept_apart(config))

        # 6. the start latent and the latent-blend reference
        x = _start_latent(config.start, source_latents[-1], masks.edit, generator)
        references = source_latents
        if config.latent_reference == "noised":  # the clean latent carried to each σ with fresh noise (BLD's)
            clean = source_latents[0]
            references = [along_path(clean, _randn(tuple(clean.shape), generator, clean.device, clean.dtype),
                                     sigma) for sigma in sigmas]

        # 7. the PFB-Diff loop on the flow
        sigma_combine = config.t_combine / inversion.grid.num_train_timesteps
        window = self.feature_transformer.window(config.blend_depth)
        target_velocity = self._guided_velocity(target, unconditional, guidance_scale, masking, config.batch_cfg,
                                                source)
        recompute = None  # where the source rows cannot ride in the target's call: mask_uncond would mask them,
        if config.mask_uncond or not config.batch_cfg:  # and without batch_cfg there are two target calls
            recompute = recomputed_flow_features(self._velocity(source, 1.0), source_latents, sigmas, window)
        recorded = inversion.features if config.cache_source and set(window) <= inversion.recorded_blocks else []
        features = flow_source_features(recorded, window, repeats, recompute)
        with self.progress_bar(total=steps) as bar, joint_attention_masking_installed(
                self.feature_transformer, masking, text_queries=config.text_queries):

            def on_step(n, velocity, latents):
                bar.update()
                if callback_on_step_end is not None:
                    callback_on_step_end(self, steps - 1 - n, sigmas[n], {"latents": latents})

            x = flow_pfb_loop(target_velocity, x, references, sigmas, features, masks.edit, masks.edit.latent,
                              blend_points=window, sigma_combine=sigma_combine, latent_blend=config.latent_blend,
                              settled_mask=masks.edit.latent_blended(settled=True).latent,
                              sigma_settled=config.word_boost_until / inversion.grid.num_train_timesteps,
                              on_step=on_step, inverted_latents=source_latents)

        # 8. decode and put the result back into the photo
        return self._output(x, inversion, masks, put_back, repeats, output_type, return_dict)

    def _guided_velocity(self, target: Conditioning, unconditional: Conditioning | None, guidance_scale: float,
                         masking: AttentionMasking, batch_cfg: bool, source: Conditioning | None = None):
        """The target branch of this model (:func:`~pfbdiff.engine.flow_loop.guided_flow_velocity`)."""
        return guided_flow_velocity(self._velocity, target, unconditional, guidance_scale, masking,
                                    batch_cfg=batch_cfg, source=source,
                                    timestep_of=lambda sigma: sigma * self.scheduler.config.num_train_timesteps)

    def __call__(self, image, mask_image=None, prompt="", source_prompt="", **kwargs):
        """Invert ``image`` and edit it in one call (see :meth:`invert` and :meth:`edit`); diffusers'
        text-to-image is :meth:`text_to_image`."""
        return PhotoEditing.__call__(self, image, mask_image, prompt, source_prompt, **kwargs)

    def target_velocity(self, prompts: list[str], guidance_scale: float, negative_prompt=None, *, batch_cfg=True):
        """``velocity(x, σ)`` of plain text-to-image with ``prompts``: guided as the family is, nothing masked."""
        target = self.encode_prompt_rows(prompts)
        unconditional = None
        if guidance_scale > 1.0 and not self.distilled_guidance:
            unconditional = self.encode_prompt_rows(_broadcast(negative_prompt or "", len(prompts), "negative_prompt"))
        return self._guided_velocity(target, unconditional, guidance_scale, AttentionMasking([], (1, 1), ()),
                                     batch_cfg)

    @torch.no_grad()
    def text_to_image(self, prompt, *, height: int, width: int, num_inference_steps=None, guidance_scale=None,
                      negative_prompt=None, generator=None, latents=None, output_type="pil", batch_cfg=True):
        """Plain Euler flow sampling on the edit's grid: the baseline for cost and for the no-op property."""
        prompts_list = _as_list(prompt)
        guidance_scale = self._or_recommended("guidance_scale", guidance_scale)
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        grid = self.flow_grid(self._or_recommended("num_inference_steps", num_inference_steps), latent_size)
        if latents is None:
            shape = (len(prompts_list), self.latent_channels, *latent_size)
            latents = _randn(shape, generator, self.transformer.device, self.transformer.dtype)
        velocity = self.target_velocity(prompts_list, guidance_scale, negative_prompt, batch_cfg=batch_cfg)
        x = integrate(lambda z, sigma: velocity(z, sigma), latents, tuple(reversed(grid.sigmas)), "euler")[-1]
        images = x if output_type == "latent" else tensors.convert_output(self.decode_latents(x), output_type)
        return PFBDiffOutput(images=images, latents=x)


class PFBDiffSD3Pipeline(FlowEditing, StableDiffusion3Pipeline):
    """PFB-Diff for Stable Diffusion 3 / 3.5: joint blocks, classifier-free guidance, three text encoders (two
    CLIPs and a T5, the words of the prompt confined in the CLIP part and the T5 part alike)."""

    t5_length = 256

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _text_parts(self):
        parts = [(self.tokenizer, self.tokenizer.model_max_length)]
        if self.text_encoder_3 is not None:
            parts.append((self.tokenizer_3, self._t5_tokens(self.tokenizer_3)))
        return parts

    @torch.no_grad()
    def encode_prompt_rows(self, prompts: list[str]) -> Conditioning:
        """The joined text sequence (CLIP-L and CLIP-G side by side, padded to T5's width, then T5's tokens) and
        the two CLIP pooled vectors joined, by diffusers' own SD3 encoder."""
        tokens, _, pooled, _ = self.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=self._t5_tokens(self.tokenizer_3) if self.tokenizer_3 is not None else self.t5_length,
            device=self.transformer.device)
        return Conditioning(tokens.to(self.transformer.dtype), pooled.to(self.transformer.dtype))

    def _velocity_inputs(self, x, sigma, condition: Conditioning, guidance_scale: float) -> dict:
        timestep = torch.full((x.shape[0],), sigma * self.scheduler.config.num_train_timesteps, device=x.device)
        return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=condition.tokens,
                    pooled_projections=condition.pooled)


class PFBDiffFluxPipeline(FlowEditing, FluxPipeline):
    """PFB-Diff for Flux.1: double- then single-stream blocks on latents packed 2 × 2, the guidance scale as an
    input (guidance-distilled, no unconditional rows), CLIP's pooled vector and T5's tokens."""

    distilled_guidance = True
    t5_length = 512
    default_settings = {"num_inference_steps": 28, "guidance_scale": 3.5}

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _text_parts(self):
        return [(self.tokenizer_2, self._t5_tokens(self.tokenizer_2))]

    @torch.no_grad()
    def encode_prompt_rows(self, prompts: list[str]) -> Conditioning:
        """T5's tokens and CLIP's pooled vector, by diffusers' own Flux encoder."""
        tokens, pooled, _ = self.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.transformer.device,
                                               max_sequence_length=self._t5_tokens(self.tokenizer_2))
        return Conditioning(tokens.to(self.transformer.dtype), pooled.to(self.transformer.dtype))

    def _velocity_inputs(self, x, sigma, condition: Conditioning, guidance_scale: float) -> dict:
        batch, channels, height, width = x.shape
        guidance = None
        if self.transformer.config.guidance_embeds:  # one scale per row (the source rows' is 1)
            guidance = torch.as_tensor(guidance_scale, dtype=torch.float32).expand(batch).to(x.device)
        return dict(
            hidden_states=self._pack_latents(x, batch, channels, height, width),
            timestep=torch.full((batch,), float(sigma), device=x.device), guidance=guidance,
            pooled_projections=condition.pooled, encoder_hidden_states=condition.tokens,
            txt_ids=torch.zeros(condition.tokens.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=self._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype))

    def _as_image_latent(self, out, x):
        return self._unpack_latents(out, x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor,
                                    self.vae_scale_factor)


def flow_pipeline_class(components: dict):
    """The pipeline class for loaded components: SD3 has a third (T5) text encoder and joint blocks, Flux
    single-stream blocks."""
    transformer = components["transformer"]
    return PFBDiffFluxPipeline if hasattr(transformer, "single_transformer_blocks") else PFBDiffSD3Pipeline

