"""ShapesBench results: the JSON document, its aggregates with 95 % intervals, the markdown report, the grid.

JSON layout (``shapesbench.json``)::

    {
      "benchmark": "shapesbench", "version": 1,
      "config": {"model", "steps", "guidance", "cases_per_task", "tasks", "methods", "image_size", "paste_back",
                 "pfbdiff_version", "torch_threads", "started", "elapsed_s", ["parts"]},
      "methods": {name: {"kind": "pfb" | "baseline", "description", "settings", ["words"]}},
      "metrics": {name: {"kind": "proportion" | "mean", "better": "higher" | "lower", "description"}},
      "summary": {task: {"n": cases,
                         "text_to_image": {"target": AGG, "full": AGG, "unet_calls": AGG, "seconds": AGG},
                         "methods": {method: {metric: AGG}}}},
      "cases": [{"id", "task", "index", "seed", "source_caption", "target_caption", "edited", "mask_kind",
                 "held_out", "new_phrases", "kept_phrases", "objects",
                 "results": {method: {metric: value, ..., "unet_calls", "unet_rows", "seconds",
                                      ["same_as"], ["auto_mask_iou"]}},
                 "text_to_image": {"target", "full", "unet_calls", "seconds"}}]
    }

where ``AGG = {"mean", "lo", "hi", "n"}``: the mean (a proportion for yes/no metrics) and its 95 % interval
(Wilson for proportions, Student t for means). Non-finite values are written as ``null``.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pfbdiff.bench.cases import BOX_MARGIN
from pfbdiff.bench.metrics import PROPORTIONS, summarise
from pfbdiff.errors import PFBDiffError
from pfbdiff.shapes.world import SHAPES

METRICS: dict[str, tuple[str, str, str]] = {  # name: (kind, better, description)
    "success": ("proportion", "higher", "oracle: target present, old gone, others kept, background right"),
    "success_raw": ("proportion", "higher", "success of the output before any paste-back"),
    "target_present": ("proportion", "higher", "the new object(s) in their mask / the new background"),
    "old_gone": ("proportion", "higher", "no old object left in the mask / old background colour gone"),
    "others_kept": ("proportion", "higher", "untouched objects found in place (IoU >= 0.8)"),
    "background_ok": ("proportion", "higher", "object tasks: background unchanged; background task: as asked"),
    "count_ok": ("proportion", "higher", "as many objects as the target scene (not part of success)"),
    "psnr_out": ("mean", "higher", "PSNR (dB, capped at 100) of kept pixels vs the source, before paste-back"),
    "ssim_out": ("mean", "higher", "SSIM of kept pixels vs the source, before paste-back"),
    "coherence": ("mean", "higher", "share of in-mask, off-object pixels matching the true background"),
    "coherence_mae": ("mean", "lower", "mean abs error (0-255) of those pixels vs the true background"),
    "seam_ring": ("mean", "lower", "mean abs error (0-255) vs the ideal edit in the 3 px ring outside the mask"),
    "seam_grad": ("mean", "lower", "mean gradient-magnitude jump vs the ideal edit across the mask edge"),
    "unet_calls": ("mean", "lower", "U-Net forward passes (a batched guidance pass counts once)"),
    "unet_rows": ("mean", "lower", "U-Net rows evaluated (a batched guidance pass of one image counts 2)"),
    "seconds": ("mean", "lower", "wall time of the method (inversion share included)"),
    "auto_mask_iou": ("mean", "higher", "DiffEdit only: IoU of its automatic mask with the user mask"),
}
GRID_GAP, GRID_LABEL_HEIGHT = 2, 12  # px between tiles; px of the column-name row above them
TABLE_COLUMNS = (("success", "success %", 100, 0), ("success_raw", "raw success %", 100, 0),
                 ("target_present", "target %", 100, 0),
                 ("old_gone", "old gone %", 100, 0), ("others_kept", "kept %", 100, 0),
                 ("background_ok", "bg ok %", 100, 0), ("psnr_out", "PSNR out", 1, 1), ("ssim_out", "SSIM out", 1, 3),
                 ("coherence", "coherence", 1, 2), ("seam_ring", "seam ring", 1, 1), ("seam_grad", "seam grad", 1, 1),
                 ("unet_calls", "U-Net calls", 1, 0), ("seconds", "s", 1, 2))


def new_result(*, model, steps, guidance, cases, tasks, methods, size, method_info, paste_back=True,
               first_case=0, box_margin=BOX_MARGIN, weights=None) -> dict:
    import torch

    from pfbdiff import __version__

    return {
        "benchmark": "shapesbench", "version": 1,
        "config": {"model": model, "weights": weights, "steps": steps, "guidance": guidance, "cases_per_task": cases,
                   "first_case": first_case, "box_margin": box_margin, "tasks": list(tasks), "methods": list(methods), "image_size": size,
                   "paste_back": paste_back, "pfbdiff_version": __version__,
                   "torch_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "elapsed_s": 0.0},
        "methods": method_info,
        "metrics": {k: {"kind": kind, "better": better, "description": text} for k, (kind, better, text) in METRICS.items()},
        "summary": {},
        "cases": [],
    }


def finalise(result: dict, elapsed: float) -> dict:
    """Fill ``summary`` from ``cases`` (per task, per method, per metric; intervals at 95 %)."""
    result["config"]["elapsed_s"] = round(elapsed, 1)
    summary = {}
    for task in result["config"]["tasks"]:
        rows = [c for c in result["cases"] if c["task"] == task]
        if not rows:
            continue
        t2i = {key: summarise([c["text_to_image"][key] for c in rows], key in ("target", "full"))
               for key in ("target", "full", "unet_calls", "seconds")}
        per_method = {}
        for method in result["config"]["methods"]:
            values = [c["results"][method] for c in rows if method in c["results"]]
            keys = [k for k in METRICS if any(k in v for v in values)]
            per_method[method] = {k: summarise([v.get(k) for v in values], k in PROPORTIONS) for k in keys}
        failures = {method: dict(Counter(c["results"][method]["failure"] for c in rows
                                         if c["results"].get(method, {}).get("failure")))
                    for method in result["config"]["methods"]
                    if any("failure" in c["results"].get(method, {}) for c in rows)}  # diagnosed runs only
        summary[task] = {"n": len(rows), "text_to_image": t2i, "methods": per_method, "failures": failures}
    result["summary"] = summary
    return result


def _clean(value):
    """JSON-safe copy: non-finite floats become None, numpy scalars plain Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def output_paths(out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    return {"json": out / "shapesbench.json", "markdown": out / "shapesbench.md", "grid": out / "shapesbench_grid.png"}


def write(result: dict, out_dir, grid_rows, methods) -> dict[str, Path]:
    """Write ``shapesbench.json``, ``shapesbench.md`` and ``shapesbench_grid.png`` into ``out_dir``."""
    return _write(result, out_dir, image_grid(grid_rows, methods) if grid_rows else None)


def _write(result: dict, out_dir, grid: Image.Image | None) -> dict[str, Path]:
    paths = output_paths(out_dir)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(_clean(result), indent=1) + "\n")
    paths["markdown"].write_text(format_markdown(result))
    if grid is not None:
        grid.save(paths["grid"])
    return paths


