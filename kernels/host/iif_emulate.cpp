// iif_emulate.cpp -- the CUDA kernels of kernels/*.cu, compiled unchanged for the CPU and run
// under cuda_emulation.h (one OS thread per CUDA thread, a pthread barrier per block), as a
// C ABI library for tests: libiif_cuda_emulation.so.
//
// Equations, index conventions and precision policy: those of projection.cu, countsketch.cu
// and gram.cu,
// whose source is included below.  The launch functions take the grid and block shape as
// arguments, so tests can check that results do not depend on launch geometry (a grid
// larger than needed, a different block shape that the kernels must refuse).
//
// Every entry point returns 0, or IIF_EINVAL for a bad dtype code or shape.
#include <stdint.h>

#include <thread>
#include <vector>

#include "cuda_emulation.h"

thread_local iif_dim3 threadIdx;
iif_dim3 blockIdx, blockDim, gridDim;
pthread_barrier_t iif_emulated_barrier;

#include "../countsketch.cu"
#include "../gram.cu"
#include "../projection.cu"

#define IIF_EINVAL (-22)

namespace {

template <typename Body>
int launch(iif_dim3 grid, iif_dim3 block, Body body) {
    const unsigned int threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return IIF_EINVAL;
    gridDim = grid;
    blockDim = block;
    for (unsigned int bz = 0; bz < grid.z; ++bz) {
        for (unsigned int by = 0; by < grid.y; ++by) {
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                blockIdx = iif_dim3{bx, by, bz};
                pthread_barrier_init(&iif_emulated_barrier, nullptr, threads);
                std::vector<std::thread> team;
                team.reserve(threads);
                for (unsigned int t = 0; t < threads; ++t) {
                    team.emplace_back([t, block, &body] {
                        threadIdx = iif_dim3{t % block.x, (t / block.x) % block.y,
                                             t / (block.x * block.y)};
                        body();
                    });
                }
                for (auto& thread : team) thread.join();
                pthread_barrier_destroy(&iif_emulated_barrier);
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = float64.
int iif_emulate_project(int dtype, unsigned int grid_x, unsigned int grid_y,
                        unsigned int block_x, const void* G, int64_t n, int64_t M, int64_t ldg,
                        uint64_t seed, uint64_t m_offset, int64_t proj_dim, int kind, void* Phi,
                        int64_t ldphi) {
    const iif_dim3 grid{grid_x, grid_y, 1}, block{block_x, 1, 1};
    if (dtype == 0) {
        return launch(grid, block, [=] {
            iif_project_f32(static_cast<const float*>(G), n, M, ldg, seed, m_offset, proj_dim,
                            kind, static_cast<float*>(Phi), ldphi);
        });
    }
    if (dtype == 1) {
        return launch(grid, block, [=] {
            iif_project_f64(static_cast<const double*>(G), n, M, ldg, seed, m_offset, proj_dim,
                            kind, static_cast<double*>(Phi), ldphi);
        });
    }
    return IIF_EINVAL;
}

int iif_emulate_countsketch(int dtype, unsigned int grid_x, unsigned int block_x, const void* G,
                            int64_t n, int64_t M, int64_t ldg, uint64_t seed, uint64_t m_offset,
                            int64_t proj_dim, void* Phi, int64_t ldphi) {
    const iif_dim3 grid{grid_x, 1, 1}, block{block_x, 1, 1};
    if (dtype == 0) {
        return launch(grid, block, [=] {
            iif_countsketch_f32(static_cast<const float*>(G), n, M, ldg, seed, m_offset, proj_dim,
                                static_cast<float*>(Phi), ldphi);
        });
    }
    if (dtype == 1) {
        return launch(grid, block, [=] {
            iif_countsketch_f64(static_cast<const double*>(G), n, M, ldg, seed, m_offset,
                                proj_dim, static_cast<double*>(Phi), ldphi);
        });
    }
    return IIF_EINVAL;
}

int iif_emulate_generate(int dtype, unsigned int grid_x, unsigned int block_x, uint64_t seed,
                         uint64_t row_start, int64_t n_rows, int64_t proj_dim, int kind,
                         void* out) {
    const iif_dim3 grid{grid_x, 1, 1}, block{block_x, 1, 1};
    if (dtype == 0) {
        return launch(grid, block, [=] {
            iif_generate_f32(seed, row_start, n_rows, proj_dim, kind, static_cast<float*>(out));
        });
    }
    if (dtype == 1) {
        return launch(grid, block, [=] {
            iif_generate_f64(seed, row_start, n_rows, proj_dim, kind, static_cast<double*>(out));
        });
    }
    return IIF_EINVAL;
}

int iif_emulate_gram(int dtype, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                     unsigned int block_x, const void* Phi, int64_t B, int64_t N, int64_t P,
                     int64_t ldb, int64_t ldr, const double* damping, double* F) {
    const iif_dim3 grid{grid_x, grid_y, grid_z}, block{block_x, 1, 1};
    if (dtype == 0) {
        return launch(grid, block, [=] {
            iif_gram_f32(static_cast<const float*>(Phi), B, N, P, ldb, ldr, damping, F);
        });
    }
    if (dtype == 1) {
        return launch(grid, block, [=] {
            iif_gram_f64(static_cast<const double*>(Phi), B, N, P, ldb, ldr, damping, F);
        });
    }
    return IIF_EINVAL;
}

}  // extern "C"
