"""configs/train.json end to end on tiny synthetic data: properties, two stages, resume, method overlays."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from ignite.engine import Engine, Events

from cmml_monai.data.errors import find_data_error
from cmml_monai.evaluation import publish_model
from cmml_monai.handlers import BestCheckpointSaver

from bundle_helpers import tiny_overrides, workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
METHODS = [
    "cmml",
    "zero_fill",
    "modality_dropout",
    "mean_impute",
    "cmml_no_memory",
    "cmml_no_context",
    "cmml_no_stage2",
    "modality_dropout_two_view",
]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic") / "derm7pt")


def tiny(synthetic_dir: str, out: str, **extra) -> dict:
    """Overrides that make train.json run in seconds on CPU."""
    return tiny_overrides(synthetic_dir, out, **{"synthetic_cases": 30, **extra})


def test_check_properties_nothing_missing(synthetic_dir, tmp_path):
    w = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path)))
    assert w.check_properties() == []
    # the model-zoo names resolve to the right objects
    assert w.max_epochs == 1 and w.val_interval == 1
    assert type(w.trainer).__name__ == "CMMLTrainer" and type(w.evaluator).__name__ == "CMMLEvaluator"
    assert w.parser.get_parsed_content("train#trainer").stage == 2
    assert w.parser.get_parsed_content("stage1#trainer").stage == 1
    # stage 2 under its symmetric name is the object MONAI's train#trainer / validate#evaluator name
    assert w.parser.get_parsed_content("stage2#trainer") is w.trainer
    assert w.parser.get_parsed_content("stage2#evaluator") is w.evaluator


def test_every_handler_is_a_config_item_in_attach_order(synthetic_dir, tmp_path):
    """Both stages list their handlers by ``_target_`` in train.json (docs/training.md's table); one
    command-line override reaches a handler inside a list, and the MLflow handlers are left out when
    tracking is off rather than built half."""
    overrides = {"stage2#early_stop#patience": 5, "stage1#handlers#6#iteration_log": True}
    w = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path), **overrides))
    names = {
        key: [type(h).__name__ for h in w.parser.get_parsed_content(key)]
        for key in ("stage1#handlers", "stage2#handlers", "stage1#val_handlers", "stage2#val_handlers")
    }
    after_load = ["WeightAverager", "EpochLossAverager", "ValidationHandler", "LrScheduleHandler"]
    logs = ["StageCheckpointSaver", "StatsHandler", "ProgressBar"]
    assert names["stage1#handlers"] == ["ResumeHandler", *after_load, *logs]
    assert names["stage2#handlers"] == ["ResumeHandler", "LoadNetworkHandler", *after_load, *logs]
    assert names["stage1#val_handlers"] == ["StatsHandler", "BestCheckpointSaver"]
    assert names["stage2#val_handlers"] == ["StatsHandler", "BestCheckpointSaver", "ResumableEarlyStopHandler"]
    assert w.parser.get_parsed_content("stage2#early_stop").patience == 5
    assert w.parser.get_parsed_content("stage1#handlers")[6].iteration_log is True
    # one checkpoint dict per stage, shared by the resume and the epoch saver, holding the trainer once attached
    stage1 = w.parser.get_parsed_content("stage1#handlers")
    trainer = w.parser.get_parsed_content("stage1#trainer")
    assert stage1[0].load_dict is stage1[5].save_dict is w.parser.get_parsed_content("stage1#checkpoint")
    assert stage1[0].load_dict["trainer"] is trainer
    tracked = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path / "tracked"), mlflow_enabled=True))
    assert [type(h).__name__ for h in tracked.parser.get_parsed_content("stage2#val_handlers")][2] == (
        "StageMLFlowHandler"
    )


def test_network_components_are_config_items(synthetic_dir, tmp_path):
    """encoder, context, crta, memory, reference and alignment are components of their own, the rest of CMML's
    options one ``network_def#options`` object: an override of either reaches the network."""
    overrides = {
        "crta#num_blocks": 2,
        "memory#num_slots": 5,
        "encoder#share_image_encoder": True,
        "context#num_tokens": 3,
        "instance_context": "true",
        "crta_reads_context": "false",
        "network_def#options#residual_head": "false",
    }
    w = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path), **overrides))
    net = w.parser.get_parsed_content("network_def")
    assert len(net.crta.blocks) == 2 and net.memory.memory.shape[1] == 5
    assert len(net.encoder.image_encoders) == 1  # one backbone shared by both images
    assert net.context.tokens.shape[0] == 3 and net.instance_context and not net.crta.reads_context
    assert not net.residual_head and net.options.stage1_head == "mean"
    assert type(net.reference).__name__ == "InstanceAdaptiveReference"
    assert type(net.alignment).__name__ == "CrossModalAlignment"


