"""Batch editing: a JSONL manifest in, one PNG and one JSON record per line out; resumable; sharded over processes.

The manifest format is described in :mod:`pfbdiff.apps.manifest`.

Safety and resumption:

* every file is written atomically (temporary file + rename), the PNG first, then its JSON record;
* each output carries a hash of everything that decides its pixels (model, the bytes of the image and mask,
  prompts, seed, steps, guidance, every setting); a rerun skips a line whose PNG carries the hash the line
  asks for, and redoes it otherwise. So a run killed at any moment (even ``kill -9``) and started again ends
  with exactly one correct output per line; stale temporary files of a killed run are removed;
* a bad line (unreadable file, unknown key, word not in the prompt, ...) is reported and the rest go on.

Lines that share the source image, source prompt, steps, strength and edited box (the whole image, unless a
large photo is cropped around its mask) are edited from one inversion: the costly DDIM inversion runs once per
group, and each edit is exactly what a single ``pfbdiff edit`` of the line makes. Across processes
(``accelerate launch -m pfbdiff batch`` or ``pfbdiff batch --num-processes N``), lines that may share an
inversion are dealt to processes together, balanced by line count; each process edits only its own lines on
its own device, so no two processes write the same output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pfbdiff.apps.manifest import BadLine, BatchLine, json_key, read_manifest
from pfbdiff.apps.request import InversionCache, adapter_fields, load_inputs, region_notes, run_request
from pfbdiff.errors import PFBDiffError
from pfbdiff.io import outputs
from pfbdiff.io.images import one_line
from pfbdiff.io.outputs import region_path, save_png, write_json

SUMMARY_NAME = "batch-summary.json"


# ------------------------------------------------------------------------------------------------ sharding


def inversion_groups(lines: Iterable[BatchLine]) -> list[list[BatchLine]]:
    """Lines that may share an inversion (same :attr:`BatchLine.sharing_key`), groups in order of first line."""
    groups: dict[tuple, list[BatchLine]] = {}
    for entry in sorted(lines, key=lambda e: e.line_no):
        groups.setdefault(entry.sharing_key, []).append(entry)
    return list(groups.values())


def shard(lines: Iterable[BatchLine], num_processes: int) -> list[list[BatchLine]]:
    """Deal whole inversion groups to ``num_processes`` shards, each to the shard with the fewest lines so far.

    Deterministic: every process computes the same split from the same manifest, so no line is run twice.
    """
    shards: list[list[BatchLine]] = [[] for _ in range(max(1, num_processes))]
    for group in sorted(inversion_groups(lines), key=lambda g: (-len(g), g[0].line_no)):
        min(shards, key=len).extend(group)  # min() takes the first of equals: the lowest process index
    return [sorted(s, key=lambda e: e.line_no) for s in shards]


# ------------------------------------------------------------------------------------------------ outputs


def output_status(entry: BatchLine, out: Path, model: str) -> str:
    """``"done"`` when the line's PNG exists and carries the line's hash (its JSON record is repaired if
    needed), ``"changed"`` when a PNG exists from other parameters, ``"missing"`` otherwise."""
    from pfbdiff.io.outputs import read_png_metadata

    target = out / entry.output
    if not target.is_file():
        return "missing"
    try:
        metadata = read_png_metadata(target)
    except PFBDiffError:
        return "changed"
    if metadata.get("batch_hash") != entry.parameters_hash(model):
        return "changed"
    record = out / entry.record_name
    try:
        ok = json.loads(record.read_text()).get("batch_hash") == metadata["batch_hash"]
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:  # killed between the PNG and its record: write the record again from the PNG
        write_json(record, _record(entry, metadata))
    return "done"


def remove_stale_temporaries(entries: Iterable[BatchLine], out: Path) -> int:
    """Delete temporary files a killed run left for these lines' outputs (and only theirs); return how many."""
    return outputs.remove_stale_temporaries(out / name for entry in entries for name in (entry.output, entry.record_name))


