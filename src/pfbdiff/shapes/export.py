"""Export of the trained ShapesWorld model: the EMA weights as a diffusers Stable Diffusion folder and its card.

:func:`export_model` writes ``unet``, ``text_encoder``, ``tokenizer``, ``vae`` and ``scheduler`` sub-folders
(fp16 safetensors on disk, fp32 configs), ``model_index.json`` and ``training.json`` (what was trained, how long,
the last quick evaluation, and a full evaluation kept from an earlier export of the same weights), then
:func:`write_model_card` writes ``model_card.md`` next to the folder from that ``training.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import torch

from pfbdiff.models.catalog import RECOMMENDED_FILE
from pfbdiff.shapes.training_loop import hardware, log, replace_folder
from pfbdiff.shapes.training_setup import (
    FLOW_T5_WIDTH,
    FLOW_TEXT_LENGTH,
    TRAINED,
    build_unet_stage,
    count_parameters,
    load_vae,
    trained_modules,
    transformer_config,
    unet_config,
    vae_config,
)
from pfbdiff.shapes.world import HELD_OUT_BACKGROUNDS, HELD_OUT_OBJECTS

#: The steps a ShapesWorld model recommends: those ShapesBench runs every method with.
RECOMMENDED_STEPS = 20


def ema_components(out: Path, seed: int, ema_shadow=None, family: str = "sd1") -> dict:
    """Components with the EMA weights of the checkpoint (or of ``ema_shadow``), in eval mode, fp32."""
    components = build_unet_stage(out, seed, family)
    if ema_shadow is None:
        ema_shadow = torch.load(out / "unet_checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
    modules = trained_modules(components)
    targets = [p for m in modules for p in m.parameters()]
    with torch.no_grad():
        for target, value in zip(targets, ema_shadow, strict=True):
            target.copy_(value)
    components["vae"] = load_vae(out)
    for module in (*modules, components["vae"]):
        module.eval().requires_grad_(False)
    return components


def export_model(out: Path, export_dir: Path, args=None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the EMA model as a diffusers StableDiffusionPipeline folder (safetensors, ``dtype`` on disk).

    The weights are stored in ``dtype`` but every config keeps fp32 as the default dtype, so a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` loads everything in fp32 on the CPU.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    seed = args.seed if args is not None else 0
    family = getattr(args, "family", "sd1")
    components = ema_components(out, seed, family=family)
    if family == "sdxl":  # trained with empty captions encoded, so the unconditional rows are not zeros
        pipeline = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=False)
    elif family == "sd3":
        pipeline = StableDiffusion3Pipeline(**components)
    else:
        pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    for weights in tmp.glob("*/*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    state = torch.load(out / "unet_checkpoint.pt", map_location="cpu", weights_only=True)
    vae_info = json.loads((out / "vae" / "training.json").read_text())
    phases = unet_phases(out, state)
    warm_start = out / "warm_start.json"
    info = {
        "family": family,
        "warm_start": json.loads(warm_start.read_text()) if warm_start.exists() else None,
        "unet_steps": state["step"],
        "unet_batch_size": args.batch if args is not None else None,
        "unet_seconds": round(state["elapsed"], 1),
        "unet_cpu_seconds": round(state.get("cpu_seconds", 0.0), 1) or None,
        "vae": vae_info,
        "parameters": {name: count_parameters(components[name])
                       for name in (*TRAINED, "vae") if name in components},
        "hardware": " + ".join(dict.fromkeys(p["hardware"] for p in phases if p.get("hardware"))) or hardware(),
        "quick_eval": _last_row(out / "unet_eval.csv", max_step=state["step"]),
        "unet_phases": phases,
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    previous = export_dir / "training.json"
    if previous.exists():  # keep a full evaluation if it was made on these very weights
        old = json.loads(previous.read_text())
        if old.get("unet_steps") == info["unet_steps"] and "evaluation" in old:
            info["evaluation"] = old["evaluation"]
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    recommended = {"num_inference_steps": RECOMMENDED_STEPS, "guidance_scale": getattr(args, "guidance", 4.0)}
    (tmp / RECOMMENDED_FILE).write_text(json.dumps(recommended) + "\n")  # what the model is evaluated with
    replace_folder(tmp, export_dir)
    write_model_card(export_dir)
    log(f"exported EMA model at step {state['step']} to {export_dir} ({folder_size(export_dir) / 1e6:.1f} MB)")
    return export_dir


def unet_phases(out: Path, state: dict) -> list[dict]:
    """The U-Net training's phases: those of the model a run started from (``--init-from``), then this run's
    settings (from ``<out>/args_unet.json``) over its steps."""
    earlier = out / "unet_phases.json"
    phases = json.loads(earlier.read_text()) if earlier.exists() else []
    args_file = out / "args_unet.json"
    if args_file.exists():
        args = json.loads(args_file.read_text())
        phases.append({"steps": [state.get("warmup_from", 0), state["step"]], "batch": args["batch"],
                       "lr": args["lr"], "warmup": args["warmup"], "decay_until": args.get("decay_until"),
                       "object_weight": args.get("object_weight", 0.0), "hardware": args.get("hardware")})
    return phases


def _phase_text(phase: dict) -> str:
    first, last = phase["steps"]
    parts = [f"steps {first}-{last}: batch {phase['batch']}"]
    if "lr" in phase:
        schedule = (f"cosine decay to 10 % at step {phase['decay_until']}" if phase.get("decay_until")
                    else "then constant")
        parts.append(f"learning rate {phase['lr']:g} ({phase['warmup']} warm-up steps, {schedule})")
    if phase.get("object_weight"):
        parts.append(f"loss weight 1 + {phase['object_weight']:g} x the object share of each latent pixel")
    if phase.get("hardware"):
        parts.append(f"on {phase['hardware']}")
    return "; ".join(parts)


def _last_row(path: Path, max_step: int | None = None) -> dict | None:
    """The last CSV row (with ``step`` at most ``max_step``, if given), or None."""
    if not path.exists():
        return None
    with path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if max_step is None or int(r["step"]) <= max_step]
    return rows[-1] if rows else None


def folder_size(folder: Path) -> int:
    """Total size in bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_model_card(model_dir: Path, card_path: Path | None = None) -> Path:
    """Write ``model_card.md`` (next to the model folder unless ``card_path``) from ``<model_dir>/training.json``."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    card_path = Path(card_path) if card_path else model_dir.parent / f"{model_dir.name}_card.md"
    vae = info["vae"]
    params = info["parameters"]
    family = info.get("family", "sd1")
    sdxl = family == "sdxl"
    lines = [
        {"sdxl": "# ShapesWorld text-to-image model, SDXL layout",
         "sd3": "# ShapesWorld text-to-image model, SD3 layout (a flow-matching transformer)"}.get(
            family, "# ShapesWorld text-to-image model (bundled with pfbdiff)"),
        "",
        ("A small flow-matching transformer with SD3's component types and layout (`AutoencoderKL`, two "
         "`CLIPTextModelWithProjection`s and a `T5EncoderModel` with their tokenizers, `SD3Transformer2DModel`, "
         "`FlowMatchEulerDiscreteScheduler`), so that PFB-Diff on SD3 and Flux's kind of model can be scored "
         "without downloading either. " if family == "sd3" else
         "A small latent diffusion model with SDXL's component types and layout (`AutoencoderKL`, `CLIPTextModel` + "
         "`CLIPTextModelWithProjection` with their `CLIPTokenizer`s, `UNet2DConditionModel` with the pooled vector "
         "and size ids, `DDIMScheduler`), so that PFB-Diff on SDXL can be scored without downloading SDXL. "
         if sdxl else
         "A small latent diffusion model with exactly Stable Diffusion's component types (`AutoencoderKL`, "
         "`CLIPTextModel` + `CLIPTokenizer`, `UNet2DConditionModel`, `DDIMScheduler`), trained from scratch "
         "(hardware below) so that the PFB-Diff editing code can be run and scored without downloading Stable "
         "Diffusion. ")
        + f"Folder: `{model_dir.name}/` (diffusers layout, fp16 safetensors on disk, configs default to fp32).",
        "",
        "## Data",
        "",
        "ShapesWorld (`pfbdiff.shapes.world`): 64 x 64 RGB scenes of one or two solid shapes (circle, square, "
        "triangle; 6 colours) on a plain, striped or checkered background of another colour, with captions such "
        "as `a red circle and a green square on a plain yellow background`. Scenes are rendered on the fly from "
        "the `train` split, which never contains the held-out combinations "
        f"(objects {', '.join(' '.join(p) for p in HELD_OUT_OBJECTS)}; backgrounds "
        f"{', '.join(' '.join(p) for p in HELD_OUT_BACKGROUNDS)}).",
        "",
        "## Components",
        "",
        f"* VAE: `AutoencoderKL`, block_out_channels {list(vae_config()['block_out_channels'])}, downscale factor 4 "
        f"(64 x 64 x 3 -> 16 x 16 x 4), {params['vae'] / 1e6:.2f}M parameters, scaling_factor "
        f"{vae['scaling_factor']} (1 / measured latent std).",
        *_component_lines(params, family),
        "* Scheduler: `FlowMatchEulerDiscreteScheduler`, no shift." if family == "sd3" else
        "* Scheduler: `DDIMScheduler`, SD's scaled-linear betas rescaled to zero terminal SNR, v-prediction, "
        "trailing timestep spacing.",
        "",
        "## Training",
        "",
        f"* VAE: {vae['steps']} steps of batch {vae['batch_size']} ({vae['seconds'] / 60:.1f} min); L1 + L2 + "
        "image-gradient L1 + 1e-5 KL; AdamW, cosine decay.",
        *_warm_start_lines(info.get("warm_start"), family),
        f"* {'Transformer' if family == 'sd3' else 'U-Net'} + text encoder{'' if family == 'sd1' else 's'} "
        f"(jointly, {'from the model above' if info.get('warm_start') else 'from scratch'}): {info['unet_steps']} "
        f"steps ({info['unet_seconds'] / 60:.1f} min; batch sizes by phase below); "
        + ("rectified flow (velocity ε − x₀ at logit-normal σ)" if family == "sd3" else
           "v-prediction, min-SNR-5 weights (for v: min(snr + 1, 5) / (snr + 1))")
        + ", AdamW with warm-up, 10 % empty captions, EMA weights exported.",
        *[f"  * {_phase_text(phase)}." for phase in info.get("unet_phases", [])],
        f"* Hardware: {info['hardware']}. Script: `python -m pfbdiff.shapes.train` (see its docstring).",
        "",
        "## Scores",
        "",
        f"* VAE reconstruction PSNR on 256 rendered scenes: mean {vae['psnr_mean']:.2f} dB "
        f"(median {vae['psnr_median']:.2f}, min {vae['psnr_min']:.2f}).",
    ]
    quick = info.get("quick_eval")
    if quick:
        # A quick check on very few captions may lack a group's score (an absent or empty CSV cell).
        scores = [f"{label} fully right {float(quick[key]):.0%}"
                  for key, label in (("single_full", "single-object"), ("two_full", "two-object")) if quick.get(key)]
        lines.append(f"* Quick check during training (step {quick['step']}, {quick['captions']} captions, "
                     f"{quick['ddim_steps']} DDIM steps): {', '.join(scores) or 'no scores'}.")
    evaluation = info.get("evaluation")
    if evaluation:
        lines.append(f"* `python -m pfbdiff.shapes.evaluate` ({evaluation['captions']} captions, half with held-out "
                     f"combinations, {evaluation['steps']} DDIM steps, CFG {evaluation['guidance']}): single-object "
                     f"fully right {evaluation['single_full']:.1%} (held-out {evaluation['single_heldout_full']:.1%}), "
                     f"two-object fully right {evaluation['two_full']:.1%} (held-out "
                     f"{evaluation['two_heldout_full']:.1%}); background colour {evaluation['all_background']:.1%}, "
                     f"pattern {evaluation['all_pattern']:.1%}"
                     + (f"; run on {evaluation['hardware']}." if evaluation.get("hardware") else "."))
    else:
        lines.append("* Full evaluation: not yet run on these weights (`python -m pfbdiff.shapes.evaluate --card`).")
    lines += ["", *quality_bar_section(vae["psnr_mean"], evaluation, info.get("family", "sd1")), "",
              f"Exported {info['exported']}.", ""]
    card_path.write_text("\n".join(lines))
    return card_path


def _component_lines(params: dict, family: str) -> list[str]:
    tokenizer = "tokenizer: CLIP BPE in which every ShapesWorld word is one token, max length 77"
    if family == "sd3":
        layout = transformer_config()
        return [f"* Text encoders: `CLIPTextModelWithProjection`, hidden 128, 3 layers, "
                f"{params['text_encoder'] / 1e6:.2f}M parameters; `CLIPTextModelWithProjection`, hidden 64, 2 layers, "
                f"{params['text_encoder_2'] / 1e6:.2f}M; both on one CLIP BPE tokenizer (every ShapesWorld word one "
                f"token, {FLOW_TEXT_LENGTH} tokens); `T5EncoderModel`, d_model {FLOW_T5_WIDTH}, 2 layers, "
                f"{params['text_encoder_3'] / 1e6:.2f}M, on a SentencePiece-style tokenizer ({FLOW_TEXT_LENGTH} "
                "tokens).",
                f"* Transformer: `SD3Transformer2DModel`, {layout['num_layers']} joint blocks of width "
                f"{layout['num_attention_heads'] * layout['attention_head_dim']}, patch 2 (8 x 8 tokens), "
                f"{params['transformer'] / 1e6:.2f}M parameters."]
    if family == "sdxl":
        return [f"* Text encoders: `CLIPTextModel`, hidden 128, 4 layers (the penultimate is read), 4 heads, "
                f"{params['text_encoder'] / 1e6:.2f}M parameters; `CLIPTextModelWithProjection`, hidden 64, 2 layers, "
                f"{params['text_encoder_2'] / 1e6:.2f}M parameters (its pooled vector goes to the U-Net); both on one "
                f"{tokenizer}.",
                f"* U-Net: `UNet2DConditionModel`, block_out_channels {list(unet_config()['block_out_channels'])}, "
                "DownBlock2D + CrossAttnDownBlock2D x2, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D x2 + UpBlock2D "
                "(SDXL's: no cross-attention at the top level), linear projections, `text_time` added conditioning "
                f"(pooled vector and six size ids), {params['unet'] / 1e6:.2f}M parameters."]
    return [f"* Text encoder: `CLIPTextModel`, hidden 128, 3 layers, 4 heads, {params['text_encoder'] / 1e6:.2f}M "
            f"parameters; {tokenizer}.",
            f"* U-Net: `UNet2DConditionModel`, block_out_channels {list(unet_config()['block_out_channels'])}, "
            "CrossAttnDownBlock2D x2 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x2, "
            f"layers_per_block {unet_config()['layers_per_block']}, {params['unet'] / 1e6:.2f}M parameters."]


def _warm_start_lines(warm_start: dict | None, family: str) -> list[str]:
    if not warm_start:
        return []
    if family == "sd3":
        return [f"* Warm start: the first CLIP from the SD-1-layout ShapesWorld model `{Path(warm_start['from']).name}/`'s "
                f"text encoder ({warm_start['unet_steps']} steps on {warm_start['hardware']}; its first "
                f"{FLOW_TEXT_LENGTH} positions); the transformer, the second CLIP and T5 from scratch "
                "(`training_setup.warm_start_sd3_from_sd1`)."]
    return [f"* Warm start: from the SD-1-layout ShapesWorld model `{Path(warm_start['from']).name}/` "
            f"({warm_start['unet_steps']} steps on {warm_start['hardware']}): what both layouts share was copied "
            "(first text encoder, U-Net convolutions and resnets, the 8 x 8 and mid-block attention); SDXL's "
            "additions (second text encoder, pooled/size embedding, 4 x 4 attention) started as no-ops "
            "(`training_setup.warm_start_from_sd1`)."]


#: The quality the bundled model is meant to reach (single-object and two-object captions fully right, VAE PSNR).
QUALITY_BAR = {"single_full": 0.90, "two_full": 0.70, "vae_psnr": 30.0}
#: The SDXL- and SD3-layout models' bar (they share the bundled model's VAE): single-object captions fully right.
SDXL_QUALITY_BAR = {"single_full": 0.85}


def quality_bar_section(vae_psnr: float, evaluation: dict | None, family: str = "sd1") -> list[str]:
    """The card's verdict against :data:`QUALITY_BAR`, and what would close the gap when it is missed."""
    lines = ["## Quality bar", ""]
    if not evaluation:
        return lines + ["Not judged yet: run the full evaluation."]
    if family in ("sdxl", "sd3"):
        bar, value = SDXL_QUALITY_BAR["single_full"], evaluation["single_full"]
        lines += [f"* single-object captions fully right: {value:.0%} (bar {bar:.0%}): "
                  f"{'met' if value >= bar else '**not met**'}; two-object captions fully right: "
                  f"{evaluation['two_full']:.0%} (no bar)."]
        if family == "sd3" and value < bar:
            lines += ["", "The transformer learns backgrounds first and shapes last. The way to the bar is more steps of "
                      "the same recipe, continued from this folder (`python -m pfbdiff.shapes.train --family sd3 "
                      "--init-from src/pfbdiff/shapes/model_sd3 --object-weight 3 --decay-until <end>`; on a GPU "
                      "`--device cuda --workers 14 --batch 128`)."]
        return lines
    checks = [("single-object captions fully right", evaluation["single_full"], QUALITY_BAR["single_full"], "{:.0%}"),
              ("two-object captions fully right", evaluation["two_full"], QUALITY_BAR["two_full"], "{:.0%}"),
              ("VAE reconstruction PSNR", vae_psnr, QUALITY_BAR["vae_psnr"], "{:.2f} dB")]
    for name, value, bar, form in checks:
        verdict = "met" if value >= bar else "**not met**"
        lines.append(f"* {name}: {form.format(value)} (bar {form.format(bar)}): {verdict}.")
    if evaluation["single_full"] < QUALITY_BAR["single_full"] or evaluation["two_full"] < QUALITY_BAR["two_full"]:
        measured = [f"background colour {evaluation['all_background']:.0%}, pattern {evaluation['all_pattern']:.0%}"]
        if "single_colours" in evaluation:  # a tiny evaluation may have no single- or no two-object caption
            measured.append(f"single objects: colour {evaluation['single_colours']:.0%}, shape "
                            f"{evaluation['single_shapes']:.0%}")
        if "two_count" in evaluation:
            measured.append(f"two-object captions: two objects drawn in {evaluation['two_count']:.0%}, both right "
                            f"in {evaluation['two_objects']:.0%}")
        lines += ["", f"Where it falls short ({'; '.join(measured)}): shapes, and drawing two objects. "
                  "The way to the bar is more U-Net steps of the same recipe, continued from this folder "
                  "(`--init-from`, with `--object-weight` and a `--decay-until` at the new end; on a GPU "
                  "`--device cuda --workers 14 --batch 128`, about 11 steps a second on an H200). For scale: "
                  "6,569 such GPU steps (9.5 min) after 4,397 CPU steps of batch 48 raised two-object captions "
                  "from 24 % to 62 % and single-object ones from 81 % to 91 %; an estimated 10,000-20,000 more "
                  "(15-30 min on one GPU) should reach the bar. If two objects still fall short, the U-Net's "
                  "capacity (one layer per block) is next."]
    return lines