def test_two_stage_run_end_to_end(synthetic_dir, tmp_path):
    out = str(tmp_path / "run")
    w = workflow(TRAIN, **tiny(synthetic_dir, out, mlflow_enabled=True))
    w.run()
    w.finalize()
    for stage in ("stage1", "stage2"):
        for name in ("checkpoint_epoch=1.pt", "checkpoint_final.pt", "model_best.pt"):
            assert os.path.isfile(os.path.join(out, stage, name)), (stage, name)
        # the final state is the last epoch's file, not a second copy of it
        assert os.path.samefile(
            os.path.join(out, stage, "checkpoint_final.pt"), os.path.join(out, stage, "checkpoint_epoch=1.pt")
        )
    full = torch.load(os.path.join(out, "stage1", "checkpoint_epoch=1.pt"), weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer"} <= set(full)
    assert full["trainer"]["iteration"] == full["trainer"]["epoch_length"]  # saved after epoch 1
    # stage 2 started from the stage-1 checkpoint
    loader = w.parser.get_parsed_content("stage2#handlers#1")
    assert loader.loaded_from.endswith(os.path.join("stage1", "checkpoint_epoch=1.pt"))
    assert os.path.isfile(os.path.join(out, "models", "model.pt"))
    # one-epoch stages: best_min_epoch 2 falls back to their only epoch, so both best files exist
    assert w.parser.get_parsed_content("stage2#best_saver").first_eligible_epoch == 1

    # stage-1 checkpoints serve the stage-1 head (validated on it), the published model the fusion head
    def served_flag(path: str) -> bool:
        state = torch.load(path, weights_only=True)
        return bool(state.get("network", state)["stage2_trained"])

    assert not served_flag(os.path.join(out, "stage1", "model_best.pt"))
    assert served_flag(os.path.join(out, "models", "model.pt"))
    assert os.path.isfile(os.path.join(out, "table_schema.json"))
    with open(os.path.join(out, "sweep", "sweep.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rate"]) for r in rows] == [0.0, 0.5]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("auc", "acc", "f1"))
    assert os.path.isfile(os.path.join(out, "mlruns.db"))


def test_resume_continues_from_next_epoch(synthetic_dir, tmp_path):
    out = str(tmp_path / "resume")
    stage1_only = ["$cmml_monai.evaluation.run_stage(@stage1#trainer, 'stage 1')"]
    w1 = workflow(TRAIN, **tiny(synthetic_dir, out, run=stage1_only, stage1_epochs=1))
    w1.run()
    assert os.path.isfile(os.path.join(out, "stage1", "checkpoint_epoch=1.pt"))

    saved_best = torch.load(os.path.join(out, "stage1", "checkpoint_epoch=1.pt"), weights_only=False)["best"]
    assert saved_best["best_score"] is not None  # the score of model_best.pt travels with the checkpoint

    w2 = workflow(TRAIN, **tiny(synthetic_dir, out, run=stage1_only, stage1_epochs=2))
    trainer = w2.parser.get_parsed_content("stage1#trainer")
    best_saver = w2.parser.get_parsed_content("stage1#best_saver")
    restored: list = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: restored.append(best_saver.state_dict()))
    started: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    w2.run()
    assert started == [2]  # epoch 1 was restored, not repeated
    # the best score of epoch 1 is known before epoch 2 validates: a worse epoch 2 cannot replace model_best.pt
    assert restored[0] == saved_best
    assert trainer.state.epoch == 2
    resume = w2.parser.get_parsed_content("stage1#handlers#0")
    assert resume.loaded_from.endswith("checkpoint_epoch=1.pt")
    assert os.path.isfile(os.path.join(out, "stage1", "checkpoint_epoch=2.pt"))

    # stage 2 alone (stage 1 given 0 epochs) starts from the stage-1 checkpoint of the earlier run
    stage2_only = [
        "$cmml_monai.evaluation.run_stage(@stage1#trainer, 'stage 1')",
        "$@stage2#early_stop.set_trainer(@stage2#trainer)",
        "$cmml_monai.evaluation.run_stage(@stage2#trainer, 'stage 2')",
    ]
    w3 = workflow(TRAIN, **tiny(synthetic_dir, out, run=stage2_only, stage1_epochs=0, stage2_epochs=1))
    w3.run()
    loader = w3.parser.get_parsed_content("stage2#handlers#1")
    assert loader.loaded_from.endswith("checkpoint_epoch=2.pt")
    assert w3.parser.get_parsed_content("stage1#trainer").state.epoch == 0  # stage 1 did not run
    assert os.path.isfile(os.path.join(out, "stage2", "checkpoint_epoch=1.pt"))


