"""The checks of tensors before their addresses reach the compiled core, and the
glue between the optimizers and fusedopt._C.

fusedopt._C takes raw pointers and element counts (docs/DESIGN.md, "Memory safety"):
the planning validates here, in Python, everything that makes a pointer safe and
names any problem (device, dtype, layout, storage extent, subclasses, DTensor
placements, checkpoints) before any write; the launch check (csrc/launch_check.cpp)
verifies the same facts again in the call that launches. Problems raise ValueError
or TypeError naming the parameter and the problem.
"""
import importlib.machinery
import inspect
import math
import numbers
import os
import sys
import warnings

import torch
from torch.autograd.graph import increment_version

from fusedopt import reference


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
# Params that may keep float32 state and take float32 grads (NOTE: [precision] in
# csrc/include/fusedopt/dispatch.h).
LOW_PRECISION = (torch.bfloat16, torch.float16)
# What holds the fp32 master of each (NOTE: [master weights] in dtypes.h): a 16-bit
# remainder beside a bf16 param, a whole fp32 copy beside an fp16 one.
MASTER_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.float32}
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64, torch.complex128)


def _kernel_codes():
    if _C is None:
        return {}
    return {
        torch.float32: _C.ScalarType.float32,
        torch.bfloat16: _C.ScalarType.bfloat16,
        torch.float16: _C.ScalarType.float16,
        torch.complex64: _C.ScalarType.float32,
        torch.int16: _C.ScalarType.int16,
    }


KERNEL_CODES = _kernel_codes()


def _tensor_reads(exchange=True):
    """What the launch check (csrc/launch_check.cpp, NOTE: [launch check]) reads on
    params, grads, state and their storages: the C-level descriptors of TensorBase
    and StorageBase, and torch's DLPack C exchange table (torch >= 2.11), which
    describes a tensor in one C call. `exchange=False` leaves the table out (tests of
    the attribute reads that older torch takes)."""
    if _C is None:
        return None
    owners = {"storage_data_ptr": (torch._C.StorageBase, "data_ptr"),
              "storage_nbytes": (torch._C.StorageBase, "nbytes")}
    descriptors = {name: inspect.getattr_static(*owners.get(name, (torch._C.TensorBase, name)))
                   for name in _C.TensorReads.names}
    capsule = inspect.getattr_static(torch.Tensor, "__dlpack_c_exchange_api__", None)
    kernel_dtypes = {dtype: int(code) for dtype, code in _kernel_codes().items()}
    return _C.TensorReads(descriptors, capsule if exchange else None, kernel_dtypes)


TENSOR_READS = _tensor_reads()
_TENSOR_GRAD = inspect.getattr_static(torch._C.TensorBase, "grad")
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


DTENSOR = _dtensor_type()  # torch.distributed.tensor.DTensor, or None without torch.distributed


def is_dtensor(tensor):
    return DTENSOR is not None and isinstance(tensor, DTENSOR)


def local(tensor):
    """The memory a kernel steps for `tensor`: a DTensor's local shard (FSDP2, tensor
    parallel), or the tensor itself."""
    if DTENSOR is not None and isinstance(tensor, DTENSOR):
        return tensor._local_tensor  # what to_local() returns outside autograd
    return tensor


def rounding_offset(param):
    """Where stochastic rounding counts a DTensor shard's elements from (NOTE:
    [stochastic rounding]); 0 for other tensors. A shard that is a contiguous range of
    the whole param in row-major order (any shard along dim 0: FSDP2; a replica) counts
    from its first element's index in the whole, so it draws the bits the unsharded
    param draws there. Any other shard counts from a pseudo-random 64-bit offset of
    its coordinates on the sharded mesh dims: distinct bits for distinct shards (two
    ranges of n elements overlap with a chance of about 2n / 2**64), the same for
    replicas."""
    if not is_dtensor(param):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, param.placements
    if all(type(placement) in (Shard, Replicate) for placement in placements):
        local_shape, offsets = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        if _is_row_major_range(local_shape, param.shape):
            offset, stride = 0, 1
            for size, dim_offset in zip(reversed(param.shape), reversed(offsets)):
                offset += dim_offset * stride
                stride *= size
            return offset
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    shard_key = 0
    for dim, placement in enumerate(placements):
        shard_key = shard_key * mesh.size(dim) + (0 if placement.is_replicate() else coordinate[dim])
    return reference.mix64(shard_key + 1)


