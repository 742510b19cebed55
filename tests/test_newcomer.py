"""Python started in an unbuilt source tree says so at import, once, with the fix."""
import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def test_importing_an_unbuilt_source_tree_warns_once_with_the_fix(tmp_path):
    # A checkout as cloned: the package's Python files and setup.py, no compiled module.
    shutil.copytree(REPOSITORY / "fusedopt", tmp_path / "fusedopt",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copy(REPOSITORY / "setup.py", tmp_path / "setup.py")
    script = ("import torch, fusedopt\n"
              "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)\n"
              "fusedopt.AdamW([p]).step()\n"
              "print(fusedopt.backend_info()['cpu_kernels'], fusedopt.__file__)\n")
    result = subprocess.run([sys.executable, "-W", "default", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", str(tmp_path / "fusedopt" / "__init__.py")]
    import_warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(import_warnings) == 1, result.stderr
    message = import_warnings[0]
    assert f"imported from {tmp_path / 'fusedopt'}" in message
    assert "fusedopt._C is not built" in message and f"pip install -e {tmp_path}" in message
    assert "circular import" not in result.stderr
