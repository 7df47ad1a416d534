"""Shared by the tests that run the bundle configs: overrides that make train.json run in seconds."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from functools import partial

import torch
from monai.bundle import ConfigWorkflow
from monai.utils import optional_import

from cmml_monai.networks import CMMLNet, CMMLOptions, InputSpec, MultiModalEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
# the small image backbone of the tests, as train.json's encoder component gives it (--image_encoder resnet10)
RESNET10 = partial(MultiModalEncoder, image_encoder="resnet10")
# the small sizes of a CPU training run of seconds (train.json overrides)
SMALL_SIZES = {
    "spatial_size": [32, 32],
    "feature_dim": 16,
    "batch_size": 8,
    "stage1_epochs": 1,
    "stage2_epochs": 1,
    "progress_bar": False,
}
# the command-line form of the small sizes, as README.md's commands take them
TINY_ARGS = [
    "--feature_dim",
    "16",
    "--image_encoder",
    "resnet10",
    "--batch_size",
    "8",
    "--val_batch_size",
    "8",
    "--num_workers",
    "0",
    "--stage1_epochs",
    "1",
    "--stage2_epochs",
    "1",
    "--progress_bar",
    "false",
    "--mlflow_enabled",
    "false",
    "--amp",
    "false",
]


def bundle_env() -> dict:
    """The environment of a bundle subprocess: this checkout first on ``PYTHONPATH``, one OpenMP thread."""
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def run_bundle(
    config: str, bundle_root: str | None, *args: str, cwd: str = ROOT, env: dict | None = None, **run_kw
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file config --bundle_root bundle_root *args`` in ``cwd``, output captured
    as text (``run_kw`` replaces ``subprocess.run``'s arguments, e.g. ``stderr=subprocess.STDOUT``).

    ``bundle_root=None`` leaves it out, as a user types it; ``--progress_bar false`` is added unless ``args`` set it;
    ``env`` defaults to :func:`bundle_env`. The caller checks ``returncode``.
    """
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config]
    cmd += ["--bundle_root", bundle_root] if bundle_root is not None else []
    cmd += [*args, *([] if "--progress_bar" in args else ["--progress_bar", "false"])]
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "timeout": 600, **run_kw}
    return subprocess.run(cmd, cwd=str(cwd), env=bundle_env() if env is None else env, **kw)


def read_predictions(output_dir: str) -> dict[str, dict[str, str]]:
    """The rows of ``output_dir``/predictions.csv by ``case_id``."""
    with open(os.path.join(output_dir, "predictions.csv"), newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def tiny_overrides(dataset_dir: str, output_dir: str, **extra) -> dict:
    """train.json overrides for a CPU run of seconds (32 px, resnet10, feature_dim 16, 1 + 1 epochs);
    ``extra`` adds or replaces keys."""
    args = {
        "bundle_root": ROOT,
        "dataset_dir": dataset_dir,
        "output_dir": output_dir,
        "shared_dir": os.path.join(output_dir, "shared"),
        **SMALL_SIZES,
        "image_encoder": "resnet10",
        "pretrained": False,  # the dataset overlays name a pretrained encoder; resnet10 has no 2D weights
        "missing_rates": [0.0, 0.5],
        "sweep#subsets": False,
        "sweep#roc": False,
        "mlflow_enabled": False,
    }
    args.update(extra)
    return args


def train_tiny_derm7pt(root, **extra) -> tuple[str, str, ConfigWorkflow]:
    """Train the tiny configuration on 30 generated Derm7pt-layout cases under ``root``.

    Returns ``(data dir, run dir, the finished workflow)``; ``extra`` adds or replaces overrides.
    """
    from cmml_monai.data.synthetic import make_synthetic

    data, run = os.path.join(str(root), "derm7pt"), os.path.join(str(root), "run")
    make_synthetic("derm7pt", data, cases=30, seed=0)
    w = workflow(TRAIN, **tiny_overrides(data, run, **{"synthetic": False, "num_workers": 0, **extra}))
    w.run()
    return data, run, w


def workflow(config_file, **override) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` (train type) of ``config_file`` with ``override``."""
    w = ConfigWorkflow(config_file=config_file, workflow_type="train", **override)
    w.initialize()
    return w


def build_network(cls: type, **kw) -> torch.nn.Module:
    """``cls`` (``CMMLNet`` or ``LateFusionNet``) from flat keyword arguments, as the tests write them: the
    :class:`InputSpec` fields go into ``spec``, for ``CMMLNet`` the :class:`CMMLOptions` fields into ``options``."""
    spec = InputSpec(**{f.name: kw.pop(f.name) for f in dataclasses.fields(InputSpec) if f.name in kw})
    if issubclass(cls, CMMLNet):
        options = {f.name: kw.pop(f.name) for f in dataclasses.fields(CMMLOptions) if f.name in kw}
        if options:
            kw["options"] = CMMLOptions(**options)
    return cls(spec, **kw)


def method_network(method: str, **args) -> torch.nn.Module:
    """The network that ``configs/methods/<method>.json`` selects, built with the flat ``args`` (see
    :func:`build_network`): the overlay's class and options, as train.json builds it (a baseline overlay points
    ``network_def`` at ``late_fusion_def`` and sets its ``mode``; a CMML overlay sets ``network_def#...``)."""
    with open(TRAIN, encoding="utf-8") as f:
        train = json.load(f)
    with open(os.path.join(ROOT, "configs", "methods", f"{method}.json"), encoding="utf-8") as f:
        overlay = json.load(f)
    name = "late_fusion_def" if overlay.get("network_def") == "@late_fusion_def" else "network_def"
    # train.json's own values (mode), not its references (spec, encoder, ...) nor nested objects (options)
    flags = {k: v for k, v in train[name].items() if not isinstance(v, dict) and not str(v).startswith(("@", "$"))}
    # the last part of the key: network_def#options#use_stage2 sets CMMLOptions.use_stage2
    flags.update({k.rsplit("#", 1)[1]: v for k, v in overlay.items() if k.startswith(name + "#")})
    module, _, cls_name = flags.pop("_target_").rpartition(".")
    cls, _ = optional_import(module, name=cls_name)
    return build_network(cls, **args, **flags)