def _is_row_major_range(local_shape, global_shape):
    """Whether a block of `local_shape` elements, at any offset in a row-major tensor of
    `global_shape`, is one contiguous range: whole in every dim after the innermost dim
    it cuts, and a single index in every dim before that one."""
    cuts = [dim for dim, (local, whole) in enumerate(zip(local_shape, global_shape)) if local != whole]
    if not cuts or math.prod(local_shape) == 0:
        return True
    return all(size == 1 for size in local_shape[:cuts[-1]])


def check_dtensor(param, other, what, where):
    """Raises unless a DTensor param's grad or state (`what`) is a DTensor on the same
    mesh with the same placements, and the param's placements make its local shard
    its own data (Shard or Replicate; a Partial param's shard is a summand), so that
    the elementwise step of local shards is the step of the whole."""
    if not is_dtensor(param):
        if is_dtensor(other):
            raise ValueError(f"{what} of {where} is a DTensor but the param is a plain tensor")
        return
    from torch.distributed.tensor import Replicate, Shard
    for placement in param.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise ValueError(
                f"{where} is a DTensor with placements {param.placements}; fusedopt steps local "
                "shards of Shard and Replicate placements only (a Partial shard is a summand, "
                "not the param's data)")
    if other is param:
        return
    if not is_dtensor(other):
        raise ValueError(
            f"{what} of {where} is a {type(other).__name__} but the param is a DTensor; load "
            "optimizer state of sharded models through torch.distributed.checkpoint "
            "(set_optimizer_state_dict), which makes DTensors")
    if other.device_mesh != param.device_mesh or tuple(other.placements) != tuple(param.placements):
        raise ValueError(
            f"{what} of {where} is a DTensor on {other.device_mesh} with placements "
            f"{other.placements}; the param is on {param.device_mesh} with placements "
            f"{param.placements}: redistribute it to the param's layout first")


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


def launch_target(device):
    """Where run_checked launches a kernel for tensors on `device`: on the CPU with
    torch's thread count, on CUDA on the device's current stream. (Tests of the
    emulated CUDA replace it with a ("hook", launcher) target.)"""
    if device.type == "cpu":
        return ("cpu", torch.get_num_threads())
    return ("cuda", device.index, torch.cuda.current_stream(device).cuda_stream)


def launch_check(params, state_dicts, state_keys, state_tensors):
    """The launch check of one kernel call (NOTE: [launch check]): `state_tensors`
    holds, per param, its state tensors in the order of `state_keys`. Built with
    `__torch_function__` off, so that no Python code runs while it reads."""
    with torch._C.DisableTorchFunction():
        return _C.LaunchCheck(TENSOR_READS, params, state_dicts, state_keys, state_tensors)


def reads_grad_plainly(param):
    """Whether `param.grad` is torch's own getter, which the launch check reads directly."""
    return inspect.getattr_static(type(param), "grad") is _TENSOR_GRAD


def kernel_numel(tensor):
    """Elements the kernel steps: complex tensors count as pairs of reals."""
    return tensor.numel() * 2 if tensor.is_complex() else tensor.numel()


def overlaps_itself(tensor):
    """True unless each dim, in order of stride, steps past everything the smaller
    strides reach (which proves no two elements share memory); expanded views overlap."""
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


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
    tensor, param = local(tensor), local(param)
    if param.is_contiguous():
        return tensor.is_contiguous()
    return tensor.stride() == param.stride()


def describe_param(group_index, param_index):
    return f"param {param_index} of param group {group_index}"


def check_tensor_type(tensor, where):
    """Raises unless `tensor` keeps its own data at its data_ptr(): torch.Tensor,
    nn.Parameter and `__torch_function__` subclasses do, and a DTensor's local shard
    does (the kernel steps that); other wrapper subclasses (those with
    `__torch_dispatch__`) hold their data elsewhere."""
    if type(tensor) in PLAIN_TYPES:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where} is a {type(tensor).__name__}, not a tensor")
    if is_dtensor(tensor):
        check_tensor_type(local(tensor), f"the local shard of {where}")
        return
    if torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python):
        raise TypeError(
            f"{where} is a {type(tensor).__module__}.{type(tensor).__name__}, a tensor subclass "
            "with __torch_dispatch__ whose data does not live at its data_ptr(); fusedopt steps "
            "torch.Tensor, nn.Parameter and __torch_function__ subclasses")


