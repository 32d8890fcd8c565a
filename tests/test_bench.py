"""Unit tests of the benchmark harness (iif_ref.bench)."""
import json
import time
import tracemalloc

import numpy as np
import pytest

from iif_ref import bench


def test_machine_info_is_json_serialisable_and_describes_cpu_and_versions():
    info = bench.machine_info()
    json.dumps(info)  # raises if anything is not serialisable
    assert info["logical_cores"] >= 1
    assert 1 <= info["usable_cores"] <= info["logical_cores"]
    assert info["versions"]["numpy"] == np.__version__
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["memory_bytes"] is None or info["memory_bytes"] > 0
    assert "pools" in info["thread_pools"]


def test_time_callable_calls_warmup_plus_repeats_and_orders_summary():
    calls = []
    r = bench.time_callable(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    assert r.repeats == 4 and r.warmup == 2
    assert r.minimum <= r.median <= r.maximum
    assert 0 <= r.iqr <= r.maximum - r.minimum


def test_time_callable_measures_at_least_the_sleep_time():
    # time.sleep sleeps at least the requested time, so each measurement must be >= it.
    r = bench.time_callable(lambda: time.sleep(0.01), repeats=2, warmup=0)
    assert r.minimum >= 0.01
    assert r.as_dict()["times"] == list(r.times)


@pytest.mark.parametrize("kwargs, exc", [
    ({"repeats": 0}, ValueError), ({"repeats": 1.5}, TypeError),
    ({"warmup": -1}, ValueError), ({"warmup": "1"}, TypeError)])
def test_time_callable_rejects_bad_counts(kwargs, exc):
    with pytest.raises(exc, match="repeats|warmup"):
        bench.time_callable(lambda: None, **kwargs)


def test_time_callable_rejects_non_callable():
    with pytest.raises(TypeError, match="fn"):
        bench.time_callable(3)


def test_peak_memory_sees_a_transient_numpy_allocation():
    nbytes = 8 * 2_000_000

    def allocate_and_drop():
        a = np.ones(2_000_000)
        return float(a.sum())

    m = bench.peak_memory(allocate_and_drop)
    assert m.result == 2_000_000.0
    # NumPy reports its buffers to tracemalloc: the peak covers the 16 MB array, and the
    # small Python overhead of the call stays far below another array's worth.
    assert nbytes <= m.tracemalloc_peak < 2 * nbytes
    assert m.maxrss_increase >= 0
    assert set(m.as_dict()) == {"tracemalloc_peak", "rss_delta", "rss_peak_delta",
                                "maxrss_increase"}
    assert not tracemalloc.is_tracing()


def test_peak_memory_stops_tracing_when_the_callable_raises():
    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.peak_memory(boom)
    assert not tracemalloc.is_tracing()


def test_gemm_roofline_reports_consistent_flop_rate():
    r = bench.gemm_roofline(16, 32, 8, np.float32, repeats=2, warmup=1)
    assert (r["n"], r["m"], r["p"], r["dtype"]) == (16, 32, 8, "float32")
    assert r["gflops"] == pytest.approx(2 * 16 * 32 * 8 / r["seconds"] / 1e9)
    assert r["bytes"] == 4 * (16 * 32 + 32 * 8 + 16 * 8)
    json.dumps(r)


@pytest.mark.parametrize("args, exc", [((0, 2, 2), ValueError), ((2, 2, 2.0), TypeError)])
def test_gemm_roofline_rejects_bad_shapes(args, exc):
    with pytest.raises(exc):
        bench.gemm_roofline(*args)


def test_gemm_roofline_rejects_integer_dtype():
    with pytest.raises(TypeError, match="dtype"):
        bench.gemm_roofline(2, 2, 2, np.int64)


def test_write_results_round_trips_numpy_values_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    rows = [{"x": np.float32(1.5), "n": np.int64(3), "a": np.arange(3), "none": None}]
    out = bench.write_results(path, rows, {"cmd": "test"}, machine=False)
    assert out == path
    data = json.loads(path.read_text())
    assert data == {"meta": {"cmd": "test"},
                    "rows": [{"x": 1.5, "n": 3, "a": [0, 1, 2], "none": None}]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_results_replaces_an_existing_file_and_adds_machine(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    bench.write_results(path, [{"a": 1}], {})
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1}] and "cpu_model" in data["machine"]


def test_write_results_rejects_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="non-finite"):
        bench.write_results(path, [{"a": float("nan")}], {}, machine=False)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("rows", ["abc", {"a": 1}, [1, 2]])
def test_write_results_rejects_rows_that_are_not_dicts(tmp_path, rows):
    with pytest.raises(TypeError, match="rows"):
        bench.write_results(tmp_path / "r.json", rows, {}, machine=False)
