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

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "driver.h"
#include "fusedopt/dispatch.h"
#include "fusedopt/dtypes.h"
#include "fusedopt/step_count.h"
#include "fusedopt/stochastic_rounding.h"
#include "fusedopt/update.h"

namespace fusedopt::cuda {
namespace {

constexpr int kBlockThreads = 512;
constexpr int kMaxTensors = 256;
// Kernel parameters may take 32,764 bytes (CUDA 12.1+, Volta and newer).
constexpr int kParamBytes = 32000;

// Every table keeps room for the largest per-tensor scalars of any kernel (Adam's and
// SGDW's), so that a launch's capacity depends on its number of lists alone.
constexpr int kTensorScalarBytes = 24;

// A chunk's slot (its tensor's place in the table) fits in one byte.
static_assert(kMaxTensors <= 256, "chunk slots are uint8_t");

template <int kNumLists, typename TensorScalars>
struct LaunchTable {
  static_assert(sizeof(TensorScalars) <= kTensorScalarBytes, "per-tensor scalars exceed their room");
  static constexpr int kPerTensorBytes = kNumLists * 8 + 8 + kTensorScalarBytes;
  static constexpr int kPerChunkBytes = sizeof(int32_t) + sizeof(uint8_t);
  static constexpr int kMaxChunks = (kParamBytes - 256 - kMaxTensors * kPerTensorBytes) / kPerChunkBytes;

  void* pointers[kNumLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  TensorScalars tensor_scalars[kMaxTensors];
  int32_t chunk_indices[kMaxChunks];
  uint8_t chunk_slots[kMaxChunks];
};

// Adam's and SGDW's per tensor: its step counter in device memory (SGDW's is null
// unless it rounds stochastically) and what its stochastic-rounding stream is made of
// besides the count (NOTE: [stochastic rounding]; unused else): the stream is
// mix64(rounding_key ^ count) + rounding_shift (NOTE: [device step counters]).
struct CountedTensorScalars {
  float* counter;
  uint64_t rounding_key;    // mix64(mix64(seed) ^ tensor)
  uint64_t rounding_shift;  // kGoldenGamma * the tensor's first element's offset
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

// The storage types of a kernel's lists (NOTE: [precision] in dispatch.h): list 0 is
// the param, list 1 the grad, the last the master when there is one (NOTE: [master
// weights] in dtypes.h), the others states.
template <typename ParamT, typename GradT, typename StateT, typename MasterT, int kNumLists>
struct ListTypes {
  using Param = ParamT;
  using Grad = GradT;
  using State = StateT;
  static constexpr bool kHasMaster = !std::is_same_v<MasterT, NoMaster>;
  static constexpr int kMasterList = kHasMaster ? kNumLists - 1 : -1;
  // The master list's type where there is one; code for the other case is never run.
  using Master = std::conditional_t<kHasMaster, MasterT, StateT>;

