"""ShapesBench: PFB-Diff, its ablations and baselines on rendered ShapesWorld edits with exact oracles.

``pfbdiff bench shapes`` (see :mod:`pfbdiff.apps.cli`) or :func:`run_shapesbench`. Cases come from
:mod:`.cases`, metrics from :mod:`.metrics`, baselines from :mod:`.baselines`, tables / JSON / image grid from
:mod:`.report`. Every method sees the same cases, the same model, the same number of DDIM steps, the same
guidance scale and the same noise seed per case; on background cases every method's mask is snapped to the
objects as the ``background`` preset snaps it (:func:`baseline_images`). The inversion-based methods (``pfb*`` and
``bld-inverted``) share one DDIM inversion per case; its U-Net calls and time are charged to each of them
(the share of the inverted steps each one uses), so the costs read as if each method ran alone. Next to the
edits, the model's own text-to-image accuracy on the same target captions is measured, so a weak model is
not mistaken for a weak method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from pfbdiff.bench import baselines
from pfbdiff.bench.cases import BOX_MARGIN, TASKS, CaseImages, make_cases, render_case
from pfbdiff.bench.diagnosis import failure_cause
from pfbdiff.bench.metrics import (
    coherence,
    edit_success,
    objects_in_mask,
    psnr,
    seam_score,
    ssim,
    text_to_image_success,
)
from pfbdiff.engine.presets import EditConfig, get_preset
from pfbdiff.engine.sampling import edit_steps
from pfbdiff.errors import PFBDiffError
from pfbdiff.photo.halo import absorb_halo

TASK_PRESET = {"object": "object", "attribute": "attribute", "background": "background", "multi-object": "multi-object"}
PAPER_PRESET = {"object": "paper-object", "attribute": "paper-object", "background": "paper-background",
                "multi-object": "paper-object"}
DEFAULT_GUIDANCE = 4.0  # the bundled shapes model's evaluation guidance (pfbdiff.shapes.evaluate)
SDEDIT_STRENGTHS = (0.5, 0.7, 0.9)
FLOW_BLEND_DEPTHS = (0.25, 0.75, 1.0)  # blend windows beside the default's (the first half of the blocks)
QUICK_CASES, FULL_CASES = 20, 200  # cases per task of --quick and of the full run


def resolve_model(model: str | None) -> str:
    """The model to benchmark: ``model`` when given, else the bundled ShapesWorld model (an error if absent)."""
    if model:
        return model
    from pfbdiff.models.loading import MODEL_ALIASES

    MODEL_ALIASES["shapes"]()  # a one-line error naming the fix when the install does not ship it
    return "shapes"


@dataclass(frozen=True)
class Method:
    """A benchmarked method: ``config(task, pipe)`` for an inversion-based PFB-Diff run (through
    ``pipe.edit``), or ``run(pipe, images, steps, guidance, generator, paste_back=...) -> BaselineResult``."""

    name: str
    description: str
    config: Callable[[str, object], EditConfig] | None = None  # config(task, pipe)
    run: Callable | None = None
    settings: dict | None = None
    applies: Callable[[object], bool] = lambda pipe: True  # whether a run of all methods includes it for ``pipe``


def _unet(pipe) -> bool:  # a U-Net model (SD 1.x/2.x, SDXL), not a flow transformer
    return getattr(pipe, "feature_unet", None) is not None


def _flow(pipe) -> bool:  # a flow-matching transformer (SD3, Flux)
    return not _unet(pipe)


def _sd1_blocks(pipe) -> bool:  # the paper presets' block numbers are SD 1.x's
    return _unet(pipe) and pipe.feature_unet.sd1_layout


def _pooled(pipe) -> bool:  # a model with a pooled text vector (SDXL)
    return getattr(pipe, "text_encoder_2", None) is not None


def default_config(task: str, pipe=None) -> EditConfig:
    """The task's preset as ``pipe``'s family runs it."""
    return get_preset(TASK_PRESET[task], getattr(pipe, "preset_family", None))


def paper_config(task: str, pipe) -> EditConfig:
    """The official code's preset for the task, carried over to the pipeline's model.

    Its mask growth (``grow``, the reference's dilation at 512 px) is scaled to the image size. Its blend /
    attention points are SD 1.x block numbers; on another U-Net layout they are carried over by resolution:
    blend at the two deepest levels, mask cross-attention at every level but the full-resolution one (which
    the reference never masks either)."""
    config = get_preset(PAPER_PRESET[task])
    if config.grow:
        config = config.replace(grow=int(round(config.grow * model_image_size(pipe) / 512)))
    unet = pipe.feature_unet
    if not unet.sd1_layout:
        config = config.replace(blend_blocks=None, blend_levels=(-2, -1), attention_blocks=None,
                                attention_levels=tuple(range(1, unet.num_levels)))
    return config


def _variant(tasks=None, **changes) -> Callable[[str, object], EditConfig]:
    """The task's preset with ``changes`` (on ``tasks`` only, when given: elsewhere the preset itself, run once
    and reported as the same)."""
    return lambda task, pipe=None: default_config(task, pipe).replace(**(changes if tasks is None or task in tasks else {}))


def _sdedit(strength: float) -> Method:
    def run(pipe, images, steps, guidance, generator, paste_back=True):  # masked SDEdit always pastes back
        editor = baselines.masked_sdedit if _unet(pipe) else baselines.masked_flow_sdedit
        return editor(pipe, images.source, images.mask, images.case.target_caption, steps=steps,
                      strength=strength, guidance_scale=guidance, generator=generator)

    return Method(f"sdedit-{strength}", f"masked SDEdit from {strength:.0%} noise (on a flow: σ = {strength}), source "
                  "pixels pasted back outside the mask", run=run, settings={"strength": strength, "paste_back": True})


def _bld(pipe, images, steps, guidance, generator, paste_back=True):  # BLD has no paste-back
    return baselines.blended_latent_diffusion(pipe, images.source, images.mask, images.case.target_caption, steps=steps,
                                              guidance_scale=guidance, generator=generator)


def _diffedit(pipe, images, steps, guidance, generator, paste_back=True):
    case = images.case
    return baselines.diffedit(pipe, images.source, case.source_caption, case.target_caption, steps=steps,
                              guidance_scale=guidance, generator=generator, paste_back=paste_back)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("pfb", "PFB-Diff, the task's preset (object / attribute / background / multi-object)", config=default_config),
    Method("pfb-paper", "PFB-Diff, the official code's settings and quirks (paper-object / paper-background)",
           config=paper_config, applies=_sd1_blocks),
    Method("pfb-no-attn", "ablation: the task preset without attention masking", config=_variant(attention_masking=False)),
    Method("pfb-latent-only", "ablation: no feature blending (blend_blocks=()), latent blending and masking kept",
           config=_variant(blend_blocks=()), applies=_unet),
    Method("pfb-deep", "ablation: feature blending at the deepest level only (blend_levels=(-1,))",
           config=_variant(blend_blocks=None, blend_levels=(-1,)), applies=_unet),
    Method("pfb-deep-mid", "ablation: feature blending at the two deepest levels (blend_levels=(-2, -1))",
           config=_variant(blend_blocks=None, blend_levels=(-2, -1)), applies=_unet),
    *[Method(f"pfb-depth-{depth}", f"ablation (SD3 / Flux): the first {depth:.0%} of the blocks blended "
             f"(blend_depth={depth})", config=_variant(blend_depth=depth), applies=_flow)
      for depth in FLOW_BLEND_DEPTHS],
    Method("pfb-text-queries", "ablation (SD3 / Flux): a confined word's own text queries also see only its region "
           "(text_queries=True)", config=_variant(text_queries=True), applies=_flow),
    Method("pfb-fireflow", "ablation (SD3 / Flux): the photo inverted with FireFlow's second-order steps "
           "(flow_solver='fireflow') instead of Euler's", config=_variant(flow_solver="fireflow"), applies=_flow),
    Method("pfb-pooled-target", "ablation (SDXL, SD3): the edit's rows take the target prompt's pooled vector "
           "(pooled_from='target')", config=_variant(pooled_from="target"), applies=_pooled),
    Method("pfb-pooled-source", "ablation (SDXL, SD3): the edit's rows take the source prompt's pooled vector "
           "(pooled_from='source')", config=_variant(pooled_from="source"), applies=_pooled),
    Method("pfb-attn-no-top", "ablation: cross-attention masked at every level but the full-resolution one (the "
           "official code's choice; attention_levels=(1, 2, 3))", config=_variant(attention_levels=(1, 2, 3)),
           applies=_unet),
    Method("pfb-region-prompts", "ablation (multi-object): inside each object's mask, the attention to text reads "
           "the object's phrase alone as its prompt (own_region_prompts=True)",
           config=_variant(tasks=("multi-object",), own_region_prompts=True)),
    Method("bld-inverted", "baseline: latent blending with the inverted source at every step, no feature "
           "blending, no masking (the official code's baseline; BLD on the inverted trajectory)",
           config=_variant(**baselines.LATENT_BLENDING)),
    Method("bld", "baseline: Blended Latent Diffusion, forward-noised source blended after every step, start from noise",
           run=_bld, settings={"start": "forward-noised source at the first timestep", "blend": "every step, fresh noise"},
           applies=_unet),
    Method("flow-bld", "baseline (SD3 / Flux): Blended Latent Diffusion on the flow: from noise, the source carried "
           "to each σ with fresh noise blended in after every step", config=_variant(**baselines.FLOW_BLENDED_LATENTS),
           applies=_flow),
    Method("kv-edit-like", "baseline (SD3 / Flux): every block's image tokens blended, the source's pooled vector, "
           "the latent blend at every step (what KV-Edit keeps)", config=_variant(**baselines.KV_EDIT_LIKE),
           applies=_flow),
    *[_sdedit(s) for s in SDEDIT_STRENGTHS],
    Method("diffedit", "baseline: DiffEdit, automatic mask (3 copies at 50 % noise, clip 3.5x mean, threshold 0.5), "
           "empty-prompt DDIM inversion, latent blending every step", run=_diffedit,
           settings={"copies": 3, "noise_level": 0.5, "clip": 3.5, "threshold": 0.5, "encode_ratio": 1.0},
           applies=_unet),
]}


def select(names, choices, what: str) -> tuple[str, ...]:
    """Validated selection from ``choices`` (all when ``names`` is empty), in the order of ``choices``."""
    names = [n for name in names or [] for n in str(name).split(",") if n.strip()]
    names = [n.strip() for n in names]
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise PFBDiffError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(choices)}")
    return tuple(c for c in choices if not names or c in names)


def weights_fingerprint(pipe) -> str:
    """A short hash of the denoiser's weights (names, shapes and the first values of every tensor): a model retrained
    under the same name or folder is another model, and a run on it is not taken up as the earlier one's."""
    denoiser = pipe.unet if _unet(pipe) else pipe.transformer
    digest = hashlib.sha256()
    for name, tensor in denoiser.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_image_size(pipe) -> int:
    return pipe.native_side


