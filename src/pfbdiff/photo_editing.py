"""What every pfbdiff pipeline does around the method, whatever the model family: the photo side of an edit.

:class:`PhotoEditing` is the part of :class:`~pfbdiff.pipeline.PFBDiffPipeline` (U-Nets) and
:class:`~pfbdiff.flow_pipeline.PFBDiffSD3Pipeline` / :class:`~pfbdiff.flow_pipeline.PFBDiffFluxPipeline`
(flow transformers) that does not depend on the backbone: the crop box around the mask and its model size
(``photo/regions.py``), the masks of an edit (``photo/mask_set.py``), the settings an edit resolves, ``__call__``
(invert, then edit) and the paste-back into the untouched photo (``photo/compositing.py``). A family supplies
``invert``, ``edit``, ``encode_prompt``, ``decode_latents`` and the few hooks named in the class docstring.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from pfbdiff import checks
from pfbdiff.engine import automask
from pfbdiff.engine.attention import negative_prompts
from pfbdiff.engine.blending import blend_latents
from pfbdiff.engine.edit_mask import EditMask
from pfbdiff.engine.inversion import Inversion
from pfbdiff.engine.presets import EditConfig, get_preset
from pfbdiff.engine.sampling import edit_steps
from pfbdiff.errors import PFBDiffError
from pfbdiff.io import images as imgs
from pfbdiff.io import tensors
from pfbdiff.photo import compositing, mask_set, regions


@dataclass
class PFBDiffOutput(BaseOutput):
    """``images``: the edited images (PIL list, numpy array or tensor); ``latents``: the final latents.

    ``masks``: the paste-back alpha of each image (PIL "L", input size; ``None`` with paste-back off);
    ``auto_masks``: the estimated edit masks (``auto_mask=True``); ``crop_box``: the edited box of the input,
    [left, top, right, bottom]; ``latent_masks``: the edit mask the method used, B×1×h×w at latent size.
    """

    images: list | np.ndarray | torch.Tensor
    latents: torch.Tensor | None = None
    masks: list | None = None
    auto_masks: list | None = None
    crop_box: list | None = None
    latent_masks: torch.Tensor | None = None


class PhotoEditing:
    """The family-independent half of a pfbdiff pipeline. A family defines:

    ``denoiser`` (its U-Net or transformer: device and dtype), ``_model_sides()`` (the native side, size multiple
    and smallest side of :func:`~pfbdiff.photo.regions.plan_region`), ``_word_positions(prompt, phrases)``,
    ``_auto_mask_estimator(...)``, ``inversion_options(config)``, ``invert``, ``edit`` and ``decode_latents``;
    and the attribute ``recommended_settings``.
    """

    #: The family whose version of a named preset this pipeline runs (``presets.FAMILY_PRESETS``; None: a U-Net's).
    preset_family: str | None = None

    def _or_recommended(self, name: str, value):
        """``value``, or the model's recommended one (:attr:`recommended_settings`) when it is ``None``."""
        return self.recommended_settings[name] if value is None else value

    def check_words(self, prompt, config: EditConfig) -> None:
        """Every confined word of ``config`` must occur in each prompt: a misspelt word is named at once."""
        config = self._as_encoded(config)
        for prompt_text in self._as_encoded(_as_list(prompt)):
            self._word_positions(prompt_text, config.inside + config.outside)

    def _as_encoded(self, texts):
        """Prompts, words or a config's words as the text encoder reads them: a multi-vector textual-inversion token
        ``<t>`` stands for ``<t> <t>_1 …`` (diffusers' ``maybe_convert_prompt``), in prompts and words alike."""
        if isinstance(texts, EditConfig):
            return texts.replace(**{side: tuple(self._as_encoded(list(getattr(texts, side)))) for side in ("inside", "outside")})
        if isinstance(texts, dict):
            return dict(zip(self._as_encoded(list(texts)), texts.values()))
        if not hasattr(self, "maybe_convert_prompt"):  # a family without textual-inversion embeddings
            return list(texts)
        return [self.maybe_convert_prompt(t, self.tokenizer) if isinstance(t, str) else t for t in texts]

    # -- where the edit happens ----------------------------------------------------------------------------
    def crop_plan(self, image_size, mask_image=None, *, crop="auto", crop_padding: int | None = None, grow: int = 0,
                  feather: int | None = None, feather_placement: str = compositing.DEFAULT_PLACEMENT) -> regions.RegionPlan:
        """The box of an image of ``image_size`` that is inverted and edited, and its model size.

        With ``crop="auto"`` an image with more pixels than the model's native size is cropped around
        ``mask_image`` (one mask or a list; grown by ``grow`` px, widened by the ``feather`` band, padded by
        ``crop_padding`` px of context) and scaled to the native pixel count; ``True`` always crops, ``False``
        never. Without a mask a large image is scaled down whole. Edits of one inversion share this plan.
        """
        checks.within_photo(image_size, grow=grow, feather=feather, crop_padding=crop_padding)
        masks = None
        if mask_image is not None:
            with warnings.catch_warnings():  # a resized mask is reported once, by the edit
                warnings.simplefilter("ignore", UserWarning)
                masks = [imgs.load_mask(m, image_size) for m in _as_list(mask_image)]
        return mask_set.crop_plan(
            image_size, masks, grow=grow, feather=feather, placement=feather_placement, crop=crop,
            padding=crop_padding, **self._model_sides(),
        )

    def prepare_masks(self, inversion: Inversion, mask_image=None, prompt="", *, preset: str | EditConfig = "object",
                      word_masks: dict | None = None, auto_mask: bool = False,
                      auto_mask_threshold: float = automask.DEFAULT_THRESHOLD,
                      auto_mask_draws: int = automask.DEFAULT_DRAWS,
                      auto_mask_seed: int = automask.DEFAULT_SEED, **overrides) -> mask_set.MaskSet:
        """Every mask of an edit of ``inversion`` (``photo/mask_set.py``), one per input image: the latent-size
        edit mask and word masks the method uses, and the full-size masks of the paste-back."""
        config = _resolve(preset, overrides, self.preset_family)
        size, n = inversion.original_sizes[0], inversion.batch_size

        def load(source, name):
            return [imgs.load_mask(m, size, name=name) for m in _broadcast_masks(source, n)]

        estimate = None
        if auto_mask:
            estimate = self._auto_mask_estimator(inversion, _broadcast(prompt, n, "prompt"), draws=auto_mask_draws,
                                                 threshold=auto_mask_threshold, seed=auto_mask_seed)

        user = load(mask_image, "mask") if mask_image is not None else None
        per_word = {word: load(m, f"mask for {word!r}") for word, m in (word_masks or {}).items()}
        return mask_set.build(inversion, user, per_word, config, tuple(inversion.latents[0].shape[-2:]),
                              device=self.denoiser.device, dtype=self.denoiser.dtype, estimate=estimate)

    def _inversion_inputs(self, image, source_prompt, strength: float, *, mask_image, plan, crop, crop_padding, grow,
                          feather, feather_placement):
        """What an inversion starts from: (the input images, the crop plan, the model-size pixels of the planned
        box in [-1, 1], one source prompt per image)."""
        if not 0.0 < strength <= 1.0:
            raise PFBDiffError.about("strength", f"must be in (0, 1], got {strength}")
        pil_images = [imgs.load_image(i) for i in _as_list(image)]
        sizes = [im.size for im in pil_images]
        if len(set(sizes)) > 1:
            raise PFBDiffError(f"images edited together must have one size, got {sorted(set(sizes))}; edit them separately")
        if plan is None:
            plan = self.crop_plan(sizes[0], mask_image, crop=crop, crop_padding=crop_padding, grow=grow,
                                  feather=feather, feather_placement=feather_placement)
        pixels = torch.cat([tensors.image_to_tensor(im.crop(tuple(plan.box.as_list())), plan.model_size)
                            for im in pil_images])
        return pil_images, plan, pixels, _broadcast(source_prompt, len(pil_images), "source_prompt")

    def _edit_settings(self, inversion, preset, overrides: dict, guidance_scale, feather, paste_back, placement,
                       colour_match):
        """The resolved settings of an edit of ``inversion``: (config, guidance scale, step count K, paste-back),
        every one checked against the inversion and the photo."""
        config = _resolve(preset, overrides, self.preset_family)
        guidance_scale = self._or_recommended("guidance_scale", guidance_scale)
        checks.finite_number("guidance_scale", guidance_scale)
        for photo_size in inversion.original_sizes:
            checks.within_photo(photo_size, grow=config.grow, halo=config.halo, feather=feather)
        steps = edit_steps(inversion.grid.num_steps, config.strength)
        if config.size_ids != inversion.size_ids:
            raise PFBDiffError.about("size_ids", f"is {config.size_ids!r} but the inversion was made with "
                                     f"{inversion.size_ids!r}: invert with size_ids={config.size_ids!r}")
        if steps > inversion.inverted_steps:
            raise PFBDiffError(
                f"the edit needs {steps} inverted steps but the inversion has {inversion.inverted_steps}; "
                f"invert with strength >= {config.strength} or lower the edit's strength"
            )
        if config.halo:
            # the mask's edge is the subject's outline: a feather would blend the old background back, and no surface
            # runs across the edge for the colour match to measure (it measured the subject's ghost there: README)
            feather = 0 if feather is None else feather
            colour_match = "none" if colour_match is None else colour_match
        colour_match = "local" if colour_match is None else colour_match
        return config, guidance_scale, steps, compositing.PasteBack(paste_back, feather, placement, colour_match,
                                                                     config.outgrow, config.ghost_reach)

    def _negative_rows(self, negative_prompt, config: EditConfig, inversion: Inversion, prompts: list[str],
                       word_regions: dict, repeats: int) -> list[str]:
        """The negative prompt of each edit row: ``negative_prompt`` for each inverted image, ``repeats`` times, with
        the kept subject's words where the preset adds them (:func:`~pfbdiff.engine.attention.negative_prompts`)."""
        negatives = _rows(_broadcast(negative_prompt or "", inversion.batch_size, "negative_prompt"), repeats)
        return negative_prompts(self.tokenizer, config, negatives, _rows(inversion.source_prompt, repeats), prompts,
                                word_regions)

    def __call__(
        self,
        image,
        mask_image=None,
        prompt="",
        source_prompt="",
        *,
        preset: str | EditConfig = "object",
        num_inference_steps: int | None = None,
        strength: float | None = None,
        crop="auto",
        crop_padding: int | None = None,
        inversion_callback=None,
        **edit_kwargs,
    ):
        """Invert ``image`` and edit it in one call (see :meth:`invert` and :meth:`edit`).

        ``crop`` / ``crop_padding`` choose the part of the image that is inverted and edited (:meth:`crop_plan`);
        ``inversion_callback(k)`` is called after each inversion step; everything else is passed on to
        :meth:`edit`.
        """
        settings = {k: edit_kwargs.pop(k) for k in list(edit_kwargs) if k in EditConfig.__dataclass_fields__}
        config = _resolve(preset, {**settings, "strength": strength}, self.preset_family)
        self.check_words(prompt, config)  # name a misspelt word before the costly inversion
        images = [imgs.load_image(i) for i in _as_list(image)]
        size = images[0].size
        if mask_image is not None and not isinstance(mask_image, (list, tuple)):
            mask_image = imgs.load_mask(mask_image, size)  # loaded once for the crop plan and the edit
        region = mask_image if mask_image is not None else list((edit_kwargs.get("word_masks") or {}).values()) or None
        plan = self.crop_plan(
            size, region, crop=crop, crop_padding=crop_padding,
            grow=config.mask_reach, feather=edit_kwargs.get("feather"),
            feather_placement=edit_kwargs.get("feather_placement", compositing.DEFAULT_PLACEMENT),
        )
        inversion = self.invert(
            images, source_prompt, num_inference_steps, strength=config.strength, plan=plan,
            callback=inversion_callback, **self.inversion_options(config),
        )
        return self.edit(inversion, mask_image, prompt, preset=config, **edit_kwargs)

    def _output(self, latents, inversion, masks, put_back, repeats, output_type, return_dict):
        """Decode, scale the edited box back to the input's pixels and paste it into the input."""
        box = mask_set.inverted_box(inversion)
        size = inversion.original_sizes[0]
        sources = _rows(inversion.source_images, repeats)
        alphas = put_back.alphas(masks, box, sources) if sources else None
        if output_type == "latent":
            images = latents
        else:
            pil, alphas = compositing.put_back(tensors.tensor_to_pil(self.decode_latents(latents)), sources, box,
                                               masks.full, alphas, put_back, masks.outlines, masks.bound)
            images = pil if output_type == "pil" else tensors.convert_output(tensors.pil_to_tensor(pil), output_type)
        if not return_dict:
            return (images,)
        return PFBDiffOutput(
            images=images, latents=latents, crop_box=box.as_list(), latent_masks=masks.edit.latent,
            masks=None if alphas is None else [tensors.to_grey(mask_set.on_canvas(a, box, size)) for a in alphas],
            auto_masks=None if masks.auto is None else [tensors.to_grey(m) for m in masks.auto],
        )


