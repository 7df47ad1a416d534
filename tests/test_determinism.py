"""Two CPU runs of configs/train.json with the same seed give the same weights and the same metrics."""

from __future__ import annotations

import os

import torch
from monai.bundle import ConfigWorkflow

from bundle_helpers import ROOT, SMALL_SIZES, TRAIN


def _train(tmp_path, name: str, seed: int) -> str:
    out = str(tmp_path / name)
    w = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        bundle_root=ROOT,
        dataset_dir=str(tmp_path / "syn"),
        synthetic_cases=30,
        output_dir=out,
        shared_dir=str(tmp_path / "shared"),
        seed=seed,
        device="cpu",
        **SMALL_SIZES,
        missing_rates=[0.0, 0.5],
        mlflow_enabled=False,
        **{"sweep#subsets": False, "sweep#roc": False},
    )
    w.initialize()
    w.run()
    w.finalize()
    return out


def _weights(out: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "models", "model.pt"), map_location="cpu", weights_only=True)


def test_same_seed_same_weights_and_metrics(tmp_path):
    first, second = _train(tmp_path, "a", 0), _train(tmp_path, "b", 0)
    wa, wb = _weights(first), _weights(second)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"same seed, different weights: {differ[:5]}"
    for stage in ("stage1", "stage2"):  # the whole training state, not only the served network
        sa = torch.load(os.path.join(first, stage, "checkpoint_final.pt"), map_location="cpu", weights_only=True)
        sb = torch.load(os.path.join(second, stage, "checkpoint_final.pt"), map_location="cpu", weights_only=True)
        assert all(torch.equal(sa["network"][k], sb["network"][k]) for k in sa["network"]), stage
    sweep_a = open(os.path.join(first, "sweep", "sweep.csv")).read()
    assert sweep_a == open(os.path.join(second, "sweep", "sweep.csv")).read()
    assert sweep_a.count("\n") == 3  # header + two rates: the comparison saw real rows

    # the comparison can see a difference: another training seed changes the weights
    wc = _weights(_train(tmp_path, "c", 1))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