def method_settings(method: Method, pipe) -> dict:
    """JSON description of a method: its settings per task (resolved block numbers for PFB-Diff runs)."""
    info = {"description": method.description, "kind": "pfb" if method.config else "baseline"}
    if method.config is None:
        info["settings"] = dict(method.settings or {})
        return info
    per_task = {}
    for task in TASKS:
        config = method.config(task, pipe)
        if _unet(pipe):
            blend = pipe.blend_plan(config).blend_points
            attention = config.attention_blocks
            if attention is None:
                attention = pipe.feature_unet.attention_blocks_at_levels(config.attention_levels)
        else:  # a flow transformer: the blend window, and word masking in every block
            blend = pipe.feature_transformer.window(config.blend_depth)
            attention = [block.index for block in pipe.feature_transformer.blocks]
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
        fields["inside"] = fields["outside"] = "per case: see words"
        fields["resolved_blend_blocks"] = sorted(blend)
        fields["resolved_attention_blocks"] = sorted(attention) if config.attention_masking else []
        per_task[task] = fields
    info["settings"] = per_task
    info["words"] = ("object / attribute: the new object's colour and shape words confined to its mask; background: "
                     "the kept objects' words confined outside the mask; multi-object: word_masks, each new "
                     "object's words confined to its own mask")
    return info


