// gram.cuh -- the summation order of the damped projected Fisher F_b = Phi_b^T Phi_b + damping I
// (Eq. 31 projected by Eq. 17), shared by the CUDA kernel (gram.cu) and the host library.
//
// Equation.  F[b, i, j] = sum_{r < N} Phi[b, r, i] * Phi[b, r, j]  (+ damping when i == j).
//
// Index convention.  Phi is (B, N, P): element (b, r, i) at b * ldb + r * ldr + i (elements);
//   F is (B, P, P) contiguous row-major, float64.
//
// Precision policy.  Inputs (float32 or float64) are widened to float64; the sum runs over r in
//   ascending order as acc = fma(Phi[b,r,i], Phi[b,r,j], acc) from acc = 0, then the damping is
//   added with one rounding.  For float32 inputs each product is exact in float64, so the only
//   error is the float64 summation: |dF_ij| <= N u64 sum_r |Phi_ri| |Phi_rj|
//   <= N u64 sqrt(F_ii F_jj).  fma(a, b, c) == fma(b, a, c) exactly, so F is exactly symmetric.
//
// Launch geometry.  One thread forms each entry in the order above (no atomics, no cross-thread
//   reduction): F does not depend on the grid or block shape.
#ifndef IIF_GRAM_CUH
#define IIF_GRAM_CUH

#include "philox.cuh"

// One entry of F in the contract's order (the host twin of the tiled kernel).
template <typename T>
IIF_HD double iif_gram_entry(const T* Phi_b, iif_i64 ldr, iif_i64 N, iif_i64 i, iif_i64 j,
                             double damping) {
    double acc = 0.0;
    for (iif_i64 r = 0; r < N; ++r) {
        acc = iif_fma((double)Phi_b[r * ldr + i], (double)Phi_b[r * ldr + j], acc);
    }
    return (i == j) ? acc + damping : acc;
}

#endif  // IIF_GRAM_CUH