def _resolve(preset: str | EditConfig, overrides: dict, family: str | None) -> EditConfig:
    """``preset`` (a name, resolved for the pipeline's ``family``, or an :class:`EditConfig`) with the given (not
    ``None``) ``overrides``."""
    overrides = {k: tuple(v) if k in ("inside", "outside") else v for k, v in overrides.items() if v is not None}
    if isinstance(preset, EditConfig):
        return preset.replace(**overrides) if overrides else preset
    return get_preset(preset, family, **overrides)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _rows(values: list, repeats: int) -> list:
    """Each item ``repeats`` times, in the order of ``repeat_interleave``."""
    return [v for v in values for _ in range(repeats)]


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


def _start_latent(start: str, inverted: torch.Tensor, edit_mask: EditMask, generator) -> torch.Tensor:
    """The loop's first latent (docs/method.md §2): the inverted source latent Z[K] (``"inverted"``), seeded
    Gaussian noise (``"noise"``), or the noise inside the edit mask and Z[K] outside it (``"noise-in-mask"``), so
    the old object's layout, which Z[K] still carries, does not shape the new one."""
    if start == "inverted":
        return inverted.clone()
    noise = _randn(tuple(inverted.shape), generator, inverted.device, inverted.dtype)
    return noise if start == "noise" else blend_latents(noise, inverted, edit_mask)
