"""The one place that checks tensors before their addresses reach the compiled core.

fusedopt._C takes raw pointers and element counts (docs/DESIGN.md 1.1), so everything
that makes a pointer safe to use is verified here, in Python, before any write:
device, dtype, layout, shapes of grads and states. Problems raise ValueError or
TypeError naming the parameter and the problem.
"""
import importlib.machinery
import inspect
import math
import os
import warnings

import torch
from torch.autograd.graph import increment_version


def _unbuilt_explanation(package_dir):
    """Plain words for a package directory that has no fusedopt._C."""
    source_root = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(source_root, "setup.py")):
        fix = (f"build it there with `pip install -e {source_root}`, or start Python from "
               "another directory to use an installed fusedopt")
    else:
        fix = "reinstall fusedopt (`pip install --force-reinstall fusedopt`)"
    return (f"fusedopt was imported from {package_dir}, where the compiled module fusedopt._C "
            f"is not built; every step will use the slow reference implementation. To fix: {fix}")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
if not any(os.path.exists(os.path.join(_PACKAGE_DIR, "_C" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
    # Typically Python started in the repository root, importing the unbuilt source tree
    # rather than the installed package; without this check the user would see only
    # "partially initialized module ... circular import" at the first step.
    _C = None
    IMPORT_ERROR = _unbuilt_explanation(_PACKAGE_DIR)
    warnings.warn(IMPORT_ERROR, RuntimeWarning, stacklevel=2)
else:
    try:
        from fusedopt import _C
    except ImportError as error:  # built, but it does not load (e.g. a missing library)
        _C = None
        IMPORT_ERROR = str(error)
    else:
        IMPORT_ERROR = None

# Storage dtypes the compiled kernels step; complex64 steps as pairs of float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
# Storage dtypes the reference steps (math in fp32, or float64 for float64 storage).
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64, torch.complex128)


def _kernel_codes():
    if _C is None:
        return {}
    return {
        torch.float32: _C.ScalarType.float32,
        torch.bfloat16: _C.ScalarType.bfloat16,
        torch.float16: _C.ScalarType.float16,
        torch.complex64: _C.ScalarType.float32,
    }


KERNEL_CODES = _kernel_codes()


def _tensor_attributes(exchange=True):
    """What the steady-path check (csrc/bindings.cpp, NOTE: [steady check]) reads on
    params, grads and state: the descriptors torch.Tensor resolves these names to, the
    exact tensor types that resolve them the same way and may be read through them
    directly, and torch's DLPack C exchange table (torch >= 2.11), which describes such
    a tensor in one C call. `exchange=False` leaves the table out (tests of the
    attribute reads that older torch takes)."""
    if _C is None:
        return None
    names = ("grad", "dtype", "shape", "ndim", "nbytes", "data_ptr", "is_contiguous", "is_neg",
             "is_conj")
    descriptors = {name: inspect.getattr_static(torch.Tensor, name) for name in names}
    capsule = inspect.getattr_static(torch.Tensor, "__dlpack_c_exchange_api__", None)
    exact_types = tuple(
        cls for cls in (torch.Tensor, torch.nn.Parameter)
        if all(inspect.getattr_static(cls, name) is descriptors[name] for name in names)
        and inspect.getattr_static(cls, "__dlpack_c_exchange_api__", None) is capsule
    )
    return _C.TensorAttributes(exact_types, descriptors, capsule if exchange else None)


TENSOR_ATTRIBUTES = _tensor_attributes()


def kernel_devices():
    """Device types the compiled kernels serve in this process: "cuda" only where the
    CUDA runtime fusedopt links finds a usable driver and device (cuda_kernels_usable)."""
    if _C is None:
        return ()
    return ("cpu", "cuda") if cuda_kernels_usable() else ("cpu",)


_CUDA_USABLE = None  # the answer of cuda_kernels_usable, once known


def cuda_kernels_usable():
    """Whether the compiled CUDA kernels can run here. A build with CUDA kernels still
    cannot run them without a device, or with a driver older than the CUDA runtime it
    links statically needs (that runtime's device count is then 0), and `backend='auto'`
    must then step with the reference rather than fail at the first launch.

    Asked only once torch has initialized CUDA (before that no CUDA tensor exists), so
    that CPU-only processes never initialize the CUDA driver through fusedopt."""
    global _CUDA_USABLE
    if _CUDA_USABLE is None:
        if _C is None or not _C.cuda_compiled:
            _CUDA_USABLE = False
        elif not torch.cuda.is_initialized():
            return False
        else:
            _CUDA_USABLE = _C.cuda.device_count() > 0
    return _CUDA_USABLE


def launch(kernel_name, args, device):
    """Runs the compiled `kernel_name` ("adam_step", "sgdw_step") for tensors on `device`:
    on the CPU with torch's thread count, on CUDA on the device's current stream."""
    if device.type == "cpu":
        getattr(_C.cpu, kernel_name)(args, torch.get_num_threads())
    else:
        stream = torch.cuda.current_stream(device).cuda_stream
        getattr(_C.cuda, kernel_name)(args, device.index, stream)


def kernel_numel(tensor):
    """Elements the kernel steps: complex tensors count as pairs of reals."""
    return tensor.numel() * 2 if tensor.is_complex() else tensor.numel()


def is_dense(tensor):
    """True when the tensor covers one gap-free block of memory, in any dim order."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(tensor, param):
    """True when `tensor` lays its elements out in memory as the dense `param` does."""
    if param.is_contiguous():
        return tensor.is_contiguous()
    return tensor.stride() == param.stride()


def describe_param(group_index, param_index):
    return f"param {param_index} of param group {group_index}"


def check_grad(param, grad, where):
    """Raises if `grad` cannot be applied to `param`."""
    if grad.layout != torch.strided:
        raise ValueError(
            f"{where} has a sparse gradient ({grad.layout}); fusedopt supports dense gradients only"
        )
    if grad.device != param.device:
        raise ValueError(f"{where} is on {param.device} but its gradient is on {grad.device}")
    if grad.dtype != param.dtype:
        raise ValueError(f"{where} is {param.dtype} but its gradient is {grad.dtype}")
    if grad.shape != param.shape:
        raise ValueError(
            f"{where} has shape {tuple(param.shape)} but its gradient has shape {tuple(grad.shape)}"
        )


def check_param(param, where):
    """Raises if `param` is not a tensor fusedopt can step."""
    if param.dtype not in REFERENCE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in REFERENCE_DTYPES)
        raise TypeError(f"{where} is {param.dtype}; fusedopt steps {names}")
    if not is_dense(param):
        raise ValueError(
            f"{where} overlaps itself or has gaps in memory (shape {tuple(param.shape)}, "
            f"strides {param.stride()}), e.g. an expanded view; fusedopt steps dense params only"
        )


def check_state(param, tensor, key, where):
    """Raises if the state tensor `key` does not match `param` element for element (its
    memory layout may differ: the kernel path copies it into the param's first)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"state '{key}' of {where} is {type(tensor).__name__}, not a tensor")
    if tensor.shape != param.shape or tensor.dtype != param.dtype or tensor.device != param.device:
        raise ValueError(
            f"state '{key}' of {where} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; "
            f"the param is {param.dtype} {tuple(param.shape)} on {param.device}"
        )
    if tensor.layout != torch.strided:
        raise ValueError(f"state '{key}' of {where} is {tensor.layout}; fusedopt keeps dense state")


def check_step(step, where):
    if not (
        isinstance(step, torch.Tensor)
        and step.dtype == torch.float32
        and step.device.type == "cpu"
        and step.numel() == 1
    ):
        raise ValueError(
            f"state 'step' of {where} must be a one-element float32 CPU tensor, got {step!r}"
        )
    value = step.item()
    if not (0 <= value < math.inf and value == int(value)):
        raise ValueError(f"state 'step' of {where} is {value}; a step count is a whole number >= 0")


def _increment_versions_at_once():
    """Whether this torch's increment_version takes a list (one C++ call for all)."""
    try:
        increment_version([])
    except TypeError:
        return False
    return True


def mark_written(tensors):
    """Bumps the version counters of tensors a kernel changed in place, as torch's own
    in-place ops do, so autograd refuses a backward through values saved before the step."""
    if INCREMENT_VERSIONS_AT_ONCE:
        increment_version(tensors)
    else:
        for tensor in tensors:
            increment_version(tensor)


INCREMENT_VERSIONS_AT_ONCE = _increment_versions_at_once()


def check_lr(lr):
    """Raises unless `lr` (a float or one-element tensor) is finite and not negative."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")


def scalar(value, name, param_device):
    """A hyperparameter as a Python float; a tensor must sit on the CPU or the params' device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"tensor {name} must have one element, got shape {tuple(value.shape)}")
        if value.device.type != "cpu" and value.device != param_device:
            raise ValueError(
                f"tensor {name} is on {value.device} but the params are on {param_device}"
            )
        value = value.item()
    return float(value)


def kernel_unavailable_reason(device_type):
    """Why the compiled kernels do not serve `device_type` tensors here, for the warning
    of `backend='auto'` and the error of `backend='kernel'`."""
    if _C is None:
        return f"the compiled module fusedopt._C did not import ({IMPORT_ERROR})"
    if device_type == "cuda" and _C.cuda_compiled:
        return ("fusedopt's CUDA kernels cannot run here: the CUDA runtime they link finds no "
                "usable device (no GPU, or an NVIDIA driver older than that runtime needs)")
    return f"this build has no fusedopt kernel for {device_type} tensors"


def check_cuda_step_allowed(device):
    """Raises, before anything is written, if a step on `device` would be captured into a
    CUDA graph: the graph would freeze that step's learning rate and bias corrections and
    replays would never advance the step counters (NOTE: [no graph capture] in
    csrc/cuda/kernels.cu, whose launchers refuse it too, call by call)."""
    if device.type != "cuda":
        return
    with torch.cuda.device(device):
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        raise RuntimeError(
            "fusedopt cannot step under CUDA graph capture: the graph would freeze this "
            "step's learning rate and bias corrections, and replays would not advance the "
            "step counters; step outside the captured region"
        )