  __host__ __device__ static constexpr int64_t bytes(int l) {
    return l == 0 ? sizeof(ParamT) : l == 1 ? sizeof(GradT) : l == kMasterList ? sizeof(Master)
                                                                                : sizeof(StateT);
  }
  __host__ __device__ static constexpr int64_t widest() {
    int64_t widest_bytes = 0;
    for (int l = 0; l < kNumLists; ++l) widest_bytes = bytes(l) > widest_bytes ? bytes(l) : widest_bytes;
    return widest_bytes;
  }
};

template <typename T, int kVec>
__device__ __forceinline__ void load_vector(const void* list, int64_t i, float (&out)[kVec]) {
  const auto loaded = load(reinterpret_cast<const Vector<T, kVec>*>(static_cast<const T*>(list) + i));
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = to_float(loaded.values[e]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vector(void* list, int64_t i, const float (&values)[kVec]) {
  Vector<T, kVec> stored;
#pragma unroll
  for (int e = 0; e < kVec; ++e) stored.values[e] = from_float<T>(values[e]);
  store(reinterpret_cast<Vector<T, kVec>*>(static_cast<T*>(list) + i), stored);
}

// Where a chunk's params lie in their tensor, and the tensor's stochastic-rounding
// stream: what round_param needs to store element i of the chunk.
struct ParamRounding {
  uint64_t stream;
  int64_t first_element;  // the chunk's first element's index in its tensor
};

template <typename ParamT, int kVec>
__device__ __forceinline__ void store_param_vector(void* list, int64_t i, const float (&values)[kVec],
                                                   const ParamRounding& rounding) {
  Vector<ParamT, kVec> stored;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    stored.values[e] = round_param<ParamT>(values[e], rounding.stream, rounding.first_element + i + e);
  }
  store(reinterpret_cast<Vector<ParamT, kVec>*>(static_cast<ParamT*>(list) + i), stored);
}

// NOTE: [device step counters]
// On CUDA, Adam's and SGDW's step counters live in device memory, as torch's fused
// optimizers keep them, and GradScaler's found_inf and scale are read there too: a step
// queues its launches without reading anything the GPU computes, so it never waits for
// the GPU. Every thread reads its tensor's counter and GradScaler's two words (the same
// few addresses for the whole block, served by the cache) and derives what the host
// would derive (step_count.h, bit for bit). A step whose found_inf is set, or whose scale
// has no normal fp32 reciprocal, writes nothing; a tensor whose counter holds no count
// (a whole number >= 0: the host checks every counter it plans with) is left as it was.
// After the step's launches, advance_counters_kernel adds 1 to each counter unless the
// step was skipped: the stream runs launches in order, so every block of the step read
// the count before the increment.
struct ScalerInputs {
  const float* found_inf;  // null: no inf check
  const float* scale;      // null: the host's inv_grad_scale
};

// Whether GradScaler skips this step; else `inv_grad_scale` is the reciprocal of its
// scale, rounded to fp32 once as the host rounds it (unchanged without a scale).
__device__ __forceinline__ bool step_is_skipped(const ScalerInputs& scaler, float& inv_grad_scale) {
  if (scaler.found_inf != nullptr && load(scaler.found_inf) != 0.0f) return true;
  if (scaler.scale != nullptr) {
    const float scale = load(scaler.scale);
    inv_grad_scale = static_cast<float>(1.0 / static_cast<double>(scale));
    const bool usable = scale > 0.0f && isfinite(scale) && isfinite(inv_grad_scale) &&
                        inv_grad_scale >= 1.17549435e-38f;  // the smallest normal fp32
    if (!usable) return true;
  }
  return false;
}

// A tensor's stochastic-rounding stream for its count after the increment.
__device__ __forceinline__ uint64_t rounding_stream_of(const CountedTensorScalars& of_tensor, float step) {
  return mix64(of_tensor.rounding_key ^ whole_count(step)) + of_tensor.rounding_shift;
}

// Runs `update(values)` over every element of one chunk. List 0 is the param,
// list 1 the grad (read only), the others are states. A list whose bit is set in
// kWriteOnlyLists is written without being read: its values enter `update` as 0
// (SGDW's first step fills a fresh, uninitialized buffer). Vectors hold as many
// elements as 16 bytes of the widest list: no access is wider than 16 bytes. The
// param is stored by round_param (`rounding`: NOTE: [stochastic rounding]).
template <typename Types, int kNumLists, unsigned kWriteOnlyLists, typename Update>
__device__ __forceinline__ void update_chunk(void* const (&pointers)[kNumLists], int64_t n,
                                             const ParamRounding& rounding, const Update& update) {
  using ParamT = typename Types::Param;
  using GradT = typename Types::Grad;
  using StateT = typename Types::State;
  using MasterT = typename Types::Master;
  constexpr int kMasterList = Types::kMasterList;
  constexpr int kVec = static_cast<int>(16 / Types::widest());
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kNumLists; ++l) {
    const int64_t bytes = Types::bytes(l) * kVec;
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
      } else if (l == 0) {
        load_vector<ParamT>(pointers[l], i, values[l]);
      } else if (l == 1) {
        load_vector<GradT>(pointers[l], i, values[l]);
      } else if (l == kMasterList) {
        load_vector<MasterT>(pointers[l], i, values[l]);
      } else {
        load_vector<StateT>(pointers[l], i, values[l]);
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
    store_param_vector<ParamT>(pointers[0], i, values[0], rounding);
#pragma unroll
    for (int l = 2; l < kNumLists; ++l) {
      if (l == kMasterList) {
        store_vector<MasterT>(pointers[l], i, values[l]);
      } else {
        store_vector<StateT>(pointers[l], i, values[l]);
      }
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    float element[kNumLists];
#pragma unroll
    for (int l = 0; l < kNumLists; ++l) {
      if (kWriteOnlyLists & (1u << l)) {
        element[l] = 0.0f;
      } else if (l == 0) {
        element[l] = to_float(load(static_cast<const ParamT*>(pointers[l]) + i));
      } else if (l == 1) {
        element[l] = to_float(load(static_cast<const GradT*>(pointers[l]) + i));
      } else if (l == kMasterList) {
        element[l] = to_float(load(static_cast<const MasterT*>(pointers[l]) + i));
      } else {
        element[l] = to_float(load(static_cast<const StateT*>(pointers[l]) + i));
      }
    }
    update(element);
    store(static_cast<ParamT*>(pointers[0]) + i,
          round_param<ParamT>(element[0], rounding.stream, rounding.first_element + i));
#pragma unroll
    for (int l = 2; l < kNumLists; ++l) {
      if (l == kMasterList) {
        store(static_cast<MasterT*>(pointers[l]) + i, from_float<MasterT>(element[l]));
      } else {
        store(static_cast<StateT*>(pointers[l]) + i, from_float<StateT>(element[l]));
      }
    }
  }
}

// The chunk this block owns: its tensor's pointers advanced to the chunk start, each
// list by its own element size; `begin` is the chunk start's element index.
template <typename Types, int kNumLists, typename TensorScalars>
__device__ __forceinline__ int64_t locate_chunk(const LaunchTable<kNumLists, TensorScalars>& table,
                                                void* (&pointers)[kNumLists], int& slot,
                                                int64_t& begin) {
  slot = table.chunk_slots[blockIdx.x];
  const int64_t chunk = chunk_elements();
  begin = static_cast<int64_t>(table.chunk_indices[blockIdx.x]) * chunk;
#pragma unroll
  for (int l = 0; l < kNumLists; ++l) {
    pointers[l] = static_cast<char*>(table.pointers[l][slot]) + begin * Types::bytes(l);
  }
  const int64_t remaining = table.numels[slot] - begin;
  return remaining < chunk ? remaining : chunk;
}

// A kernel's lists: the param, the grad, `kStates` states and the master if any.
template <typename MasterT, int kStates>
__host__ __device__ constexpr int num_lists() {
  return 2 + kStates + (std::is_same_v<MasterT, NoMaster> ? 0 : 1);
}

// Calls `step(value, states...)` on the fp32 value the kernel updates: the param's, or
// its master's, written back to both lists afterwards (NOTE: [master weights]).
template <typename Types, int kNumLists, typename Step>
__device__ __forceinline__ void with_master(float (&v)[kNumLists], const Step& step) {
  float unused_master = 0.0f;
  float& master = Types::kHasMaster ? v[kNumLists - 1] : unused_master;
  float value = master_value<typename Types::Master>(v[0], master);
  step(value);
  if constexpr (Types::kHasMaster) {
    store_master_value<typename Types::Master>(value, v[0], master);
  } else {
    v[0] = value;
  }
}

// Adam's kernel parameters besides the table: the scalars shared by all tensors, what
// the bias corrections are derived from, and GradScaler's tensors.
struct AdamLaunchScalars {
  AdamScalars shared;
  double lr, beta1, beta2;
  ScalerInputs scaler;
};

template <typename ParamT, typename GradT, typename StateT, typename MasterT, WeightDecay kDecay,
          bool kAmsgrad, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const __grid_constant__ LaunchTable<num_lists<MasterT, kAmsgrad ? 3 : 2>(),
                                                    CountedTensorScalars> table,
                const AdamLaunchScalars launch) {
  constexpr int kNumLists = num_lists<MasterT, kAmsgrad ? 3 : 2>();
  using Types = ListTypes<ParamT, GradT, StateT, MasterT, kNumLists>;
  void* pointers[kNumLists];
  int slot;
  int64_t begin;
  const int64_t n = locate_chunk<Types>(table, pointers, slot, begin);
  const CountedTensorScalars& of_tensor = table.tensor_scalars[slot];
  AdamScalars scalars = launch.shared;
  if (step_is_skipped(launch.scaler, scalars.inv_grad_scale)) return;
  const float count = load(of_tensor.counter);
  if (!is_step_count(count)) return;
  const float step = count + 1.0f;  // fp32, as the host and torch.optim increment it
  const BiasCorrections corrections = bias_corrections(launch.lr, launch.beta1, launch.beta2, step);
  scalars.step_size = corrections.step_size;
  scalars.bias_correction2_sqrt = corrections.bias_correction2_sqrt;
  const ParamRounding rounding{rounding_stream_of(of_tensor, step), begin};
  update_chunk<Types, kNumLists, 0u>(pointers, n, rounding, [&](float (&v)[kNumLists]) {
    with_master<Types>(v, [&](float& param) {
      float unused_max = 0.0f;
      adam_update<kDecay, kAmsgrad, kMaximize>(param, v[1], v[2], v[3], kAmsgrad ? v[4] : unused_max,
                                              scalars);
    });
  });
}

struct SgdwLaunchScalars {
  SgdScalars shared;
  ScalerInputs scaler;
};

template <typename ParamT, typename GradT, typename StateT, typename MasterT, bool kDecoupledDecay,
          Momentum kMomentum, bool kNesterov, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    sgdw_kernel(const __grid_constant__ LaunchTable<
                    num_lists<MasterT, kMomentum == Momentum::kNone ? 0 : 1>(), CountedTensorScalars> table,
                const SgdwLaunchScalars launch) {
  constexpr bool kHasBuffer = kMomentum != Momentum::kNone;
  constexpr int kNumLists = num_lists<MasterT, kHasBuffer ? 1 : 0>();
  using Types = ListTypes<ParamT, GradT, StateT, MasterT, kNumLists>;
  void* pointers[kNumLists];
  int slot;
  int64_t begin;
  const int64_t n = locate_chunk<Types>(table, pointers, slot, begin);
  SgdScalars scalars = launch.shared;
  if (step_is_skipped(launch.scaler, scalars.inv_grad_scale)) return;
  const CountedTensorScalars& of_tensor = table.tensor_scalars[slot];
  uint64_t stream = 0;
  if (of_tensor.counter != nullptr) {  // counted only to round stochastically
    const float count = load(of_tensor.counter);
    if (!is_step_count(count)) return;
    stream = rounding_stream_of(of_tensor, count + 1.0f);
  }
  const ParamRounding rounding{stream, begin};
  // The first step creates the momentum buffer (list 2) from the gradient: it is written only.
  constexpr unsigned kWriteOnlyLists = kMomentum == Momentum::kFirstStep ? 1u << 2 : 0u;
  update_chunk<Types, kNumLists, kWriteOnlyLists>(pointers, n, rounding, [&](float (&v)[kNumLists]) {
    with_master<Types>(v, [&](float& param) {
      float unused_buffer = 0.0f;
      sgdw_update<kDecoupledDecay, kMomentum, kNesterov, kMaximize>(
          param, v[1], kHasBuffer ? v[2] : unused_buffer, scalars);
    });
  });
}

// Adds 1 to each counter of a step unless GradScaler skipped it (NOTE: [device step
// counters]): thread i of the grid owns counter i.
constexpr int kCounterThreads = 256;
constexpr int kMaxCounters = (kParamBytes - 256) / static_cast<int>(sizeof(float*));
struct CounterTable {
  float* counters[kMaxCounters];
  int count;
};

__global__ void __launch_bounds__(kCounterThreads)
    advance_counters_kernel(const __grid_constant__ CounterTable table, const ScalerInputs scaler) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= table.count) return;
  float unused_inv_grad_scale = 1.0f;
  if (step_is_skipped(scaler, unused_inv_grad_scale)) return;
  const float count = load(table.counters[i]);
  if (is_step_count(count)) store(table.counters[i], count + 1.0f);
}

template <typename ParamT, typename GradT, typename StateT, bool kWeightDecay, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    adagrad_kernel(const __grid_constant__ LaunchTable<3, AdagradTensorScalars> table,
                   const AdagradScalars shared) {
  using Types = ListTypes<ParamT, GradT, StateT, NoMaster, 3>;
  void* pointers[3];
  int slot;
  int64_t begin;
  const int64_t n = locate_chunk<Types>(table, pointers, slot, begin);
  AdagradScalars scalars = shared;
  scalars.lr = table.tensor_scalars[slot].lr;
  update_chunk<Types, 3, 0u>(pointers, n, ParamRounding{0, begin}, [&](float (&v)[3]) {
    adagrad_update<kWeightDecay, kMaximize>(v[0], v[1], v[2], scalars);
  });
}

// Lists: param, grad, square_avg, then momentum_buffer and grad_avg where present.
template <bool kCentered, bool kMomentum>
__host__ __device__ constexpr int rmsprop_lists() {
  return 3 + (kMomentum ? 1 : 0) + (kCentered ? 1 : 0);
}

template <typename ParamT, typename GradT, typename StateT, bool kWeightDecay, bool kCentered,
          bool kMomentum, bool kMaximize>
__global__ void __launch_bounds__(kBlockThreads)
    rmsprop_kernel(const __grid_constant__ LaunchTable<rmsprop_lists<kCentered, kMomentum>(),
                                                       NoTensorScalars> table,
                   const RmspropScalars scalars) {
  constexpr int kNumLists = rmsprop_lists<kCentered, kMomentum>();
  using Types = ListTypes<ParamT, GradT, StateT, NoMaster, kNumLists>;
  void* pointers[kNumLists];
  int slot;
  int64_t begin;
  const int64_t n = locate_chunk<Types>(table, pointers, slot, begin);
  constexpr int kBufferList = kMomentum ? 3 : 0;  // 0: any valid index, never used then
  update_chunk<Types, kNumLists, 0u>(pointers, n, ParamRounding{0, begin}, [&](float (&v)[kNumLists]) {
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

// Puts Adagrad's and RMSprop's host step counters back as they were unless commit() is
// called: they are advanced before the launches, and a call that raises must change nothing.
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
      table.chunk_slots[c] = static_cast<uint8_t>(plan.chunk_slots[c]);  // < kMaxTensors
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
    case 6:
      return {kMaxTensors, LaunchTable<6, NoTensorScalars>::kMaxChunks};
  }
  throw std::invalid_argument("launch tables hold 2 to 6 lists");
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

// Each tensor's counter and rounding inputs (NOTE: [device step counters]).
template <typename Args>
CountedTensorScalars counted_tensor_scalars(const Args& args, int64_t t) {
  CountedTensorScalars out{nullptr, 0, 0};
  if (!args.steps.empty()) out.counter = reinterpret_cast<float*>(args.steps[t]);
  if (args.stochastic_rounding) {
    out.rounding_key = mix64(mix64(args.rounding_seed) ^ args.rounding_ids[t]);
    out.rounding_shift = kGoldenGamma * args.rounding_offsets[t];
  }
  return out;
}

template <typename Args>
ScalerInputs scaler_inputs(const Args& args) {
  return ScalerInputs{reinterpret_cast<const float*>(args.found_inf),
                      reinterpret_cast<const float*>(args.scale)};
}

// Queues the increment of every counter of a step, after its launches (NOTE: [device
// step counters]).
void advance_counters(const std::vector<uintptr_t>& counters, const ScalerInputs& scaler,
                      cudaStream_t stream) {
  static_assert(sizeof(CounterTable) <= kParamBytes, "counter table exceeds the kernel parameter space");
  cudaGetLastError();
  for (size_t first = 0; first < counters.size(); first += kMaxCounters) {
    CounterTable table;
    table.count = static_cast<int>(std::min<size_t>(kMaxCounters, counters.size() - first));
    for (int i = 0; i < table.count; ++i) table.counters[i] = reinterpret_cast<float*>(counters[first + i]);
    const unsigned blocks = static_cast<unsigned>((table.count + kCounterThreads - 1) / kCounterThreads);
    launch_kernel(advance_counters_kernel, blocks, kCounterThreads, stream, table, scaler);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) {
      throw std::runtime_error(std::string("fusedopt CUDA step counter launch failed after the step's "
                                           "updates were queued (the counters lag by one): ") +
                               cudaGetErrorString(status));
    }
  }
}

void adam_step(const AdamStepArgs& args, int device, uintptr_t stream) {
  const bool has_master = args.master != MasterWeights::kNone;
  const int lists_count = (args.amsgrad ? 5 : 4) + (has_master ? 1 : 0);
  prepare_and_launch(args, lists_count, device, stream, [&](const Plans& plans,
                                                             cudaStream_t cuda_stream) {
    // The bias corrections of step 1 are replaced per tensor in the kernel.
    const AdamLaunchScalars launch{adam_scalars(args, 1.0f), args.lr, args.beta1, args.beta2,
                                   scaler_inputs(args)};
    std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads, &args.exp_avgs,
                                                     &args.exp_avg_sqs};
    if (args.amsgrad) lists.push_back(&args.max_exp_avg_sqs);
    if (has_master) lists.push_back(&args.masters);
    auto tensor_scalars_of = [&](int64_t t) { return counted_tensor_scalars(args, t); };
    with_precision(args.dtype, args.grad_dtype, args.state_dtype, args.master,
                   args.stochastic_rounding, [&](auto param, auto grad, auto state, auto master) {
      using P = typename decltype(param)::type;
      using G = typename decltype(grad)::type;
      using S = typename decltype(state)::type;
      using M = typename decltype(master)::type;
      with_weight_decay(args.decay, [&](auto decay) {
        with_bool(args.amsgrad, [&](auto amsgrad) {
          with_bool(args.maximize, [&](auto maximize) {
            launch_all<LaunchTable<num_lists<M, amsgrad.value ? 3 : 2>(), CountedTensorScalars>>(
                plans, lists, args.numels,
                adam_kernel<P, G, S, M, decay.value, amsgrad.value, maximize.value>, launch,
                tensor_scalars_of, cuda_stream);
          });
        });
      });
    });
    advance_counters(args.steps, launch.scaler, cuda_stream);
  });
}

void sgdw_step(const SgdwStepArgs& args, int device, uintptr_t stream) {
  const bool has_buffer = args.momentum_mode != Momentum::kNone;
  const bool has_master = args.master != MasterWeights::kNone;
  const int lists_count = 2 + (has_buffer ? 1 : 0) + (has_master ? 1 : 0);
  prepare_and_launch(args, lists_count, device, stream, [&](const Plans& plans,
                                                             cudaStream_t cuda_stream) {
    const SgdwLaunchScalars launch{sgdw_scalars(args), scaler_inputs(args)};
    std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads};
    if (has_buffer) lists.push_back(&args.momentum_buffers);
    if (has_master) lists.push_back(&args.masters);
    auto tensor_scalars_of = [&](int64_t t) { return counted_tensor_scalars(args, t); };
    with_precision(args.dtype, args.grad_dtype, args.state_dtype, args.master,
                   args.stochastic_rounding, [&](auto param, auto grad, auto state, auto master) {
      using P = typename decltype(param)::type;
      using G = typename decltype(grad)::type;
      using S = typename decltype(state)::type;
      using M = typename decltype(master)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_momentum(args.momentum_mode, [&](auto momentum) {
          with_bool(args.nesterov, [&](auto nesterov) {
            with_bool(args.maximize, [&](auto maximize) {
              constexpr int kNumLists = num_lists<M, momentum.value == Momentum::kNone ? 0 : 1>();
              launch_all<LaunchTable<kNumLists, CountedTensorScalars>>(
                  plans, lists, args.numels,
                  sgdw_kernel<P, G, S, M, decay.value, momentum.value, nesterov.value, maximize.value>,
                  launch, tensor_scalars_of, cuda_stream);
            });
          });
        });
      });
    });
    advance_counters(args.steps, launch.scaler, cuda_stream);
  });
}

