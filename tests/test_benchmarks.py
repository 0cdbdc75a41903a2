"""Smoke test of the benchmark harness (``python -m benchmarks``): structure, never timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import gradicon_fast as gf  # noqa: E402
from benchmarks import cases as C  # noqa: E402
from benchmarks import report, runner  # noqa: E402

BACKENDS = ["torch"] + (["cpu"] if gf.backends()["cpu"] else [])


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    rc = runner.main(["--device", "cpu", "--sizes", "tiny", "--repeat", "1", "--backends", ",".join(BACKENDS),
                      "--output", str(out), "--quiet", *extra])
    assert rc == 0
    with open(out) as f:
        return json.load(f)


def _check_common(result: dict, ops: list[str]) -> None:
    assert result["schema"] == runner.SCHEMA
    assert result["device"].startswith("cpu-") and result["device"].endswith("threads")
    env = result["environment"]
    for key in ("torch", "cpu_model", "threads", "date", "git", "gradicon_fast_backends"):
        assert key in env
    assert result["config"]["backends"] == BACKENDS
    assert [c["op"] for c in result["cases"]] == ops
    for case in result["cases"]:
        assert case["size"]["label"] == "tiny" and case["size"]["n"] == C.PRESETS["tiny"]
        assert case["field_bytes"] > 0 and case["grad_bytes"] == case["field_bytes"]
        assert case["moved_bytes_fwd_bwd"] > case["moved_bytes_fwd"] > 0
        assert set(case["results"]) == set(BACKENDS)
        for backend, r in case["results"].items():
            if case["op"] == "gradicon_analytic" and backend != "torch" and r["status"] == "error":
                assert r["error"]  # a fused backend may not offer the analytic mode yet
                continue
            assert r["status"] == "ok", (case["op"], backend, r.get("error"))
            assert len(r["fwd_bwd_s"]) == 1 and len(r["fwd_s"]) == 1
            for key in ("fwd_bwd_median_s", "fwd_median_s", "speedup_fwd_bwd", "speedup_fwd"):
                assert _positive_finite(r[key]), (case["op"], backend, key, r[key])
        assert case["results"]["torch"]["speedup_fwd_bwd"] == 1.0


def test_runner_tiny_all_ops(tmp_path):
    """Every op on the reference and the CPU kernels, one repetition, no memory probes."""
    result = _run(tmp_path, "all", "--warmup", "0", "--no-memory", "--note", "smoke test")
    ops = C.default_ops()
    _check_common(result, ops)
    assert result["config"]["note"] == "smoke test"
    assert result["copy_bandwidth"] is None  # CPU run
    for case in result["cases"]:
        for r in case["results"].values():
            assert r["memory"] is None and r["bandwidth"] is None

    table = report.console_table(result)
    assert all(op in table for op in ops)
    (tmp_path / "other_tool.json").write_text(json.dumps({"peak": 1}))  # results/ is shared with other tools
    loaded = report.load(report.result_files(tmp_path))
    assert [r["device"] for r in loaded] == [result["device"]]
    section = report.markdown(loaded)
    assert section.count("\n| ") >= len(ops) * len(BACKENDS) + 1
    md = tmp_path / "BENCH.md"
    md.write_text(f"# title\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    report.update_markdown(md, section)
    text = md.read_text()
    assert "old table" not in text and "before" in text and "after" in text and "gradicon_sparse" in text


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_runner_memory_probe(tmp_path):
    """The peak-RSS probe runs in a subprocess per backend and reports the extra memory."""
    result = _run(tmp_path, "memory", "--warmup", "1", "--ops", "gradicon_sparse")
    _check_common(result, ["gradicon_sparse"])
    for backend, r in result["cases"][0]["results"].items():
        mem = r["memory"]
        assert mem["method"] == "cpu-peak-rss"
        assert mem["supported"], mem
        assert mem["peak_bytes"] >= mem["baseline_bytes"] > 0
        assert mem["returned_grad_bytes"] == mem["grad_bytes"] == result["cases"][0]["grad_bytes"]
        assert math.isfinite(mem["extra_fraction"])


def test_sizes_and_byte_counts():
    lung = C.parse_size("lung")
    assert lung.field_sides == (44, 88, 175, 175)
    case = C.Case(op="gradicon_sparse", size=lung)
    assert case.points_shape == (88, 88, 88)
    assert C.parse_size("20").field_sides == (5, 10, 20, 20)
    with pytest.raises(ValueError):
        C.parse_size("huge")
    tiny = C.Case(op="warp", size=C.parse_size("tiny"), batch=2)
    inputs = tiny.build()
    counts = C.byte_counts(tiny, inputs)
    fields = sum(2 * 3 * s ** 3 * 4 for s in tiny.size.field_sides)
    image = 2 * 12 ** 3 * 4
    assert counts["field_bytes"] == counts["grad_bytes"] == fields
    assert counts["output_bytes"] == image
    assert counts["moved_bytes_fwd"] == fields + image + image
    assert counts["moved_bytes_fwd_bwd"] == 2 * fields + 2 * image + image + image + fields
    assert all(t.requires_grad for t in inputs.grad_inputs) and not inputs.image.requires_grad


def test_bandwidth_and_gpu_table():
    """The GPU-only columns, from a synthetic result (the bandwidth figures need a GPU to measure)."""
    from benchmarks import measure

    bw = measure.bandwidth(moved_fwd=10**9, moved_fwd_bwd=3 * 10**9, fwd_s=0.01, fwd_bwd_s=0.02, copy_gbps=300.0)
    assert bw["fwd_gb_per_s"] == pytest.approx(100.0) and bw["fwd_bwd_gb_per_s"] == pytest.approx(150.0)
    assert bw["fwd_bwd_fraction_of_copy"] == pytest.approx(0.5)
    record = {"status": "ok", "fwd_bwd_median_s": 0.02, "fwd_median_s": 0.01, "speedup_fwd_bwd": 10.0,
              "speedup_fwd": 12.0, "bandwidth": bw,
              "memory": {"supported": True, "extra_bytes": 2 * 1024 * 1024, "extra_fraction": 0.01}}
    result = {"device": "nvidia-test", "config": {"note": "synthetic"}, "copy_bandwidth": {"gb_per_s": 300.0},
              "environment": {"device": "cuda", "cuda": {"gpu_name": "Test GPU", "cuda_runtime": "12.8"},
                              "cpu_model": "x", "threads": 1, "cpu_count": 1, "torch": "2", "date": "today"},
              "cases": [{"op": "warp", "size": {"label": "lung", "n": 175}, "batch": 4, "field_bytes": 10 ** 8,
                         "grad_bytes": 10 ** 8, "results": {"cuda": record}}]}
    table = report.console_table(result)
    assert "GB/s fwd+bwd" in table and "150" in table and "50%" in table and "300 GB/s" in table
    assert "| warp | lung (175) | 4 | cuda |" in report.markdown_section(result)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_runner_tiny_cuda(tmp_path):
    """On a GPU machine: the CUDA path (events, memory stats, copy bandwidth) end to end."""
    out = tmp_path / "cuda.json"
    assert runner.main(["--device", "cuda", "--sizes", "tiny", "--repeat", "1", "--warmup", "1",
                        "--ops", "gradicon_sparse,warp", "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["copy_bandwidth"]["gb_per_s"] > 0
    for case in result["cases"]:
        r = case["results"]["torch"]
        assert r["status"] == "ok" and r["memory"]["method"] == "cuda-max-memory-allocated"
        assert _positive_finite(r["bandwidth"]["fwd_bwd_gb_per_s"])
        for other in case["results"].values():
            assert other["status"] in ("ok", "error")


def _official_report_checks(result: dict, size: int, steps: int) -> None:
    from benchmarks import official

    assert result["benchmark"] == "official" and result["device"].startswith("cpu-")
    assert result["config"]["size"] == size and result["config"]["steps"] == steps
    assert set(result["sides"]) == set(official.SIDES)
    for side, r in result["sides"].items():
        assert r["ok"], (side, r.get("error"), r.get("stderr"))
        assert r["side"] == side and r["size"] == size
        fwd = r["forward"]
        assert fwd["peak_reset"] and _positive_finite(fwd["seconds"]) and fwd["extra_mb"] >= 0
        if steps:
            io = r["io_step"]
            assert len(io["seconds_all"]) == steps and _positive_finite(io["seconds"]) and io["extra_mb"] >= 0
            assert len(io["similarity_per_step"]) == steps + 1  # the warm-up step, then the timed ones
    # The same weight file and images on both sides: the same maps and the same similarity term.
    ours, theirs = result["sides"]["gradicon_fast"], result["sides"]["official"]
    assert min(theirs["forward"]["mean_abs_displacement"]) > 1e-5  # the random weights move points
    assert ours["forward"]["mean_abs_displacement"] == pytest.approx(theirs["forward"]["mean_abs_displacement"],
                                                                      rel=1e-3)
    if steps:
        assert ours["io_step"]["similarity_per_step"][0] == pytest.approx(
            theirs["io_step"]["similarity_per_step"][0], rel=1e-4)


def test_official_benchmark_forward(tmp_path):
    """``python -m benchmarks official`` at the official U-Net's smallest grid, forward registration only."""
    pytest.importorskip("icon_registration")
    import subprocess

    out = tmp_path / "official.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "official", "--size", "65", "--steps", "0",
                           "--output", str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "forward registration, s" in proc.stdout and "instance-optimisation" not in proc.stdout
    _official_report_checks(json.loads(out.read_text()), 65, 0)


@pytest.mark.slow
def test_official_benchmark_steps(tmp_path):
    """The same with one timed instance-optimisation step on each side (minutes on two cores)."""
    pytest.importorskip("icon_registration")
    from benchmarks import official

    out = tmp_path / "official.json"
    assert official.main(["--size", "65", "--steps", "1", "--output", str(out)]) == 0
    _official_report_checks(json.loads(out.read_text()), 65, 1)


def test_official_benchmark_bad_options():
    from benchmarks import official

    with pytest.raises(SystemExit, match="--size must be >= 65"):
        official.main(["--size", "64"])
    with pytest.raises(SystemExit, match="--steps must be >= 0"):
        official.main(["--steps", "-1"])
