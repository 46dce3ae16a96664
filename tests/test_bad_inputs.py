"""Every bad input ends the same way, whatever the face: one ``error:`` line that names the problem and the fix,
exit code 2 (in a batch: that line failed with the message, the others done, exit 1), no traceback, nothing
written and the inputs untouched. The cases here are the ones a new user's battery found; ``test_cli.py`` has
the everyday ones."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from typer.testing import CliRunner

from pfbdiff.apps.cli import app
from pfbdiff.apps.manifest import read_manifest
from pfbdiff.apps.request import setting_value
from pfbdiff.engine.presets import FAMILY_PRESETS, PRESETS, get_preset

runner = CliRunner()
LONG_PROMPT = "a cat on a bench, " + "very " * 80 + "and a blue dog"


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_refused(result, fragment, folder, before):
    """Exit 2, exactly one ``error:`` line holding ``fragment``, no traceback or usage box, nothing written."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output
    assert _snapshot(folder) == before


def _edit_argv(files, model, *extra):
    folder, image, mask = files
    return ["edit", str(image), "-m", str(mask), "-p", "a dog", "--steps", "2", "--model", str(model),
            "-o", str(folder / "out.png"), *extra]


def _corrupt_copy(model_dir, where):
    """The model with its U-Net weights cut short, as a download killed half-way leaves it."""
    broken = where / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return broken


