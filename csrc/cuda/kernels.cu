// The CUDA kernels and their host-side launchers.
//
// Each thread block updates one chunk of one tensor (NOTE: [launch packing]):
// every element of param, grad and state is loaded once, updated in fp32 registers
// by the rules of update.h, and stored once. Loads and stores are 16-byte vectors
// when every pointer of the tensor allows it, element by element otherwise (views
// with odd storage offsets are real). Compiled with --fmad=false and IEEE division
// and square root, so the GPU rounds exactly as the CPU kernels and the reference.
// The CI runs this file on the CPU (NOTE: [emulated CUDA] in runtime.h): kernels keep
// the rules written there.
#include "runtime.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "driver.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/dtypes.h"
#include "fusedopt/update.h"

namespace fusedopt::cuda {
namespace {

constexpr int kBlockThreads = 512;
constexpr int kMaxTensors = 256;
// Kernel parameters may take 32,764 bytes (CUDA 12.1+, Volta and newer).
constexpr int kParamBytes = 32000;

// Every table keeps room for the largest per-tensor scalars of any kernel (Adam's),
// so that a launch's capacity depends on its number of lists alone.
constexpr int kTensorScalarBytes = 8;

template <int kNumLists, typename TensorScalars>
struct LaunchTable {
  static_assert(sizeof(TensorScalars) <= kTensorScalarBytes, "per-tensor scalars exceed their room");
  static constexpr int kPerTensorBytes = kNumLists * 8 + 8 + kTensorScalarBytes;
  static constexpr int kMaxChunks = (kParamBytes - 256 - kMaxTensors * kPerTensorBytes) / 8;

  void* pointers[kNumLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  TensorScalars tensor_scalars[kMaxTensors];
  int32_t chunk_slots[kMaxChunks];
  int32_t chunk_indices[kMaxChunks];
};

// Per-tensor part of the Adam scalars (they depend on the tensor's step count).
struct AdamTensorScalars {
  float step_size;
  float bias_correction2_sqrt;
};
// Per-tensor part of the Adagrad scalars: the learning rate decayed by the step count.
struct AdagradTensorScalars {
  float lr;
};
struct NoTensorScalars {};

template <typename T, int kElements>
struct alignas(sizeof(T) * kElements) Vector {
  T values[kElements];
};

// Elements per chunk: kChunkElements; the emulated build lets tests shrink it, to
// overflow a launch table with few elements.
__host__ __device__ __forceinline__ int64_t chunk_elements() {
#if defined(FUSEDOPT_CUDA_EMULATION)
  return emulation::chunk_elements > 0 ? emulation::chunk_elements : kChunkElements;
#else
  return kChunkElements;
#endif
}

// Raises on a failed runtime call. The failed call also left its error as this
// thread's last error; it is consumed here, so that it cannot surface later as the
// error of another call (a launch that in fact succeeded).
void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fusedopt CUDA ") + what + " failed: " +
                             cudaGetErrorString(status));
  }
}

// Runs `update(values)` over every element of one chunk. List 0 is the param,
// list 1 the grad (read only), the others are states stored like the param. A list
// whose bit is set in kWriteOnlyLists is written without being read: its values
// enter `update` as 0 (SGDW's first step fills a fresh, uninitialized buffer).
template <typename ParamT, typename GradT, int kNumLists, unsigned kWriteOnlyLists,
          typename Update>
__device__ __forceinline__ void update_chunk(void* const (&pointers)[kNumLists], int64_t n,
                                             const Update& update) {
  constexpr int kVec = 16 / sizeof(ParamT);
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kNumLists; ++l) {
    const size_t bytes = (l == 1 ? sizeof(GradT) : sizeof(ParamT)) * kVec;
    aligned = aligned && reinterpret_cast<uintptr_t>(pointers[l]) % bytes == 0;
  }
  const int64_t vector_end = aligned ? n - n % kVec : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < vector_end;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    float values[kNumLists][kVec];
