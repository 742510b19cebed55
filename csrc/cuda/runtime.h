// What kernels.cu uses of CUDA, in one place: the runtime API, the kernel launch and
// global-memory loads and stores. Under nvcc they are CUDA's own; with
// FUSEDOPT_CUDA_EMULATION (a g++ build for the CI, which has no GPU) they come from
// emulation.h and run on the CPU.
//
// NOTE: [emulated CUDA]
// The CI compiles the very same kernels.cu with the host compiler and runs every
// launch block by block and thread by thread (fusedopt._cuda_emulated): the kernels,
// the launch packing, the device guard and the error handling are then tested on
// every commit, bit for bit against the CPU kernels, and each load and store can be
// recorded and checked against the thread that owns the element.
// Sequential execution is faithful only while the kernels need no cooperation between
// threads. Rules for kernel authors:
//   * no shared memory, no __syncthreads, no atomics, no warp intrinsics, no
//     cooperative groups: each thread's result may not depend on another thread's
//     (emulation.h poisons those names, so the emulated build fails to compile);
//   * every access to tensor memory goes through load() and store() below, so the
//     emulated build can record it (a plain dereference is not checked);
//   * every launch goes through launch_kernel(), never <<<>>> directly.
// A kernel that needs any of these needs a new test plan, not a workaround.
#pragma once

#if defined(FUSEDOPT_CUDA_EMULATION)
#include "emulation.h"
#else
#include <cuda_runtime.h>
#endif

namespace fusedopt::cuda {

// Reads one value (a scalar or a Vector) of tensor memory.
template <typename T>
__device__ __forceinline__ T load(const T* address) {
#if defined(FUSEDOPT_CUDA_EMULATION)
  emulation::record_access(address, sizeof(T), /*write=*/false);
#endif
  return *address;
}

// Writes one value of tensor memory.
template <typename T>
__device__ __forceinline__ void store(T* address, const T& value) {
#if defined(FUSEDOPT_CUDA_EMULATION)
  emulation::record_access(address, sizeof(T), /*write=*/true);
#endif
  *address = value;
}

// Queues `kernel(args...)` on `stream` with `blocks` blocks of `threads` threads; the
// caller reads cudaGetLastError() for a launch error, as after <<<>>>.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads,
                   cudaStream_t stream, const Args&... args) {
#if defined(FUSEDOPT_CUDA_EMULATION)
  emulation::run_grid(blocks, threads, stream, [&] { kernel(args...); });
#else
  kernel<<<blocks, threads, 0, stream>>>(args...);
#endif
}

}  // namespace fusedopt::cuda
