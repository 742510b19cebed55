// CPU kernels compiled for the avx512 instruction set (flags in setup.py).
#define FUSEDOPT_CPU_ISA avx512
#include "kernels_impl.h"