def extent_bytes(tensor):
    """Bytes from a tensor's first element to one past its last."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


def check_memory(tensor, where):
    """Raises unless the tensor's elements lie inside its storage (a storage shrunk
    with `untyped_storage().resize_()` leaves a tensor pointing past its end); of a
    DTensor, its local shard's."""
    tensor = local(tensor)
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return
    address = tensor.data_ptr()
    storage = tensor.untyped_storage()
    base, size = storage.data_ptr(), storage.nbytes()
    if address == 0 or address < base or address - base + extent_bytes(tensor) > size:
        raise ValueError(
            f"{where} reaches beyond the end of its storage: it needs "
            f"{address - base + extent_bytes(tensor) if address else extent_bytes(tensor)} bytes, "
            f"its storage holds {size} (was the storage resized, e.g. by "
            "untyped_storage().resize_()?)")


def alignment(tensor):
    """The address alignment the kernels need: one real element (complex steps as pairs)."""
    size = tensor.element_size()
    return size // 2 if tensor.is_complex() else size


def is_aligned(tensor):
    return tensor.numel() == 0 or tensor.data_ptr() % alignment(tensor) == 0


def check_aligned(param, where):
    if not is_aligned(param):
        raise ValueError(
            f"{where} is not aligned for {param.dtype} (address {param.data_ptr():#x}), e.g. made "
            "by torch.frombuffer with an odd offset; the kernels read whole elements: give it "
            "aligned memory (p.data = p.data.clone()) or use backend='reference'")


def needs_relayout(tensor, param, use_kernel, dtype=None):
    """Whether the step must work on a copy of a grad or state tensor laid out like
    `param` (and of `dtype`, if given): the kernel walks dense, aligned memory in the
    param's order; the reference writes state in place, which an overlapping view
    refuses; neither reads a lazily negated or conjugated view as its values."""
    tensor, param = local(tensor), local(param)
    if tensor.is_neg() or tensor.is_conj() or (dtype is not None and tensor.dtype != dtype):
        return True  # both paths read and write plain values
    if use_kernel:
        return not same_layout(tensor, param) or not is_aligned(tensor)
    return overlaps_itself(tensor)


def relaid_out(tensor, param, dtype=None):
    """A copy of `tensor`'s values in fresh memory laid out like `param` (a DTensor
    like a DTensor param: its local shard laid out like the param's), in `dtype`
    (by default the tensor's own)."""
    with torch.no_grad():
        return torch.empty_like(param, dtype=dtype or tensor.dtype,
                                memory_format=torch.preserve_format).copy_(tensor)


def memory_range(tensor, name):
    """(first byte, one past the last, name) of a dense tensor's memory; None for
    tensors without memory to compare (empty, meta, strided views with gaps)."""
    tensor = local(tensor)
    if tensor.numel() == 0 or tensor.device.type == "meta" or not is_dense(tensor):
        return None
    start = tensor.data_ptr()
    return (start, start + tensor.numel() * tensor.element_size(), name)


def check_grad(param, grad, where):
    """Raises if `grad` cannot be applied to `param`."""
    if grad.layout != torch.strided:
        raise ValueError(
            f"{where} has a sparse gradient ({grad.layout}); fusedopt supports dense gradients only"
        )
    check_tensor_type(grad, f"the gradient of {where}")
    check_dtensor(param, grad, "the gradient", where)
    if grad.device != param.device:
        raise ValueError(f"{where} is on {param.device} but its gradient is on {grad.device}")
    if grad.dtype != param.dtype and not (grad.dtype == torch.float32 and param.dtype in LOW_PRECISION):
        raise ValueError(
            f"{where} is {param.dtype} but its gradient is {grad.dtype}; a gradient is of its "
            "param's dtype, or float32 for a bfloat16 or float16 param")
    if grad.shape != param.shape:
        raise ValueError(
            f"{where} has shape {tuple(param.shape)} but its gradient has shape {tuple(grad.shape)}"
        )
    check_memory(grad, f"the gradient of {where}")


def check_param(param, where):
    """Raises if `param` is not a tensor fusedopt can step."""
    if param.dtype not in REFERENCE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in REFERENCE_DTYPES)
        raise TypeError(f"{where} is {param.dtype}; fusedopt steps {names}")
    if overlaps_itself(param):
        raise ValueError(
            f"{where} overlaps itself in memory (shape {tuple(param.shape)}, strides "
            f"{param.stride()}), e.g. an expanded view; a step would write its elements twice"
        )