void adagrad_step(const AdagradStepArgs& args, int device, uintptr_t stream) {
  prepare_and_launch(args, 3, device, stream, [&](const Plans& plans, cudaStream_t cuda_stream) {
    StepCounterRollback rollback(args.steps);
    const std::vector<AdagradScalars> scalars = advance_adagrad_steps(args);
    const AdagradScalars shared = scalars.empty() ? AdagradScalars{} : scalars[0];
    const std::vector<const std::vector<uintptr_t>*> lists{&args.params, &args.grads, &args.sums};
    auto tensor_scalars_of = [&](int64_t t) { return AdagradTensorScalars{scalars[t].lr}; };
    with_precision(args.dtype, args.grad_dtype, args.state_dtype, MasterWeights::kNone,
                   [&](auto param, auto grad, auto state, auto) {
      using P = typename decltype(param)::type;
      using G = typename decltype(grad)::type;
      using S = typename decltype(state)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_bool(args.maximize, [&](auto maximize) {
          launch_all<LaunchTable<3, AdagradTensorScalars>>(
              plans, lists, args.numels, adagrad_kernel<P, G, S, decay.value, maximize.value>,
              shared, tensor_scalars_of, cuda_stream);
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
    with_precision(args.dtype, args.grad_dtype, args.state_dtype, MasterWeights::kNone,
                   [&](auto param, auto grad, auto state, auto) {
      using P = typename decltype(param)::type;
      using G = typename decltype(grad)::type;
      using S = typename decltype(state)::type;
      with_bool(args.weight_decay != 0.0, [&](auto decay) {
        with_bool(args.centered, [&](auto centered) {
          with_bool(args.has_momentum_buffer(), [&](auto momentum) {
            with_bool(args.maximize, [&](auto maximize) {
              constexpr int kNumLists = rmsprop_lists<centered.value, momentum.value>();
              launch_all<LaunchTable<kNumLists, NoTensorScalars>>(
                  plans, lists, args.numels,
                  rmsprop_kernel<P, G, S, decay.value, centered.value, momentum.value,
                                 maximize.value>,
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
