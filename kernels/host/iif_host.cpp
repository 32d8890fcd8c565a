// iif_host.cpp -- C ABI host library built from the same headers as the CUDA kernels.
//
// Equations.  A[m, p] of Eq. (17) (philox.cuh, docs/rng.md); Phi = G A (projection.cuh);
//   Phi = G A for the CountSketch A (countsketch.cuh);
//   F_b = Phi_b^T Phi_b + damping I (gram.cuh, Eq. 31).
//
// Index convention.  All arrays row-major and contiguous: A block (n_rows, P) holding rows
//   row_start .. row_start + n_rows - 1; G (n, M); Phi (n, P); stacked Phi (B, N, P);
//   F (B, P, P).
//
// Precision policy.  Each function evaluates, operation for operation, the order that the
//   header shared with the CUDA kernel fixes: the sign pattern and the Rademacher projection
//   and Gram results are bit for bit those of the GPU; Gaussian entries differ from the GPU's
//   by the ulps by which libm and CUDA's log/sqrt/cos/sin differ.
//
// Launch geometry.  Sequential loops; results are the pure functions the headers define.
//
// Meant for cross-checks at small sizes (the projection makes M Philox calls per entry).
// Every entry point returns 0 on success and IIF_EINVAL for arguments outside the domain.
#include <stdint.h>

#include "../countsketch.cuh"
#include "../gram.cuh"
#include "../philox.cuh"
#include "../projection.cuh"

#define IIF_EINVAL (-22)
#define IIF_HOST_ABI_VERSION 2

namespace {

bool valid_generate_args(uint64_t row_start, int64_t n_rows, int64_t proj_dim, int kind) {
    if (n_rows < 0 || proj_dim < 1 || proj_dim > (int64_t)4294967296LL) return false;
    if (kind < IIF_KIND_RADEMACHER || kind > IIF_KIND_KRONECKER_OUT) return false;
    // Rows row_start .. row_start + n_rows - 1 must stay below 2^64.
    if (n_rows > 0 && row_start > UINT64_MAX - (uint64_t)(n_rows - 1)) return false;
    return true;
}

template <typename T>
int generate(uint64_t seed, uint64_t row_start, int64_t n_rows, int64_t proj_dim, int kind,
             T* out) {
    if (!valid_generate_args(row_start, n_rows, proj_dim, kind) || (n_rows > 0 && !out))
        return IIF_EINVAL;
    const double sqrt_dim = iif_sqrt_dim(proj_dim);
    for (int64_t i = 0; i < n_rows; ++i) {
        for (int64_t p = 0; p < proj_dim; ++p) {
            out[i * proj_dim + p] =
                (T)iif_entry(seed, row_start + (uint64_t)i, (iif_u32)p, proj_dim, sqrt_dim, kind);
        }
    }
    return 0;
}

template <typename T>
int project(const T* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
            int64_t proj_dim, int kind, T* Phi) {
    if (n < 0 || M < 0 || !valid_generate_args(m_offset, M, proj_dim, kind)) return IIF_EINVAL;
    if ((n > 0 && !Phi) || (n > 0 && M > 0 && !G)) return IIF_EINVAL;
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t p = 0; p < proj_dim; ++p) {
            Phi[i * proj_dim + p] =
                iif_project_entry<T>(G, M, M, i, seed, m_offset, proj_dim, (iif_u32)p, kind);
        }
    }
    return 0;
}

template <typename T>
int countsketch(const T* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
                int64_t proj_dim, T* Phi) {
    if (n < 0 || M < 0 || !valid_generate_args(m_offset, M, proj_dim, IIF_KIND_COUNTSKETCH))
        return IIF_EINVAL;
    if ((n > 0 && !Phi) || (n > 0 && M > 0 && !G)) return IIF_EINVAL;
    for (int64_t i = 0; i < n; ++i) {
        iif_countsketch_row<T>(G, M, M, i, seed, m_offset, proj_dim, Phi, proj_dim);
    }
    return 0;
}

template <typename T>
int gram(const T* Phi, int64_t B, int64_t N, int64_t P, double damping, double* F) {
    if (B < 0 || N < 0 || P < 1 || (B > 0 && !F) || (B > 0 && N > 0 && !Phi)) return IIF_EINVAL;
    for (int64_t b = 0; b < B; ++b) {
        const T* Phi_b = Phi + b * N * P;
        for (int64_t i = 0; i < P; ++i) {
            for (int64_t j = 0; j < P; ++j) {
                F[(b * P + i) * P + j] = iif_gram_entry<T>(Phi_b, P, N, i, j, damping);
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

int iif_host_abi_version(void) { return IIF_HOST_ABI_VERSION; }

void iif_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    iif_philox4x32_10_core(ctr, key, out);
}

int iif_generate_block(uint64_t seed, uint64_t row_start, int64_t n_rows, int64_t proj_dim,
                       int kind, double* out) {
    return generate<double>(seed, row_start, n_rows, proj_dim, kind, out);
}

int iif_generate_block_f32(uint64_t seed, uint64_t row_start, int64_t n_rows, int64_t proj_dim,
                           int kind, float* out) {
    return generate<float>(seed, row_start, n_rows, proj_dim, kind, out);
}

int iif_project_f64(const double* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
                    int64_t proj_dim, int kind, double* Phi) {
    return project<double>(G, n, M, seed, m_offset, proj_dim, kind, Phi);
}

int iif_project_f32(const float* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
                    int64_t proj_dim, int kind, float* Phi) {
    return project<float>(G, n, M, seed, m_offset, proj_dim, kind, Phi);
}

int iif_countsketch_f64(const double* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
                        int64_t proj_dim, double* Phi) {
    return countsketch<double>(G, n, M, seed, m_offset, proj_dim, Phi);
}

int iif_countsketch_f32(const float* G, int64_t n, int64_t M, uint64_t seed, uint64_t m_offset,
                        int64_t proj_dim, float* Phi) {
    return countsketch<float>(G, n, M, seed, m_offset, proj_dim, Phi);
}

int iif_gram_f64(const double* Phi, int64_t B, int64_t N, int64_t P, double damping, double* F) {
    return gram<double>(Phi, B, N, P, damping, F);
}

int iif_gram_f32(const float* Phi, int64_t B, int64_t N, int64_t P, double damping, double* F) {
    return gram<float>(Phi, B, N, P, damping, F);
}

}  // extern "C"
