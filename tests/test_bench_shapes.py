"""ShapesBench (pfbdiff.bench: cases, metrics, baselines, runner, report, CLI) on rendered scenes and the tiny model."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.bench import baselines, metrics, report, shapes
from pfbdiff.bench import cases as bench_cases
from pfbdiff.bench.cases import TASKS, make_case, make_cases, render_case
from pfbdiff.engine.presets import get_preset
from pfbdiff.errors import PFBDiffError
from pfbdiff.models import catalog
from pfbdiff.shapes.binary_masks import dilate
from pfbdiff.shapes.oracles import object_kept
from pfbdiff.shapes.world import render, sample_scene

TINY_SIZE = 128  # the tiny model's image side


@pytest.fixture(scope="module")
def first_cases():
    return {task: make_cases(task, 6) for task in TASKS}


# --- cases -------------------------------------------------------------------------------------------------


def test_cases_are_deterministic_and_do_not_depend_on_the_count(first_cases):
    again = make_cases("object", 3)
    assert again == first_cases["object"][:3]
    assert make_case("background", 4) == first_cases["background"][4]
    a, b = render_case(again[1], 64), render_case(first_cases["object"][1], 64)
    assert np.array_equal(a.source, b.source) and np.array_equal(a.mask, b.mask) and np.array_equal(a.ideal, b.ideal)
    assert len({c.seed for task in TASKS for c in first_cases[task]}) == 6 * len(TASKS)


def test_case_seeds_are_disjoint_from_training_and_evaluation(first_cases):
    from pfbdiff.shapes.evaluate import EVAL_SCENE_TAG, PSNR_SCENE_TAG
    from pfbdiff.shapes.training_setup import STAGE_CODES

    def stream(entropy):
        return tuple(np.random.default_rng(entropy).integers(0, 2**31, 4))

    # numpy pads entropy with zero words, so [s, stage, step] (training) == [s, stage, step, 0]: a last word of
    # 1 can never coincide with a training or evaluation stream, whatever the training seed.
    assert stream([0, 2, 5]) == stream([0, 2, 5, 0]) != stream([0, 2, 5, 1])
    for task in TASKS:
        entropy = bench_cases.entropy(task, 0)
        assert len(entropy) == 4 and entropy[-1] != 0 and entropy[0] not in (EVAL_SCENE_TAG, PSNR_SCENE_TAG)
    assert stream(bench_cases.entropy("object", 0)) != stream([bench_cases.BENCH_TAG, 1, 0])
    # Geometry is continuous, so a scene shared with training would mean a shared random stream.
    scenes = [c.source for task in TASKS for c in first_cases[task]]
    train_geometry = set()
    for stage in STAGE_CODES:
        for step in range(3):
            rng = np.random.default_rng([0, STAGE_CODES[stage], step])
            train_geometry |= {(o.cx, o.cy, o.size) for _ in range(16) for o in sample_scene(rng, split="train").objects}
    assert train_geometry.isdisjoint({(o.cx, o.cy, o.size) for s in scenes for o in s.objects})


@pytest.mark.parametrize("task", TASKS)
def test_cases_are_valid(task, first_cases):
    for number, case in enumerate(first_cases[task]):
        for size in (64, TINY_SIZE) if number < 2 else (64,):
            images = render_case(case, size)
            # The oracle finds every source object where it is.
            for i, obj in enumerate(case.source.objects):
                assert object_kept(images.labels, obj, images.source, object_index=i)
            # The ideal edit passes the success oracle; the unedited source does not.
            assert metrics.edit_success(images, images.ideal)["success"], case
            assert not metrics.edit_success(images, images.source)["success"], case
            if number == 0:  # a perfect text-to-image sample shows the target; the source does not
                assert metrics.text_to_image_success(case, images.ideal) == {"target": True, "full": True}
                assert not metrics.text_to_image_success(case, images.source)["target"]
            union = np.zeros_like(images.mask)
            for region in images.regions:
                assert region.any()
                union |= region
            assert np.array_equal(union, images.mask) and not images.mask.all()
        if task == "background":
            assert case.target.background != case.source.background and case.edited == ()
            assert images.mask.mean() > 0.5 and not (images.mask & (images.labels > 0)).any()
            continue
        assert np.array_equal(images.kept, ~images.mask)  # object edits change nothing outside the mask
        for i, region in zip(case.edited, images.regions):
            old, new = case.source.objects[i], case.target.objects[i]
            assert new.colour != old.colour and new.colour != case.source.background
            assert (new.shape == old.shape) if task == "attribute" else (new.shape != old.shape)
            assert region[images.labels == i + 1].all()  # the mask covers the object
        for j in range(len(case.source.objects)):
            if j not in case.edited:
                assert not (images.mask & (images.labels == j + 1)).any()  # and never a kept object
        for phrase in case.new_phrases:
            assert case.target_caption.count(phrase) == 1
        assert case.mask_kind in (("dilated", "box") if task == "attribute" else ("box",))


def test_a_tight_box_is_the_objects_bounding_box_and_a_margin_widens_it(first_cases):
    case = first_cases["object"][0]
    (i,) = case.edited
    tight, default = render_case(case, 64, box_margin=0), render_case(case, 64)
    source_masks = render(case.source, 64).object_masks
    ys, xs = np.nonzero(source_masks[i] | render(case.target, 64).object_masks[i])
    box = np.zeros_like(tight.mask)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    for j, other in enumerate(source_masks):
        if j != i:
            box &= ~dilate(other, 1)  # never over a kept object
    assert np.array_equal(tight.mask, box)
    assert (default.mask >= tight.mask).all() and default.mask.sum() > tight.mask.sum()
    assert metrics.edit_success(tight, tight.ideal)["success"]


def test_held_out_combinations_appear(first_cases):
    for task in TASKS:
        assert any(c.held_out for c in first_cases[task])
        assert bench_cases.held_out_targets(first_cases[task])
    assert {c.mask_kind for c in first_cases["attribute"]} == {"dilated", "box"}


# --- metrics -----------------------------------------------------------------------------------------------


def test_psnr_ssim_and_seam_of_identical_images():
    images = render_case(make_case("object", 0), 64)
    src = images.source
    assert metrics.psnr(src, src) == metrics.PSNR_CAP and metrics.psnr(src, src, cap=None) == math.inf
    assert metrics.ssim(src, src) == pytest.approx(1.0) and metrics.ssim(src, src, images.kept) == pytest.approx(1.0)
    assert metrics.seam_score(src, src, images.mask) == {"seam_ring": 0.0, "seam_grad": 0.0}
    assert metrics.seam_score(images.ideal, src, images.mask, reference=images.ideal) == {"seam_ring": 0.0, "seam_grad": 0.0}
    rng = np.random.default_rng(0)
    noisy = [np.clip(src + rng.normal(0, s, src.shape), 0, 255) for s in (4, 16)]
    psnrs = [metrics.psnr(n, src) for n in noisy]
    ssims = [metrics.ssim(n, src) for n in noisy]
    assert metrics.PSNR_CAP > psnrs[0] > psnrs[1] and 1.0 > ssims[0] > ssims[1]
    assert math.isnan(metrics.psnr(src, src, np.zeros(src.shape[:2], bool)))


def test_psnr_and_ssim_known_values():
    a, b = np.full((16, 16, 3), 100.0), np.full((16, 16, 3), 110.0)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    window = metrics._gaussian_window()
    assert len(window) == 11 and window.sum() == pytest.approx(1.0) and window.argmax() == 5


def test_seam_and_coherence_see_what_they_should():
    images = render_case(make_case("object", 2), 64)
    src, mask = images.source, images.mask
    step = src.astype(float).copy()
    ring = dilate(mask, 3) & ~mask
    step[ring] += 40
    assert metrics.seam_score(step, src, mask)["seam_ring"] == pytest.approx(40.0)
    ideal_objects = metrics.objects_in_mask(images.ideal, mask)
    assert len(ideal_objects) == 1
    assert metrics.coherence(images.ideal, images.background, mask, ideal_objects)["coherence"] == pytest.approx(1.0)
    assert metrics.coherence(images.background, images.background, mask)["coherence_mae"] == 0.0
    blank = np.zeros_like(src)
    assert metrics.coherence(blank, images.background, mask, ideal_objects)["coherence"] < 0.5


def test_the_report_counts_single_object_successes_by_the_shape_asked_for():
    """Each single-object case counts once under its new object's shape, and again under the held-out columns when it
    asks for a combination never trained on; text-to-image is counted the same way; two-object and background cases
    are left out, as are methods that did not run every case of the task."""
    def case(task, phrases, held_out, results, t2i):
        return {"task": task, "new_phrases": phrases, "held_out": held_out, "text_to_image": {"target": t2i},
                "results": {m: {"success": ok} for m, ok in results.items()}}

    cases = [case("object", ["green triangle"], True, {"pfb": False, "bld": False}, True),
             case("object", ["red triangle"], False, {"pfb": True, "bld": False}, True),
             case("object", ["blue circle"], False, {"pfb": True}, False),
             case("multi-object", ["red circle", "blue square"], False, {"pfb": True, "bld": True}, True),
             case("background", [], False, {"pfb": True, "bld": True}, True)]
    result = {"cases": cases, "config": {"methods": ["pfb", "bld"]}}
    lines = report.shape_section(result, ["object", "multi-object", "background"])
    table = lines[lines.index("**object**") + 2:]
    assert table == ["| method | circle (of 1) | triangle (of 2) | held-out triangle (of 1) |", "|---|---|---|---|",
                     "| *text-to-image* | 0 | 2 | 1 |", "| pfb | 1 | 1 | 0 |"]
    assert report.shape_section(result, ["background"]) == []


def test_confidence_intervals():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), rel=1e-5)
    widths = [np.subtract(*metrics.wilson_interval(n // 2, n)[::-1]) for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert metrics.t_quantile_975(9) == 2.262 and metrics.t_quantile_975(100) == pytest.approx(1.984, abs=1e-3)
    rng = np.random.default_rng(1)
    spans = []
    for n in (10, 100, 1000):
        mean, lo, hi, count = metrics.mean_interval(rng.normal(5, 1, n))
        assert lo < mean < hi and count == n
        spans.append(hi - lo)
    assert spans[0] > spans[1] > spans[2]
    summary = metrics.summarise([True, False, None, True], proportion=True)
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(2 / 3)
    assert metrics.summarise([1.0, float("nan"), 3.0], proportion=False)["mean"] == 2.0


# --- baselines and the runner on the tiny model ------------------------------------------------------------


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_baselines_run_end_to_end(tiny_pipe):
    case = make_case("object", 1)
    images = render_case(case, TINY_SIZE)
    prompt = case.target_caption
    calls = tiny_pipe.unet_calls
    bld = baselines.blended_latent_diffusion(tiny_pipe, images.source, images.mask, prompt, steps=2, guidance_scale=4.0,
                                             generator=_generator())
    assert bld.image.shape == (TINY_SIZE, TINY_SIZE, 3) and bld.image.dtype == np.uint8
    assert tiny_pipe.unet_calls - calls == 2
    again = baselines.blended_latent_diffusion(tiny_pipe, images.source, images.mask, prompt, steps=2,
                                               guidance_scale=4.0, generator=_generator())
    assert np.array_equal(bld.image, again.image)

    calls = tiny_pipe.unet_calls
    sdedit = baselines.masked_sdedit(tiny_pipe, images.source, images.mask, prompt, steps=2, strength=0.5,
                                     guidance_scale=4.0, generator=_generator())
    assert tiny_pipe.unet_calls - calls == 1
    assert np.array_equal(sdedit.image[~images.mask], images.source[~images.mask])  # pasted back
    assert np.array_equal(sdedit.image[images.mask], sdedit.raw[images.mask])
    assert not np.array_equal(sdedit.raw, sdedit.image)

    calls = tiny_pipe.unet_calls
    diffedit = baselines.diffedit(tiny_pipe, images.source, case.source_caption, prompt, steps=2, guidance_scale=4.0,
                                  generator=_generator(), copies=2)
    assert tiny_pipe.unet_calls - calls == 2 + 2 + 2  # mask copies, inversion, edit
    assert diffedit.mask.shape == images.mask.shape and diffedit.mask.any()
    assert diffedit.raw.shape == diffedit.image.shape


@pytest.mark.parametrize("family", [None, "flow"])
@pytest.mark.parametrize("preset", ["object", "attribute", "background", "multi-object"])
def test_the_baselines_take_none_of_the_mechanisms_a_preset_adds(preset, family):
    """A baseline is the task's preset with its own changes; what a preset turns on later (the background's
    ``kept_apart``, the flow object's ``text_queries``, the object's latent core and noise in the mask) must not leak
    into it."""
    latent_only = get_preset(preset, family, **baselines.LATENT_BLENDING)
    assert not (latent_only.attention_masking or latent_only.kept_apart or latent_only.blend_blocks
                or latent_only.blend_depth or latent_only.latent_inset)
    assert latent_only.start == "inverted"
    for settings in (baselines.FLOW_BLENDED_LATENTS, baselines.KV_EDIT_LIKE):
        config = get_preset(preset, family, **settings)
        assert not (config.kept_apart or config.text_queries or config.latent_inset)
    assert get_preset(preset, family, **baselines.KV_EDIT_LIKE).start == "inverted"


def test_every_method_runs_on_one_case(tiny_pipe):
    images = render_case(make_case("multi-object", 0), TINY_SIZE)
    methods = tuple(m for m, method in shapes.METHODS.items() if method.applies(tiny_pipe))
    outcome = shapes.run_case(tiny_pipe, images, methods, steps=1, guidance=4.0, keep_images=True)
    assert set(outcome["results"]) == set(methods)
    assert set(outcome["images"]) == set(methods) | {"t2i"}
    for name, result in outcome["results"].items():
        assert {"success", "success_raw", "psnr_out", "ssim_out", "coherence", "seam_ring", "seam_grad", "unet_calls",
                "seconds"} <= set(result), name
        assert result["unet_calls"] >= 1
    assert outcome["results"]["pfb-deep-mid"]["same_as"] == "pfb"  # identical settings run once
    assert outcome["results"]["pfb-paper"]["unet_calls"] == 4  # reference path: inversion + source, uncond, cond
    assert 0.0 <= outcome["results"]["diffedit"]["auto_mask_iou"] <= 1.0
    assert set(outcome["text_to_image"]) >= {"target", "full"}


def test_paper_preset_is_carried_over_to_other_unets(tiny_pipe):
    class Shallow:  # a 3-level U-Net like the shapes model's, at 64 px
        native_side = 64
        feature_unet = type("F", (), {"blocks": tuple(range(13)), "num_levels": 3, "sd1_layout": False})()

    config = shapes.paper_config("background", Shallow())
    assert config.blend_blocks is None and config.blend_levels == (-2, -1) and config.attention_levels == (1, 2)
    assert config.grow == round(get_preset("paper-background").grow * 64 / 512) and config.reference_middle and config.mask_uncond
    literal = shapes.paper_config("object", tiny_pipe)  # SD 1.x layout: the reference block numbers
    assert literal.blend_blocks == (8, 9, 10, 11, 12, 14, 15, 16, 17, 18)


def test_quick_shapesbench_writes_json_markdown_and_grid(tiny_pipe, tmp_path):
    methods = ("pfb", "sdedit-0.5")
    result = shapes.run_shapesbench(tiny_pipe, cases=2, steps=2, methods=methods, out_dir=tmp_path, grid_cases=1,
                                    model_name="tiny")
    data = json.loads((tmp_path / "shapesbench.json").read_text())
    assert data["config"]["tasks"] == list(TASKS) and data["config"]["methods"] == list(methods)
    assert len(data["cases"]) == 2 * len(TASKS) and set(data["methods"]) == set(methods)
    per_case = set(report.METRICS) - {"auto_mask_iou"}
    for case in data["cases"]:
        assert set(case["results"]) == set(methods)
        for values in case["results"].values():
            assert per_case <= set(values)
        assert {"target", "full", "unet_calls", "seconds"} <= set(case["text_to_image"])
    for task in TASKS:
        block = data["summary"][task]
        assert block["n"] == 2 and set(block["methods"]) == set(methods)
        assert set(block["text_to_image"]) == {"target", "full", "unet_calls", "seconds"}
        for method in methods:
            assert per_case <= set(block["methods"][method])
            for agg in block["methods"][method].values():
                assert set(agg) == {"mean", "lo", "hi", "n"}
    assert result["summary"]["object"]["methods"]["pfb"]["success"]["n"] == 2
    markdown = (tmp_path / "shapesbench.md").read_text()
    assert "text-to-image" in markdown and all(m in markdown for m in methods) and "multi-object" in markdown
    grid = Image.open(tmp_path / "shapesbench_grid.png")
    assert grid.size == (6 * (TINY_SIZE + 2) + 2, 12 + len(TASKS) * (TINY_SIZE + 2) + 2)


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("seconds", "elapsed_s", "started", "parts")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_a_run_split_by_task_merges_into_the_whole_run(tiny_pipe, tmp_path):
    settings = dict(cases=2, steps=2, methods=("pfb", "sdedit-0.5"), grid_cases=1, model_name="tiny")
    whole = shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "whole", **settings)
    shapes.run_shapesbench(tiny_pipe, tasks=TASKS[:1], out_dir=tmp_path / "a", **settings)
    shapes.run_shapesbench(tiny_pipe, tasks=TASKS[1:], out_dir=tmp_path / "b", **settings)
    merged = report.merge_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert merged["config"]["parts"] == 2 and merged["config"]["tasks"] == list(TASKS)
    written = json.loads((tmp_path / "merged" / "shapesbench.json").read_text())
    assert _without_times(written) == _without_times(json.loads((tmp_path / "whole" / "shapesbench.json").read_text()))
    assert _without_times(merged["summary"]) == _without_times(whole["summary"])
    stacked = np.asarray(Image.open(tmp_path / "merged" / "shapesbench_grid.png"))
    assert np.array_equal(stacked, np.asarray(Image.open(tmp_path / "whole" / "shapesbench_grid.png")))
    assert "2 parts side by side" in (tmp_path / "merged" / "shapesbench.md").read_text()

    with pytest.raises(PFBDiffError, match="one of the parts"):
        report.merge_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "a")
    with pytest.raises(PFBDiffError, match="more than one part"):
        report.merge_folders([tmp_path / "a", tmp_path / "whole"], tmp_path / "bad")
    shapes.run_shapesbench(tiny_pipe, **{**settings, "steps": 1}, tasks=TASKS[1:2], out_dir=tmp_path / "c")
    with pytest.raises(PFBDiffError, match="differ in steps"):
        report.merge_folders([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_an_interrupted_run_goes_on_where_it_stopped(tiny_pipe, tmp_path, monkeypatch):
    settings = dict(tasks=TASKS[:2], cases=3, steps=2, methods=("pfb",), grid_cases=1, model_name="tiny")
    whole = shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "whole", **settings)
    stopped = json.loads((tmp_path / "whole" / "shapesbench.json").read_text())
    stopped["cases"] = stopped["cases"][:4]  # stopped during the second task
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "shapesbench.json").write_text(json.dumps(stopped))
    ran = []
    run_case = shapes.run_case
    monkeypatch.setattr(shapes, "run_case", lambda pipe, images, *a, **k: ran.append(images.case.id) or run_case(pipe, images, *a, **k))
    resumed = shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "run", **settings)
    grid_cases = [f"{task}-0000" for task in TASKS[:2]]  # run again for the grid's pictures
    assert ran == [grid_cases[0], grid_cases[1], f"{TASKS[1]}-0001", f"{TASKS[1]}-0002"]
    assert _without_times(resumed) == _without_times(json.loads(json.dumps(report._clean(whole))))
    assert resumed["config"]["started"] == stopped["config"]["started"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / "shapesbench_grid.png")),
                          np.asarray(Image.open(tmp_path / "whole" / "shapesbench_grid.png")))

    before = (tmp_path / "run" / "shapesbench.json").read_text()
    with pytest.raises(PFBDiffError, match="other steps; give another --out"):
        shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "run", **{**settings, "steps": 1})
    # the same model name with retrained weights, or a preset changed since, is another run too
    monkeypatch.setattr(shapes, "weights_fingerprint", lambda pipe: "retrained")
    with pytest.raises(PFBDiffError, match="other weights; give another --out"):
        shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "run", **settings)
    monkeypatch.undo()
    monkeypatch.setitem(shapes.METHODS, "pfb", dataclasses.replace(shapes.METHODS["pfb"],
                                                                   config=shapes._variant(word_boost=1.0)))
    with pytest.raises(PFBDiffError, match="other method settings; give another --out"):
        shapes.run_shapesbench(tiny_pipe, out_dir=tmp_path / "run", **settings)
    assert (tmp_path / "run" / "shapesbench.json").read_text() == before


def test_cases_past_the_benchs_own_serve_for_tuning_and_a_run_on_them_is_not_mixed_with_the_bench(tiny_pipe, tmp_path):
    settings = dict(tasks=TASKS[:1], cases=2, steps=1, methods=("pfb",), grid_cases=1, out_dir=tmp_path)
    tuning = shapes.run_shapesbench(tiny_pipe, first_case=200, **settings)
    assert [case["index"] for case in tuning["cases"]] == [200, 201] and tuning["config"]["first_case"] == 200
    with pytest.raises(PFBDiffError, match="other first_case"):
        shapes.run_shapesbench(tiny_pipe, **settings)


def test_a_run_of_every_method_takes_those_that_apply_to_the_model(tiny_pipe, tmp_path):
    from pfbdiff.models.toy_models import save_tiny_model
    from pfbdiff.pipeline import load_pipeline

    sdxl = load_pipeline(str(save_tiny_model(tmp_path / "xl", family="sdxl")), quiet=True)
    chosen = {}
    for name, pipe in (("sd1", tiny_pipe), ("sdxl", sdxl)):
        result = shapes.run_shapesbench(pipe, tasks=TASKS[:1], cases=1, steps=1, grid_cases=0)
        chosen[name] = set(result["config"]["methods"])
    assert chosen["sd1"] - chosen["sdxl"] == {"pfb-paper"}  # its block numbers are SD 1.x's
    assert chosen["sdxl"] - chosen["sd1"] == {"pfb-pooled-target", "pfb-pooled-source"}  # SD 1.x has no pooled vector


@pytest.mark.parametrize("task", ["background", "multi-object"])
def test_on_a_flow_transformer_the_bench_runs_the_flow_methods_and_baselines(task):
    """On SD3 the U-Net-only methods (the paper presets, block levels, BLD's and DiffEdit's DDIM code) give way to
    the blend window, the text-query direction, FireFlow inversion and the flow baselines; a FireFlow inversion is
    made once and costs one velocity more than Euler's."""
    from pfbdiff.flow_pipeline import PFBDiffSD3Pipeline
    from pfbdiff.models.toy_flow_models import tiny_flow_components

    pipe = PFBDiffSD3Pipeline(**tiny_flow_components("sd3"))
    pipe.set_progress_bar_config(disable=True)
    methods = tuple(m for m, method in shapes.METHODS.items() if method.applies(pipe))
    assert {"pfb-depth-1.0", "pfb-text-queries", "pfb-fireflow", "flow-bld", "kv-edit-like", "sdedit-0.5",
            "pfb-pooled-source", "pfb-region-prompts"} <= set(methods)
    assert not {"pfb-paper", "pfb-deep", "bld", "diffedit"} & set(methods)
    images = render_case(make_case(task, 0), shapes.model_image_size(pipe))
    outcome = shapes.run_case(pipe, images, methods, steps=2, guidance=4.0)
    assert set(outcome["results"]) == set(methods)
    calls = {name: result["unet_calls"] for name, result in outcome["results"].items()}
    assert calls["pfb"] == 2 + 2  # the inversion (recording the source tokens), then one call per step
    assert calls["pfb-fireflow"] == calls["pfb"] + 1
    assert calls["sdedit-0.5"] == 1  # half of the two steps


