// gram.cu -- stacked damped projected Fisher matrices F_b = Phi_b^T Phi_b + damping I in float64
// (Eq. 31 after the projection of Eq. 17), for float32 or float64 Phi.
//
// Equation.  F[b, i, j] = sum_{r < N} Phi[b, r, i] Phi[b, r, j] + damping[b] [i == j].
//
// Index convention.  Phi (B, N, P), element (b, r, i) at b * ldb + r * ldr + i; F (B, P, P)
//   contiguous float64; damping (B,) float64, one absolute damping per slice.  Block
//   (bx, by, bz) owns the 64 x 64 tile (rows 64*by, columns 64*bx) of slices
//   b = bz, bz + gridDim.z, ...; only tiles with by <= bx work, an off-diagonal tile also
//   writing its mirror, so each entry is formed once.  256 threads, 4 x 4 entries each.
//   The Cholesky factorisation and the solves run in cuSOLVER through CuPy
//   (iif_ref/kernels/_cupy_backend.py): cusolverDnDpotrfBatched for the per-slice
//   positive-definiteness certificate and factor, cuBLAS trsmBatched (through
//   cupyx.scipy.linalg.solve_triangular) for the solves with that factor.
//
// Precision policy.  As gram.cuh: float64 fma chain over r ascending (products of float32
//   inputs exact), |dF_ij| <= N u64 sqrt(F_ii F_jj); F exactly symmetric; agrees bit for bit
//   with the host library.
//
// Launch geometry.  One thread per entry, fixed order, no atomics: the result does not depend
//   on the grid.  Requires blockDim = (256, 1, 1); any other shape writes nothing.
#include "gram.cuh"

#define IIF_GRAM_TILE 64
#define IIF_GRAM_TILE_R 16
#define IIF_GRAM_THREADS 256

template <typename T>
__device__ __forceinline__ void iif_gram_tile(const T* __restrict__ Phi, iif_i64 B, iif_i64 N,
                                              iif_i64 P, iif_i64 ldb, iif_i64 ldr,
                                              const double* __restrict__ damping,
                                              double* __restrict__ F) {
    __shared__ double Xi[IIF_GRAM_TILE_R][IIF_GRAM_TILE];
    __shared__ double Xj[IIF_GRAM_TILE_R][IIF_GRAM_TILE];

    if (blockDim.x != IIF_GRAM_THREADS || blockDim.y != 1 || blockDim.z != 1) return;
    if (blockIdx.y > blockIdx.x) return;  // the mirror tile (bx, by) covers it

    const int tid = threadIdx.x;
    const int tr = tid / 16, tc = tid % 16;
    const iif_i64 i0 = (iif_i64)blockIdx.y * IIF_GRAM_TILE;
    const iif_i64 j0 = (iif_i64)blockIdx.x * IIF_GRAM_TILE;
    const bool diagonal_tile = (blockIdx.x == blockIdx.y);

    for (iif_i64 b = blockIdx.z; b < B; b += gridDim.z) {
        const T* Phi_b = Phi + b * ldb;
        double acc[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = 0.0;

        for (iif_i64 r0 = 0; r0 < N; r0 += IIF_GRAM_TILE_R) {
#pragma unroll
            for (int s = 0; s < (IIF_GRAM_TILE_R * IIF_GRAM_TILE) / IIF_GRAM_THREADS; ++s) {
                const int idx = tid + s * IIF_GRAM_THREADS;
                const int k = idx / IIF_GRAM_TILE, c = idx % IIF_GRAM_TILE;
                const iif_i64 r = r0 + k;
                const bool row_in = r < N;
                Xi[k][c] = (row_in && i0 + c < P) ? (double)Phi_b[r * ldr + i0 + c] : 0.0;
                Xj[k][c] = (row_in && j0 + c < P) ? (double)Phi_b[r * ldr + j0 + c] : 0.0;
            }
            __syncthreads();
            const int kmax = (N - r0 < IIF_GRAM_TILE_R) ? (int)(N - r0) : IIF_GRAM_TILE_R;
            // Rows past N are skipped rather than multiplied by zero, keeping the chain
            // identical to the host twin's.
            for (int k = 0; k < kmax; ++k) {
                double xi[4], xj[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) xi[r] = Xi[k][tr + 16 * r];
#pragma unroll
                for (int c = 0; c < 4; ++c) xj[c] = Xj[k][4 * tc + c];
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[r][c] = iif_fma(xi[r], xj[c], acc[r][c]);
            }
            __syncthreads();
        }

        double* F_b = F + b * P * P;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const iif_i64 i = i0 + tr + 16 * r;
            if (i >= P) continue;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const iif_i64 j = j0 + 4 * tc + c;
                if (j >= P) continue;
                const double v = (i == j) ? acc[r][c] + damping[b] : acc[r][c];
                F_b[i * P + j] = v;
                if (!diagonal_tile) F_b[j * P + i] = v;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(IIF_GRAM_THREADS)
    iif_gram_f32(const float* Phi, iif_i64 B, iif_i64 N, iif_i64 P, iif_i64 ldb, iif_i64 ldr,
                 const double* damping, double* F) {
    iif_gram_tile<float>(Phi, B, N, P, ldb, ldr, damping, F);
}

extern "C" __global__ void __launch_bounds__(IIF_GRAM_THREADS)
    iif_gram_f64(const double* Phi, iif_i64 B, iif_i64 N, iif_i64 P, iif_i64 ldb, iif_i64 ldr,
                 const double* damping, double* F) {
    iif_gram_tile<double>(Phi, B, N, P, ldb, ldr, damping, F);
}
