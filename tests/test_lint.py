import subprocess
import sys

from tests.conftest import ROOT


def test_code_is_ruff_clean():
    """``python -m ruff`` (this interpreter's ruff, a dev dependency): found in a venv, where PATH may lack it."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert "No module named ruff" not in result.stderr, "install the dev extra: pip install -e .[dev]"
    assert result.returncode == 0, result.stdout + result.stderr
