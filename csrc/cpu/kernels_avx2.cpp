// CPU kernels compiled for the avx2 instruction set (flags in setup.py).
#define FUSEDOPT_CPU_ISA avx2
#include "kernels_impl.h"
