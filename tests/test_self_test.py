"""`python -m fusedopt`: the installation report and kernel self-test users run first."""
import subprocess
import sys

import torch

import fusedopt
from fusedopt import __main__ as self_test_module
from fusedopt import reference


def test_python_m_fusedopt_reports_and_passes_on_this_machine(tmp_path):
    # Run outside the checkout so that `fusedopt` is the installed build, as for a user.
    result = subprocess.run([sys.executable, "-m", "fusedopt"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert f"fusedopt {fusedopt.__version__}" in out and f"torch {torch.__version__}" in out
    assert '"cpu_kernels": true' in out
    verdicts = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    expected = len(self_test_module.OPTIMIZERS) * len(self_test_module.DTYPES)
    cpu = [line for line in verdicts if line.split()[1] == "cpu"]
    assert len(cpu) == expected and all(line.startswith("ok") for line in verdicts)
    assert f"{len(verdicts)} of {len(verdicts)} cases match the reference bit for bit" in out


def test_a_kernel_that_differs_from_the_reference_fails_the_self_test(monkeypatch, capsys):
    """Kernel and reference made to differ by one ulp of one element (the reference's
    param nudged after each of its steps) must give FAIL lines and exit status 1."""
    real_step = reference.sgdw_step_

    def nudged_step(param, *args, **kwargs):
        real_step(param, *args, **kwargs)
        if param.numel():
            flat = (torch.view_as_real(param) if param.is_complex() else param).view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=flat.dtype))

    monkeypatch.setattr(reference, "sgdw_step_", nudged_step)
    assert self_test_module.main() == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed and all("SGDW" in line and "differ from the reference" in line for line in failed)
    passed = [line for line in out.splitlines() if line.startswith("ok")]
    assert passed and not any("SGDW" in line for line in passed)