# --------------------------------------------------------------------------------------------- parts


MERGE_KEYS = ("model", "weights", "steps", "guidance", "cases_per_task", "first_case", "box_margin", "methods",
              "image_size", "paste_back")
SETTING_DEFAULTS = {"first_case": 0, "box_margin": BOX_MARGIN}  # what a run recorded before the setting existed used


def _differing_settings(config: dict, other: dict, keys) -> list[str]:
    return [key for key in keys
            if config.get(key, SETTING_DEFAULTS.get(key)) != other.get(key, SETTING_DEFAULTS.get(key))]


def take_up_earlier_run(out_dir, fresh: dict) -> tuple[dict[str, dict], float]:
    """Continue a run of the same bench already in ``out_dir``: ``fresh`` takes its start time, and its finished
    cases (by id) and elapsed seconds are returned, so an interrupted run goes on where it stopped. A run with
    other settings there is an error, not overwritten."""
    path = output_paths(out_dir)["json"]
    if not path.is_file():
        return {}, 0.0
    earlier = json.loads(path.read_text())
    config = earlier.get("config", {})
    differ = _differing_settings(config, fresh["config"], (*MERGE_KEYS, "tasks"))
    if earlier.get("methods") != json.loads(json.dumps(fresh["methods"])):  # a preset changed since
        differ.append("method settings")
    if differ:
        raise PFBDiffError(f"{out_dir} holds a ShapesBench run with other {', '.join(differ)}; give another --out, "
                           "or delete that folder to start again")
    fresh["config"]["started"] = config.get("started", fresh["config"]["started"])
    return {case["id"]: case for case in earlier.get("cases", [])}, float(config.get("elapsed_s") or 0.0)