CLI_CASES = {
    "guidance nan": (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    "guidance inf": (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "--seed must be between 0 and 2**64 - 1"),
    "steps beyond the training steps": (["--steps", "100000"],
                                        "--steps must be at most 1000, the number of steps the model was trained with"),
    "steps that are not a number": (["--steps", "abc"], "Invalid value for '--steps'"),
    "an unknown option": (["--stepz", "3"], "No such option: --stepz"),
    "a confined word past the token limit": (["--prompt", LONG_PROMPT, "--inside", "blue"],
                                             "'blue' lies past the text encoder's 77-token limit"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_in_one_line(files, tiny_model_dir, case):
    extra, fragment = CLI_CASES[case]
    before = _snapshot(files[0])
    _assert_refused(runner.invoke(app, _edit_argv(files, tiny_model_dir, *extra)), fragment, files[0], before)


def test_a_damaged_model_is_one_line_naming_the_part(files, tiny_model_dir, tmp_path_factory):
    broken = _corrupt_copy(tiny_model_dir, tmp_path_factory.mktemp("models"))
    before = _snapshot(files[0])
    result = runner.invoke(app, _edit_argv(files, broken))
    _assert_refused(result, f"cannot load the unet of '{broken}'", files[0], before)
    assert "download or save the model again" in result.output


def test_a_damaged_single_file_checkpoint_is_one_line(files, tiny_model_dir):
    folder = files[0]
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    before = _snapshot(folder)
    result = runner.invoke(app, _edit_argv(files, folder / "model.safetensors", "--config", str(tiny_model_dir)))
    _assert_refused(result, "could not load", folder, before)


@pytest.mark.parametrize("change, fragment", [
    (dict(steps="ten"), "--steps must be an integer"),
    (dict(image=5), "IMAGE must be a file path, got 5"),
    (dict(settings=[1]), "--set must be an object of method settings"),
    (dict(seed=2**64), "--seed must be between 0 and 2**64 - 1"),
    (dict(guidance_scale=1e999), "--guidance must be a finite number"),
])
def test_a_bad_record_is_checked_like_a_command_line(files, tiny_model_dir, change, fragment):
    folder, image, mask = files
    record = {"record_version": 1, "image": str(image), "mask": str(mask), "prompt": "a dog", "steps": 2,
              "model": str(tiny_model_dir), **change}
    (folder / "record.json").write_text(json.dumps(record))
    before = _snapshot(folder)
    result = runner.invoke(app, ["edit", "--from-json", str(folder / "record.json"), "-o", str(folder / "out.png")])
    _assert_refused(result, fragment, folder, before)


def test_any_prompt_the_tokenizer_reads_edits_and_a_cut_prompt_is_warned_about(files, tiny_model_dir):
    folder = files[0]
    for n, prompt in enumerate(["a blue square 🟦 on a plain yellow background — ünïcödé 猫 ✨", LONG_PROMPT]):
        result = runner.invoke(app, _edit_argv(files, tiny_model_dir, "-p", prompt, "-o", str(folder / f"{n}.png")))
        assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "does not see its end: 'very" in warnings[0] and "and a blue dog'" in warnings[0]


def test_an_edit_removes_its_own_stale_temporary_files_only(files, tiny_model_dir):
    folder = files[0]
    own, other = folder / ".out.png.0123abcd.tmp", folder / ".photo.png.0123abcd.tmp"
    own.write_bytes(b"")
    other.write_bytes(b"")
    assert runner.invoke(app, _edit_argv(files, tiny_model_dir)).exit_code == 0
    assert not own.exists() and other.exists()


# ------------------------------------------------------------------------------------------------ batch


@pytest.mark.parametrize("line, fragment", [
    ('{"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "guidance": 1e999}',
     '"guidance" must be a finite number, got inf'),
    ('{"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "seed": 18446744073709551616}',
     '"seed" must be between 0 and 2**64 - 1'),
    ('{"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "steps": "abc"}', '"steps" must be an integer'),
    ('{"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "steps": 100000}',
     '"steps" must be at most 1000, the number of steps the model was trained with'),
])
def test_a_bad_manifest_line_fails_alone(files, tiny_model_dir, line, fragment):
    folder = files[0]
    good = json.dumps({"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "steps": 2, "output": "ok.png"})
    (folder / "edits.jsonl").write_text(good + "\n" + line + "\n")
    lines, bad = read_manifest(folder / "edits.jsonl", model=str(tiny_model_dir))
    assert [entry.output for entry in lines] == ["ok.png"]
    assert len(bad) == 1 and fragment in bad[0].reason and "\n" not in bad[0].reason, bad[0].reason
    result = runner.invoke(app, ["batch", str(folder / "edits.jsonl"), "-o", str(folder / "out"),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 done" in result.output and fragment in result.output


def test_a_manifest_saved_by_a_windows_editor_reads_like_any_other(files, tiny_model_dir):
    """A byte-order mark and CRLF line ends; an output may name a subfolder of --out, which is created."""
    folder = files[0]
    lines = [{"image": "photo.png", "mask": "mask.png", "prompt": "a dog", "steps": 2, "output": name}
             for name in ("a.png", "sub/b.png")]
    (folder / "edits.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\r\n" for line in lines).encode())
    result = runner.invoke(app, ["batch", str(folder / "edits.jsonl"), "-o", str(folder / "out"),
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert (folder / "out" / "a.png").is_file() and (folder / "out" / "sub" / "b.png").is_file()


def test_a_user_error_in_accelerate_processes_is_one_line_from_the_launcher(files, tiny_model_dir, tmp_path_factory):
    folder, image, mask = files
    broken = _corrupt_copy(tiny_model_dir, tmp_path_factory.mktemp("models"))
    lines = [{"image": "photo.png", "mask": "mask.png", "prompt": p, "steps": 2} for p in ("a dog", "a fox")]
    (folder / "edits.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = _snapshot(folder)
    result = subprocess.run(
        [sys.executable, "-m", "pfbdiff", "batch", str(folder / "edits.jsonl"), "-o", str(folder / "out"),
         "--model", str(broken), "--num-processes", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot load the unet" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert _snapshot(folder) == before and not (folder / "out").exists()


# ------------------------------------------------------------------------------------------------ web UI


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["ui", "--port", str(port), "--model", str(tmp_path / "no-such-model")])
    _assert_refused(result, f"--port {port} on 127.0.0.1 is in use by another program", tmp_path, {})


@pytest.mark.parametrize("host, fragment", [("999.1.1.1", "--host 999.1.1.1 is not an address of this machine"),
                                            ("8.8.8.8", "--host 8.8.8.8 is not an address of this machine")])
def test_a_host_this_machine_cannot_serve_is_one_line(tmp_path, host, fragment):
    result = runner.invoke(app, ["ui", "--host", host, "--model", str(tmp_path / "no-such-model")])
    _assert_refused(result, fragment, tmp_path, {})


def test_the_ui_leaves_no_empty_folder_when_stopped(tiny_pipe, monkeypatch, tmp_path):
    gradio = pytest.importorskip("gradio")
    from pfbdiff.apps import ui

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: None)  # returns as after Ctrl-C
    monkeypatch.setattr("pfbdiff.pipeline.load_pipeline", lambda *args, **kwargs: tiny_pipe)
    ui.launch("tiny-test", port=_free_port(), echo=lambda text: None, block=True)
    assert list(tmp_path.glob("pfbdiff-ui-*")) == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------------ frictions


def test_help_presets_and_validation_errors_do_not_import_torch(files):
    """They answer at once: torch, diffusers and transformers are only imported to run a model."""
    folder, image, mask = files
    script = f"""
import sys
from typer.testing import CliRunner
from pfbdiff.apps.cli import app
runner = CliRunner()
assert runner.invoke(app, ["--help"]).exit_code == 0
assert runner.invoke(app, ["presets"]).exit_code == 0
for bad in (["--steps", "0"], ["--guidance", "nan"], ["--preset", "nope"], ["--steps", "abc"]):
    argv = ["edit", {str(image)!r}, "-m", {str(mask)!r}, "-p", "a dog", "-o", {str(folder / "o.png")!r}, *bad]
    assert runner.invoke(app, argv).exit_code == 2, bad
print(sorted(name for name in ("torch", "diffusers", "transformers", "gradio") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_presets_print_to_stdout_as_settings_that_give_the_preset_back():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    rows = result.stdout.splitlines()
    for name, preset in PRESETS.items():
        header = rows.index(next(row for row in rows if row.startswith(f"{name}: ")))
        settings = dict(pair.split("=", 1) for pair in rows[header + 1].split())
        values = {key: tuple(int(x) for x in text.split(",") if x) if key in ("inside", "outside")
                  else setting_value(key, text) for key, text in settings.items()}
        assert PRESETS["object"].replace(**values) == preset, name
    assert "blend_blocks=8,9,10,11,12,14,15,16,17,18" in result.stdout and "(8, 9" not in result.stdout
    # a family's own version of a preset is printed under it the same way
    for name in FAMILY_PRESETS["flow"]:
        header = rows.index(next(row for row in rows if row.startswith(f"{name}: ")))
        label, _, changes = rows[header + 2].partition(": ")
        assert label.strip() == "on SD3 and Flux"
        values = {key: setting_value(key, text) for key, text in (pair.split("=", 1) for pair in changes.split())}
        assert PRESETS[name].replace(**values) == get_preset(name, "flow") != PRESETS[name]


def test_help_shows_install_hints_with_brackets():
    assert "pip install 'pfbdiff[ui]'" in runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output


def test_a_mistake_with_brackets_is_printed_as_written(files, tiny_model_dir):
    result = runner.invoke(app, _edit_argv(files, tiny_model_dir, "--inside", "[red]"))
    assert result.exit_code == 2 and "'[red]' does not occur in the prompt" in result.output



# ------------------------------------------------------------------------------------------------ Python API


@pytest.mark.parametrize("arguments, parameter, fragment", [
    (dict(guidance_scale=float("nan")), "guidance_scale", "must be a finite number"),
    (dict(num_inference_steps=100000), "num_inference_steps", "must be at most 1000"),
    (dict(feather=10**11), "feather", "must be at most 128 pixels (the photo's longer side)"),
    (dict(crop_padding=10**12), "crop_padding", "must be at most 128 pixels"),
    (dict(grow=-10**9), "grow", "must be at most 128 pixels"),
    (dict(blend_levels=(99,)), "blend_levels", "selects no level of this U-Net"),
    (dict(attention_blocks=(1,)), "attention_blocks", "not blocks with cross-attention"),
    (dict(blend_blocks=(999,)), "blend_blocks", "paper-* presets run on SD 1.x models only"),
])
def test_the_api_applies_the_same_rules_as_a_value_error_naming_the_parameter(tiny_pipe, photo, box_mask, arguments,
                                                                             parameter, fragment):
    with pytest.raises(ValueError) as error:
        tiny_pipe(photo, box_mask, "a dog", "a cat", **{"num_inference_steps": 2, **arguments})
    assert error.value.parameter == parameter and fragment in str(error.value), str(error.value)


def test_text_to_image_refuses_an_infinite_guidance(tiny_pipe):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got inf"):
        tiny_pipe.text_to_image("a dog", height=64, width=64, num_inference_steps=2, guidance_scale=float("inf"))
