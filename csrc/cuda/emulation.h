// CUDA for the host compiler: just enough of CUDA's built-ins, qualifiers and runtime
// API for kernels.cu to compile with g++ and run on the CPU (NOTE: [emulated CUDA] in
// runtime.h states the rules the kernels keep so that this stays faithful).
//
// A launch runs block after block, and within a block thread after thread, on the
// calling thread; threadIdx, blockIdx, blockDim and gridDim are thread-local globals
// set before each thread's turn. The runtime stand-in keeps CUDA's per-thread last
// error and current device, and tests steer it (device count, a missing or old driver,
// a failing launch, stream capture) to reach the host code's error paths.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// --- built-in variables and qualifiers -------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
using dim3 = uint3;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

// --- runtime API stand-in (emulation.cpp) ----------------------------------------------
// Error codes carry CUDA's values, so messages and tests read the same on both builds.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureImplicit = 906,
};
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);

namespace fusedopt::cuda::emulation {

// --- launches --------------------------------------------------------------------------
// Checks a launch as the runtime would (driver, current device, configuration, a failure
// the tests planted); false, with the last error set, when it is refused.
bool begin_launch(unsigned blocks, unsigned threads, cudaStream_t stream);

template <typename Body>
void run_grid(unsigned blocks, unsigned threads, cudaStream_t stream, const Body& run_thread) {
  if (!begin_launch(blocks, threads, stream)) return;
  gridDim = dim3{blocks, 1, 1};
  blockDim = dim3{threads, 1, 1};
  for (unsigned block = 0; block < blocks; ++block) {
    blockIdx = uint3{block, 0, 0};
    for (unsigned thread = 0; thread < threads; ++thread) {
      threadIdx = uint3{thread, 0, 0};
      run_thread();
    }
  }
}

// Elements per chunk when > 0 (tests shrink chunks); 0: the real kChunkElements.
inline int64_t chunk_elements = 0;

// --- access recording --------------------------------------------------------------------
// One load or store of tensor memory, by the thread that made it.
struct AccessRecord {
  uint64_t address;
  uint32_t bytes;
  uint32_t write;
  uint32_t launch;  // ordinal of the accepted launch since the last reset()
  uint32_t block;
  uint32_t thread;
  uint32_t unused;
};
static_assert(sizeof(AccessRecord) == 32, "Python reads the records with a fixed layout");

inline bool recording = false;
void append_record(const void* address, size_t bytes, bool write);
inline void record_access(const void* address, size_t bytes, bool write) {
  if (recording) append_record(address, bytes, write);
}
void start_recording();
std::vector<AccessRecord> stop_recording();

// --- steering, for the tests ---------------------------------------------------------------
struct RuntimeCounters {
  int64_t launches;          // accepted launches
  int64_t set_device_calls;  // cudaSetDevice calls, failed ones included
};

// Back to one healthy device, no planted failure, no capture, counters zero; this
// thread's last error cleared and its current device unset (no context yet).
void reset();
void set_device_count(int count);
// Every runtime call returns `error` (e.g. cudaErrorInsufficientDriver), or works (0).
void set_driver_error(int error);
// The launch `launches_from_now` attempts ahead (0: the next) fails with `error`.
void fail_launch(int launches_from_now, int error);
void set_capture_status(int status);
// Plants `error` as this thread's last error, as a failed earlier call would.
void set_last_error(int error);
// This thread's current device, -1 while it has none.
int current_device();
RuntimeCounters counters();

}  // namespace fusedopt::cuda::emulation

// Sequential emulation cannot run code in which threads cooperate (NOTE: [emulated
// CUDA]): using any of these names is a compile error in the emulated build.
#pragma GCC poison __shared__ __syncthreads __syncthreads_count __syncthreads_and
#pragma GCC poison __syncthreads_or __syncwarp __threadfence __threadfence_block
#pragma GCC poison atomicAdd atomicSub atomicExch atomicMin atomicMax atomicInc atomicDec
#pragma GCC poison atomicCAS atomicAnd atomicOr atomicXor
#pragma GCC poison __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync
#pragma GCC poison __ballot_sync __any_sync __all_sync __activemask __match_any_sync
#pragma GCC poison __reduce_add_sync cooperative_groups
