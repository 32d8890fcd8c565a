"""Benchmark of the kernel layer: projection throughput and batched Fisher solves.

Run from a source checkout::

    python validation/bench_kernels.py            # or: iif-ref reproduce bench_kernels

Writes ``docs/results/bench_kernels.json`` (with the machine description) and prints
ratios measured in this one run:

1. Projection ``Phi = G A`` (float32, Rademacher) with the Numba backend, holding at
   most the default 64 MiB of ``A``, against the BLAS GEMM ``G @ A`` with ``A``
   materialised (the roofline), and against TRAK's CPU ``BasicProjector`` when the
   ``traker`` package (and torch) import. ``A`` for the paper-scale ``M = 2**20`` rows
   does not fit this machine (16 GB at P = 4096), so every side is timed on the same
   sub-range of ``M_meas`` rows of ``A`` (at most ~256 MiB materialised, and at most
   2e10 flop per call) and reported as throughput in rows of ``A`` per second; the
   time for the full ``M = 2**20`` is ``2**20 / throughput``.
2. Where the GEMM is called: from Python (what the backend does) or as ``np.dot``
   inside a jitted loop.
3. ``projected_scores`` against a Python loop of ``scipy.linalg.cho_factor`` /
   ``cho_solve`` on the same float64 Fishers, with the peak of NumPy allocations
   (tracemalloc) of each.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import scipy.linalg

from iif_ref.bench import machine_info, peak_memory, time_callable, write_results
from iif_ref.kernels import DEFAULT_MEMORY_BUDGET, available_backends, project, projected_scores

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "results" / "bench_kernels.json"
M_PAPER = 2**20
MAX_A_BYTES = 256 * 2**20
MAX_FLOP = 2e10


def _rows_measured(n, proj_dim, itemsize, max_flop):
    rows = min(MAX_A_BYTES // (proj_dim * itemsize), int(max_flop / (2 * n * proj_dim)))
    return max(1024, 1 << (rows.bit_length() - 1))  # a power of two, for readable tables


def _interleaved(fns, repeats):
    """Time the callables alternately (one warm-up each, then ``repeats`` rounds), so
    that load from other processes on a shared machine hits all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            bucket.extend(time_callable(fn, repeats=1, warmup=0).times)
    return [float(np.median(t)) for t in times], times


def _trak_projector(grad_dim, proj_dim):
    """TRAK's CPU projector on these shapes, or (None, reason)."""
    try:
        import torch
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as exc:  # noqa: BLE001 -- any import failure means "skip, say why"
        return None, f"trak/torch not importable: {type(exc).__name__}: {exc}"
    proj = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0,
                          proj_type=ProjectionType.rademacher, device=torch.device("cpu"),
                          dtype=torch.float32)

    def run(G):
        return proj.project(torch.from_numpy(G), model_id=0)
    return run, ""


def bench_projection(sizes, repeats, with_trak, max_flop):
    rows = []
    for n, proj_dim in sizes:
        m = _rows_measured(n, proj_dim, 4, max_flop)
        rng = np.random.default_rng(0)
        G = rng.standard_normal((n, m), dtype=np.float32)
        A = rng.standard_normal((m, proj_dim), dtype=np.float32)  # values irrelevant to BLAS
        out = np.empty((n, proj_dim), dtype=np.float32)
        fns = {"roofline": lambda: np.matmul(G, A, out=out),
               "numba": lambda: project(G, proj_dim, seed=1, backend="numba")}
        trak_reason = "not requested (--no-trak)"
        if with_trak:
            run, trak_reason = _trak_projector(m, proj_dim)
            if run is not None:
                fns["trak"] = lambda: run(G)
        medians, times = _interleaved(list(fns.values()), repeats)
        t = dict(zip(fns, medians))
        row = {"n": n, "proj_dim": proj_dim, "M_measured": m, "M_paper": M_PAPER,
               "dtype": "float32", "A_budget_bytes": DEFAULT_MEMORY_BUDGET,
               "A_materialised_bytes_roofline": m * proj_dim * 4,
               "roofline_rows_per_s": m / t["roofline"],
               "roofline_gflops": 2 * n * m * proj_dim / t["roofline"] / 1e9,
               "numba_rows_per_s": m / t["numba"],
               "numba_over_roofline": t["roofline"] / t["numba"],
               "numba_seconds_full_M": M_PAPER * t["numba"] / m,
               "times_s": dict(zip(fns, times))}
        if "trak" in t:
            row.update(trak_rows_per_s=m / t["trak"],
                       numba_speedup_over_trak=t["trak"] / t["numba"])
        else:
            row["trak_skipped"] = trak_reason
        del A
        rows.append(row)
        print(f"project n={n:5d} P={proj_dim:5d} M_meas={m:7d}: roofline "
              f"{row['roofline_rows_per_s']:9.0f} rows/s ({row['roofline_gflops']:.0f} GFLOP/s)"
              f", numba {row['numba_rows_per_s']:9.0f} rows/s = "
              f"{row['numba_over_roofline']:.2f}x roofline"
              + (f", {row['numba_speedup_over_trak']:.1f}x TRAK BasicProjector"
                 if "trak" in t else f", TRAK skipped ({trak_reason})"), flush=True)
    return rows


