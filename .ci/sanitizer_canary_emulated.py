"""Proves the sanitizer stage instruments the emulated CUDA kernels too: a step over a
9-element tensor whose buffers hold 8 must be stopped by AddressSanitizer in the
emulated kernel's store (the Python optimizers would never pass such a count).
Run under the sanitized build with the runtimes preloaded; exits 0 only if it is."""
import subprocess
import sys
import tempfile

OVERFLOW = """
import numpy as np
from fusedopt import _C, _cuda_emulated
param = np.ones(8, dtype=np.float32)
grad = np.ones(8, dtype=np.float32)
args = _C.SgdwStepArgs()
args.params = [param.ctypes.data]
args.grads = [grad.ctypes.data]
args.numels = [9]
args.lr = 0.1
_cuda_emulated.sgdw_step(args, 0, 0)
"""

# Run outside the checkout so `import fusedopt` finds the installed (sanitized) build.
result = subprocess.run([sys.executable, "-c", OVERFLOW], capture_output=True, text=True,
                        cwd=tempfile.gettempdir())
if result.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in result.stderr \
        and "sgdw_kernel" in result.stderr:
    print("sanitizer canary (emulated CUDA): out-of-bounds write in sgdw_kernel reported, as it must be")
    sys.exit(0)
print("sanitizer canary (emulated CUDA): the out-of-bounds write was NOT reported", file=sys.stderr)
print(result.stderr[-2000:], file=sys.stderr)
sys.exit(1)
