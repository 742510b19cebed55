"""`python -m fusedopt`: what this installation is, and whether its kernels are right here.

Prints the versions (fusedopt, torch, the CUDA driver and runtimes), backend_info(),
then, for every device that has fusedopt kernels (the CPU, each visible GPU), runs a
few steps of each optimizer and dtype with the compiled kernels and with the reference
implementation and compares params and states bit for bit (the kernels and the
reference perform the same fp32 operations: NOTE: [bitwise parity]). One line per
case; the exit status is 1 if any case differs or cannot run, 0 otherwise.
"""
import ctypes
import json
import sys

import torch

import fusedopt
from fusedopt import _backend

# A scalar, odd sizes, a matrix, and a tensor spanning two CUDA chunks (65,536 elements).
SHAPES = [(), (7,), (33, 17), (70001,)]
STEPS = 3
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
OPTIMIZERS = {
    "Adam(weight_decay=0.1)": lambda params, backend: fusedopt.Adam(
        params, lr=1e-2, weight_decay=0.1, backend=backend),
    "AdamW(amsgrad=True)": lambda params, backend: fusedopt.AdamW(
        params, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=backend),
    "SGDW(momentum=0.9, nesterov=True)": lambda params, backend: fusedopt.SGDW(
        params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, backend=backend),
    "SGDW()": lambda params, backend: fusedopt.SGDW(params, lr=1e-2, backend=backend),
    "Adagrad(lr_decay=0.01, weight_decay=0.1)": lambda params, backend: fusedopt.Adagrad(
        params, lr=1e-2, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, backend=backend),
    "RMSprop(momentum=0.9, centered=True)": lambda params, backend: fusedopt.RMSprop(
        params, lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1, backend=backend),
    "RMSprop()": lambda params, backend: fusedopt.RMSprop(params, lr=1e-2, backend=backend),
}


def cuda_driver_version():
    """The installed NVIDIA driver's CUDA version ("13.0"), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def report():
    info = fusedopt.backend_info()
    print(f"fusedopt {fusedopt.__version__} ({fusedopt.__file__})")
    print(f"torch {torch.__version__}, CUDA runtime of torch: {torch.version.cuda}, "
          f"GPUs torch sees: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    print(f"NVIDIA driver supports CUDA: {cuda_driver_version() or 'no driver found'}")
    print(f"fusedopt CUDA kernels: {'compiled for sm ' + info['cuda_archs'] if info['cuda_compiled'] else 'not built'}"
          f", usable here: {info['cuda_available']}")
    print("backend_info():", json.dumps(info, indent=1))
    return info


def make_problem(dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)

    def random(shape):
        if dtype == torch.complex64:
            return torch.view_as_complex(torch.randn(shape + (2,), generator=generator))
        return torch.randn(shape, generator=generator).to(dtype)

    initial = [random(shape).to(device) for shape in SHAPES]
    grads = [[random(shape).to(device) for shape in SHAPES] for _ in range(STEPS)]
    return initial, grads


def run(make_optimizer, backend, initial, grads):
    params = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = make_optimizer(params, backend)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()
    states = [tensor for state in optimizer.state.values() for tensor in state.values()]
    return [p.detach() for p in params] + states


def check(device, name, make_optimizer, dtype, seed):
    """One self-test case: None when kernel and reference agree bit for bit, else why not."""
    initial, grads = make_problem(dtype, device, seed)
    try:
        kernel = run(make_optimizer, "kernel", initial, grads)
    except RuntimeError as error:
        return f"the kernel did not run: {error}"
    reference = run(make_optimizer, "reference", initial, grads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if all(torch.equal(k, initial_p) for k, initial_p in zip(kernel, initial)):
        return "the kernel left the params unchanged"
    differing = sum(not torch.equal(k, r) for k, r in zip(kernel, reference))
    return f"{differing} of {len(kernel)} tensors differ from the reference" if differing else None


def devices():
    """The CPU, and every GPU if fusedopt's CUDA kernels can run here."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        torch.cuda.init()  # fusedopt asks its own CUDA runtime only once torch's is up
        if _backend.cuda_kernels_usable():
            found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        else:
            print(f"note  cuda    no kernel test: {_backend.kernel_unavailable_reason('cuda')}")
    return found


def self_test():
    """Runs every case on every device; returns the number of failures."""
    if _backend._C is None:
        print(f"FAIL  the compiled kernels did not import: {_backend.IMPORT_ERROR}")
        return 1
    failures = 0
    cases = 0
    for device in devices():
        for seed, (name, make_optimizer) in enumerate(OPTIMIZERS.items()):
            for dtype in DTYPES:
                problem = check(device, name, make_optimizer, dtype, seed)
                cases += 1
                failures += problem is not None
                verdict = "ok  " if problem is None else "FAIL"
                line = f"{verdict}  {str(device):7} {name:42} {str(dtype).replace('torch.', ''):10}"
                print(line.rstrip() if problem is None else f"{line}  {problem}")
    print(f"{cases - failures} of {cases} cases match the reference bit for bit"
          + ("" if not failures else f"; {failures} FAILED"))
    return failures


def main():
    report()
    print(f"\nSelf-test: {STEPS} steps of each optimizer and dtype, kernel against reference, bit for bit")
    return 1 if self_test() else 0


if __name__ == "__main__":
    sys.exit(main())
