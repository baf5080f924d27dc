"""The DDP code path for real: torchrun, two CPU processes, gloo; each rank trains on its own shard."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import subprocess_env
from worker.process.localredis import free_port
from worker.scoring.checkpoint import load_checkpoint


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(image_set: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    args = ("-l", str(image_set), "-o", "run", "--arch", "test_resnet", "--crop-size", "32", "--epochs", "1")
    opts = ("--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet")
    launch = (torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()))
    out = subprocess.run(
        [*launch, "-m", "worker", "train", *args, *opts],
        cwd=tmp_path,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    n_train = int((pd.read_csv(tmp_path / "run" / "splits.csv")["split"] == "train").sum())
    # each of the 2 ranks sees half the items: steps per epoch = ceil(ceil(n/2) / 4), not ceil(n / 4)
    assert rows[0]["step"] == math.ceil(math.ceil(n_train / 2) / 4) < math.ceil(n_train / 4)
    assert load_checkpoint(tmp_path / "run" / "checkpoint").manifest.arch == "test_resnet"
