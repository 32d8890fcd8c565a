// philox.cuh -- the counter-based random projection matrix A of Eq. (17).
//
// Equation.  A[m, p] = s(seed, m, p) * P^(-1/2)   (Rademacher, kind 0, default)
//            A[m, p] = z(seed, m, p) * P^(-1/2)   (Gaussian,   kind 1)
//            A[m, p] = s(m) [p == h(m)]           (CountSketch, kind 2: one nonzero per row)
//            S[m, p] = s(seed, m, p)              (Kronecker factors, kinds 3 and 4: +-1)
//   with s in {+1, -1} and z ~ N(0, 1) drawn from Philox4x32-10 exactly as written in
//   docs/rng.md (counter layout, key = seed split in two 32-bit words, Box-Muller).  The
//   fourth counter word of every call is the kind's code, so the kinds are independent
//   streams of one generator.
//
// Index convention.  m in [0, 2^64) is the parameter (row) index of A, p in [0, 2^32) the
//   projected coordinate (column), P = proj_dim the number of columns.  One Philox call with
//   counter (m_lo, m_hi, p / 128, 0) gives the 128 signs of columns 128*(p/128) .. +127 of row
//   m (bit p % 32 of word (p % 128) / 32; a set bit means -1).  One call with counter
//   (m_lo, m_hi, p / 2, 1) gives the Gaussian pair for columns 2*(p/2) and 2*(p/2) + 1.
//
// Precision policy.  Philox is exact 32-bit integer arithmetic, so the sign pattern is bit for
//   bit the same on every backend.  The Gaussian uniforms, log, sqrt, cos and sin are float64;
//   they agree with other backends to the few ulp by which libm implementations differ.  The
//   value of an entry is formed in float64 (+-(1 / sqrt(P)), or z / sqrt(P)) and rounded once
//   to the output dtype.
//
// Launch geometry.  Every function here is a pure function of (seed, m, p, P): no thread,
//   block or grid index enters, so the matrix does not depend on how the work is launched.
//
// This header compiles as CUDA (nvcc), as CUDA through NVRTC (no standard library there, so
// the fixed-width types are our own typedefs), and as plain C++ for the host library.
#ifndef IIF_PHILOX_CUH
#define IIF_PHILOX_CUH

#if defined(__CUDACC_RTC__)
typedef unsigned int iif_u32;
typedef unsigned long long iif_u64;
typedef long long iif_i64;
#else
#include <math.h>
#include <stdint.h>
typedef uint32_t iif_u32;
typedef uint64_t iif_u64;
typedef int64_t iif_i64;
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IIF_HD __host__ __device__ __forceinline__
#else
#define IIF_HD inline
#endif

// Entry kinds (the `kind` argument of every kernel and host function).
#define IIF_KIND_RADEMACHER 0
#define IIF_KIND_GAUSSIAN 1
#define IIF_KIND_COUNTSKETCH 2
#define IIF_KIND_KRONECKER_IN 3
#define IIF_KIND_KRONECKER_OUT 4

// Philox4x32 constants (Salmon et al., SC'11; docs/rng.md).
#define IIF_PHILOX_M0 0xD2511F53u
#define IIF_PHILOX_M1 0xCD9E8D57u
#define IIF_PHILOX_W0 0x9E3779B9u
#define IIF_PHILOX_W1 0xBB67AE85u

