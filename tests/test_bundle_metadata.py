"""The bundle's metadata.json is valid against MONAI's schema (offline) and describes the served network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).resolve().parent / "data" / "meta_schema_20240725.json"


def test_verify_metadata_offline(tmp_path):
    # verify_metadata downloads the schema unless a file already sits at --filepath
    local_schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, local_schema)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(ROOT / "configs" / "metadata.json"),
            "--filepath",
            str(local_schema),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_network_data_format_follows_the_batch_contract():
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image", "tabular"]
    assert list(fmt["outputs"]) == ["pred"]
    image, tabular, pred = fmt["inputs"]["image"], fmt["inputs"]["tabular"], fmt["outputs"]["pred"]
    assert tabular["spatial_shape"] == []
    assert len(image["channel_def"]) == image["num_channels"]
    assert len(tabular["channel_def"]) == tabular["num_channels"]
    assert len(pred["channel_def"]) == pred["num_channels"]
