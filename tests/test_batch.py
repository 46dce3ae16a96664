"""``pfbdiff batch``: manifest checks, resumable runs, bad lines, a real SIGKILL, shared inversions, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pfbdiff.apps.batch import Reporter, inversion_groups, remove_stale_temporaries, run_shard, shard
from pfbdiff.apps.cli import app
from pfbdiff.apps.manifest import BatchLine, read_manifest
from pfbdiff.apps.request import replay
from pfbdiff.errors import PFBDiffError
from pfbdiff.io.outputs import read_png_metadata

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def _scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1) + rng.integers(0, 40, 3)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def folder(tmp_path):
    """A manifest folder with three 64×64 photos, a box mask and an all-black mask."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(_scene(i)).save(data / f"photo{i}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(data / "box.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "black.png")
    return data


def _line(image="photo0.png", mask="box.png", prompt="a dog", **extra):
    return {"image": image, "mask": mask, "prompt": prompt, "source_prompt": "a cat", "steps": STEPS, **extra}


def _write(folder: Path, entries, name="manifest.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


def _images(out: Path) -> set[str]:
    """The edited images in ``out`` (a region file is written just before its image, so a rerun redoes both)."""
    return {p.name for p in out.glob("*.png") if not p.name.endswith(".region.png")}


def _outputs(out: Path) -> list[str]:
    """The images, records and summary in ``out``. Region files are left out once checked: one beside each output
    whose record says the edit changed pixels outside the mask (a new object followed past its edge), none else."""
    names = sorted(p.name for p in out.iterdir())
    records = [json.loads((out / n).read_text()) for n in names if n.endswith(".json") and n != "batch-summary.json"]
    regions = {Path(r["edit_region_file"]).name for r in records if r.get("changed_outside_mask")}
    assert {n for n in names if n.endswith(".region.png")} == regions
    return [n for n in names if n not in regions]


# ----------------------------------------------------------------------------------------------- manifest


def test_manifest_lines_get_defaults_relative_paths_and_aliases(folder):
    path = _write(folder, [
        "# a comment, then a blank line", "",
        _line(output="dog.png", inside="dog, a", guidance_scale=3.0, t_combine=100),
        _line(image="./photo1.png", num_inference_steps=4, strength=0.5, preset="attribute", seed=7),
    ])
    lines, bad = read_manifest(path, steps=9, guidance=5.0)
    assert bad == []
    first, second = lines
    assert first.line_no == 3 and first.image == (folder / "photo0.png").resolve()
    assert first.output == "dog.png" and first.request.inside == ["dog", "a"] and first.request.guidance_scale == 3.0
    assert first.config.t_combine == 100 and first.request.preset == "object" and first.request.steps == STEPS
    assert first.request.settings == {"t_combine": 100} and first.request.paste_back is True
    assert second.output == "line-0004.png" and second.request.steps == 4 and second.config.strength == 0.5
    assert second.request.seed == 7 and second.request.guidance_scale == 5.0
    assert first.parameters_hash("m") != second.parameters_hash("m")
    assert first.parameters_hash("m") != first.parameters_hash("other-model")


def test_a_finished_line_goes_stale_when_any_familys_version_of_its_preset_changes(folder, monkeypatch):
    # the manifest is hashed before the model (and so its family) is known: a flow model's batch must rerun
    # when only the flow version of the preset changes
    from pfbdiff.engine import presets

    (line,), _ = read_manifest(_write(folder, [_line()]), steps=9, guidance=5.0)
    before = line.parameters_hash("shapes-sd3")
    flow = {**presets.FAMILY_PRESETS["flow"], "object": {"word_boost": 3.0}}
    monkeypatch.setitem(presets.FAMILY_PRESETS, "flow", flow)
    assert line.config == line.request.config_for(None)  # the U-Net version is unchanged...
    assert line.parameters_hash("shapes-sd3") != before  # ...and the line is stale all the same


@pytest.mark.parametrize("entry, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (_line(colour="red"), "unknown key(s) 'colour'"),
    ({"image": "photo0.png", "mask": "box.png"}, 'missing "prompt"'),
    (_line(image="missing.png"), "image file not found"),
    (_line(image="../outside.png"), "leads outside the manifest's folder"),
    (_line(mask="/etc/hostname"), "leads outside the manifest's folder"),
    (_line(output="../escape.png"), "plain relative name inside --out"),
    (_line(output="/tmp/abs.png"), "plain relative name inside --out"),
    (_line(output=".hidden.png"), "hidden name"),
    (_line(output="dog.jpg"), "must end in .png"),
    (_line(preset="nope"), "unknown preset 'nope'"),
    (_line(steps=0), '"steps" must be at least 1'),
    (_line(seed=1.5), '"seed" must be an integer'),
    (_line(strength=2.0), '"strength" must be in (0, 1]'),
    (_line(prompt=" "), '"prompt" is empty'),
    (_line(inside=[1]), '"inside" must be a list of words'),
    ({"image": "photo0.png", "prompt": "a dog"}, 'missing "mask" (or set "auto_mask": true)'),
    (_line(model="other"), "options of `pfbdiff batch`"),
    (_line(crop="yes"), '"crop" must be "auto", true or false'),
    (_line(paste_back="no"), '"paste_back" must be true or false'),
    (_line(feather=-2), '"feather" must be 0 or more pixels'),
    (_line(settings={"t_combine": "soon"}), "t_combine"),
])
def test_bad_lines_are_reported_with_a_reason_and_the_rest_kept(folder, entry, fragment):
    (folder.parent / "outside.png").write_bytes((folder / "photo0.png").read_bytes())
    lines, bad = read_manifest(_write(folder, [_line(output="ok.png"), entry]))
    assert [e.output for e in lines] == ["ok.png"]
    assert len(bad) == 1 and bad[0].line_no == 2 and fragment in bad[0].reason, bad[0].reason
    assert "\n" not in bad[0].reason


def test_symlink_leading_outside_is_refused_and_duplicate_outputs_are_bad(folder):
    secret = folder.parent / "secret.png"
    secret.write_bytes((folder / "photo0.png").read_bytes())
    (folder / "link.png").symlink_to(secret)
    lines, bad = read_manifest(_write(folder, [_line(image="link.png"), _line(output="x.png"), _line(output="X.png")]))
    assert [e.line_no for e in lines] == [2]
    assert "outside the manifest's folder" in bad[0].reason
    assert "also the output of line 2" in bad[1].reason


def test_missing_or_empty_manifest_is_a_user_error(folder):
    with pytest.raises(PFBDiffError, match="manifest not found"):
        read_manifest(folder / "nope.jsonl")
    with pytest.raises(PFBDiffError, match="has no edits"):
        read_manifest(_write(folder, ["# nothing"]))


def test_sharding_keeps_inversion_groups_together_and_covers_every_line_once(folder):
    entries = [_line(image=f"photo{i % 3}.png", output=f"{n}.png", source_prompt="a cat" if n < 7 else "a dog")
               for n, i in enumerate([0, 0, 1, 2, 0, 1, 2, 0, 0, 1])]
    lines, bad = read_manifest(_write(folder, entries))
    assert bad == [] and len(inversion_groups(lines)) == 5
    for n in (1, 2, 3, 7):
        shards = shard(lines, n)
        assert len(shards) == n
        seen = [e.line_no for s in shards for e in s]
        assert sorted(seen) == [e.line_no for e in lines]  # every line once, none twice
        for group in inversion_groups(lines):
            owners = {i for i, s in enumerate(shards) for e in s if e.line_no in {g.line_no for g in group}}
            assert len(owners) == 1  # a shared inversion stays in one process
        assert shard(lines, n) == shards  # deterministic: every process computes the same split
    sizes = sorted(len(s) for s in shard(lines, 2))
    assert sizes[1] - sizes[0] <= 2


# ----------------------------------------------------------------------------------------------- running


def _run(lines, out, pipe, bad=(), model="tiny-test"):
    events = []
    reporter = Reporter(line=lambda entry, status, message: events.append((entry.line_no, status, message)))
    summary = run_shard(lines, list(bad), out, model=model, load_pipe=lambda: pipe, reporter=reporter)
    return summary, events


def test_shared_source_lines_reuse_one_inversion(folder, tmp_path, tiny_pipe):
    upper = np.zeros((64, 64), np.uint8)
    upper[4:20, 8:40] = 255
    Image.fromarray(upper).save(folder / "upper.png")
    lines, _ = read_manifest(_write(folder, [
        _line(output="a.png"), _line(prompt="a fox", output="b.png"),
        _line(prompt="a cow", mask="upper.png", output="c.png", seed=3, paste_back=False),
        _line(image="photo1.png", output="d.png"),
    ]))
    before = tiny_pipe.unet_calls
    summary, _ = _run(lines, tmp_path / "out", tiny_pipe)
    k = STEPS
    assert summary.inversions == 2 and len(summary.done) == 4
    # per group: K inversion passes, then K batched (uncond + cond) passes per edit
    assert tiny_pipe.unet_calls - before == (k + 3 * k) + (k + k)
    records = [json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in "abcd"]
    assert [r["shared_inversion"] for r in records] == [False, True, True, False]
    assert [r["unet_calls"] for r in records] == [2 * k, k, k, 2 * k]
    # each output is exactly what a single `pfbdiff edit` of the line makes: its record replays it
    for name, record in zip("bc", records[1:3]):
        again = replay(record, pipe=tiny_pipe).result
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(tmp_path / "out" / f"{name}.png")))


