"""fusedopt: one-pass multi-tensor Adam, AdamW, SGDW, Adagrad and RMSprop steps, drop-in for
torch.optim."""
from importlib.metadata import PackageNotFoundError, version as _package_version

import torch

from fusedopt import _backend, reference
from fusedopt.adagrad import Adagrad
from fusedopt.adam import Adam, AdamW
from fusedopt.rmsprop import RMSprop
from fusedopt.sgdw import SGDW
from fusedopt.weight_decay import RestartNormalizedWeightDecay, normalized_weight_decay

try:
    __version__ = _package_version("fusedopt")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Adam", "AdamW", "SGDW", "Adagrad", "RMSprop", "RestartNormalizedWeightDecay",
           "backend_info", "normalized_weight_decay", "reference", "__version__"]


def backend_info():
    """What this installation can do: compiled kernels, CPU ISA, CUDA build and device."""
    C = _backend._C
    cuda_compiled = bool(C is not None and C.cuda_compiled)
    return {
        "version": __version__,
        "cpu_kernels": C is not None,
        "cpu_isa": C.cpu.active_isa() if C is not None else None,
        "cpu_isas_compiled": list(C.cpu.compiled_isas()) if C is not None else [],
        "cpu_parallel": C.cpu.parallel_runtime() if C is not None else None,
        # How the launch check reads tensors (NOTE: [launch check]).
        "steady_check": None if C is None else (
            "dlpack-exchange" if _backend.TENSOR_READS.exchanges else "attribute-reads"),
        "cuda_compiled": cuda_compiled,
        "cuda_archs": C.cuda_archs if cuda_compiled else "",
        "cuda_available": cuda_compiled and C.cuda.device_count() > 0 and torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
        "import_error": _backend.IMPORT_ERROR,
    }
