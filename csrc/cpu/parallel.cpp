#include "parallel.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>

#include "thread_pool.h"

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#endif

namespace fusedopt::cpu {
namespace {

// NOTE: [sharing torch's OpenMP team]
// torch runs its CPU ops on an OpenMP team (libgomp in the Linux wheels) whose
// workers busy-wait for milliseconds after every parallel region. Threads of our own
// would share the cores with those spinning workers, so a step right after a torch op
// (the backward pass, in training) would lose up to a core. When the process has an
// OpenMP runtime loaded, the tasks therefore run on its team through GOMP_parallel,
// the entry point `#pragma omp parallel` compiles to (LLVM's and Intel's runtimes
// export it too). The runtime is found among the libraries already loaded, never
// linked or loaded by us, so the extension still depends on neither torch nor
// OpenMP. fusedopt's sleeping pool (thread_pool.h) runs the tasks where no runtime is
// loaded, and in a child process forked after fusedopt was imported: GNU libgomp
// keeps the parent's team in its bookkeeping, and those threads do not exist in the
// child.
using GompParallel = void (*)(void (*body)(void*), void* data, unsigned num_threads,
                              unsigned flags);

struct OpenMpRuntime {
  GompParallel parallel = nullptr;
  std::string library;
};

#if defined(__linux__)
bool is_openmp_library(const char* path) {
  const char* slash = std::strrchr(path, '/');
  const char* name = slash == nullptr ? path : slash + 1;
  for (const char* prefix : {"libgomp", "libiomp", "libomp"}) {
    if (std::strncmp(name, prefix, std::strlen(prefix)) == 0) return true;
  }
  return false;
}

int visit_loaded_library(dl_phdr_info* info, size_t, void* found) {
  auto* runtime = static_cast<OpenMpRuntime*>(found);
  if (info->dlpi_name == nullptr || !is_openmp_library(info->dlpi_name)) return 0;
  // RTLD_NOLOAD: a handle to the library already in the process, or none. It is kept
  // open, so the runtime stays loaded for as long as we may call into it.
  void* handle = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  void* symbol = dlsym(handle, "GOMP_parallel");
  if (symbol == nullptr) {
    dlclose(handle);
    return 0;
  }
  runtime->parallel = reinterpret_cast<GompParallel>(symbol);
  const char* slash = std::strrchr(info->dlpi_name, '/');
  runtime->library = slash == nullptr ? info->dlpi_name : slash + 1;
  return 1;  // stop at the first runtime
}
#endif

OpenMpRuntime find_loaded_openmp() {
  OpenMpRuntime runtime;
#if defined(__linux__)
  dl_iterate_phdr(&visit_loaded_library, &runtime);
#endif
  return runtime;
}

// FUSEDOPT_CPU_PARALLEL=pool|openmp chooses (the tests run both); unset: openmp when
// a runtime is loaded. Looked up at the first step, by which time torch is imported.
struct Selection {
  OpenMpRuntime openmp;  // parallel == nullptr: the pool
};

Selection select_runtime() {
  Selection selection;
  const char* requested = std::getenv("FUSEDOPT_CPU_PARALLEL");
  const std::string choice = requested == nullptr ? "" : requested;
  if (choice == "pool") return selection;
  selection.openmp = find_loaded_openmp();
  if (choice == "openmp" && selection.openmp.parallel == nullptr) {
    throw std::invalid_argument(
        "FUSEDOPT_CPU_PARALLEL=openmp, but no OpenMP runtime exporting GOMP_parallel is loaded");
  }
  if (!choice.empty() && choice != "openmp") {
    throw std::invalid_argument("FUSEDOPT_CPU_PARALLEL=" + choice + "; choose pool or openmp");
  }
  return selection;
}

const Selection& selection() {
  static const Selection selected = select_runtime();
  return selected;
}

// Whether this process is a child forked after the module was loaded. The parent
// may have used torch's OpenMP team before the fork (any large torch op does) even if
// it never stepped; so the handler is registered at load, not at the first step.
std::atomic<bool> forked_since_load{false};

#if defined(__linux__)
[[maybe_unused]] const bool fork_handler_registered = [] {
  return pthread_atfork(nullptr, nullptr, [] { forked_since_load.store(true); }) == 0;
}();
#endif

// The OpenMP team of this process, or null where the pool runs the tasks.
GompParallel openmp_parallel() {
  if (forked_since_load.load(std::memory_order_relaxed)) return nullptr;
  return selection().openmp.parallel;
}

struct OpenMpJob {
  const std::function<void(int64_t)>* task;
  int64_t num_tasks;
  std::atomic<int64_t> next_task{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first task's exception, rethrown by the caller
  std::mutex error_mutex;
};

// An exception must not leave an OpenMP region (it would terminate the process):
// the first is kept, the remaining tasks are skipped, and the caller rethrows it.
void run_openmp_job(void* data) {
  auto* job = static_cast<OpenMpJob*>(data);
  for (int64_t i = job->next_task.fetch_add(1); i < job->num_tasks && !job->failed.load();
       i = job->next_task.fetch_add(1)) {
    try {
      (*job->task)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job->error_mutex);
      if (!job->failed.exchange(true)) job->error = std::current_exception();
    }
  }
}

}  // namespace

void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t)>& task) {
  const GompParallel openmp = openmp_parallel();  // also refuses a bad FUSEDOPT_CPU_PARALLEL
  const int64_t threads = num_threads < num_tasks ? num_threads : num_tasks;
  if (threads <= 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  if (openmp != nullptr) {
    OpenMpJob job;
    job.task = &task;
    job.num_tasks = num_tasks;
    openmp(&run_openmp_job, &job, static_cast<unsigned>(threads), 0);
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  ThreadPool::instance().parallel_for(num_tasks, static_cast<int>(threads), task);
}

void check_parallel_runtime() { selection(); }

std::string parallel_runtime() {
  if (openmp_parallel() != nullptr) return "openmp (" + selection().openmp.library + ")";
  return "pool";
}

}  // namespace fusedopt::cpu
