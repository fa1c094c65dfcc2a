"""The code stays as pyproject.toml's [tool.ruff] asks: pyflakes, pycodestyle, no silent blind except."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_code_is_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"  # installed by the test extra (make test)
    proc = subprocess.run([str(ruff), "check", "rlhfkit", "tests", "benchmarks", "examples"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
