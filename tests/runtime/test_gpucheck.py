"""The GPU check's CPU parts: the comparison logic, and the whole check at toy sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vidmaas.runtime.gpucheck import compare, step_ratio

ROOT = Path(__file__).resolve().parents[2]


def test_comparing_videos_tells_identical_from_close_from_different() -> None:
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    assert compare(a, a.copy()) == {"identical": True, "max_abs": 0, "mean_abs": 0.0,
                                    "psnr_db": None}
    b = a.copy()
    b[0, 0, 0, 0] = 255
    far = compare(a, b)
    assert not far["identical"] and far["max_abs"] == 255 and far["psnr_db"] < 30
    assert compare(a, a[:1])["identical"] is False
    # The first step pays one-off costs: the faster step of each run is compared.
    assert step_ratio([3.0, 1.02], [2.0, 1.0]) == pytest.approx(1.02)


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--budget-s", "600"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "running the CPU smoke version" in proc.stdout
    for section in ("plan", "tiny", "ti2v_full", "a14b_swap"):
        assert f"PASS {section}:" in proc.stdout, proc.stdout[-3000:]
    assert "SKIP cfg_parallel" in proc.stdout and "SKIP ulysses" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["ti2v_full"]["compare"]["identical"] is True  # the bare pipeline's frames
    assert report["a14b_swap"]["compare"]["identical"] is True
    assert "step 3 load transformer_2" in report["a14b_swap"]["swap_moves"]
    assert report["plan"]["unfit"] == []