def test_rerun_skips_done_lines_without_loading_the_model_and_redoes_changed_ones(folder, tmp_path, tiny_pipe):
    out = tmp_path / "out"
    entries = [_line(output="a.png"), _line(prompt="a fox", output="b.png")]
    lines, _ = read_manifest(_write(folder, entries))
    summary, _ = _run(lines, out, tiny_pipe)
    assert summary.done == ["a.png", "b.png"]
    first_bytes = (out / "a.png").read_bytes()

    def no_model():
        raise AssertionError("a finished batch must not load the model")

    again = run_shard(lines, [], out, model="tiny-test", load_pipe=no_model)
    assert again.skipped == ["a.png", "b.png"] and again.done == []
    (out / "a.json").unlink()  # as if killed between the PNG and its record
    assert run_shard(lines, [], out, model="tiny-test", load_pipe=no_model).skipped == ["a.png", "b.png"]
    assert json.loads((out / "a.json").read_text())["batch_hash"] == read_png_metadata(out / "a.png")["batch_hash"]

    entries[1]["prompt"] = "a cow"  # a changed line is redone, the other kept
    changed, _ = read_manifest(_write(folder, entries))
    summary, _ = _run(changed, out, tiny_pipe)
    assert summary.skipped == ["a.png"] and summary.done == ["b.png"]
    assert (out / "a.png").read_bytes() == first_bytes
    assert read_png_metadata(out / "b.png")["prompt"] == "a cow"
    assert _outputs(out) == ["a.json", "a.png", "b.json", "b.png"]


