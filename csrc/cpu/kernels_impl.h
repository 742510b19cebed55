// The CPU chunk kernels. Included by one translation unit per instruction set
// (kernels_baseline.cpp, kernels_avx2.cpp, kernels_avx512.cpp), each compiled with
// its own -m flags and FUSEDOPT_CPU_ISA naming its namespace. Everything here has
// internal linkage except kernel_table() (see NOTE: [internal linkage for shared math]).
#ifndef FUSEDOPT_CPU_ISA
#error "define FUSEDOPT_CPU_ISA before including kernels_impl.h"
#endif

#include "fusedopt/dispatch.h"
#include "kernels.h"

namespace fusedopt::cpu::FUSEDOPT_CPU_ISA {
namespace {

// A chunk's slice of a list; null for a list the call does not have.
template <typename T, bool kPresent>
T* slice(void* const* list, const Chunk& chunk) {
  return kPresent ? static_cast<T*>(list[chunk.tensor]) + chunk.begin : nullptr;
}

// Tensor `t`'s stochastic-rounding stream; 0 (unused) for params rounded to nearest.
template <typename ParamT>
uint64_t rounding_stream_of(const uint64_t* streams, int64_t t) {
  return std::is_same_v<ParamT, StochasticBFloat16> ? streams[t] : 0;
}

// One pass over a chunk: each element of every list is loaded once, updated in
// fp32 registers and stored once. Plain indexed loops over __restrict pointers, so
// the compiler vectorizes the whole body, conversions included.
template <typename ParamT, typename GradT, typename StateT, typename MasterT, WeightDecay kDecay,
          bool kAmsgrad, bool kMaximize>
void adam_chunk(const AdamKernelArgs& args, const Chunk& chunk) {
  constexpr bool kHasMaster = !std::is_same_v<MasterT, NoMaster>;
  const int64_t t = chunk.tensor;
  ParamT* __restrict param = static_cast<ParamT*>(args.params[t]) + chunk.begin;
  MasterT* __restrict master = slice<MasterT, kHasMaster>(args.masters, chunk);
  const GradT* __restrict grad = static_cast<const GradT*>(args.grads[t]) + chunk.begin;
  StateT* __restrict exp_avg = static_cast<StateT*>(args.exp_avgs[t]) + chunk.begin;
  StateT* __restrict exp_avg_sq = static_cast<StateT*>(args.exp_avg_sqs[t]) + chunk.begin;
  StateT* __restrict max_exp_avg_sq =
      kAmsgrad ? static_cast<StateT*>(args.max_exp_avg_sqs[t]) + chunk.begin : nullptr;
  const AdamScalars scalars = args.scalars[t];
  const uint64_t stream = rounding_stream_of<ParamT>(args.rounding_streams, t);
  const int64_t begin = chunk.begin;  // a local: stores may alias `chunk` (-fno-strict-aliasing)
  const int64_t n = chunk.end - chunk.begin;
  for (int64_t i = 0; i < n; ++i) {
    float p = to_float(param[i]);
    float master_bits = 0.0f;
    if constexpr (kHasMaster) master_bits = to_float(master[i]);
    p = master_value<MasterT>(p, master_bits);
    float m = to_float(exp_avg[i]);
    float v = to_float(exp_avg_sq[i]);
    float v_max = 0.0f;
    if constexpr (kAmsgrad) v_max = to_float(max_exp_avg_sq[i]);
    adam_update<kDecay, kAmsgrad, kMaximize>(p, to_float(grad[i]), m, v, v_max, scalars);
    store_master_value<MasterT>(p, p, master_bits);
    param[i] = round_param<ParamT>(p, stream, begin + i);
    if constexpr (kHasMaster) master[i] = from_float<MasterT>(master_bits);
    exp_avg[i] = from_float<StateT>(m);
    exp_avg_sq[i] = from_float<StateT>(v);
    if constexpr (kAmsgrad) max_exp_avg_sq[i] = from_float<StateT>(v_max);
  }
}

template <typename ParamT, typename GradT, typename StateT, typename MasterT, bool kDecoupledDecay,
          Momentum kMomentum, bool kNesterov, bool kMaximize>
void sgdw_chunk(const SgdwKernelArgs& args, const Chunk& chunk) {
  constexpr bool kHasBuffer = kMomentum != Momentum::kNone;
  constexpr bool kHasMaster = !std::is_same_v<MasterT, NoMaster>;
  const int64_t t = chunk.tensor;
  ParamT* __restrict param = static_cast<ParamT*>(args.params[t]) + chunk.begin;
  MasterT* __restrict master = slice<MasterT, kHasMaster>(args.masters, chunk);
  const GradT* __restrict grad = static_cast<const GradT*>(args.grads[t]) + chunk.begin;
  StateT* __restrict buffer =
      kHasBuffer ? static_cast<StateT*>(args.momentum_buffers[t]) + chunk.begin : nullptr;
  const SgdScalars scalars = args.scalars;
  const uint64_t stream = rounding_stream_of<ParamT>(args.rounding_streams, t);
  const int64_t begin = chunk.begin;  // a local: stores may alias `chunk` (-fno-strict-aliasing)
  const int64_t n = chunk.end - chunk.begin;
  for (int64_t i = 0; i < n; ++i) {
    float p = to_float(param[i]);
    float master_bits = 0.0f;
    if constexpr (kHasMaster) master_bits = to_float(master[i]);
    p = master_value<MasterT>(p, master_bits);
    float b = 0.0f;
    if constexpr (kMomentum == Momentum::kRunning) b = to_float(buffer[i]);
    sgdw_update<kDecoupledDecay, kMomentum, kNesterov, kMaximize>(p, to_float(grad[i]), b, scalars);
    store_master_value<MasterT>(p, p, master_bits);
    param[i] = round_param<ParamT>(p, stream, begin + i);
    if constexpr (kHasMaster) master[i] = from_float<MasterT>(master_bits);
    if constexpr (kHasBuffer) buffer[i] = from_float<StateT>(b);
  }
}

template <typename ParamT, typename GradT, typename StateT, bool kWeightDecay, bool kMaximize>
void adagrad_chunk(const AdagradKernelArgs& args, const Chunk& chunk) {
  const int64_t t = chunk.tensor;
  ParamT* __restrict param = static_cast<ParamT*>(args.params[t]) + chunk.begin;
  const GradT* __restrict grad = static_cast<const GradT*>(args.grads[t]) + chunk.begin;
  StateT* __restrict sum = static_cast<StateT*>(args.sums[t]) + chunk.begin;
  const AdagradScalars scalars = args.scalars[t];
  const int64_t n = chunk.end - chunk.begin;
  for (int64_t i = 0; i < n; ++i) {
    float p = to_float(param[i]);
    float s = to_float(sum[i]);
    adagrad_update<kWeightDecay, kMaximize>(p, to_float(grad[i]), s, scalars);
    param[i] = from_float<ParamT>(p);
    sum[i] = from_float<StateT>(s);
  }
}

template <typename ParamT, typename GradT, typename StateT, bool kWeightDecay, bool kCentered,
          bool kMomentum, bool kMaximize>
void rmsprop_chunk(const RmspropKernelArgs& args, const Chunk& chunk) {
  const int64_t t = chunk.tensor;
  ParamT* __restrict param = static_cast<ParamT*>(args.params[t]) + chunk.begin;
  const GradT* __restrict grad = static_cast<const GradT*>(args.grads[t]) + chunk.begin;
  StateT* __restrict square_avg = static_cast<StateT*>(args.square_avgs[t]) + chunk.begin;
  StateT* __restrict buffer = slice<StateT, kMomentum>(args.momentum_buffers, chunk);
  StateT* __restrict grad_avg = slice<StateT, kCentered>(args.grad_avgs, chunk);
  const RmspropScalars scalars = args.scalars;
  const int64_t n = chunk.end - chunk.begin;
  for (int64_t i = 0; i < n; ++i) {
    float p = to_float(param[i]);
    float v = to_float(square_avg[i]);
    float b = 0.0f;
    float m = 0.0f;
    if constexpr (kMomentum) b = to_float(buffer[i]);
    if constexpr (kCentered) m = to_float(grad_avg[i]);
    rmsprop_update<kWeightDecay, kCentered, kMomentum, kMaximize>(p, to_float(grad[i]), v, b, m,
                                                                   scalars);
    param[i] = from_float<ParamT>(p);
    square_avg[i] = from_float<StateT>(v);
    if constexpr (kMomentum) buffer[i] = from_float<StateT>(b);
    if constexpr (kCentered) grad_avg[i] = from_float<StateT>(m);
  }
}

AdamChunkKernel select_adam(const Precision& precision, WeightDecay decay, bool amsgrad,
                            bool maximize) {
  return with_precision(precision.param, precision.grad, precision.state, precision.master,
                        precision.stochastic_rounding,
                        [&](auto param, auto grad, auto state, auto master) {
    using P = typename decltype(param)::type;
    using G = typename decltype(grad)::type;
    using S = typename decltype(state)::type;
    using M = typename decltype(master)::type;
    return with_weight_decay(decay, [&](auto kDecay) {
      return with_bool(amsgrad, [&](auto kAmsgrad) {
        return with_bool(maximize, [&](auto kMaximize) -> AdamChunkKernel {
          return &adam_chunk<P, G, S, M, kDecay.value, kAmsgrad.value, kMaximize.value>;
        });
      });
    });
  });
}

SgdwChunkKernel select_sgdw(const Precision& precision, bool decoupled_decay, Momentum momentum,
                            bool nesterov, bool maximize) {
  return with_precision(precision.param, precision.grad, precision.state, precision.master,
                        precision.stochastic_rounding,
                        [&](auto param, auto grad, auto state, auto master) {
    using P = typename decltype(param)::type;
    using G = typename decltype(grad)::type;
    using S = typename decltype(state)::type;
    using M = typename decltype(master)::type;
    return with_bool(decoupled_decay, [&](auto kDecay) {
      return with_momentum(momentum, [&](auto kMomentum) {
        return with_bool(nesterov, [&](auto kNesterov) {
          return with_bool(maximize, [&](auto kMaximize) -> SgdwChunkKernel {
            return &sgdw_chunk<P, G, S, M, kDecay.value, kMomentum.value, kNesterov.value,
                               kMaximize.value>;
          });
        });
      });
    });
  });
}

AdagradChunkKernel select_adagrad(const Precision& precision, bool weight_decay, bool maximize) {
  return with_precision(precision.param, precision.grad, precision.state, MasterWeights::kNone,
                        [&](auto param, auto grad, auto state, auto) {
    using P = typename decltype(param)::type;
    using G = typename decltype(grad)::type;
    using S = typename decltype(state)::type;
    return with_bool(weight_decay, [&](auto kDecay) {
      return with_bool(maximize, [&](auto kMaximize) -> AdagradChunkKernel {
        return &adagrad_chunk<P, G, S, kDecay.value, kMaximize.value>;
      });
    });
  });
}

RmspropChunkKernel select_rmsprop(const Precision& precision, bool weight_decay, bool centered,
                                  bool momentum, bool maximize) {
  return with_precision(precision.param, precision.grad, precision.state, MasterWeights::kNone,
                        [&](auto param, auto grad, auto state, auto) {
    using P = typename decltype(param)::type;
    using G = typename decltype(grad)::type;
    using S = typename decltype(state)::type;
    return with_bool(weight_decay, [&](auto kDecay) {
      return with_bool(centered, [&](auto kCentered) {
        return with_bool(momentum, [&](auto kMomentum) {
          return with_bool(maximize, [&](auto kMaximize) -> RmspropChunkKernel {
            return &rmsprop_chunk<P, G, S, kDecay.value, kCentered.value, kMomentum.value,
                                  kMaximize.value>;
          });
        });
      });
    });
  });
}

#define FUSEDOPT_STRINGIFY_(x) #x
#define FUSEDOPT_STRINGIFY(x) FUSEDOPT_STRINGIFY_(x)

constexpr KernelTable kTable{FUSEDOPT_STRINGIFY(FUSEDOPT_CPU_ISA), &select_adam, &select_sgdw,
                             &select_adagrad, &select_rmsprop};

}  // namespace

const KernelTable& kernel_table() { return kTable; }

}  // namespace fusedopt::cpu::FUSEDOPT_CPU_ISA