@pytest.mark.parametrize(
    "min_epoch, max_epochs, saved_epoch",
    [(1, 4, 1), (2, 4, 3), (4, 4, 4), (2, None, 3), (3, 1, 1)],
)
def test_best_checkpoint_ignores_epochs_before_min_epoch(min_epoch, max_epochs, saved_epoch, tmp_path, caplog):
    """A real Ignite engine validates four epochs; epoch 1 has the highest score but is a warm-up."""
    scores = [0.9, 0.6, 0.8, 0.7]
    network = torch.nn.Linear(1, 1, bias=False)
    engine = Engine(lambda e, batch: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(e):  # runs before the saver (attached first): marks the weights with the epoch number
        network.weight.data.fill_(float(e.state.epoch))
        e.state.metrics = {"val_auc": scores[e.state.epoch - 1]}
        e.state.key_metric_name = "val_auc"

    saver = BestCheckpointSaver(str(tmp_path), {"network": network}, min_epoch=min_epoch, max_epochs=max_epochs)
    saver.attach(engine)
    with caplog.at_level("INFO", logger="cmml_monai.handlers.checkpoint"):
        engine.run([0], max_epochs=len(scores) if max_epochs is None else max(max_epochs, 1))
    best = torch.load(os.path.join(str(tmp_path), "model_best.pt"), weights_only=True)
    assert best.get("network", best)["weight"].item() == saved_epoch  # one object: saved unwrapped
    assert saver.state_dict()["best_score"] == scores[saved_epoch - 1]
    assert f"model_best.pt saved: epoch {saved_epoch}" in caplog.text
    if saver.first_eligible_epoch > 1:
        assert "epoch 1 is before best_min_epoch" in caplog.text


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_best_checkpoint_min_epoch_errors(bad, tmp_path):
    with pytest.raises(ValueError, match="best_min_epoch must be an integer >= 1"):
        BestCheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(1, 1)}, min_epoch=bad)


def _marked_net(value: float) -> dict:
    return {"weight": torch.full((1, 1), value), "bias": torch.zeros(1)}


def test_publish_model_serves_best_or_last_epoch(tmp_path, caplog):
    """``serve best`` copies the last stage's ``model_best.pt``; ``serve last`` takes the network of its
    last epoch checkpoint; a stage without checkpoints falls back to the stage before it."""
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    stage1.mkdir()
    stage2.mkdir()
    torch.save({"network": _marked_net(1.0), "optimizer": {}}, stage1 / "checkpoint_epoch=3.pt")
    torch.save(_marked_net(2.0), stage2 / "model_best.pt")
    for epoch in (4, 5, 10):  # epoch 10 is the last: the order is numeric, not by name
        torch.save({"network": _marked_net(float(epoch)), "optimizer": {}}, stage2 / f"checkpoint_epoch={epoch}.pt")
    out = str(tmp_path / "out")

    def served(serve: str, stages: list) -> float:
        path = publish_model(out, [str(s) for s in stages], serve=serve)
        assert path == os.path.join(out, "models", "model.pt")
        state = torch.load(path, weights_only=True)
        assert set(state) == {"weight", "bias"}  # the bare network state, loadable by the sweep and export
        return float(state["weight"])

    with caplog.at_level("INFO", logger="cmml_monai.evaluation.workflow"):
        assert served("best", [stage1, stage2]) == 2.0
        assert served("last", [stage1, stage2]) == 10.0
    assert "serve last" in caplog.text and "checkpoint_epoch=10.pt" in caplog.text
    (stage2 / "model_best.pt").unlink()
    assert served("best", [stage1, stage2]) == 10.0  # never validated: its last epoch
    empty = tmp_path / "empty"
    empty.mkdir()
    assert served("last", [stage1, empty]) == 1.0  # a stage that did not train (0 epochs) is skipped
    with pytest.raises(FileNotFoundError, match="nothing was trained"):
        publish_model(out, [str(empty)], serve="last")
    with pytest.raises(ValueError, match="serve must be one of .* got 'final'"):
        publish_model(out, [str(stage1)], serve="final")


