// countsketch.cuh -- the summation order of the CountSketch projection Phi = G A (docs/rng.md,
// "CountSketch"), shared by the CUDA kernel (countsketch.cu) and the host library.
//
// Equation.  Phi[i, p] = sum_{m < M, h(m_offset + m) = p} s(m_offset + m) G[i, m], where row m
//   of A has its one nonzero s(m) in {+1, -1} in column h(m) (philox.cuh,
//   iif_countsketch_bucket).  Cost O(M) per row of G, against O(M P) for a dense A.
//
// Index convention.  G (n, M) row-major with leading dimension ldg; Phi (n, P) row-major with
//   leading dimension ldphi.  Column m of G is row m_offset + m of A.
//
// Precision policy (the contract every backend follows, so all agree bit for bit).  Each row
//   of Phi starts at +0; m runs in ascending order and Phi[i, h(m)] = Phi[i, h(m)] + s(m) G[i, m]
//   in the input dtype T (s G is exact: a sign flip).  Each entry is a sum of the k_p entries
//   of its bucket in ascending m: |Phi - exact| <= (k_p - 1) u sum_{h(m) = p} |G[i, m]|.
//
// Launch geometry.  One thread forms one row of Phi in the order above; no atomics, so the
//   result does not depend on the grid or the block shape.
#ifndef IIF_COUNTSKETCH_CUH
#define IIF_COUNTSKETCH_CUH

#include "philox.cuh"

// Row `row` of Phi in the contract's order (hashes recomputed per row: O(M) Philox calls).
template <typename T>
IIF_HD void iif_countsketch_row(const T* G, iif_i64 ldg, iif_i64 M, iif_i64 row, iif_u64 seed,
                                iif_u64 m_offset, iif_i64 proj_dim, T* Phi, iif_i64 ldphi) {
    T* out = Phi + row * ldphi;
    for (iif_i64 p = 0; p < proj_dim; ++p) out[p] = (T)0;
    for (iif_i64 m = 0; m < M; ++m) {
        iif_u32 negative;
        const iif_u32 p = iif_countsketch_bucket(seed, m_offset + (iif_u64)m, proj_dim, &negative);
        const T g = G[row * ldg + m];
        out[p] = out[p] + (negative ? -g : g);
    }
}

#endif  // IIF_COUNTSKETCH_CUH