# --------------------------------------------------------------------------------------------- one case


def edit_arguments(images: CaseImages) -> dict:
    """Mask and confined words of a PFB-Diff edit: new objects inside their masks, kept objects outside."""
    case = images.case
    if case.task == "multi-object":
        return dict(mask_image=None, inside=(), outside=(),
                    word_masks={p: r.astype(np.float32) for p, r in zip(case.new_phrases, images.regions)})
    mask = images.mask.astype(np.float32)
    if case.task == "background":
        return dict(mask_image=mask, inside=(), outside=case.kept_phrases)
    return dict(mask_image=mask, inside=case.new_phrases, outside=())


def baseline_images(images: CaseImages) -> CaseImages:
    """The case as the baselines see it. On background cases their mask is snapped to the objects the way the
    ``background`` preset snaps PFB-Diff's (``halo.py``), so that every method edits the same region and the
    table compares methods, not masks. The metrics are always taken against the case's own mask."""
    if images.case.task != "background":
        return images
    snapped = absorb_halo(images.mask, images.source, get_preset(TASK_PRESET["background"]).halo) > 0.5
    return dataclasses.replace(images, mask=snapped, regions=(snapped,))


def score(images: CaseImages, image: np.ndarray, raw: np.ndarray | None = None) -> dict:
    """Every per-case metric of one result (``raw``: the output before paste-back, for fidelity)."""
    from pfbdiff.shapes.oracles import analyse

    analysis = analyse(image)
    result: dict = edit_success(images, image, analysis)
    result["success_raw"] = result["success"] if raw is None else edit_success(images, raw)["success"]
    result["failure"] = failure_cause(images, analysis, result)
    raw = image if raw is None else raw
    result["psnr_out"] = psnr(raw, images.source, images.kept)
    result["ssim_out"] = ssim(raw, images.source, images.kept)
    on_objects = [] if images.case.task == "background" else objects_in_mask(image, images.mask, analysis)
    result.update(coherence(image, images.background, images.mask, on_objects))
    result.update(seam_score(image, images.source, images.mask, reference=images.ideal))
    return result


