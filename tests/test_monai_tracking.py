"""MONAI's own ``--tracking mlflow`` switch is refused with one line before anything runs (issue #17).

``python -m monai.bundle run ... --tracking mlflow`` patches MONAI's ``MLFlowHandler`` into the trainer's
and validator's handler lists, which would open a second MLflow store with a duplicate run beside the
project's ``MLflowTracker``. ``configs/train.json`` holds ``"save_execute_config": false`` and calls
``cmml_monai.handlers.refuse_monai_tracking(@save_execute_config)`` in ``initialize``: MONAI's patch always
rewrites that key, so the run stops there, before preflight, training or any store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cmml_monai.data.errors import DataError
from cmml_monai.handlers import refuse_monai_tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
CHECK = "$cmml_monai.handlers.refuse_monai_tracking(@save_execute_config)"
TINY = ["--spatial_size", "[32,32]", "--feature_dim", "16", "--image_encoder", "resnet10", "--batch_size", "8",
        "--num_workers", "0", "--stage1_epochs", "1", "--stage2_epochs", "1", "--progress_bar", "false",
        "--missing_rates", "[0.0]", "--synthetic_cases", "24"]


def _wired(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config.get("save_execute_config") is False and CHECK in (config.get("initialize") or [])


def test_refuse_monai_tracking_values():
    refuse_monai_tracking(False)  # a plain run: the config's own value
    for patched in (None, True, "/out/config_20260101_000000.json"):  # what MONAI's patch leaves
        with pytest.raises(DataError, match=r"^--tracking \(MONAI's switch.*--tracking_uri URI or MLFLOW_TRACKING_URI"):
            refuse_monai_tracking(patched)


@pytest.mark.skipif(not _wired(TRAIN), reason="configs/train.json lacks the wiring: top-level "
                    "\"save_execute_config\": false and, in initialize after install_data_error_hook(), " + CHECK)
@pytest.mark.parametrize("mlflow_enabled", ["true", "false"])
def test_monai_tracking_switch_is_refused_before_anything_runs(tmp_path, mlflow_enabled):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", TRAIN, "--bundle_root", ROOT,
           "--dataset_dir", str(tmp_path / "syn"), "--output_dir", str(work / "out"), *TINY,
           "--mlflow_enabled", mlflow_enabled, "--tracking", "mlflow"]
    done = subprocess.run(cmd, cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "--tracking (MONAI's switch" in errors[0] and "--tracking_uri" in errors[0]
    assert "Traceback" not in done.stderr
    # nothing ran: no data written, no store opened (neither MONAI's nor the project's), no config exported
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert not any(p.endswith((".db", ".pt")) or "mlruns" in p or "config_" in p for p in written), written
    assert not os.path.exists(tmp_path / "syn")