def test_bad_serve_stops_the_run_before_training(synthetic_dir, tmp_path):
    out = tmp_path / "typo"
    with pytest.raises(Exception) as raised:  # MONAI wraps it; the bundle's hook prints the DataError's line
        workflow(TRAIN, **tiny(synthetic_dir, str(out), serve="Last"))
    assert "serve must be one of ('best', 'last'), got 'Last'" in str(find_data_error(raised.value))
    assert not (out / "stage1").exists()  # nothing trained


def test_early_stop_state_survives_resume(synthetic_dir, tmp_path):
    """Patience keeps counting across a resume, and a stage that stopped early stays stopped."""
    out = str(tmp_path / "early")
    stage2_only = [
        "$@stage2#early_stop.set_trainer(@stage2#trainer)",
        "$cmml_monai.evaluation.run_stage(@stage2#trainer, 'stage 2')",
    ]
    flat = {"stage2#early_stop#score_function": "$lambda engine: 0.0", "early_stop_patience": 2}

    def run(epochs: int) -> tuple[list[int], object]:
        w = workflow(TRAIN, **tiny(synthetic_dir, out, run=stage2_only, stage1_epochs=0, stage2_epochs=epochs, **flat))
        trainer = w.parser.get_parsed_content("stage2#trainer")
        started: list[int] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
        w.run()
        return started, w.parser.get_parsed_content("stage2#early_stop")

    started, stop = run(2)  # epoch 1 sets the best score, epoch 2 does not improve: counter 1 of 2
    assert started == [1, 2] and stop.state_dict() == {"counter": 1, "best_score": 0.0, "stopped": False}
    saved = torch.load(os.path.join(out, "stage2", "checkpoint_epoch=2.pt"), weights_only=False)["early_stop"]
    assert saved == {"counter": 1, "best_score": 0.0, "stopped": False}

    # resumed with a longer budget: the restored counter reaches the patience after one more epoch
    # (a fresh counter would have trained epochs 3, 4 and 5)
    started, stop = run(5)
    assert started == [3] and stop.state_dict()["stopped"] is True

    # a rerun does not train the stopped stage again
    started, stop = run(5)
    assert started == [] and stop.stopped


@pytest.mark.parametrize("method", METHODS)
def test_method_overlay_builds_and_steps(method, synthetic_dir, tmp_path):
    overlay = os.path.join(ROOT, "configs", "methods", f"{method}.json")
    w = workflow([TRAIN, overlay], **tiny(synthetic_dir, str(tmp_path)))
    assert w.parser.get_parsed_content("method") == method
    epochs = w.parser.get_parsed_content("epochs")
    assert sum(epochs) == 2  # the same total budget for every method
    key = "stage2#trainer" if epochs[1] else "stage1#trainer"
    trainer = w.parser.get_parsed_content(key)
    batch = next(iter(trainer.data_loader))
    before = [p.detach().clone() for p in trainer.network.parameters()]
    out = trainer._iteration(trainer, batch)
    out = out[0] if isinstance(out, list) else out
    assert torch.isfinite(torch.as_tensor(out["loss"]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.network.parameters()))


@pytest.mark.slow
def test_default_config_runs(tmp_path):
    """The embedded default (synthetic Derm7pt, default sizes and epochs) end to end. Not run by default:
    .ci/run runs this job as its main job (README quick start, line 1); ``pytest -m slow`` runs it here."""
    out = str(tmp_path / "default")
    w = workflow(
        TRAIN,
        bundle_root=ROOT,
        output_dir=out,
        shared_dir=os.path.join(out, "shared"),
        dataset_dir=str(tmp_path / "syn"),
        progress_bar=False,
    )
    w.run()
    w.finalize()
    with open(os.path.join(out, "sweep", "sweep.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_validation_follows_the_sweep_rates_by_default(synthetic_dir, tmp_path):
    """By default validation scores each case once per sweep rate (the kept checkpoint is chosen
    under the missingness the sweep tests); ``val_missing_rates []`` validates the observed cases."""
    default = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path / "default"), missing_rates=[0.0, 0.3, 0.7]))
    observed = default.parser.get_parsed_content("val_dataset")
    views = default.parser.get_parsed_content("val_dataloader").dataset
    assert default.parser.get_parsed_content("val_missing_rates") == [0.0, 0.3, 0.7]
    assert len(views) == 3 * len(observed)
    assert sorted({views[i]["missing_rate"] for i in range(len(views))}) == [0.0, 0.3, 0.7]
    off = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path / "off"), val_missing_rates=[]))
    assert off.parser.get_parsed_content("val_dataloader").dataset is off.parser.get_parsed_content("val_dataset")
    assert not os.path.exists(os.path.join(str(tmp_path / "off"), "shared", "masks_valid.json"))