class _Meter:
    """Denoiser passes, rows and wall time of a block of work."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        self.calls, self.rows, self.start = self.pipe.unet_calls, self.pipe.unet_evaluations, time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.calls = self.pipe.unet_calls - self.calls
        self.rows = self.pipe.unet_evaluations - self.rows
        self.seconds = time.perf_counter() - self.start


def run_case(pipe, images: CaseImages, methods, *, steps: int, guidance: float, keep_images: bool = False,
             paste_back: bool = True) -> dict:
    """Run every method (and the text-to-image reference) on one rendered case; per-method metrics.

    ``paste_back`` is passed to the pipeline's ``edit`` (PFB-Diff runs and DiffEdit): on, the result is the
    pipeline's composite into the source; the fidelity metrics always use the decode before it."""
    case = images.case

    def generator():
        return torch.Generator().manual_seed(case.seed)

    results, pictures, done = {}, {}, {}
    baseline_view = baseline_images(images)
    inversions = {}  # one inversion per way of inverting (a flow's solver), shared by the methods that use it

    def inverted(config):
        options = {k: v for k, v in pipe.inversion_options(config).items() if k != "record_blocks"}
        key = tuple(sorted(options.items()))
        if key not in inversions:
            with _Meter(pipe) as cost:
                inversions[key] = (pipe.invert(Image.fromarray(images.source), case.source_caption, steps,
                                               strength=1.0, **options), cost)
        return inversions[key]

    for name in methods:
        method = METHODS[name]
        extra = {}
        if method.config is not None:
            config = method.config(case.task, pipe)
            if config in done:  # identical settings (e.g. pfb-deep-mid is the preset's own levels): run once
                results[name] = {**results[done[config]], "same_as": done[config]}
                if keep_images:
                    pictures[name] = pictures[done[config]]
                continue
            done[config] = name
            inversion, inv_cost = inverted(config)
            with _Meter(pipe) as cost:
                out = baselines.pipeline_edit(pipe, inversion, prompt=case.target_caption, preset=config,
                                              guidance_scale=guidance, generator=generator(),
                                              paste_back=paste_back, **edit_arguments(images))
            share = edit_steps(inversion.inverted_steps, config.strength) / inversion.inverted_steps
            calls = cost.calls + round(inv_cost.calls * share)
            rows = cost.rows + round(inv_cost.rows * share)
            seconds = cost.seconds + inv_cost.seconds * share
        else:
            with _Meter(pipe) as cost:
                out = method.run(pipe, baseline_view, steps, guidance, generator(), paste_back=paste_back)
            calls, rows, seconds = cost.calls, cost.rows, cost.seconds
            if out.mask is not None:
                from pfbdiff.shapes.binary_masks import iou

                extra["auto_mask_iou"] = iou(out.mask, images.mask)
        metrics = score(images, out.image, out.raw)
        metrics.update(unet_calls=calls, unet_rows=rows, seconds=seconds, **extra)
        results[name] = metrics
        if keep_images:
            pictures[name] = out.image
    with _Meter(pipe) as t2i_cost:
        sample = pipe.text_to_image(case.target_caption, height=images.size, width=images.size, num_inference_steps=steps,
                                    guidance_scale=guidance, generator=generator()).images[0]
    t2i = text_to_image_success(case, np.asarray(sample))
    t2i.update(unet_calls=t2i_cost.calls, seconds=t2i_cost.seconds)
    if keep_images:
        pictures["t2i"] = np.asarray(sample)
    return {"results": results, "text_to_image": t2i, "images": pictures}