#pragma unroll
    for (int l = 0; l < kNumLists; ++l) {
      if (kWriteOnlyLists & (1u << l)) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) values[l][e] = 0.0f;
      } else if (l == 1) {
        const auto loaded = load(reinterpret_cast<const Vector<GradT, kVec>*>(
            static_cast<const GradT*>(pointers[l]) + i));
#pragma unroll
        for (int e = 0; e < kVec; ++e) values[l][e] = to_float(loaded.values[e]);
      } else {
        const auto loaded = load(reinterpret_cast<const Vector<ParamT, kVec>*>(
            static_cast<const ParamT*>(pointers[l]) + i));
#pragma unroll
        for (int e = 0; e < kVec; ++e) values[l][e] = to_float(loaded.values[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float element[kNumLists];
#pragma unroll
      for (int l = 0; l < kNumLists; ++l) element[l] = values[l][e];
      update(element);
#pragma unroll
      for (int l = 0; l < kNumLists; ++l) values[l][e] = element[l];
    }
#pragma unroll
    for (int l = 0; l < kNumLists; ++l) {
      if (l == 1) continue;
      Vector<ParamT, kVec> stored;
#pragma unroll
      for (int e = 0; e < kVec; ++e) stored.values[e] = from_float<ParamT>(values[l][e]);
      store(reinterpret_cast<Vector<ParamT, kVec>*>(static_cast<ParamT*>(pointers[l]) + i), stored);
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    float element[kNumLists];
#pragma unroll
    for (int l = 0; l < kNumLists; ++l) {
      if (kWriteOnlyLists & (1u << l)) {
        element[l] = 0.0f;
      } else if (l == 1) {
        element[l] = to_float(load(static_cast<const GradT*>(pointers[l]) + i));
      } else {
        element[l] = to_float(load(static_cast<const ParamT*>(pointers[l]) + i));
      }
    }
    update(element);
#pragma unroll
    for (int l = 0; l < kNumLists; ++l) {
      if (l != 1) store(static_cast<ParamT*>(pointers[l]) + i, from_float<ParamT>(element[l]));
    }
  }
}

// The chunk this block owns: its tensor's pointers advanced to the chunk start (list 1
// is the grad, of GradT; the others are of ParamT).
template <typename ParamT, typename GradT, int kNumLists, typename TensorScalars>
__device__ __forceinline__ int64_t locate_chunk(const LaunchTable<kNumLists, TensorScalars>& table,
                                                void* (&pointers)[kNumLists], int& slot) {
  slot = table.chunk_slots[blockIdx.x];
  const int64_t chunk = chunk_elements();
  const int64_t begin = static_cast<int64_t>(table.chunk_indices[blockIdx.x]) * chunk;
#pragma unroll
  for (int l = 0; l < kNumLists; ++l) {
    const int64_t element_bytes = l == 1 ? sizeof(GradT) : sizeof(ParamT);
    pointers[l] = static_cast<char*>(table.pointers[l][slot]) + begin * element_bytes;
  }
  const int64_t remaining = table.numels[slot] - begin;
  return remaining < chunk ? remaining : chunk;
}

template <typename ParamT, typename GradT, WeightDecay kDecay, bool kAmsgrad, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const __grid_constant__ LaunchTable<kAmsgrad ? 5 : 4, AdamTensorScalars> table,
                const AdamScalars shared) {
  constexpr int kNumLists = kAmsgrad ? 5 : 4;
  void* pointers[kNumLists];
  int slot;
  const int64_t n = locate_chunk<ParamT, GradT>(table, pointers, slot);
  AdamScalars scalars = shared;
  scalars.step_size = table.tensor_scalars[slot].step_size;
  scalars.bias_correction2_sqrt = table.tensor_scalars[slot].bias_correction2_sqrt;
  update_chunk<ParamT, GradT, kNumLists, 0u>(pointers, n, [&](float (&v)[kNumLists]) {
    float unused_max = 0.0f;
    adam_update<kDecay, kAmsgrad, kMaximize>(v[0], v[1], v[2], v[3],
                                            kAmsgrad ? v[kNumLists - 1] : unused_max, scalars);
  });
}

template <typename ParamT, typename GradT, bool kDecoupledDecay, Momentum kMomentum, bool kNesterov,
          bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    sgdw_kernel(const __grid_constant__ LaunchTable<kMomentum == Momentum::kNone ? 2 : 3,
                                                    NoTensorScalars> table,
                const SgdScalars scalars) {
  constexpr int kNumLists = kMomentum == Momentum::kNone ? 2 : 3;
  void* pointers[kNumLists];
  int slot;
  const int64_t n = locate_chunk<ParamT, GradT>(table, pointers, slot);
  // The first step creates the momentum buffer from the gradient: it is written only.
  constexpr unsigned kWriteOnlyLists = kMomentum == Momentum::kFirstStep ? 1u << 2 : 0u;
  update_chunk<ParamT, GradT, kNumLists, kWriteOnlyLists>(pointers, n, [&](float (&v)[kNumLists]) {
    float unused_buffer = 0.0f;
    sgdw_update<kDecoupledDecay, kMomentum, kNesterov, kMaximize>(
        v[0], v[1], kMomentum == Momentum::kNone ? unused_buffer : v[kNumLists - 1], scalars);
  });
}

