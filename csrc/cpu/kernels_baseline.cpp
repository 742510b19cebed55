// CPU kernels compiled for the baseline instruction set (flags in setup.py).
#define FUSEDOPT_CPU_ISA baseline
#include "kernels_impl.h"