# --------------------------------------------------------------------------------------------- the bench


def run_shapesbench(pipe, *, tasks=TASKS, methods=None, cases: int = 20, steps: int = 50,
                    guidance: float = DEFAULT_GUIDANCE, out_dir=None, grid_cases: int = 4, model_name: str = "",
                    paste_back: bool = True, on_case: Callable | None = None, first_case: int = 0,
                    box_margin: int = BOX_MARGIN) -> dict:
    """Run ShapesBench on the cases ``first_case`` to ``first_case + cases - 1`` of each task (the bench's own are
    0-199; later ones serve for tuning and for checks on cases no setting saw); returns the JSON-ready result and, with ``out_dir``, writes the JSON, the markdown
    report and the image grid there (see :mod:`.report`). ``on_case(done, total, case_id)`` reports progress.

    The JSON is rewritten after every case, and a run with the same settings already in ``out_dir`` is taken up
    where it stopped: its finished cases are kept, except the grid's, which are run again for their pictures
    (the cases are seeded, so they come out the same). ``box_margin``: how far (pixels at 64 px) the object tasks'
    box masks reach past the object's bounding box."""
    from pfbdiff.bench import report

    tasks = select(tasks, TASKS, "task")
    every = not methods
    methods = select(methods, tuple(METHODS), "method")
    if every:
        methods = tuple(m for m in methods if METHODS[m].applies(pipe))
    if cases < 1 or steps < 1:
        raise PFBDiffError(f"cases and steps must be at least 1, got cases={cases}, steps={steps}")
    size = model_image_size(pipe)
    started = time.time()
    result = report.new_result(
        model=model_name, weights=weights_fingerprint(pipe), steps=steps, guidance=guidance, cases=cases, tasks=tasks,
        methods=methods, size=size, paste_back=paste_back, first_case=first_case, box_margin=box_margin,
        method_info={m: method_settings(METHODS[m], pipe) for m in methods},
    )
    earlier, earlier_seconds = report.take_up_earlier_run(out_dir, result) if out_dir is not None else ({}, 0.0)
    grid_rows = []
    total, done = cases * len(tasks), 0
    for task in tasks:
        for case in make_cases(task, cases, first_case):
            keep = case.index < first_case + grid_cases
            if case.id in earlier and not keep:
                result["cases"].append(earlier[case.id])
            else:
                images = render_case(case, size, box_margin)
                outcome = run_case(pipe, images, methods, steps=steps, guidance=guidance, keep_images=keep,
                                   paste_back=paste_back)
                result["cases"].append({**case.to_json(), "results": outcome["results"],
                                        "text_to_image": outcome["text_to_image"]})
                if keep:
                    grid_rows.append((case.id, images, outcome["images"]))
                if out_dir is not None:
                    report.write(report.finalise(result, earlier_seconds + time.time() - started), out_dir, [], methods)
            done += 1
            if on_case is not None:
                on_case(done, total, case.id)
        report.finalise(result, earlier_seconds + time.time() - started)
        if out_dir is not None:
            report.write(result, out_dir, grid_rows, methods)
    return result
