// kernels.cu itself, compiled by the host compiler for fusedopt._cuda_emulated
// (NOTE: [emulated CUDA] in runtime.h): the build defines FUSEDOPT_CUDA_EMULATION.
#include "kernels.cu"
