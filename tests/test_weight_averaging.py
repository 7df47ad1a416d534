"""The recommended overlays train with weight averaging (``ema_momentum``): what stage 2 validates, what
``model_best.pt`` holds and what ``models/model.pt`` serves must be the averaged weights, not the raw ones."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from ignite.engine import Events

from cmml_monai.data.synthetic import make_synthetic

from bundle_helpers import TRAIN, tiny_overrides, workflow


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory) -> dict:
    """A tiny run (1 + 3 epochs, large steps, ``ema_momentum`` 0.5) that records, at every stage-2 validation,
    the averaged and the raw weights and the evaluator's outputs."""
    root = tmp_path_factory.mktemp("ema")
    data, out = str(root / "derm7pt"), str(root / "run")
    make_synthetic("derm7pt", data, cases=30, seed=0)
    w = workflow(
        TRAIN,
        **tiny_overrides(
            data,
            out,
            synthetic=False,
            num_workers=0,
            ema_momentum=0.5,
            learning_rate=0.01,
            stage2_epochs=3,
            best_min_epoch=1,
            run_sweep=False,
        ),
    )
    evaluator = w.parser.get_parsed_content("validate#evaluator")
    averager = w.parser.get_parsed_content("stage2#averager")
    network = w.parser.get_parsed_content("network")
    seen: dict = {"epochs": [], "batches": []}

    def record_batch(engine):  # MONAI's evaluator has decollated the batch and its output into items
        items, outputs = engine.state.batch, engine.state.output
        seen["batches"].append(
            (
                torch.stack([torch.as_tensor(i["image"]) for i in items]),
                torch.stack([torch.as_tensor(i["tabular"]) for i in items]),
                torch.stack([torch.as_tensor(o["pred"]) for o in outputs]),
            )
        )

    def record_epoch(engine):
        seen["epochs"].append(
            {
                "metric": engine.state.metrics["val_auc"],
                "averaged": copy.deepcopy(averager.model.state_dict()),
                "raw": copy.deepcopy(network.state_dict()),
                "batches": seen["batches"],
            }
        )
        seen["batches"] = []

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, record_batch)
    evaluator.add_event_handler(Events.COMPLETED, record_epoch)
    w.run()
    w.finalize()
    return {"out": out, "epochs": seen["epochs"], "averager": averager, "network": network}


def test_averaging_is_on_and_the_weights_differ(averaged_run):
    assert averaged_run["averager"].model is not averaged_run["network"]
    last = averaged_run["epochs"][-1]
    assert not _same(last["averaged"], last["raw"])


def test_stage2_validation_scores_the_averaged_weights(averaged_run):
    net = copy.deepcopy(averaged_run["network"]).eval()
    epoch = averaged_run["epochs"][-1]
    assert epoch["batches"]
    for image, tabular, probs in epoch["batches"]:  # the evaluator's post-processed (softmax) predictions
        with torch.no_grad():
            net.load_state_dict(epoch["averaged"])
            averaged = torch.softmax(net(image, tabular), dim=1)
            net.load_state_dict(epoch["raw"])
            raw = torch.softmax(net(image, tabular), dim=1)
        assert torch.allclose(probs, averaged, atol=1e-5)
        assert not torch.allclose(probs, raw, atol=1e-3)


def test_best_and_served_checkpoints_hold_the_averaged_weights(averaged_run):
    epochs = averaged_run["epochs"]
    best = max(range(len(epochs)), key=lambda i: (epochs[i]["metric"], -i))  # the first epoch of the best score
    saved = torch.load(
        os.path.join(averaged_run["out"], "stage2", "model_best.pt"), map_location="cpu", weights_only=True
    )
    saved = saved.get("network", saved)  # one saved object: its state dict alone
    assert _same(saved, epochs[best]["averaged"]) and not _same(saved, epochs[best]["raw"])
    served = torch.load(os.path.join(averaged_run["out"], "models", "model.pt"), map_location="cpu", weights_only=True)
    assert _same(served.get("network", served), saved)
