// Portability macros for code compiled both by the host compiler and by nvcc.
#pragma once

// NOTE: [internal linkage for shared math]
// The CPU kernels are compiled several times with different ISA flags (baseline,
// AVX2, AVX-512) into one shared object. An inline function with external linkage
// would be emitted by each of those translation units and the linker would keep
// one copy, possibly the AVX-512 one, for every caller. Functions in the shared
// headers therefore have internal linkage on the host (`static`) and are forced
// inline, so each ISA variant carries its own copy.
#if defined(__CUDACC__)
#define FUSEDOPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HOST_DEVICE static inline __attribute__((always_inline))
#endif
