// cuda_emulation.h -- just enough of the CUDA execution model to run the kernels of
// kernels/*.cu, unchanged, on the CPU (tests only; see iif_emulate.cpp).
//
// A block is emulated by blockDim.x * blockDim.y * blockDim.z OS threads that share the
// kernel's __shared__ arrays (function-local statics) and meet at __syncthreads() on a
// pthread barrier; the blocks of a grid run one after another.  threadIdx is per thread,
// blockIdx / blockDim / gridDim are set by the launcher before the block's threads start.
// This checks the kernels' indexing, tiling, boundary guards and barrier placement (a
// missing barrier shows up as a race, not reliably); it says nothing about speed, and it
// runs the host libm, so Gaussian entries agree with the GPU only to a few ulp.
//
// Defining the CUDA keywords as macros is only done in this one translation unit.
#ifndef IIF_CUDA_EMULATION_H
#define IIF_CUDA_EMULATION_H

#include <pthread.h>

struct iif_dim3 {
    unsigned int x, y, z;
};

extern thread_local iif_dim3 threadIdx;
extern iif_dim3 blockIdx, blockDim, gridDim;
extern pthread_barrier_t iif_emulated_barrier;

inline void __syncthreads() { pthread_barrier_wait(&iif_emulated_barrier); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

#endif  // IIF_CUDA_EMULATION_H