def merge(results: list[dict]) -> dict:
    """One result from runs of the same bench on different tasks: a full run split into parts that run side by
    side (``--tasks``), on one machine or several. Summaries are recomputed from the cases; the wall time is the
    longest part's."""
    if not results:
        raise PFBDiffError("nothing to merge: give the result folders of two or more parts")
    first = results[0]["config"]
    for other in results[1:]:
        differ = _differing_settings(other["config"], first, MERGE_KEYS)
        if differ:
            raise PFBDiffError(f"the parts differ in {', '.join(differ)}; run every part with the same settings")
    tasks = [task for result in results for task in result["config"]["tasks"]]
    repeated = sorted({task for task in tasks if tasks.count(task) > 1})
    if repeated:
        raise PFBDiffError(f"task {', '.join(repeated)} is in more than one part; give each part its own --tasks")
    merged = {**results[0], "config": {**first, "tasks": tasks, "parts": len(results)},
              "cases": [case for result in results for case in result["cases"]]}
    return finalise(merged, max(result["config"]["elapsed_s"] for result in results))


def stack_grids(grids: list[Image.Image], label_height: int = GRID_LABEL_HEIGHT, gap: int = GRID_GAP) -> Image.Image:
    """The parts' image grids (drawn by :func:`image_grid`) one below the other, with the column names once."""
    if len({grid.width for grid in grids}) > 1:
        raise PFBDiffError("the parts' grids differ in width (different methods); run every part with the same --methods")
    bodies = [grid.crop((0, label_height + gap, grid.width, grid.height)) for grid in grids[1:]]
    canvas = Image.new("RGB", (grids[0].width, grids[0].height + sum(b.height for b in bodies)), (255, 255, 255))
    canvas.paste(grids[0], (0, 0))
    top = grids[0].height
    for body in bodies:
        canvas.paste(body, (0, top))
        top += body.height
    return canvas


def merge_folders(part_dirs, out_dir) -> dict:
    """``merge`` of the parts' ``shapesbench.json`` files and ``stack_grids`` of their grids, written to
    ``out_dir`` (which must not be one of the parts)."""
    out = Path(out_dir).resolve()
    results, grids = [], []
    for part in part_dirs:
        paths = output_paths(part)
        if Path(part).resolve() == out:
            raise PFBDiffError(f"--out {out_dir} is one of the parts; give a new folder so no part is overwritten")
        if not paths["json"].is_file():
            raise PFBDiffError(f"{paths['json']} is missing: is {part} a finished `pfbdiff bench shapes` folder?")
        results.append(json.loads(paths["json"].read_text()))
        if paths["grid"].is_file():
            grids.append(Image.open(paths["grid"]).convert("RGB"))
    merged = merge(results)
    _write(merged, out, stack_grids(grids) if grids else None)
    return merged


