// The CPU multi-tensor driver: plan chunks, group them into tasks, run the tasks on
// the thread pool with the kernel chosen for this CPU, dtype and optimizer modes.
#include "driver.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "parallel.h"

namespace fusedopt::cpu {
namespace {

// 16Ki elements: a chunk's slices of all lists (up to 5 x 64 KiB in fp32) stay in
// L2 while it is processed, and a large tensor splits across threads.
constexpr int64_t kChunkElements = 16384;
// A task is worth waking a thread for once it moves about a megabyte.
constexpr int64_t kMinTaskElements = 32768;

const KernelTable* find_table(const std::string& isa) {
  if (isa == "baseline") return &baseline::kernel_table();
#if defined(FUSEDOPT_X86_ISA_VARIANTS)
  if (isa == "avx2") return &avx2::kernel_table();
  if (isa == "avx512") return &avx512::kernel_table();
#endif
  return nullptr;
}

bool cpu_supports(const std::string& isa) {
#if defined(FUSEDOPT_X86_ISA_VARIANTS)
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return isa == "baseline";
}

// The best ISA this CPU runs, or the one FUSEDOPT_CPU_ISA names (used by the
// tests to run every variant on one machine).
const KernelTable& select_table() {
  const char* requested = std::getenv("FUSEDOPT_CPU_ISA");
  if (requested != nullptr && *requested != '\0') {
    const std::string isa(requested);
    const KernelTable* table = find_table(isa);
    if (table == nullptr) {
      throw std::invalid_argument("FUSEDOPT_CPU_ISA=" + isa +
                                  " is not compiled in; compiled: baseline" +
#if defined(FUSEDOPT_X86_ISA_VARIANTS)
                                  std::string(", avx2, avx512"));
#else
                                  std::string());
#endif
    }
    if (!cpu_supports(isa)) {
      throw std::invalid_argument("FUSEDOPT_CPU_ISA=" + isa + " but this CPU does not support it");
    }
    return *table;
  }
  for (const char* isa : {"avx512", "avx2"}) {
    if (find_table(isa) != nullptr && cpu_supports(isa)) return *find_table(isa);
  }
  return baseline::kernel_table();
}

const KernelTable& table() {
  static const KernelTable& selected = select_table();
  return selected;
}

struct WorkPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> task_bounds;
};

WorkPlan plan_work(const std::vector<int64_t>& numels) {
  WorkPlan plan;
  plan.chunks = plan_chunks(numels, kChunkElements);
  plan.task_bounds = group_chunks_into_tasks(plan.chunks, kMinTaskElements);
  return plan;
}

template <typename KernelArgs, typename Kernel>
void run(const WorkPlan& plan, int num_threads, const KernelArgs& args, Kernel kernel) {
  const int64_t num_tasks = static_cast<int64_t>(plan.task_bounds.size()) - 1;
  parallel_for(num_tasks, num_threads, [&](int64_t task) {
    for (int64_t c = plan.task_bounds[task]; c < plan.task_bounds[task + 1]; ++c) {
      kernel(args, plan.chunks[c]);
    }
  });
}

template <typename T>
void* const* as_pointers(const std::vector<T>& list) {
  static_assert(sizeof(T) == sizeof(void*), "pointer lists hold one address per tensor");
  return list.empty() ? nullptr : reinterpret_cast<void* const*>(list.data());
}

}  // namespace

void adam_step(const AdamStepArgs& args, int num_threads) {
  check_parallel_runtime();
  check_lists(args);
  const AdamChunkKernel kernel =
      table().adam({args.dtype, args.grad_dtype, args.state_dtype, args.master,
                    args.stochastic_rounding},
                   args.decay, args.amsgrad, args.maximize);
  const WorkPlan plan = plan_work(args.numels);  // validates before the step counters move
  std::vector<uint64_t> rounding_streams;
  const std::vector<AdamScalars> scalars = advance_adam_steps(args, rounding_streams);
  const AdamKernelArgs kernel_args{as_pointers(args.params),          as_pointers(args.grads),
                                   as_pointers(args.exp_avgs),        as_pointers(args.exp_avg_sqs),
                                   as_pointers(args.max_exp_avg_sqs), as_pointers(args.masters),
                                   scalars.data(),                    rounding_streams.data()};
  run(plan, num_threads, kernel_args, kernel);
}

void sgdw_step(const SgdwStepArgs& args, int num_threads) {
  check_parallel_runtime();
  check_lists(args);
  const SgdwChunkKernel kernel =
      table().sgdw({args.dtype, args.grad_dtype, args.state_dtype, args.master,
                    args.stochastic_rounding},
                   args.weight_decay != 0.0, args.momentum_mode, args.nesterov, args.maximize);
  const WorkPlan plan = plan_work(args.numels);  // validates before the step counters move
  const std::vector<uint64_t> rounding_streams = advance_sgdw_steps(args);
  const SgdwKernelArgs kernel_args{as_pointers(args.params),           as_pointers(args.grads),
                                   as_pointers(args.momentum_buffers), as_pointers(args.masters),
                                   sgdw_scalars(args),                 rounding_streams.data()};
  run(plan, num_threads, kernel_args, kernel);
}

void adagrad_step(const AdagradStepArgs& args, int num_threads) {
  check_parallel_runtime();
  check_lists(args);
  const AdagradChunkKernel kernel =
      table().adagrad({args.dtype, args.grad_dtype, args.state_dtype, MasterWeights::kNone, false},
                      args.weight_decay != 0.0, args.maximize);
  const WorkPlan plan = plan_work(args.numels);  // validates before the step counters move
  const std::vector<AdagradScalars> scalars = advance_adagrad_steps(args);
  const AdagradKernelArgs kernel_args{as_pointers(args.params), as_pointers(args.grads),
                                      as_pointers(args.sums), scalars.data()};
  run(plan, num_threads, kernel_args, kernel);
}

void rmsprop_step(const RmspropStepArgs& args, int num_threads) {
  check_parallel_runtime();
  check_lists(args);
  const RmspropChunkKernel kernel =
      table().rmsprop({args.dtype, args.grad_dtype, args.state_dtype, MasterWeights::kNone, false},
                      args.weight_decay != 0.0, args.centered, args.has_momentum_buffer(),
                      args.maximize);
  const WorkPlan plan = plan_work(args.numels);  // validates before the step counters move
  advance_rmsprop_steps(args);
  const RmspropKernelArgs kernel_args{as_pointers(args.params),       as_pointers(args.grads),
                                      as_pointers(args.square_avgs),  as_pointers(args.momentum_buffers),
                                      as_pointers(args.grad_avgs),    rmsprop_scalars(args)};
  run(plan, num_threads, kernel_args, kernel);
}

std::string active_isa() { return table().isa; }

std::vector<std::string> compiled_isas() {
#if defined(FUSEDOPT_X86_ISA_VARIANTS)
  return {"baseline", "avx2", "avx512"};
#else
  return {"baseline"};
#endif
}

}  // namespace fusedopt::cpu