def test_stale_temporaries_of_a_killed_run_are_removed_only_for_own_outputs(folder, tmp_path):
    lines, _ = read_manifest(_write(folder, [_line(output="a.png")]))
    out = tmp_path / "out"
    out.mkdir()
    for name in (".a.png.0123abcd.tmp", ".a.json.deadbeef.tmp", ".other.png.0123abcd.tmp", "a.png.tmp"):
        (out / name).write_bytes(b"x")
    assert remove_stale_temporaries(lines, out) == 2
    assert _outputs(out) == [".other.png.0123abcd.tmp", "a.png.tmp"]


def test_a_bad_line_is_reported_and_the_rest_go_on(folder, tmp_path, tiny_model_dir):
    manifest = _write(folder, [
        _line(output="good1.png"),
        _line(image="missing.png", output="missing.png"),
        _line(inside=["zebra"], output="word.png"),
        _line(mask="black.png", output="black.png"),
        "{oops",
        _line(image="photo2.png", prompt="a fox", output="good2.png"),
    ])
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(manifest), "--out", str(out), "--model", str(tiny_model_dir)])
    assert result.exit_code == 1, result.output
    assert _outputs(out) == ["batch-summary.json", "good1.json", "good1.png", "good2.json", "good2.png"]
    summary = json.loads((out / "batch-summary.json").read_text())
    assert sorted(summary["done"]) == ["good1.png", "good2.png"] and summary["skipped"] == []
    reasons = {f["line"]: f["reason"] for f in summary["failed"]}
    assert set(reasons) == {2, 3, 4, 5}
    assert "image file not found" in reasons[2] and "zebra" in reasons[3]
    assert "all black" in reasons[4] and "not valid JSON" in reasons[5]
    assert "2 done, 0 skipped" in result.output and "4 failed" in result.output
    assert "Traceback" not in result.output