template <typename ParamT, typename GradT, bool kWeightDecay, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    adagrad_kernel(const __grid_constant__ LaunchTable<3, AdagradTensorScalars> table,
                   const AdagradScalars shared) {
  void* pointers[3];
  int slot;
  const int64_t n = locate_chunk<ParamT, GradT>(table, pointers, slot);
  AdagradScalars scalars = shared;
  scalars.lr = table.tensor_scalars[slot].lr;
  update_chunk<ParamT, GradT, 3, 0u>(pointers, n, [&](float (&v)[3]) {
    adagrad_update<kWeightDecay, kMaximize>(v[0], v[1], v[2], scalars);
  });
}

// Lists: param, grad, square_avg, then momentum_buffer and grad_avg where present.
template <bool kCentered, bool kMomentum>
__host__ __device__ constexpr int rmsprop_lists() {
  return 3 + (kMomentum ? 1 : 0) + (kCentered ? 1 : 0);
}

template <typename ParamT, typename GradT, bool kWeightDecay, bool kCentered, bool kMomentum,
          bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    rmsprop_kernel(const __grid_constant__ LaunchTable<rmsprop_lists<kCentered, kMomentum>(),
                                                       NoTensorScalars> table,
                   const RmspropScalars scalars) {
  constexpr int kNumLists = rmsprop_lists<kCentered, kMomentum>();
  void* pointers[kNumLists];
  int slot;
  const int64_t n = locate_chunk<ParamT, GradT>(table, pointers, slot);
  constexpr int kBufferList = kMomentum ? 3 : 0;  // 0: any valid index, never used then
  update_chunk<ParamT, GradT, kNumLists, 0u>(pointers, n, [&](float (&v)[kNumLists]) {
    float unused_buffer = 0.0f;
    float unused_grad_avg = 0.0f;
    rmsprop_update<kWeightDecay, kCentered, kMomentum, kMaximize>(
        v[0], v[1], v[2], kMomentum ? v[kBufferList] : unused_buffer,
        kCentered ? v[kNumLists - 1] : unused_grad_avg, scalars);
  });
}