# --------------------------------------------------------------------------------------------- markdown


def _fmt(agg: dict | None, scale: float, digits: int, interval: bool = True) -> str:
    if not agg or agg.get("n", 0) == 0 or agg["mean"] is None or not math.isfinite(agg["mean"]):
        return "–"
    mean = f"{agg['mean'] * scale:.{digits}f}"
    if not interval or agg["n"] < 2:
        return mean
    return f"{mean} [{agg['lo'] * scale:.{digits}f}, {agg['hi'] * scale:.{digits}f}]"


def _parallelism(config: dict) -> str:
    threads = f"{config['torch_threads']} torch thread{'s' if config['torch_threads'] != 1 else ''}"
    parts = config.get("parts", 1)
    return f"{parts} parts side by side, {threads} each" if parts > 1 else threads


def format_markdown(result: dict) -> str:
    config, summary = result["config"], result["summary"]
    tasks = [t for t in config["tasks"] if t in summary]
    lines = [
        "# ShapesBench", "",
        f"Model `{config['model']}`, {config['steps']} DDIM steps, guidance {config['guidance']}, "
        f"{config['image_size']} px, {config['cases_per_task']} cases per task, {config['elapsed_s']:.0f} s "
        f"({_parallelism(config)}), started {config['started']}.", "",
        "## Edit success (% of cases, 95 % Wilson interval)", "",
        "The first row is the model's own text-to-image accuracy on the same target captions (is the new object, "
        "or the new background, in a fresh sample at all?): an edit method can hardly beat it by much, so read "
        "each method against it.", "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| *text-to-image (target shown)* | " + " | ".join(_fmt(summary[t]["text_to_image"]["target"], 100, 0) for t in tasks) + " |",
        "| *text-to-image (whole caption right)* | " + " | ".join(_fmt(summary[t]["text_to_image"]["full"], 100, 0) for t in tasks) + " |",
    ]
    for method in config["methods"]:
        cells = [_fmt(summary[t]["methods"].get(method, {}).get("success"), 100, 0) for t in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for task in tasks:
        block = summary[task]
        lines += ["", f"## {task} (n = {block['n']})", "",
                  "Means with 95 % intervals (Wilson for %, Student t otherwise). PSNR / SSIM: kept pixels against "
                  "the source before any paste-back; coherence: in-mask background matches the truth (higher is "
                  "better); seams: 0–255 error vs the ideal edit at the mask edge (lower is better).", "",
                  "| method | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
                  "|---|" + "---|" * len(TABLE_COLUMNS)]
        t2i = block["text_to_image"]
        lines.append("| *text-to-image* | " + _fmt(t2i["target"], 100, 0) + " | " + " | ".join("" for _ in TABLE_COLUMNS[1:-2])
                     + f" | {_fmt(t2i['unet_calls'], 1, 0, False)} | {_fmt(t2i['seconds'], 1, 2, False)} |")
        for method in config["methods"]:
            metrics = block["methods"].get(method, {})
            cells = [_fmt(metrics.get(key), scale, digits, interval=key not in ("unet_calls", "seconds"))
                     for key, _, scale, digits in TABLE_COLUMNS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += failure_section(result, tasks)
    lines += shape_section(result, tasks)
    lines += ["", "## Methods", ""]
    for method in config["methods"]:
        lines.append(f"* **{method}**: {result['methods'][method]['description']}")
    lines += ["", "Grid (`shapesbench_grid.png`): rows are cases; columns: source | mask | ideal edit | each method "
              "| text-to-image sample of the target caption.", ""]
    return "\n".join(lines)


def failure_section(result: dict, tasks) -> list[str]:
    """Failed cases by cause (:mod:`.diagnosis`), per task and method: what went wrong, not only how often."""
    from pfbdiff.bench.diagnosis import causes_of

    lines = ["", "## Failures by cause (cases)", "",
             "Each failed case counted once, under the first cause that applies (`bench/diagnosis.py`); methods "
             "whose results were recorded before the diagnosis existed are left out."]
    for task in tasks:
        failures = result["summary"][task].get("failures") or {}
        causes = [c for c in causes_of(task) if any(c in f for f in failures.values())]
        if not causes:
            continue
        lines += ["", f"**{task}**", "", "| method | " + " | ".join(causes) + " |", "|---|" + "---|" * len(causes)]
        for method in (m for m in result["config"]["methods"] if m in failures):
            counts = failures[method]
            lines.append(f"| {method} | " + " | ".join(str(counts.get(c, 0)) for c in causes) + " |")
    return lines


def shape_section(result: dict, tasks) -> list[str]:
    """Single-object edits counted by the shape asked for and on the held-out combinations (a colour and shape the
    model never saw together in training), beside text-to-image on the same captions: where an edit method falls
    short of what the model draws, not only by how much."""
    cases = [c for c in result.get("cases", ()) if len(c["new_phrases"]) == 1]
    lines = []
    for task in (t for t in tasks if t != "background"):
        rows = [c for c in cases if c["task"] == task]
        by_shape = [(shape, [c for c in rows if c["new_phrases"][0].split()[-1] == shape]) for shape in SHAPES]
        held_out = [(f"held-out {shape}", [c for c in group if c["held_out"]]) for shape, group in by_shape]
        groups = [(name, group) for name, group in by_shape + held_out if group]
        if not groups:
            continue
        lines += ["", f"**{task}**", "", "| method | " + " | ".join(f"{name} (of {len(group)})" for name, group in groups)
                  + " |", "|---|" + "---|" * len(groups),
                  "| *text-to-image* | " + " | ".join(str(sum(bool(c["text_to_image"]["target"]) for c in group))
                                                      for _, group in groups) + " |"]
        for method in (m for m in result["config"]["methods"] if all(m in c["results"] for c in rows)):
            lines.append(f"| {method} | " + " | ".join(str(sum(bool(c["results"][method]["success"]) for c in group))
                                                        for _, group in groups) + " |")
    if not lines:
        return []
    return ["", "## Single-object successes by the shape asked for (cases)", "",
            "Successes among the cases whose new object is a circle, a square or a triangle, then among those of them "
            "that ask for a held-out combination (a colour and shape the model never saw together in training); "
            "text-to-image: the new object drawn anywhere in a fresh sample of the same caption."] + lines


def success_section(result: dict) -> str:
    """The edit-success table of the markdown report (with its heading), for printing."""
    text = format_markdown(result)
    start = text.index("## Edit success")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None].rstrip() + "\n"


# --------------------------------------------------------------------------------------------- grid


def image_grid(rows, methods, gap: int = GRID_GAP, label_height: int = GRID_LABEL_HEIGHT) -> Image.Image:
    """Rows = cases; columns: source | mask | ideal | each method | t2i, with a header of column names."""
    columns = ["source", "mask", "ideal", *methods, "t2i"]
    size = rows[0][1].size
    width = len(columns) * (size + gap) + gap
    height = label_height + len(rows) * (size + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, name in enumerate(columns):
        draw.text((gap + j * (size + gap), 0), name[: max(3, size // 6)], fill=(0, 0, 0), font=font)
    for i, (_, images, pictures) in enumerate(rows):
        mask_rgb = np.repeat((images.mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
        tiles = {"source": images.source, "mask": mask_rgb, "ideal": images.ideal, **pictures}
        for j, name in enumerate(columns):
            tile = tiles.get(name)
            if tile is None:
                continue
            canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)), (gap + j * (size + gap), label_height + gap + i * (size + gap)))
    return canvas
