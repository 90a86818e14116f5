"""The GPU benchmark's code path runs on the CPU at a tiny size (the figures come from a GPU)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_scale_smoke_prints_a_row_per_setting():
    result = subprocess.run(
        [sys.executable, "gpu_scale.py", "--smoke", "--steps", "1", "--families", "sdxl"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sdxl")]
    assert (
        len(rows) == 2 * 3
    )  # checkpointing x (leco, 4 steps per forward, reference); SDXL: the most conditioning code
    for row in rows:
        seconds = float(row.split("|")[6])
        assert seconds > 0