def _record(entry: BatchLine, metadata: dict) -> dict:
    return {"line": entry.line_no, "output": entry.output, **metadata}


# ------------------------------------------------------------------------------------------------ running


@dataclass
class BatchSummary:
    """What one process (or, merged, the whole run) did."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"line", "output", "reason"}
    seconds: float = 0.0
    edit_seconds: float = 0.0
    inversions: int = 0
    unet_calls: int = 0
    processes: int = 1
    # a mistake in the command itself (the model will not load, ...) that stopped a process: the error's fields
    stopped_by: list[dict] = field(default_factory=list)

    @property
    def edits_per_minute(self) -> float:
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 and self.done else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "edits_per_minute": round(self.edits_per_minute, 3)}

    @classmethod
    def merged(cls, parts: list[dict]) -> "BatchSummary":
        total = cls(processes=len(parts))
        for part in parts:
            total.done += part["done"]
            total.skipped += part["skipped"]
            total.failed += part["failed"]
            total.seconds = max(total.seconds, part["seconds"])  # processes run side by side
            total.edit_seconds += part["edit_seconds"]
            total.inversions += part["inversions"]
            total.unet_calls += part["unet_calls"]
            total.stopped_by += [error for error in part["stopped_by"] if error not in total.stopped_by]
        total.failed.sort(key=lambda f: f["line"])
        return total


@dataclass
class Reporter:
    """Hooks for progress: ``start(total)``, ``line(entry, status, message)``, ``step()`` (a denoising step)."""

    start: Callable[[int, int], None] = lambda lines, steps: None
    line: Callable[[BatchLine | BadLine, str, str], None] = lambda entry, status, message: None
    step: Callable[[], None] = lambda: None


def run_shard(lines: list[BatchLine], bad: list[BadLine], out: Path, *, model: str, load_pipe: Callable[[], Any],
              reporter: Reporter | None = None, report_bad: bool = True) -> BatchSummary:
    """Run this process's ``lines`` into ``out``: skip those already done, edit the rest group by group.

    ``load_pipe()`` is only called when some line needs editing, so a finished batch reruns in a moment.
    ``bad`` lines are counted as failed when ``report_bad`` (one process reports them).
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    summary = BatchSummary()

    def fail(entry, reason):
        summary.failed.append({"line": entry.line_no, "output": entry.output, "reason": reason})
        reporter.line(entry, "failed", reason)

    if report_bad:
        for entry in bad:
            fail(entry, entry.reason)
    remove_stale_temporaries(lines, out)
    todo = []
    for entry in lines:
        if output_status(entry, out, model) == "done":
            summary.skipped.append(entry.output)
            reporter.line(entry, "skipped", "already done with these parameters")
        else:
            todo.append(entry)
    reporter.start(len(todo), sum(e.request.edit_steps() for e in todo))
    pipe = None
    if todo:
        pipe = load_pipe()
        out.mkdir(parents=True, exist_ok=True)  # once the model loaded: a command that cannot run writes nothing
    for group in inversion_groups(todo):
        inversions = InversionCache(size=len(group))  # lines of one group may share an inversion
        for entry in group:
            edit_started = time.perf_counter()
            try:
                request = entry.request_for(model)
                outcome = run_request(request, pipe, load_inputs(request), inversions=inversions,
                                      on_edit_step=lambda _: reporter.step())
                record = {**outcome.record, "batch_hash": entry.parameters_hash(model)}
                target, protect = out / entry.output, {"input image": entry.image, "mask": entry.mask}
                target.parent.mkdir(parents=True, exist_ok=True)  # "output" may name a subfolder
                if region_notes(record):  # the edit region is not the mask: save it, as the CLI does
                    record["edit_region_file"] = str(region_path(target))
                    save_png(outcome.result.masks[0], region_path(target), record, protect=protect)
                save_png(outcome.result.images[0], target, record, protect=protect)
                write_json(out / entry.record_name, _record(entry, record))
            except Exception as error:  # noqa: BLE001 - one bad line must not stop the batch
                fail(entry, _reason(error))
                continue
            seconds = time.perf_counter() - edit_started
            summary.edit_seconds += seconds
            summary.unet_calls += record["unet_calls"]
            summary.inversions += not outcome.shared_inversion
            summary.done.append(entry.output)
            note = " (shared inversion)" if outcome.shared_inversion else ""
            reporter.line(entry, "done", f"{seconds:.1f} s, {record['unet_calls']} U-Net passes{note}")
    summary.seconds = time.perf_counter() - started
    return summary


