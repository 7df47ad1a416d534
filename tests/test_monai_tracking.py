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

import pytest
from monai.bundle import ConfigWorkflow

from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.handlers import refuse_monai_tracking

from bundle_helpers import bundle_env, run_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
EVALUATE = os.path.join(ROOT, "configs", "evaluate.json")
CHECK = "$cmml_monai.handlers.refuse_monai_tracking(@save_execute_config)"
TINY = [
    "--spatial_size",
    "[32,32]",
    "--feature_dim",
    "16",
    "--image_encoder",
    "resnet10",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--stage1_epochs",
    "1",
    "--stage2_epochs",
    "1",
    "--progress_bar",
    "false",
    "--missing_rates",
    "[0.0]",
    "--synthetic_cases",
    "24",
]


def _wired(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config.get("save_execute_config") is False and CHECK in (config.get("initialize") or [])


def test_refuse_monai_tracking_values():
    refuse_monai_tracking(False)  # a plain run: the config's own value
    for patched in (None, True, "/out/config_20260101_000000.json"):  # what MONAI's patch leaves
        with pytest.raises(DataError, match=r"^--tracking \(MONAI's switch.*--tracking_uri URI or MLFLOW_TRACKING_URI"):
            refuse_monai_tracking(patched)


def _wiring(*configs: str) -> str:
    """Why the configs cannot refuse the switch yet ('' when they can): the last file with an
    ``initialize`` list must call the check, and the merged config must hold ``save_execute_config: false``."""
    merged: dict = {}
    for path in configs:
        with open(path, encoding="utf-8") as f:
            merged.update(json.load(f))
    if merged.get("save_execute_config") is not False or CHECK not in (merged.get("initialize") or []):
        return (
            f"{', '.join(os.path.basename(c) for c in configs)}: wiring missing (top-level "
            f'"save_execute_config": false and, in initialize after install_data_error_hook(), {CHECK})'
        )
    return ""


@pytest.mark.parametrize("configs", [[TRAIN], [TRAIN, EVALUATE]], ids=["train", "train+evaluate"])
def test_monai_tracking_switch_is_refused_before_anything_runs(tmp_path, configs):
    if _wiring(*configs):
        pytest.skip(_wiring(*configs))
    work = tmp_path / "work"
    work.mkdir()
    env = bundle_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    done = run_bundle(
        repr(configs),
        ROOT,
        "--dataset_dir",
        str(tmp_path / "syn"),
        "--output_dir",
        str(work / "out"),
        *TINY,
        "--tracking",
        "mlflow",
        cwd=str(work),
        env=env,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "--tracking (MONAI's switch" in errors[0] and "--tracking_uri" in errors[0]
    assert "Traceback" not in done.stderr
    # nothing ran: no data written, no store opened (neither MONAI's nor the project's), no config exported
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert not any(p.endswith((".db", ".pt")) or "mlruns" in p or "config_" in p for p in written), written
    assert not os.path.exists(tmp_path / "syn")


def test_monai_tracking_argument_of_the_python_api_is_refused(tmp_path):
    if _wiring(TRAIN):
        pytest.skip(_wiring(TRAIN))
    w = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        tracking="mlflow",
        bundle_root=ROOT,
        dataset_dir=str(tmp_path / "syn"),
        output_dir=str(tmp_path / "out"),
        mlflow_enabled=False,
    )
    with pytest.raises(Exception) as raised:
        w.initialize()
    error = find_data_error(raised.value)
    assert error is not None and str(error).startswith("--tracking (MONAI's switch")
    assert not os.path.exists(tmp_path / "syn") and not os.path.exists(tmp_path / "out")
