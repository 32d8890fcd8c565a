"""GPU benchmark of the CuPy backend, as ratios measured in one run on one device.

1. Projection ``Phi = G A``: the on-the-fly kernel (``A`` regenerated per tile, never
   stored) against cuBLAS GEMM (``cupy.matmul``) with ``A`` materialised on the device
   (generation excluded from the GEMM time) -- the roofline the kernel is compared with;
   and the CountSketch kernel (``kernels/countsketch.cu``, ``O(n M)``) on the same ``G``,
   with its bytes checked against the C++ host twin on the first rows.
2. Projected scores ``-sum_b Gamma_b F_b^-1 Psi_b^T``: the batched path (Gram kernel,
   batched Cholesky, batched triangular solves) against a Python loop over the slices
   doing the same float64 work with single-matrix CuPy calls, and, at the smallest size,
   against the NumPy oracle on the host CPU.

Times are GPU event times from ``cupyx.profiler.benchmark`` (median of the repeats, after
warm-up, which also covers the one-off NVRTC compile). Prints a table and writes JSON with
the machine description (``iif_ref.bench.write_results``) to ``--out``, default
``$OUT/bench_kernels_gpu.json`` when ``$OUT`` is set, else ``results/``.

Run: ``python validation/bench_kernels_gpu.py [--quick] [--out PATH]`` on a CUDA machine
(``validation/gpu_check.sh`` runs it). Needs CuPy and a device; exits 2 otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from iif_ref.bench import write_results
from iif_ref.kernels._registry import backend_status, get_backend

PROJECTION_SIZES = [  # (n, M, P, dtype)
    (1024, 2**18, 512, "float32"),
    (1024, 2**18, 512, "float64"),
    (2048, 2**20, 1024, "float32"),
    (4096, 2**18, 4096, "float32"),
]
SCORE_SIZES = [  # (B, N, P, T)
    (64, 2048, 128, 16),
    (32, 4096, 512, 16),
    (8, 8192, 1024, 32),
]
QUICK_PROJECTION = PROJECTION_SIZES[:2]
QUICK_SCORES = SCORE_SIZES[:1]


def _gpu_median(fn, *, repeats, warmup):
    from cupyx.profiler import benchmark
    result = benchmark(fn, (), n_repeat=repeats, n_warmup=warmup)
    return float(np.median(result.gpu_times[0]))


def bench_projection(cb, sizes, repeats, deadline, skipped):
    import cupy
    rows = []
    for n, M, P, dtype in sizes:
        if time.perf_counter() > deadline:
            skipped.append({"bench": "projection", "n": n, "M": M, "P": P, "dtype": dtype})
            continue
        rng = cupy.random.default_rng(0)
        G = rng.standard_normal((n, M), dtype=dtype)
        A = cupy.empty((M, P), dtype=dtype)
        # Materialise A once with the generate kernel (the GEMM's matrix is the same A).
        gen = cb._kernel("projection.cu", f"iif_generate_{cb._suffix(np.dtype(dtype))}")
        grid, block = cb.generate_launch(M, P)
        gen(grid, block, (np.uint64(1), np.uint64(0), np.int64(M), np.int64(P), np.int32(0), A))
        t_kernel = _gpu_median(lambda: cb.project(G, P, seed=1, kind="rademacher",
                                                  chunk_rows=M), repeats=repeats, warmup=2)
        t_gemm = _gpu_median(lambda: cupy.matmul(G, A), repeats=repeats, warmup=2)
        t_gauss = _gpu_median(lambda: cb.project(G, P, seed=1, kind="gaussian", chunk_rows=M),
                              repeats=max(2, repeats // 2), warmup=1)
        t_sketch = _gpu_median(lambda: cb.project(G, P, seed=1, kind="countsketch",
                                                  chunk_rows=M),
                               repeats=max(2, repeats // 2), warmup=1)
        sketch_bytes_equal = _countsketch_equals_host(cb, G[:4, :4096], P)
        # Accuracy on the first 64 rows (float64 copies of all of G would not fit).
        Phi = cb.project(G[:64], P, seed=1, kind="rademacher", chunk_rows=M)
        G64, A64 = G[:64].astype(np.float64), A.astype(np.float64)
        ref = cupy.matmul(G64, A64)
        scale = cupy.matmul(cupy.abs(G64), cupy.abs(A64))
        rel_err = float(cupy.max(cupy.abs(Phi - ref) / scale))
        del G64, A64
        flops = 2.0 * n * M * P
        rows.append({
            "bench": "projection", "n": n, "M": M, "P": P, "dtype": dtype,
            "t_onthefly_s": t_kernel, "t_gemm_materialised_s": t_gemm,
            "t_onthefly_gaussian_s": t_gauss,
            "ratio_onthefly_over_gemm": t_kernel / t_gemm,
            "ratio_gaussian_over_gemm": t_gauss / t_gemm,
            "t_countsketch_s": t_sketch, "ratio_countsketch_over_gemm": t_sketch / t_gemm,
            "countsketch_equals_host_twin_bytes": sketch_bytes_equal,
            "onthefly_tflops": flops / t_kernel / 1e12, "gemm_tflops": flops / t_gemm / 1e12,
            "A_bytes_not_stored": M * P * np.dtype(dtype).itemsize,
            "max_error_over_sum_abs_first_64_rows": rel_err,
        })
        del G, A, Phi, ref, scale
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _countsketch_equals_host(cb, G, P):
    """Whether the device CountSketch of ``G`` (a few rows) is the host twin's bytes."""
    import cupy

    from iif_ref.kernels import _host
    ok, _ = _host.available()
    if not ok:
        return None
    got = cupy.asnumpy(cb.project(G, P, seed=1, kind="countsketch", chunk_rows=G.shape[1]))
    return got.tobytes() == _host.countsketch(cupy.asnumpy(G), P, seed=1).tobytes()