def test_cli_bench_shapes(tiny_model_dir, tmp_path, monkeypatch):
    from pfbdiff.apps.cli import app

    runner = CliRunner()
    out = tmp_path / "sb"
    args = ["bench", "shapes", "--model", str(tiny_model_dir), "--cases", "1", "--tasks", "attribute",
            "--methods", "pfb", "--steps", "2", "--out", str(out), "--grid-cases", "1"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "| pfb |" in done.output
    assert json.loads((out / "shapesbench.json").read_text())["config"]["cases_per_task"] == 1
    assert (out / "shapesbench.md").exists() and (out / "shapesbench_grid.png").exists()
    tighter = runner.invoke(app, [*args, "--box-margin", "0"])  # other masks: not taken up, not overwritten
    assert tighter.exit_code == 2 and "other box_margin" in tighter.output and "Traceback" not in tighter.output
    negative = runner.invoke(app, [*args, "--box-margin", "-1"])
    assert negative.exit_code == 2 and "--box-margin" in negative.output

    bad = runner.invoke(app, ["bench", "shapes", "--model", "tiny", "--methods", "pfb,nope"])
    assert bad.exit_code == 2 and "unknown method nope" in bad.output
    merged = runner.invoke(app, ["bench", "shapes-merge", str(out), "--out", str(out)])
    assert merged.exit_code == 2 and "one of the parts" in merged.output and "Traceback" not in merged.output
    merged = runner.invoke(app, ["bench", "shapes-merge", str(out), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0 and "| pfb |" in merged.output
    missing_part = runner.invoke(app, ["bench", "shapes-merge", str(tmp_path / "nothing")])
    assert missing_part.exit_code == 2 and "shapesbench.json is missing" in missing_part.output
    monkeypatch.setattr(catalog, "BUNDLED_SHAPES_MODEL", tmp_path / "missing")
    missing = runner.invoke(app, ["bench", "shapes", "--quick"])
    assert missing.exit_code == 2 and "--model" in missing.output and "Traceback" not in missing.output


def test_the_cli_bench_on_a_flow_model_folder_runs_what_applies_and_the_familys_background_preset(tmp_path):
    """Without --methods the CLI runs every method that applies to the model (the U-Net-only ones would fail on a
    transformer), and a flow's background edits blend the latent at every step (presets.FAMILY_PRESETS)."""
    from diffusers import StableDiffusion3Pipeline

    from pfbdiff.apps.cli import app
    from pfbdiff.models.toy_flow_models import tiny_flow_components

    StableDiffusion3Pipeline(**tiny_flow_components("sd3")).save_pretrained(tmp_path / "sd3", safe_serialization=True)
    out = tmp_path / "sb"
    done = CliRunner().invoke(app, ["bench", "shapes", "--model", str(tmp_path / "sd3"), "--cases", "1", "--tasks",
                                    "background", "--steps", "2", "--out", str(out), "--grid-cases", "0"])
    assert done.exit_code == 0, done.output
    result = json.loads((out / "shapesbench.json").read_text())
    assert "kv-edit-like" in result["config"]["methods"] and "pfb-paper" not in result["config"]["methods"]
    settings = result["methods"]["pfb"]["settings"]["background"]
    assert settings["latent_blend"] == -1.0 and get_preset("background").latent_blend == 0.8
