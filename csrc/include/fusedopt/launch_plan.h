// Packing the work list into CUDA launches (host code, unit-tested on the CPU).
//
// NOTE: [launch packing]
// One launch carries, in its kernel parameters, a table of tensors (their
// addresses, element counts and per-tensor scalars) and a list of chunks, each
// naming a slot of that table and its chunk number within the tensor; block i of
// the grid processes chunk i. CUDA 12.1+ allows 32 KB of kernel parameters on every
// architecture we build, so a launch holds a few hundred tensors and a few thousand
// chunks: a model with thousands of tensors takes a handful of launches. A tensor
// whose chunks do not all fit continues in the next launch, where it takes a new slot.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fusedopt {

struct LaunchCapacity {
  int max_tensors;
  int max_chunks;
};

struct LaunchPlan {
  std::vector<int64_t> tensors;      // slot -> index of the tensor in the step's lists
  std::vector<int32_t> chunk_slots;  // chunk -> slot in `tensors`
  std::vector<int32_t> chunk_indices;  // chunk -> chunk number within its tensor
};

inline std::vector<LaunchPlan> plan_launches(const std::vector<int64_t>& numels,
                                             int64_t chunk_elements, LaunchCapacity capacity) {
  if (chunk_elements <= 0 || capacity.max_tensors <= 0 || capacity.max_chunks <= 0) {
    throw std::invalid_argument("launch capacity and chunk size must be positive");
  }
  std::vector<LaunchPlan> launches;
  for (int64_t tensor = 0; tensor < static_cast<int64_t>(numels.size()); ++tensor) {
    if (numels[tensor] < 0) throw std::invalid_argument("a tensor has a negative element count");
    const int64_t num_chunks = (numels[tensor] + chunk_elements - 1) / chunk_elements;
    if (num_chunks > INT32_MAX) throw std::invalid_argument("a tensor has too many chunks");
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      bool start_launch = launches.empty();
      if (!start_launch) {
        const LaunchPlan& last = launches.back();
        const bool chunks_full = static_cast<int>(last.chunk_slots.size()) == capacity.max_chunks;
        const bool tensors_full = static_cast<int>(last.tensors.size()) == capacity.max_tensors;
        start_launch = chunks_full || (last.tensors.back() != tensor && tensors_full);
      }
      if (start_launch) launches.emplace_back();
      LaunchPlan& launch = launches.back();
      if (launch.tensors.empty() || launch.tensors.back() != tensor) launch.tensors.push_back(tensor);
      launch.chunk_slots.push_back(static_cast<int32_t>(launch.tensors.size() - 1));
      launch.chunk_indices.push_back(static_cast<int32_t>(chunk));
    }
  }
  return launches;
}

}  // namespace fusedopt