// Makes `device` current for the duration of a call and then restores the caller's
// device, touching the current device only when it differs: on a thread with no
// current context, setting device 0 "back" would create device 0's primary context.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    // A destructor cannot report; consume the error so no later call inherits it.
    if (switched_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// NOTE: [no graph capture]
// A step captured into a CUDA graph would freeze that step's scalars (learning rate,
// bias corrections) into the graph, and replays would never advance the host step
// counters: the bias correction would silently go wrong. Until a capturable mode keeps
// those on the device, a step on a capturing stream is refused before any write, as
// torch.optim refuses capture when capturable=False.
void refuse_graph_capture(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  if (status != cudaStreamCaptureStatusNone) {
    throw std::runtime_error(
        "fusedopt: step() on a stream under CUDA graph capture is not supported: the graph "
        "would freeze this step's learning rate and bias corrections (see docs/DESIGN.md)");
  }
}

// Puts the step counters back as they were unless commit() is called: they are
// advanced (on the host) before the launches, and a call that raises must change nothing.
class StepCounterRollback {
 public:
  explicit StepCounterRollback(const std::vector<uintptr_t>& counters)
      : counters_(counters), saved_(counters.size()) {
    for (size_t t = 0; t < counters_.size(); ++t) {
      std::memcpy(&saved_[t], reinterpret_cast<const void*>(counters_[t]), sizeof(float));
    }
  }
  ~StepCounterRollback() {
    if (committed_) return;
    for (size_t t = 0; t < counters_.size(); ++t) {
      std::memcpy(reinterpret_cast<void*>(counters_[t]), &saved_[t], sizeof(float));
    }
  }
  void commit() { committed_ = true; }
  StepCounterRollback(const StepCounterRollback&) = delete;
  StepCounterRollback& operator=(const StepCounterRollback&) = delete;

 private:
  const std::vector<uintptr_t>& counters_;
  std::vector<float> saved_;
  bool committed_ = false;
};

// Fills one launch table per launch of the plan from the step's pointer lists and
// queues the launches in order. Raises on the first launch that fails; the launches
// before it stay queued (a later launch of the same kernel fails only on a device
// fault, which leaves the context unusable anyway) and the message says how many.
template <typename Table, typename Kernel, typename Shared, typename TensorScalarsOf>
void launch_all(const std::vector<LaunchPlan>& plans,
                const std::vector<const std::vector<uintptr_t>*>& lists,
                const std::vector<int64_t>& numels, Kernel kernel, const Shared& shared,
                TensorScalarsOf tensor_scalars_of, cudaStream_t stream) {
  constexpr int kNumLists = sizeof(Table::pointers) / sizeof(Table::pointers[0]);
  static_assert(sizeof(Table) <= kParamBytes, "launch table exceeds the kernel parameter space");
  // An error left by an earlier call on this thread is not this launch's error.
  cudaGetLastError();
  for (size_t launch = 0; launch < plans.size(); ++launch) {
    const LaunchPlan& plan = plans[launch];
    Table table;
    for (size_t slot = 0; slot < plan.tensors.size(); ++slot) {
      const int64_t tensor = plan.tensors[slot];
      for (int l = 0; l < kNumLists; ++l) {
        table.pointers[l][slot] = reinterpret_cast<void*>((*lists[l])[tensor]);
      }
      table.numels[slot] = numels[tensor];
      table.tensor_scalars[slot] = tensor_scalars_of(tensor);
    }
    for (size_t c = 0; c < plan.chunk_slots.size(); ++c) {
      table.chunk_slots[c] = plan.chunk_slots[c];
      table.chunk_indices[c] = plan.chunk_indices[c];
    }
    launch_kernel(kernel, static_cast<unsigned>(plan.chunk_slots.size()), kBlockThreads, stream,
                  table, shared);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) {
      throw std::runtime_error("fusedopt CUDA kernel launch " + std::to_string(launch + 1) +
                               " of " + std::to_string(plans.size()) + " failed (" +
                               std::to_string(launch) + " queued before it): " +
                               cudaGetErrorString(status));
    }
  }
}

}  // namespace

LaunchCapacity launch_capacity(int num_lists) {
  switch (num_lists) {
    case 2:
      return {kMaxTensors, LaunchTable<2, NoTensorScalars>::kMaxChunks};
    case 3:
      return {kMaxTensors, LaunchTable<3, NoTensorScalars>::kMaxChunks};
    case 4:
      return {kMaxTensors, LaunchTable<4, NoTensorScalars>::kMaxChunks};
    case 5:
      return {kMaxTensors, LaunchTable<5, NoTensorScalars>::kMaxChunks};
  }
  throw std::invalid_argument("launch tables hold 2 to 5 lists");
}

namespace {

// What every launcher does before anything is written: check the pointer lists, plan
// the launches, make `device` current and refuse a capturing stream. Then
// `launch(plans, stream)` runs while the device is current.
template <typename Args, typename Launch>
void prepare_and_launch(const Args& args, int num_lists, int device, uintptr_t stream,
                        Launch launch) {
  check_lists(args);
  const std::vector<LaunchPlan> plans =
      plan_launches(args.numels, chunk_elements(), launch_capacity(num_lists));
  DeviceGuard guard(device);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  refuse_graph_capture(cuda_stream);
  launch(plans, cuda_stream);
}

using Plans = std::vector<LaunchPlan>;

}  // namespace

