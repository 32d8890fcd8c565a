// projection.cu -- Phi = G A with A generated on the fly (Eq. 17 with Phi = U A of Eq. 31).
//
// Equation.  Phi[i, p] = sum_{m < M} G[i, m] * A[m_offset + m, p]; A[m, p] is the pure function
//   of (seed, m, p) in philox.cuh (docs/rng.md).  A is never stored: each block regenerates the
//   16 x 64 tile of A it needs in shared memory, from (seed, m, p) alone.
//
// Index convention.  G (n, M) row-major, leading dimension ldg; Phi (n, P) row-major,
//   leading dimension ldphi; block (bx, by) owns rows 64*by .. +63 and columns 64*bx .. +63 of
//   Phi; 256 threads, each accumulating a 4 x 4 register tile.  Also iif_generate_*: writes the
//   block A[row_start : row_start + n_rows, 0 : P] (row-major) for tests.
//
// Precision policy.  Exactly the contract of projection.cuh: fma chains in the input dtype T
//   within each 16-wide tile of m, tiles summed in float64 registers, one rounding to T at the
//   end (float32 inputs: error <= (16 u32 + (M/16 + 1) u64) sum|G||A| + u32 |Phi|).  The host
//   library evaluates the same order, so Rademacher results agree bit for bit with it.
//
// Launch geometry.  Every output entry is computed by one thread in a fixed order; there are no
//   atomics, so the result does not depend on the grid or on how callers chunk the rows of G.
//   The kernels require blockDim = (256, 1, 1) (checked: any other shape writes nothing and the
//   Python side always launches 256).
#include "projection.cuh"

#define IIF_PROJ_TILE_N 64
#define IIF_PROJ_TILE_P 64
#define IIF_PROJ_THREADS 256

template <typename T>
__device__ __forceinline__ void iif_project_tile(const T* __restrict__ G, iif_i64 n, iif_i64 M,
                                                 iif_i64 ldg, iif_u64 seed, iif_u64 m_offset,
                                                 iif_i64 proj_dim, int kind, T* __restrict__ Phi,
                                                 iif_i64 ldphi) {
    const int K = IIF_PROJ_TILE_K;
    // Gs is stored k-major (transposed) so the inner loop reads 4 consecutive rows at once;
    // the +1 pad breaks the bank conflicts of the transposing store.
    __shared__ T Gs[IIF_PROJ_TILE_K][IIF_PROJ_TILE_N + 1];
    __shared__ T As[IIF_PROJ_TILE_K][IIF_PROJ_TILE_P];
    __shared__ iif_u32 bits[IIF_PROJ_TILE_K][4];

    if (blockDim.x != IIF_PROJ_THREADS || blockDim.y != 1 || blockDim.z != 1) return;

    const int tid = threadIdx.x;
    const int tr = tid / 16;  // this thread's rows: row0 + tr + 16 * r, r = 0..3
    const int tc = tid % 16;  // this thread's columns: col0 + 4 * tc + c, c = 0..3
    const iif_i64 row0 = (iif_i64)blockIdx.y * IIF_PROJ_TILE_N;
    const iif_i64 col0 = (iif_i64)blockIdx.x * IIF_PROJ_TILE_P;
    const double sqrt_dim = iif_sqrt_dim(proj_dim);

    double total[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) total[r][c] = 0.0;

    for (iif_i64 m0 = 0; m0 < M; m0 += K) {
        // Stage 1: load the G tile (zero outside the matrix) and draw this tile's randomness.
#pragma unroll
        for (int i = 0; i < (IIF_PROJ_TILE_N * IIF_PROJ_TILE_K) / IIF_PROJ_THREADS; ++i) {
            const int idx = tid + i * IIF_PROJ_THREADS;
            const int r = idx / K, k = idx % K;
            const iif_i64 gi = row0 + r, gm = m0 + k;
            Gs[k][r] = (gi < n && gm < M) ? G[gi * ldg + gm] : (T)0;
        }
        if (kind == IIF_KIND_RADEMACHER) {
            // 64 columns starting at a multiple of 64 lie in one 128-column Philox group:
            // one call per row of the tile, made by the first 16 threads.
            if (tid < K) {
                iif_u32 r[4] = {0u, 0u, 0u, 0u};
                if (m0 + tid < M) {
                    iif_philox_for_entry(seed, m_offset + (iif_u64)(m0 + tid),
                                         (iif_u32)(col0 >> 7), 0u, r);
                }
                bits[tid][0] = r[0];
                bits[tid][1] = r[1];
                bits[tid][2] = r[2];
                bits[tid][3] = r[3];
            }
        } else if (kind == IIF_KIND_GAUSSIAN) {
            // Gaussian: each thread makes one (even, odd) pair of one row of the tile.
            const int k = tid / 32, pair = tid % 32;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int kk = k + 8 * half;
                const iif_i64 gm = m0 + kk;
                T z0 = (T)0, z1 = (T)0;
                if (gm < M) {
                    double d0, d1;
                    iif_gaussian_pair(seed, m_offset + (iif_u64)gm,
                                      (iif_u32)((col0 >> 1) + pair), &d0, &d1);
                    z0 = (T)(d0 / sqrt_dim);
                    z1 = (T)(d1 / sqrt_dim);
                }
                As[kk][2 * pair] = z0;
                As[kk][2 * pair + 1] = z1;
            }
        } else {
            // Any other kind (CountSketch, Kronecker factors): entry by entry, 4 per thread.
#pragma unroll
            for (int i = 0; i < (IIF_PROJ_TILE_K * IIF_PROJ_TILE_P) / IIF_PROJ_THREADS; ++i) {
                const int idx = tid + i * IIF_PROJ_THREADS;
                const int kk = idx / IIF_PROJ_TILE_P, c = idx % IIF_PROJ_TILE_P;
                const iif_i64 gm = m0 + kk, gp = col0 + c;
                As[kk][c] = (gm < M && gp < proj_dim)
                                ? (T)iif_entry(seed, m_offset + (iif_u64)gm, (iif_u32)gp,
                                               proj_dim, sqrt_dim, kind)
                                : (T)0;
            }
        }
        __syncthreads();
        if (kind == IIF_KIND_RADEMACHER) {
            // Stage 2: expand the sign bits of this thread's 4 columns of row tr of the tile.
            const double value = 1.0 / sqrt_dim;  // as iif_entry forms it
            const T plus = (T)value, minus = (T)(-value);
            const bool row_in = (m0 + tr) < M;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = (int)((col0 + 4 * tc + c) & 127);
                const iif_u32 b = (bits[tr][j >> 5] >> (j & 31)) & 1u;
                As[tr][4 * tc + c] = row_in ? (b ? minus : plus) : (T)0;
            }
            __syncthreads();
        }
        // Stage 3: the contract's fma chain within the tile, then one float64 add per tile.
        T part[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) part[r][c] = (T)0;
