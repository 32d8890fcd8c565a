// projection.cuh -- the summation order of Phi = G A (Eq. 17, 31), shared by the CUDA kernel
// (projection.cu) and the host library (host/iif_host.cpp).
//
// Equation.  Phi[i, p] = sum_{m < M} G[i, m] * A[m_offset + m, p],  A from philox.cuh.
//
// Index convention.  G is (n, M) row-major with leading dimension ldg (elements); Phi is
//   (n, P) row-major with leading dimension ldphi.  Column m of G multiplies row
//   m_offset + m of A, so a long parameter vector can be projected piece by piece.
//
// Precision policy (the contract both implementations follow, operation for operation).
//   The m axis is cut into tiles of IIF_PROJ_TILE_K = 16 consecutive indices starting at 0.
//   Within a tile, part = fma(G[i, m], A_T[m, p], part) in the input dtype T, m ascending,
//   part starting at 0; A_T is A[m, p] rounded once to T.  Tiles are summed in float64,
//   total += (double)part, tile by tile in ascending order, and Phi = (T)total.
//   Error bound: with u = unit roundoff of T and S = sum_m |G[i, m]| |A_T[m, p]|,
//     |Phi - sum_m G A_T| <= (K u + (ceil(M/K) + 1) u64) S + u |Phi|   (K = 16),
//   so for float32 the bound does not grow with M beyond the float64 term: about 1e-6 S.
//   Rounding A to float32 adds at most u32 S more (none for Rademacher when P is a power of 4).
//
// Launch geometry.  Each output entry is formed by exactly one thread in the order above; no
//   atomics and no reduction across threads, so Phi does not depend on the grid, the block
//   shape or how the rows of G are chunked.
#ifndef IIF_PROJECTION_CUH
#define IIF_PROJECTION_CUH

#include "philox.cuh"

#define IIF_PROJ_TILE_K 16

// One entry of Phi in the contract's order, straight from (seed, m, p): the host twin of the
// tiled kernel (O(M) Philox calls per entry -- meant for small reference sizes).
template <typename T>
IIF_HD T iif_project_entry(const T* G, iif_i64 ldg, iif_i64 M, iif_i64 row, iif_u64 seed,
                           iif_u64 m_offset, iif_i64 proj_dim, iif_u32 p, int kind) {
    const double sqrt_dim = iif_sqrt_dim(proj_dim);
    double total = 0.0;
    for (iif_i64 m0 = 0; m0 < M; m0 += IIF_PROJ_TILE_K) {
        T part = (T)0;
        for (iif_i64 m = m0; m < m0 + IIF_PROJ_TILE_K; ++m) {
            // Past M the kernel multiplies zero padding (0 * 0 + part, which can only turn a
            // -0 into +0); the twin does the same so that even the sign of zero agrees.
            const T g = (m < M) ? G[row * ldg + m] : (T)0;
            const T a = (m < M) ? (T)iif_entry(seed, m_offset + (iif_u64)m, p, proj_dim,
                                                      sqrt_dim, kind)
                                : (T)0;
            part = iif_fma(g, a, part);
        }
        total += (double)part;
    }
    return (T)total;
}

#endif  // IIF_PROJECTION_CUH
