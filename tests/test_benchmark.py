"""The step benchmark still runs end to end and writes the report it promises.

It runs once, in its hidden smoke mode (every workload's dimensions divided by 16,
a few steps), in a subprocess as a user would run it.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: on a busy machine OpenMP barriers make torch's steps over thousands
    # of tensors take seconds, and the smoke run measures nothing anyway.
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--threads", "1",
               "--json", str(out / "report.json")]
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", str(out / "report.png")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out, result.stdout, json.loads((out / "report.json").read_text())


def test_json_report_has_a_measured_row_per_workload(smoke_run):
    _, _, report = smoke_run
    for key in ("device", "torch", "fusedopt", "backend_info", "command", "timestamp_utc"):
        assert report[key], key
    assert report["copy_gbps"] > 0
    workloads = {row["workload"] for row in report["rows"]}
    assert workloads == set(report["workloads"]) == {
        "large", "gpt2-124m", "llama-layers", "many-4k", "mid", "tiny"}
    for workload in workloads:
        rows = [row for row in report["rows"] if row["workload"] == workload]
        optimizers = {(row["optimizer"], row["dtype"]) for row in rows}
        assert len(optimizers) == 8, (workload, optimizers)  # OPTIMIZERS in bench_step.py
        for optimizer, dtype in optimizers:
            by_impl = {row["impl"]: row for row in rows
                       if (row["optimizer"], row["dtype"]) == (optimizer, dtype)}
            ours = by_impl["fusedopt"]
            # torch-fused; torch-foreach for RMSprop; fp32 masters for bf16 master weights;
            # fusedopt rounding to nearest for stochastic rounding
            baseline = by_impl[ours["baseline"]]
            for row in (baseline, ours):
                assert row["error"] is None, row
                assert row["median_ms"] > 0 and row["gbps"] > 0, row
                assert row["numel"] == report["workloads"][workload]["numel"] > 0
                # params, grads and states at least: half of what a step reads and writes
                assert row["peak_memory_bytes"] >= row["numel"] * row["floor_bytes_per_param"] / 2
            assert baseline["ratio_vs_baseline"] == 1.0
            assert math.isclose(ours["ratio_vs_baseline"], baseline["median_ms"] / ours["median_ms"])


def test_markdown_table_names_every_row(smoke_run):
    _, stdout, report = smoke_run
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(report["rows"])  # the header, then one per row


def test_plot_is_written(smoke_run):
    pytest.importorskip("matplotlib")
    out, _, _ = smoke_run
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