#pragma unroll
        for (int k = 0; k < IIF_PROJ_TILE_K; ++k) {
            T g[4], a[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) g[r] = Gs[k][tr + 16 * r];
#pragma unroll
            for (int c = 0; c < 4; ++c) a[c] = As[k][4 * tc + c];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) part[r][c] = iif_fma(g[r], a[c], part[r][c]);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) total[r][c] += (double)part[r][c];
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const iif_i64 gi = row0 + tr + 16 * r;
        if (gi >= n) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const iif_i64 gp = col0 + 4 * tc + c;
            if (gp < proj_dim) Phi[gi * ldphi + gp] = (T)total[r][c];
        }
    }
}

// A[row_start + i, p] for i < n_rows, p < P, row-major into out (n_rows, P); grid-stride loop.
template <typename T>
__device__ __forceinline__ void iif_generate_rows(iif_u64 seed, iif_u64 row_start,
                                                  iif_i64 n_rows, iif_i64 proj_dim, int kind,
                                                  T* __restrict__ out) {
    const double sqrt_dim = iif_sqrt_dim(proj_dim);
    const iif_i64 total = n_rows * proj_dim;
    const iif_i64 stride = (iif_i64)gridDim.x * blockDim.x;
    for (iif_i64 idx = (iif_i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += stride) {
        const iif_i64 i = idx / proj_dim, p = idx % proj_dim;
        out[idx] = (T)iif_entry(seed, row_start + (iif_u64)i, (iif_u32)p, proj_dim, sqrt_dim,
                                 kind);
    }
}

// C names for cupy.RawModule / cuModuleGetFunction lookup; one per dtype.
extern "C" __global__ void __launch_bounds__(IIF_PROJ_THREADS)
    iif_project_f32(const float* G, iif_i64 n, iif_i64 M, iif_i64 ldg, iif_u64 seed,
                    iif_u64 m_offset, iif_i64 proj_dim, int kind, float* Phi, iif_i64 ldphi) {
    iif_project_tile<float>(G, n, M, ldg, seed, m_offset, proj_dim, kind, Phi, ldphi);
}

extern "C" __global__ void __launch_bounds__(IIF_PROJ_THREADS)
    iif_project_f64(const double* G, iif_i64 n, iif_i64 M, iif_i64 ldg, iif_u64 seed,
                    iif_u64 m_offset, iif_i64 proj_dim, int kind, double* Phi, iif_i64 ldphi) {
    iif_project_tile<double>(G, n, M, ldg, seed, m_offset, proj_dim, kind, Phi, ldphi);
}

extern "C" __global__ void iif_generate_f32(iif_u64 seed, iif_u64 row_start, iif_i64 n_rows,
                                            iif_i64 proj_dim, int kind, float* out) {
    iif_generate_rows<float>(seed, row_start, n_rows, proj_dim, kind, out);
}

extern "C" __global__ void iif_generate_f64(iif_u64 seed, iif_u64 row_start, iif_i64 n_rows,
                                            iif_i64 proj_dim, int kind, double* out) {
    iif_generate_rows<double>(seed, row_start, n_rows, proj_dim, kind, out);
}