def test_a_missing_manifest_exits_2_with_one_line(tmp_path):
    result = runner.invoke(app, ["batch", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "manifest not found" in result.output
    assert not (tmp_path / "out").exists()


def _command(manifest, out, model, *extra):
    return [sys.executable, "-m", "pfbdiff", "batch", str(manifest), "--out", str(out), "--model", str(model), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _check_complete(manifest, out, model):
    """Every line has exactly one PNG and one record, from this line's parameters; nothing else is left."""
    lines, bad = read_manifest(manifest, model=str(model))  # lines take the steps and guidance the model recommends
    assert bad == []
    expected = sorted([e.output for e in lines] + [e.record_name for e in lines] + ["batch-summary.json"])
    assert _outputs(out) == expected  # no temporary files, no duplicates
    for entry in lines:
        assert read_png_metadata(out / entry.output)["batch_hash"] == entry.parameters_hash(str(model))
        assert json.loads((out / entry.record_name).read_text())["line"] == entry.line_no
    return lines


def test_sigkill_at_any_moment_then_rerun_gives_exactly_one_correct_output_per_line(folder, tmp_path, tiny_model_dir):
    entries = [_line(image=f"photo{i % 3}.png", prompt=p, output=f"{p.split()[1]}-{i}.png", steps=3)
               for i, p in enumerate(["a dog", "a fox", "a cow", "a red hat", "a blue cat", "a dog"])]
    manifest = _write(folder, entries)
    out = tmp_path / "out"
    process = subprocess.Popen(_command(manifest, out, tiny_model_dir), env=_env(), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and _images(out)):
            assert process.poll() is None, "the batch ended before writing an output"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    written_before = _images(out)
    assert 1 <= len(written_before) < len(entries)
    rerun = subprocess.run(_command(manifest, out, tiny_model_dir), env=_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lines = _check_complete(manifest, out, tiny_model_dir)
    summary = json.loads((out / "batch-summary.json").read_text())
    assert set(summary["skipped"]) >= written_before  # finished work is kept, not redone
    assert sorted(summary["done"] + summary["skipped"]) == sorted(e.output for e in lines)


def test_two_accelerate_processes_do_every_line_once(folder, tmp_path, tiny_model_dir):
    entries = [_line(image=f"photo{i % 3}.png", prompt=p, output=f"{i}.png")
               for i, p in enumerate(["a dog", "a fox", "a cow", "a red hat", "a blue cat"])]
    manifest = _write(folder, entries)
    out = tmp_path / "out"
    result = subprocess.run(_command(manifest, out, tiny_model_dir, "--num-processes", "2"), env=_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    _check_complete(manifest, out, tiny_model_dir)
    summary = json.loads((out / "batch-summary.json").read_text())
    assert summary["processes"] == 2 and summary["inversions"] == 3
    assert sorted(summary["done"]) == sorted(f"{i}.png" for i in range(5))  # none twice
    for process in (1, 2):
        assert f"[process {process}/2] done" in log  # both processes worked
    for line_no in range(1, 6):
        assert log.count(f"done line {line_no} ") == 1


def test_the_shipped_example_manifest_is_valid(tmp_path):
    lines, bad = read_manifest(REPO / "examples" / "shapes-manifest.jsonl")
    assert bad == [] and len(lines) == 8
    groups = inversion_groups(lines)
    assert [len(g) for g in groups] == [3, 2, 3]
    assert all(isinstance(e, BatchLine) and Image.open(e.image).size == (64, 64) for e in lines)