void adam_step(const AdamStepArgs& args, int device, uintptr_t stream) {
  prepare_and_launch(args, args.amsgrad ? 5 : 4, device, stream, [&](const Plans& plans,
                                                                     cudaStream_t cuda_stream) {
    StepCounterRollback rollback(args.steps);
    const std::vector<AdamScalars> scalars = advance_adam_steps(args);
    const AdamScalars shared = scalars.empty() ? AdamScalars{} : scalars[0];
    std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads, &args.exp_avgs,
                                                     &args.exp_avg_sqs};
    if (args.amsgrad) lists.push_back(&args.max_exp_avg_sqs);
    auto tensor_scalars_of = [&](int64_t t) {
      return AdamTensorScalars{scalars[t].step_size, scalars[t].bias_correction2_sqrt};
    };
    with_scalar_type(args.dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      with_weight_decay(args.decay, [&](auto decay) {
        with_bool(args.amsgrad, [&](auto amsgrad) {
          with_bool(args.maximize, [&](auto maximize) {
            launch_all<LaunchTable<amsgrad.value ? 5 : 4, AdamTensorScalars>>(
                plans, lists, args.numels,
                adam_kernel<T, T, decay.value, amsgrad.value, maximize.value>, shared,
                tensor_scalars_of, cuda_stream);
          });
        });
      });
    });
    rollback.commit();
  });
}

void sgdw_step(const SgdwStepArgs& args, int device, uintptr_t stream) {
  const bool has_buffer = args.momentum_mode != Momentum::kNone;
  prepare_and_launch(args, has_buffer ? 3 : 2, device, stream, [&](const Plans& plans,
                                                                   cudaStream_t cuda_stream) {
    const SgdScalars scalars = sgdw_scalars(args);
    std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads};
    if (has_buffer) lists.push_back(&args.momentum_buffers);
    auto no_tensor_scalars = [](int64_t) { return NoTensorScalars{}; };
    with_scalar_type(args.dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_momentum(args.momentum_mode, [&](auto momentum) {
          with_bool(args.nesterov, [&](auto nesterov) {
            with_bool(args.maximize, [&](auto maximize) {
              constexpr int kNumLists = momentum.value == Momentum::kNone ? 2 : 3;
              launch_all<LaunchTable<kNumLists, NoTensorScalars>>(
                  plans, lists, args.numels,
                  sgdw_kernel<T, T, decay.value, momentum.value, nesterov.value, maximize.value>,
                  scalars, no_tensor_scalars, cuda_stream);
            });
          });
        });
      });
    });
  });
}

void adagrad_step(const AdagradStepArgs& args, int device, uintptr_t stream) {
  prepare_and_launch(args, 3, device, stream, [&](const Plans& plans, cudaStream_t cuda_stream) {
    StepCounterRollback rollback(args.steps);
    const std::vector<AdagradScalars> scalars = advance_adagrad_steps(args);
    const AdagradScalars shared = scalars.empty() ? AdagradScalars{} : scalars[0];
    const std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads, &args.sums};
    auto tensor_scalars_of = [&](int64_t t) { return AdagradTensorScalars{scalars[t].lr}; };
    with_scalar_type(args.dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_bool(args.maximize, [&](auto maximize) {
          launch_all<LaunchTable<3, AdagradTensorScalars>>(
              plans, lists, args.numels, adagrad_kernel<T, T, decay.value, maximize.value>, shared,
              tensor_scalars_of, cuda_stream);
        });
      });
    });
    rollback.commit();
  });
}

void rmsprop_step(const RmspropStepArgs& args, int device, uintptr_t stream) {
  std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads, &args.square_avgs};
  if (args.has_momentum_buffer()) lists.push_back(&args.momentum_buffers);
  if (args.centered) lists.push_back(&args.grad_avgs);
  prepare_and_launch(args, static_cast<int>(lists.size()), device, stream,
                     [&](const Plans& plans, cudaStream_t cuda_stream) {
    StepCounterRollback rollback(args.steps);
    advance_rmsprop_steps(args);
    const RmspropScalars scalars = rmsprop_scalars(args);
    auto no_tensor_scalars = [](int64_t) { return NoTensorScalars{}; };
    with_scalar_type(args.dtype, [&](auto type) {
      using T = typename decltype(type)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_bool(args.centered, [&](auto centered) {
          with_bool(args.has_momentum_buffer(), [&](auto momentum) {
            with_bool(args.maximize, [&](auto maximize) {
              constexpr int kNumLists = rmsprop_lists<centered.value, momentum.value>();
              launch_all<LaunchTable<kNumLists, NoTensorScalars>>(
                  plans, lists, args.numels,
                  rmsprop_kernel<T, T, decay.value, centered.value, momentum.value, maximize.value>,
                  scalars, no_tensor_scalars, cuda_stream);
            });
          });
        });
      });
    });
    rollback.commit();
  });
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace fusedopt::cuda