def _loop_scores(Phi, Psi, Gamma, lam):
    """The same float64 work slice by slice with single-matrix CuPy calls."""
    import cupy
    from cupyx.scipy.linalg import solve_triangular
    out = cupy.zeros((Gamma.shape[1], Phi.shape[1]))
    for b in range(Phi.shape[0]):
        phi = Phi[b].astype(np.float64)
        F = phi.T @ phi + lam * cupy.eye(phi.shape[1])
        L = cupy.linalg.cholesky(F)
        X = solve_triangular(L, Gamma[b].astype(np.float64).T, lower=True)
        X = solve_triangular(L, X, trans="T", lower=True)
        out -= X.T @ Psi[b].astype(np.float64).T
    return out


def bench_scores(cb, sizes, repeats, with_cpu, deadline, skipped):
    import cupy
    rows = []
    for i, (B, N, P, T) in enumerate(sizes):
        if time.perf_counter() > deadline:
            skipped.append({"bench": "projected_scores", "B": B, "N": N, "P": P, "T": T})
            continue
        rng = cupy.random.default_rng(1)
        Phi = rng.standard_normal((B, N, P), dtype=np.float32)
        Psi = rng.standard_normal((B, N, P), dtype=np.float32)
        Gamma = rng.standard_normal((B, T, P), dtype=np.float32)
        lam = np.full(B, 1e-3 * N)
        t_batched = _gpu_median(lambda: cb.projected_scores(Phi, Psi, Gamma, damping=lam,
                                                            reduce=True),
                                repeats=repeats, warmup=2)
        t_loop = _gpu_median(lambda: _loop_scores(Phi, Psi, Gamma, float(lam[0])),
                             repeats=repeats, warmup=1)
        got = cb.projected_scores(Phi, Psi, Gamma, damping=lam, reduce=True)
        loop = _loop_scores(Phi, Psi, Gamma, float(lam[0]))
        row = {"bench": "projected_scores", "B": B, "N": N, "P": P, "T": T,
               "input_dtype": "float32", "t_batched_s": t_batched, "t_python_loop_s": t_loop,
               "ratio_batched_over_loop": t_batched / t_loop,
               "max_abs_diff_vs_loop": float(cupy.max(cupy.abs(got - loop))),
               "max_abs_score": float(cupy.max(cupy.abs(loop)))}
        if with_cpu and i == 0:
            host = [cupy.asnumpy(a) for a in (Phi, Psi, Gamma)]
            numpy_backend = get_backend("numpy")
            t0 = time.perf_counter()
            cpu = numpy_backend.projected_scores(*host, damping=lam, reduce=True)
            t_cpu = time.perf_counter() - t0
            row.update({"t_numpy_oracle_cpu_s": t_cpu, "ratio_batched_over_cpu": t_batched / t_cpu,
                        "max_abs_diff_vs_cpu": float(np.max(np.abs(cupy.asnumpy(got) - cpu)))})
        rows.append(row)
        del Phi, Psi, Gamma
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def _print_table(rows):
    for row in rows:
        if row["bench"] == "projection":
            print(f"projection n={row['n']:>5} M={row['M']:>8} P={row['P']:>5} {row['dtype']}: "
                  f"on-the-fly/GEMM = {row['ratio_onthefly_over_gemm']:6.2f}  "
                  f"(gaussian {row['ratio_gaussian_over_gemm']:6.2f}; "
                  f"{row['onthefly_tflops']:.1f} vs {row['gemm_tflops']:.1f} TFLOP/s; "
                  f"A not stored: {row['A_bytes_not_stored'] / 2**30:.2f} GiB; "
                  f"max err/sum|GA| {row['max_error_over_sum_abs_first_64_rows']:.1e}); "
                  f"countsketch/GEMM = {row['ratio_countsketch_over_gemm']:6.3f} "
                  f"(bytes = host twin: {row['countsketch_equals_host_twin_bytes']})")
        else:
            extra = ""
            if "ratio_batched_over_cpu" in row:
                extra = f"; batched/CPU oracle = {row['ratio_batched_over_cpu']:.3f}"
            print(f"scores B={row['B']:>3} N={row['N']:>5} P={row['P']:>5} T={row['T']:>3}: "
                  f"batched/loop = {row['ratio_batched_over_loop']:6.3f}  "
                  f"(max |diff| {row['max_abs_diff_vs_loop']:.1e} of "
                  f"{row['max_abs_score']:.1e}{extra})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds after which remaining sizes are skipped (and listed)")
    args = parser.parse_args(argv)
    ok, reason = backend_status("cupy")
    if not ok:
        print(f"cupy backend unavailable: {reason}", file=sys.stderr)
        return 2
    import cupy
    cb = get_backend("cupy")
    proj_sizes = QUICK_PROJECTION if args.quick else PROJECTION_SIZES
    score_sizes = QUICK_SCORES if args.quick else SCORE_SIZES
    deadline = time.perf_counter() + args.time_budget
    skipped = []
    # Half the budget for each part, so that both are measured.
    rows = bench_projection(cb, proj_sizes, args.repeats,
                            time.perf_counter() + args.time_budget / 2, skipped)
    rows += bench_scores(cb, score_sizes, args.repeats, True, deadline, skipped)
    _print_table(rows)
    for entry in skipped:
        print(f"skipped (time budget): {entry}")
    out = args.out
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("results")
        out = base / "bench_kernels_gpu.json"
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    meta = {"command": " ".join([sys.executable] + sys.argv),
            "device": props["name"].decode() if isinstance(props["name"], bytes)
            else str(props["name"]),
            "multiprocessors": int(props["multiProcessorCount"]),
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "tf32": os.environ.get("CUPY_TF32", "0"),
            "timing": "cupyx.profiler.benchmark GPU event times, median of repeats",
            "skipped_for_time_budget": skipped}
    path = write_results(out, rows, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
