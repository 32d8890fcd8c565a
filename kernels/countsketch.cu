// countsketch.cu -- Phi = G A for the CountSketch matrix A (one nonzero per row, docs/rng.md):
// Phi[i, p] = sum_{h(m) = p} s(m) G[i, m], A never stored (bucket and sign of row m are drawn
// from (seed, m) by philox.cuh).
//
// Index convention.  G (n, M) row-major, leading dimension ldg; Phi (n, P) row-major, leading
//   dimension ldphi; thread (blockIdx.x * blockDim.x + threadIdx.x), grid-stride, owns rows of
//   Phi.
//
// Precision policy.  Exactly the contract of countsketch.cuh: per row, ascending m, one add in
//   the input dtype per nonzero; the host library and the NumPy and Numba backends evaluate
//   the same order, so all agree bit for bit.
//
// Launch geometry.  One thread per row of Phi, any grid and block shape; no atomics.  Not
//   tuned: reads of G are strided by ldg across a warp (a tuned version would stage G tiles in
//   shared memory); correctness first, the cost is O(n M) either way.
#include "countsketch.cuh"

template <typename T>
__device__ __forceinline__ void iif_countsketch_rows(const T* __restrict__ G, iif_i64 n,
                                                     iif_i64 M, iif_i64 ldg, iif_u64 seed,
                                                     iif_u64 m_offset, iif_i64 proj_dim,
                                                     T* __restrict__ Phi, iif_i64 ldphi) {
    const iif_i64 stride = (iif_i64)gridDim.x * blockDim.x;
    for (iif_i64 row = (iif_i64)blockIdx.x * blockDim.x + threadIdx.x; row < n; row += stride) {
        iif_countsketch_row<T>(G, ldg, M, row, seed, m_offset, proj_dim, Phi, ldphi);
    }
}

extern "C" __global__ void iif_countsketch_f32(const float* G, iif_i64 n, iif_i64 M, iif_i64 ldg,
                                               iif_u64 seed, iif_u64 m_offset, iif_i64 proj_dim,
                                               float* Phi, iif_i64 ldphi) {
    iif_countsketch_rows<float>(G, n, M, ldg, seed, m_offset, proj_dim, Phi, ldphi);
}

extern "C" __global__ void iif_countsketch_f64(const double* G, iif_i64 n, iif_i64 M,
                                               iif_i64 ldg, iif_u64 seed, iif_u64 m_offset,
                                               iif_i64 proj_dim, double* Phi, iif_i64 ldphi) {
    iif_countsketch_rows<double>(G, n, M, ldg, seed, m_offset, proj_dim, Phi, ldphi);
}