def bench_dot_placement(n, proj_dim, m, repeats):
    """Design check: GEMM called from Python (what the backend does) vs ``np.dot``
    inside a jitted loop over the same blocks (which needs contiguous column blocks)."""
    import numba

    from iif_ref.kernels import _numba_backend
    from iif_ref.kernels._philox import split_seed

    @numba.njit
    def inside(G, k0, k1, chunk, value, proj_dim):
        n_rows, n_params = G.shape
        out = np.zeros((n_rows, proj_dim), G.dtype)
        buf = np.empty((chunk, proj_dim), G.dtype)
        for start in range(0, n_params, chunk):
            stop = min(start + chunk, n_params)
            block = buf[: stop - start]
            _numba_backend._rademacher_block(k0, k1, np.uint64(start), value, block)
            out += np.dot(np.ascontiguousarray(G[:, start:stop]), block)
        return out

    G = np.random.default_rng(2).standard_normal((n, m), dtype=np.float32)
    chunk = DEFAULT_MEMORY_BUDGET // (proj_dim * 4)
    k0, k1 = split_seed(1)
    value = np.float32(1 / np.sqrt(proj_dim))
    (t_in, t_out), times = _interleaved(
        [lambda: inside(G, k0, k1, chunk, value, proj_dim),
         lambda: project(G, proj_dim, seed=1, backend="numba")], repeats)
    row = {"n": n, "proj_dim": proj_dim, "M_measured": m, "dtype": "float32",
           "seconds_dot_inside_numba": t_in, "seconds_gemm_from_python": t_out,
           "inside_over_outside_time": t_in / t_out, "times_s": times}
    print(f"GEMM placement n={n} P={proj_dim} M={m}: np.dot inside numba takes "
          f"{row['inside_over_outside_time']:.2f}x the time of GEMM from Python", flush=True)
    return row


def _loop_reference(Phi, Psi, Gamma, lam):
    """What a user would write: per slice, dense Fisher, cho_factor, cho_solve."""
    B, N, P = Phi.shape
    total = np.zeros((Gamma.shape[1], N))
    for b in range(B):
        phi = Phi[b].astype(np.float64)
        F = phi.T @ phi + lam * np.eye(P)
        total -= scipy.linalg.cho_solve(scipy.linalg.cho_factor(F),
                                        Gamma[b].astype(np.float64).T).T @ Psi[b].T
    return total


def bench_solve(cases, repeats):
    rows = []
    for B, N, P, T in cases:
        rng = np.random.default_rng(1)
        Phi = rng.standard_normal((B, N, P), dtype=np.float32)
        Psi = rng.standard_normal((B, N, P), dtype=np.float32)
        Gamma = rng.standard_normal((B, T, P), dtype=np.float32)
        lam = 1e-3 * float(np.mean(np.sum(np.square(Phi, dtype=np.float64), axis=(1, 2)))) / P
        ours = lambda: projected_scores(Phi, Psi, Gamma, damping=lam, backend="numba")  # noqa: E731
        loop = lambda: _loop_reference(Phi, Psi, Gamma, lam)  # noqa: E731
        (t_ours, t_loop), times = _interleaved([ours, loop], repeats)
        m_ours, m_loop = peak_memory(ours), peak_memory(loop)
        diff = float(np.max(np.abs(m_ours.result - m_loop.result))
                     / np.max(np.abs(m_loop.result)))
        row = {"B": B, "N": N, "P": P, "T": T, "input_dtype": "float32", "damping": lam,
               "path": "woodbury N x N" if N < P else "direct P x P",
               "speedup_over_loop": t_loop / t_ours,
               "peak_bytes_ours": m_ours.tracemalloc_peak,
               "peak_bytes_loop": m_loop.tracemalloc_peak,
               "max_rel_difference": diff,
               "times_s": {"ours": times[0], "loop": times[1]}}
        rows.append(row)
        print(f"solve B={B} N={N} P={P} T={T} ({row['path']}): "
              f"{row['speedup_over_loop']:.2f}x the cho_factor loop; peak NumPy memory "
              f"{m_ours.tracemalloc_peak / 2**20:.1f} MiB vs {m_loop.tracemalloc_peak / 2**20:.1f}"
              f" MiB; max relative difference {diff:.1e}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--no-trak", action="store_true", help="skip the TRAK column")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", "--output", dest="output", metavar="PATH", type=Path,
                        default=OUTPUT, help="results JSON (default docs/results/bench_kernels.json)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()  # the machine may be shared: record how busy it was
    if "numba" not in available_backends():
        print("the numba backend is unavailable; nothing to benchmark", file=sys.stderr)
        return 2
    max_flop = MAX_FLOP
    if args.quick:
        sizes, cases = [(64, 128)], [(4, 300, 64, 8), (4, 50, 200, 8)]
        max_flop = 1e9
    else:
        sizes = [(256, 512), (256, 4096), (4096, 512), (4096, 4096)]  # (n, proj_dim)
        cases = [(16, 2048, 256, 16), (16, 256, 1024, 16), (256, 1024, 32, 4)]
    # Warm the JIT (compilation or cache load) outside every timing.
    project(np.ones((2, 300), np.float32), 130, backend="numba")
    proj_rows = bench_projection(sizes, args.repeats, not args.no_trak, max_flop)
    dot_rows = [bench_dot_placement(*((64, 128, 4096) if args.quick
                                      else (256, 4096, 16384)), args.repeats)]
    solve_rows = bench_solve(cases, args.repeats)
    meta = {"load_average_before": load_before,
            "command": "python validation/bench_kernels.py" + (" --quick" if args.quick else ""),
            "note": ("projection throughput is rows of A per second on M_measured rows; "
                     "roofline = np.matmul with A materialised; numba holds <= "
                     "A_budget_bytes of A; solve peak = tracemalloc peak of NumPy buffers; "
                     "the callables of each row are timed interleaved, median of repeats"),
            "load_average_after": os.getloadavg()}
    path = write_results(args.output, [{"benchmark": "project", **r} for r in proj_rows]
                         + [{"benchmark": "gemm_placement", **r} for r in dot_rows]
                         + [{"benchmark": "projected_scores", **r} for r in solve_rows],
                         meta=meta, machine=machine_info())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
