// The multi-tensor work list: every tensor of a step cut into chunks.
//
// NOTE: [work list]
// A step's tensors are cut into chunks of at most `chunk_elements` elements, chunk
// boundaries at multiples of `chunk_elements` from each tensor's start, so every
// chunk of a suitably aligned tensor is aligned too. Empty tensors get no chunk.
// The CPU driver hands groups of consecutive chunks ("tasks") to threads; the CUDA
// driver packs chunks into launches. This is host code only, unit-tested through
// `fusedopt._C.plan_chunks`.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fusedopt {

struct Chunk {
  int64_t tensor;
  int64_t begin;  // element offsets within the tensor, [begin, end)
  int64_t end;
};

inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels, int64_t chunk_elements) {
  if (chunk_elements <= 0) throw std::invalid_argument("chunk_elements must be positive");
  std::vector<Chunk> chunks;
  for (int64_t tensor = 0; tensor < static_cast<int64_t>(numels.size()); ++tensor) {
    const int64_t numel = numels[tensor];
    if (numel < 0) throw std::invalid_argument("a tensor has a negative element count");
    for (int64_t begin = 0; begin < numel; begin += chunk_elements) {
      const int64_t end = numel - begin > chunk_elements ? begin + chunk_elements : numel;
      chunks.push_back(Chunk{tensor, begin, end});
    }
  }
  return chunks;
}

// Splits the chunk list into tasks of consecutive chunks holding at least
// `min_task_elements` elements each (the last may hold fewer), so that thousands of
// tiny tensors cost one scheduling step per task rather than one per tensor.
// Returns the task boundaries: task i covers chunks [bounds[i], bounds[i + 1]).
inline std::vector<int64_t> group_chunks_into_tasks(const std::vector<Chunk>& chunks,
                                                    int64_t min_task_elements) {
  std::vector<int64_t> bounds{0};
  int64_t elements = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(chunks.size()); ++i) {
    elements += chunks[i].end - chunks[i].begin;
    if (elements >= min_task_elements) {
      bounds.push_back(i + 1);
      elements = 0;
    }
  }
  if (bounds.back() != static_cast<int64_t>(chunks.size())) {
    bounds.push_back(static_cast<int64_t>(chunks.size()));
  }
  return bounds;
}

}  // namespace fusedopt
