// How the CPU driver spreads a step's tasks over threads: on the OpenMP team that
// torch already runs its CPU ops on, or on fusedopt's own pool (NOTE: [sharing
// torch's OpenMP team] in parallel.cpp).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace fusedopt::cpu {

// Runs task(i) for every i in [0, num_tasks) on up to `num_threads` threads, the
// caller included, and returns when all are done. Tasks are handed out one at a
// time, so any thread may run any task.
void parallel_for(int64_t num_tasks, int num_threads, const std::function<void(int64_t)>& task);

// Raises std::invalid_argument for a bad FUSEDOPT_CPU_PARALLEL: the drivers call it
// before they change anything.
void check_parallel_runtime();

// Where parallel_for runs tasks in this process: "openmp (<library>)" or "pool".
std::string parallel_runtime();

}  // namespace fusedopt::cpu