def check_state(param, tensor, key, where, exact_dtype=None):
    """Raises if the state tensor `key` does not match `param` element for element (its
    memory layout may differ: the step then works on a copy laid out like the param),
    or is not of `exact_dtype` where that is given (a master)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"state '{key}' of {where} is {type(tensor).__name__}, not a tensor")
    check_tensor_type(tensor, f"state '{key}' of {where}")
    check_dtensor(param, tensor, f"state '{key}'", where)
    state_dtype_fits = tensor.dtype == exact_dtype if exact_dtype is not None else (
        tensor.dtype == param.dtype or (tensor.dtype == torch.float32 and param.dtype in LOW_PRECISION))
    if tensor.shape != param.shape or not state_dtype_fits or tensor.device != param.device:
        raise ValueError(
            f"state '{key}' of {where} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}; "
            f"the param is {param.dtype} {tuple(param.shape)} on {param.device} (state is of "
            "the param's dtype, or float32 for a bfloat16 or float16 param)"
        )
    if tensor.layout != torch.strided:
        raise ValueError(f"state '{key}' of {where} is {tensor.layout}; fusedopt keeps dense state")
    check_memory(tensor, f"state '{key}' of {where}")


def check_loaded_state(param, tensor, key, where, is_master=False):
    """Raises unless a checkpoint's state tensor can become the param's state (a master
    of another dtype is dropped after the load instead)."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
        raise ValueError(
            f"loaded state '{key}' of {where} has shape {shape}; the param has shape "
            f"{tuple(param.shape)}"
        )
    check_tensor_type(tensor, f"loaded state '{key}' of {where}")
    check_dtensor(param, tensor, f"loaded state '{key}'", where)
    if tensor.layout != torch.strided:
        raise ValueError(f"loaded state '{key}' of {where} is {tensor.layout}; fusedopt keeps dense state")
    if not is_master and (not (tensor.is_floating_point() or tensor.is_complex())
                          or tensor.is_complex() != param.is_complex()):
        raise ValueError(f"loaded state '{key}' of {where} is {tensor.dtype}; the param is {param.dtype}")
    check_memory(tensor, f"loaded state '{key}' of {where}")


def check_loaded_step(step, where):
    """Raises unless a checkpoint's step count is a whole number >= 0, as a number or a
    one-element real tensor."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(f"loaded state 'step' of {where} is a {step.dtype} tensor of "
                             f"{step.numel()} elements; a step count is one real number")
        check_tensor_type(step, f"loaded state 'step' of {where}")
        check_memory(step, f"loaded state 'step' of {where}")
        value = step.item()
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"loaded state 'step' of {where} is {type(step).__name__} {step!r}; "
                         "a step count is a number or a one-element tensor")
    if not (0 <= value < math.inf and value == int(value)):
        raise ValueError(f"loaded state 'step' of {where} is {value}")


def check_step(step, where, device, read_count=True):
    """Raises unless a step counter is a one-element float32 tensor on `device` holding
    (when `read_count`) a whole number >= 0. Reading a count on CUDA waits for the GPU:
    the full planning reads only counts that no kernel of the last step wrote."""
    if not (
        isinstance(step, torch.Tensor)
        and step.dtype == torch.float32
        and step.device == device
        and step.numel() == 1
    ):
        raise ValueError(
            f"state 'step' of {where} must be a one-element float32 tensor on {device}, got {step!r}"
        )
    check_tensor_type(step, f"state 'step' of {where}")
    check_memory(step, f"state 'step' of {where}")
    if not read_count:
        return
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
    if not isinstance(value, (torch.Tensor, numbers.Real)):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"tensor {name} must have one element, got shape {tuple(value.shape)}")
        if value.device.type != "cpu" and value.device != param_device:
            raise ValueError(
                f"tensor {name} is on {value.device} but the params are on {param_device}"
            )
        value = value.item()
    return float(value)


# Frames of these directories are not the user's: warnings point past them.
_INTERNAL_DIRS = (_PACKAGE_DIR + os.sep, os.path.dirname(torch.optim.__file__) + os.sep)


def warn_at_caller(message):
    """warnings.warn, attributed to the first frame outside fusedopt and torch.optim
    (the user's `step()` call, whichever path planned it)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


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