def test_validation_under_missing_rates(synthetic_dir, tmp_path):
    """``val_missing_rates``: every validation case once per rate under the saved seeded masks, and the
    key metric (which picks model_best.pt and drives early stopping) is the AUC over all those views."""
    from cmml_monai.engines import autocast_context
    from cmml_monai.metrics import macro_auc

    out = str(tmp_path / "valrates")
    w = workflow(TRAIN, **tiny(synthetic_dir, out, val_missing_rates=[0.0, 0.7], run_sweep=False))
    observed = w.parser.get_parsed_content("val_dataset")
    views = w.parser.get_parsed_content("val_dataloader").dataset
    assert len(views) == 2 * len(observed)
    masks_file = os.path.join(out, "shared", "masks_valid.json")
    with open(masks_file, encoding="utf-8") as f:
        assert sorted(json.load(f)["masks"]) == ["0.0", "0.7"]
    assert w.parser.get_parsed_content("validate#dataset") is views
    w.run()
    evaluator = w.parser.get_parsed_content("validate#evaluator")
    # recompute the last validation by hand from the masked views (stage 2 trained one epoch)
    network = w.parser.get_parsed_content("network").eval()
    device = next(network.parameters()).device  # the bundle's device: CUDA where present, with its autocast
    probs, labels = [], []
    with torch.no_grad(), autocast_context(w.parser.get_parsed_content("amp"), device):
        for item in views:
            tab = item.get("tabular")
            image = item["image"][None].float().to(device)
            logits = network(image, None if tab is None else tab[None].float().to(device))
            probs.append(torch.softmax(logits.float(), dim=1)[0].cpu())
            labels.append(int(item["label"]))
    expected, _ = macro_auc(torch.stack(probs).numpy(), labels)
    assert evaluator.state.metrics["val_auc"] == pytest.approx(expected, abs=1e-5)
    # the rate-0.7 views really miss modalities (NaN) while the rate-0 views are the observed cases
    nan_0 = sum(bool(torch.isnan(views[i]["image"]).any()) for i in range(len(observed)))
    nan_7 = sum(bool(torch.isnan(views[len(observed) + i]["image"]).any()) for i in range(len(observed)))
    assert nan_7 > nan_0


@pytest.mark.parametrize("method", ["cmml", "zero_fill"])
def test_derm7pt_overlay_sets_the_stage1_head_of_cmml_only(method, synthetic_dir, tmp_path):
    """The Derm7pt overlay's ``stage1_head`` reaches CMML's network_def; a baseline, which has no such
    head, builds unchanged whichever order the overlays come in. Its ``distill_weight`` reaches the
    stage-2 loss (a baseline gives no second view, so the term is never computed for it)."""
    dataset = os.path.join(ROOT, "configs", "datasets", "derm7pt.json")
    overlay = os.path.join(ROOT, "configs", "methods", f"{method}.json")
    args = tiny(synthetic_dir, str(tmp_path), synthetic=True, num_workers=0)
    for key in ("image_encoder", "pretrained"):  # the overlay's own encoder: the ImageNet EfficientNet-Lite0
        args.pop(key)
    for files in ([TRAIN, dataset, overlay], [TRAIN, overlay, dataset]):
        w = workflow(files, **args)
        net = w.parser.get_parsed_content("network_def")
        assert type(net.encoder.image_encoders[0].backbone).__name__ == "EfficientNetFeatures"
        assert w.parser.get_parsed_content("normalization")["mean"] == [0.5, 0.5, 0.5]
        assert w.parser.get_parsed_content("stage2#loss").w_distill == 2.0
        assert w.parser.get_parsed_content("stage1#loss").w_distill == 0.0
        if method == "cmml":
            assert net.stage1_head == "concat_mlp"
        else:
            assert type(net).__name__ == "LateFusionNet"


def test_warmup_epochs_reaches_both_stage_schedulers(synthetic_dir, tmp_path):
    w = workflow(TRAIN, **tiny(synthetic_dir, str(tmp_path), warmup_epochs=1, stage1_epochs=2, stage2_epochs=2))
    for key in ("stage1#lr_scheduler", "stage2#lr_scheduler"):
        scheduler = w.parser.get_parsed_content(key)
        assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR), key
        # the first epoch runs at warmup_start_factor (0.1) of the stage's learning rate
        assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(
            0.1 * w.parser.get_parsed_content("learning_rate")
        )
