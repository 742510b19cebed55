"""Proves the sanitizer stage is live: an out-of-bounds kernel write must be reported.

Run under the sanitized build with the runtimes preloaded; it writes one element
past the end of an 8-element buffer through the raw-pointer API (which the Python
optimizers would never allow). Exits 0 only if AddressSanitizer stops the write.
"""
import subprocess
import sys
import tempfile

OVERFLOW = """
import numpy as np
from fusedopt import _backend
C = _backend._C
param = np.ones(8, dtype=np.float32)
grad = np.ones(8, dtype=np.float32)
args = C.SgdwStepArgs()
args.params = [param.ctypes.data]
args.grads = [grad.ctypes.data]
args.numels = [9]
args.lr = 0.1
C.cpu.sgdw_step(args, 1)
"""

# Run outside the checkout so `import fusedopt` finds the installed (sanitized) build.
result = subprocess.run([sys.executable, "-c", OVERFLOW], capture_output=True, text=True,
                        cwd=tempfile.gettempdir())
if result.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in result.stderr:
    print("sanitizer canary: out-of-bounds write reported, as it must be")
    sys.exit(0)
print("sanitizer canary: the out-of-bounds write was NOT reported", file=sys.stderr)
print(result.stderr[-2000:], file=sys.stderr)
sys.exit(1)
