"""The speed benchmark (pfbdiff.bench.speed): what each job costs in U-Net passes, wall time and peak memory."""

import sys

import pytest
import torch

from pfbdiff.bench import speed


def test_the_jobs_cost_the_passes_the_method_says_and_report_their_peak_memory():
    rows = {row["job"][:3]: row for row in speed.run_speed_benchmark("tiny", size=128, steps=2, repeats=1)}
    k = 2
    assert {job: row["unet_passes"] for job, row in rows.items()} == {"(a)": k, "(b)": 2 * k, "(c)": k, "(d)": 4 * k}
    assert {job: row["unet_evaluations"] for job, row in rows.items()} == {"(a)": 2 * k, "(b)": 3 * k, "(c)": 2 * k,
                                                                          "(d)": 4 * k}
    assert rows["(a)"]["ratio"] == 1.0
    if sys.platform == "linux":
        assert all(row["peak_memory_gb"] > 0 for row in rows.values()) and rows["(a)"]["memory_ratio"] == 1.0
    table = speed.format_table(list(rows.values()))
    assert table.count("\n") == 5 and "peak memory GiB" in table
    assert {(row["device"], row["dtype"]) for row in rows.values()} == {("cpu", "float32")}


def test_the_models_can_be_timed_in_half_precision():
    rows = speed.run_speed_benchmark("tiny", size=128, steps=1, repeats=1, device="cpu", dtype="bfloat16")
    assert {row["dtype"] for row in rows} == {"bfloat16"} and all(row["seconds"] > 0 for row in rows)


@pytest.mark.skipif(sys.platform != "linux", reason="resident memory is read from /proc")
def test_the_peak_memory_of_a_job_sees_what_it_allocates():
    def job():
        block = torch.ones(64, 2**20)  # 256 MiB, written, so resident
        return float(block.sum())

    before = speed._resident_bytes()
    assert speed._peak_memory(job, torch.device("cpu")) - before > 200 * 2**20


def test_an_sdxl_model_skips_the_paper_job_whose_block_numbers_are_sd1s(monkeypatch, tmp_path):
    from pfbdiff.models.toy_models import save_tiny_model
    from pfbdiff.pipeline import load_pipeline

    sdxl = load_pipeline(str(save_tiny_model(tmp_path / "xl", family="sdxl")), quiet=True)
    monkeypatch.setattr(speed, "benchmark_pipeline", lambda name, device, dtype: sdxl)
    rows = speed.run_speed_benchmark("tiny-sdxl", size=128, steps=1, repeats=1)
    assert [row["job"][:3] for row in rows] == ["(a)", "(b)", "(c)"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_a_flow_model_the_inversion_records_the_source_tokens_and_the_first_step_brings_its_own(monkeypatch,
                                                                                                    family):
    """On SD3 and Flux an Euler inversion records the blend window's source tokens where the edit needs them, all
    but the first edit step's (Z[K] is never evaluated while inverting): that step's source row rides in the
    target's call. So an edit costs K calls, K target steps' rows and one source row; SD3's target rows carry
    the guidance rows, Flux's (guidance-distilled) do not."""
    from pfbdiff.flow_pipeline import flow_pipeline_class
    from pfbdiff.models.toy_flow_models import reduced_flow_components, tiny_flow_components

    components = tiny_flow_components(family)
    pipe = flow_pipeline_class(components)(**components)
    monkeypatch.setattr(speed, "benchmark_pipeline", lambda name, device, dtype: speed._quiet(pipe))
    rows = {row["job"][:3]: row for row in speed.run_speed_benchmark(family, size=128, steps=2, repeats=1)}
    k, guided = 2, 2 if family == "sd3" else 1
    assert {job: row["unet_passes"] for job, row in rows.items()} == {"(a)": k, "(b)": 2 * k, "(c)": k}
    assert {job: row["unet_evaluations"] for job, row in rows.items()} == {
        "(a)": guided * k, "(b)": k + guided * k + 1, "(c)": guided * k + 1}
    reduced = reduced_flow_components(family, sample_size=8)["transformer"]
    assert sum(p.numel() for p in reduced.parameters()) > 2e7  # the timed architecture is not the tiny one