// Philox4x32-10: ten rounds, the key bumped by the Weyl constants between rounds.
IIF_HD void iif_philox4x32_10_core(const iif_u32 ctr[4], const iif_u32 key[2], iif_u32 out[4]) {
    iif_u32 c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    iif_u32 k0 = key[0], k1 = key[1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += IIF_PHILOX_W0;
            k1 += IIF_PHILOX_W1;
        }
        // Full 64-bit products split into high and low words (exact in unsigned arithmetic).
        const iif_u64 prod0 = (iif_u64)IIF_PHILOX_M0 * (iif_u64)c0;
        const iif_u64 prod1 = (iif_u64)IIF_PHILOX_M1 * (iif_u64)c2;
        const iif_u32 hi0 = (iif_u32)(prod0 >> 32), lo0 = (iif_u32)prod0;
        const iif_u32 hi1 = (iif_u32)(prod1 >> 32), lo1 = (iif_u32)prod1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// The Philox call for row m, column group `group` (= p / 128 or p / 2) and stream word.
IIF_HD void iif_philox_for_entry(iif_u64 seed, iif_u64 m, iif_u32 group, iif_u32 stream,
                                 iif_u32 out[4]) {
    const iif_u32 ctr[4] = {(iif_u32)m, (iif_u32)(m >> 32), group, stream};
    const iif_u32 key[2] = {(iif_u32)seed, (iif_u32)(seed >> 32)};
    iif_philox4x32_10_core(ctr, key, out);
}

// sqrt(P) in float64 (correctly rounded on every backend).  A Rademacher entry is
// +-(1 / sqrt(P)) and a Gaussian one z / sqrt(P), each formed in float64 in exactly that way
// (as the NumPy oracle does) and then rounded once to the output dtype.
IIF_HD double iif_sqrt_dim(iif_i64 proj_dim) { return sqrt((double)proj_dim); }

// 1 when the sign of column p of row m in stream `stream` is negative, else 0 (bit p % 32 of
// word (p % 128) / 32 of the call with counter (m_lo, m_hi, p / 128, stream)).
IIF_HD iif_u32 iif_sign_bit(iif_u64 seed, iif_u64 m, iif_u32 p, iif_u32 stream) {
    iif_u32 r[4];
    iif_philox_for_entry(seed, m, p >> 7, stream, r);
    const iif_u32 j = p & 127u;
    return (r[j >> 5] >> (j & 31u)) & 1u;
}

// 1 when A[m, p] is negative in the Rademacher matrix, else 0.
IIF_HD iif_u32 iif_rademacher_bit(iif_u64 seed, iif_u64 m, iif_u32 p) {
    return iif_sign_bit(seed, m, p, (iif_u32)IIF_KIND_RADEMACHER);
}

// CountSketch row m: bucket h(m) = floor(r0 * P / 2^32) (exact in 64 bits for P < 2^32) and
// sign bit (bit 0 of r1; 1 means -1) of the call with counter (m_lo, m_hi, 0, 2).
IIF_HD iif_u32 iif_countsketch_bucket(iif_u64 seed, iif_u64 m, iif_i64 proj_dim,
                                      iif_u32* negative) {
    iif_u32 r[4];
    iif_philox_for_entry(seed, m, 0u, (iif_u32)IIF_KIND_COUNTSKETCH, r);
    *negative = r[1] & 1u;
    return (iif_u32)(((iif_u64)r[0] * (iif_u64)proj_dim) >> 32);
}

// A 53-bit uniform in (0, 1] from two words, the operations in the order docs/rng.md writes
// them: the 53-bit integer is exact in float64, "+ 0.5" rounds once (ties to even), and the
// division by 2^53 is exact.
IIF_HD double iif_uniform53(iif_u32 a, iif_u32 b) {
    const iif_u64 bits = ((iif_u64)(a >> 5) << 26) + (iif_u64)(b >> 6);
    return ((double)bits + 0.5) / 9007199254740992.0;  // 2^53
}

// The Gaussian pair of columns 2*pair (cos) and 2*pair + 1 (sin) of row m: one Philox call,
// Box-Muller in float64.
IIF_HD void iif_gaussian_pair(iif_u64 seed, iif_u64 m, iif_u32 pair, double* z_even,
                              double* z_odd) {
    iif_u32 r[4];
    iif_philox_for_entry(seed, m, pair, 1u, r);
    const double u1 = iif_uniform53(r[0], r[1]);
    const double u2 = iif_uniform53(r[2], r[3]);
    const double rho = sqrt(-2.0 * log(u1));
    const double theta = 6.283185307179586 * u2;  // 2*pi in float64, then one rounding
    *z_even = rho * cos(theta);
    *z_odd = rho * sin(theta);
}

// The standard normal z of column p of row m (cos for even p, sin for odd p).
IIF_HD double iif_gaussian_z(iif_u64 seed, iif_u64 m, iif_u32 p) {
    double z_even, z_odd;
    iif_gaussian_pair(seed, m, p >> 1, &z_even, &z_odd);
    return (p & 1u) ? z_odd : z_even;
}

// A[m, p] in float64 (the value every dtype is rounded from); P = proj_dim, sqrt_dim = sqrt(P).
IIF_HD double iif_entry(iif_u64 seed, iif_u64 m, iif_u32 p, iif_i64 proj_dim, double sqrt_dim,
                        int kind) {
    if (kind == IIF_KIND_GAUSSIAN) {
        return iif_gaussian_z(seed, m, p) / sqrt_dim;
    }
    if (kind == IIF_KIND_COUNTSKETCH) {
        iif_u32 negative;
        if (iif_countsketch_bucket(seed, m, proj_dim, &negative) != p) return 0.0;
        return negative ? -1.0 : 1.0;
    }
    if (kind == IIF_KIND_KRONECKER_IN || kind == IIF_KIND_KRONECKER_OUT) {
        return iif_sign_bit(seed, m, p, (iif_u32)kind) ? -1.0 : 1.0;
    }
    const double value = 1.0 / sqrt_dim;
    return iif_rademacher_bit(seed, m, p) ? -value : value;
}

// Fused multiply-add per dtype, written out so that the host twin and the device kernels
// round identically (nvcc contracts a*b+c into an FMA on its own; g++ on x86-64 does not).
IIF_HD float iif_fma(float a, float b, float c) { return fmaf(a, b, c); }
IIF_HD double iif_fma(double a, double b, double c) { return fma(a, b, c); }

#endif  // IIF_PHILOX_CUH