def _reason(error: Exception) -> str:
    if isinstance(error, PFBDiffError):
        return one_line(error.naming(json_key))
    return f"internal error ({type(error).__name__}: {one_line(str(error))}); please report it"


# ------------------------------------------------------------------------------------------------ processes


def launched_by_accelerate() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` / ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(device: str | None):
    """accelerate's PartialState: which process this is, of how many, and its device.

    Under ``accelerate launch`` / ``torchrun`` the processes join one group (gloo on CPUs, NCCL on GPUs) with a
    long timeout, because processes that finish early wait for the others at the end.
    """
    import torch
    from accelerate import PartialState

    cpu = (device or "").startswith("cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, **({"timeout": timedelta(days=7)} if launched_by_accelerate() else {}))


def gather_summaries(state, summary: BatchSummary) -> BatchSummary:
    """All processes' summaries merged (on every process)."""
    if state.num_processes == 1:
        return BatchSummary.merged([summary.as_dict()])
    from accelerate.utils import gather_object

    return BatchSummary.merged(gather_object([summary.as_dict()]))


#: The file in which processes started by :func:`launch_processes` report a mistake in the command, for the
#: launching process to print once (instead of torchrun stopping the others and printing its failure report).
ERRORS_FILE_VARIABLE = "PFBDIFF_BATCH_ERRORS"


def end_launched_process(code: int, error: str | None = None) -> None:
    """Exit a process started by ``accelerate launch`` now, without the interpreter's teardown.

    Its work is written and its process group destroyed, yet torch's gloo backend can still abort
    ("terminate called without an active exception", SIGABRT) while the interpreter finalises, about one
    exit in six on two CPU processes; the launcher then reports the whole batch as failed. A user ``error``
    (one line) goes to the launching process's error file when there is one, and the process ends with 0 so
    torchrun does not report a crash; otherwise it is printed and the process ends with ``code``.
    """
    import sys

    errors_file = os.environ.get(ERRORS_FILE_VARIABLE)
    if error is not None and errors_file:
        with open(errors_file, "a", encoding="utf-8") as stream:  # one short append per process: not interleaved
            stream.write(error.replace("\n", " ") + "\n")
        code = 0
    elif error is not None:
        print(f"error: {error}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch_processes(num_processes: int, batch_args: list[str]) -> tuple[int, list[str]]:
    """Run ``pfbdiff batch`` in ``num_processes`` processes (:func:`launcher_command`); return the launcher's exit
    code and the distinct user errors its processes reported."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pfbdiff-batch-") as folder:
        errors_file = Path(folder) / "errors.txt"
        environment = {**os.environ, ERRORS_FILE_VARIABLE: str(errors_file)}
        code = subprocess.call(launcher_command(num_processes, batch_args), env=environment)
        errors = errors_file.read_text("utf-8").splitlines() if errors_file.exists() else []
    return code, list(dict.fromkeys(errors))


def launcher_command(num_processes: int, batch_args: list[str]) -> list[str]:
    """``accelerate launch`` of ``pfbdiff batch`` in ``num_processes`` processes on this machine.

    ``--multi_gpu`` is accelerate's name for its torchrun launcher; on a machine without GPUs the processes
    run on the CPU and join a gloo group.
    """
    import sys

    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "pfbdiff", "batch", *batch_args,
    ]


# ------------------------------------------------------------------------------------------------ command


def run_batch_command(manifest: Path, out: Path, *, model: str | None, steps: int | None, guidance: float | None,
                      device: str | None, dtype: str | None, allow_pickle: bool, config: str | None,
                      console, loras=(), embeddings=()) -> int:
    """``pfbdiff batch`` in this process (one shard when launched by accelerate); return the exit code."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from pfbdiff.apps.provenance import model_reference
    from pfbdiff.models.catalog import default_model
    from pfbdiff.pipeline import load_pipeline

    if model is None:
        model, _ = default_model()  # the loader prints a note when that is the random-weight 'tiny'
    model = model_reference(model)  # a local folder as an absolute path, as in `pfbdiff edit` records
    adapters = adapter_fields(loras, embeddings)
    lines, bad = read_manifest(manifest, steps=steps, guidance=guidance, model=model, adapters=adapters)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PFBDiffError(f"--out {out} is a file; give a folder (it is created if missing)")
    state = process_state(device)
    index, count = state.process_index, state.num_processes
    mine = shard(lines, count)[index]
    tag = f"\\[process {index + 1}/{count}] " if count > 1 else ""  # escaped: rich reads [..] as markup
    device = device or (str(state.device) if count > 1 else None)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("edits"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
        disable=not state.is_local_main_process,
    )
    tasks = {}

    def on_start(n_lines, n_steps):
        tasks["lines"] = progress.add_task(f"{tag}editing", total=n_lines)
        tasks["steps"] = progress.add_task(f"{tag}denoising", total=n_steps)

    def on_line(entry, status, message):
        colour = {"done": "green", "skipped": "cyan", "failed": "red"}[status]
        name = entry.output or f"line {entry.line_no}"
        console.print(f"{tag}[{colour}]{status}[/] line {entry.line_no} → {name}: {message}", highlight=False,
                      soft_wrap=True)
        if status == "done" and "lines" in tasks:
            progress.advance(tasks["lines"])

    reporter = Reporter(start=on_start, line=on_line, step=lambda: progress.advance(tasks["steps"]))
    try:
        with progress:
            summary = run_shard(mine, bad, out, model=model, reporter=reporter, report_bad=index == 0,
                                load_pipe=lambda: load_pipeline(model, torch_dtype=dtype, device=device, **adapters,
                                                                allow_pickle=allow_pickle, config=config, quiet=True))
    except PFBDiffError as error:
        if count == 1:
            raise
        # the other processes wait for this one at the gather: meet them there, then all stop with the error
        summary = BatchSummary(stopped_by=[{"message": str(error), "parameter": error.parameter,
                                            "detail": error.detail}])
    total = gather_summaries(state, summary)
    if count > 1:
        state.destroy_process_group()  # a clean exit, without torch's warning about a live group
    if total.stopped_by:
        first = total.stopped_by[0]
        raise PFBDiffError(first["message"], parameter=first["parameter"], detail=first["detail"])
    if state.is_main_process:
        record = {"manifest": str(Path(manifest).resolve()), "model": model, "out": str(out.resolve()),
                  **total.as_dict()}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SUMMARY_NAME, record)
        rate = f", {total.edits_per_minute:.1f} edits/min" if total.done else ""
        console.print(
            f"[bold]summary[/]: {len(total.done)} done, {len(total.skipped)} skipped (already done), "
            f"{len(total.failed)} failed — {total.seconds:.1f} s on {total.processes} process(es){rate}; "
            f"{total.inversions} inversion(s) for {len(total.done)} edit(s). Written: {out / SUMMARY_NAME}",
            highlight=False, soft_wrap=True,
        )
        for failure in total.failed:
            console.print(f"  [red]line {failure['line']}[/]: {failure['reason']}", highlight=False, soft_wrap=True)
    return 1 if total.failed else 0
