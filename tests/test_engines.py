"""Engine pieces with real components: metrics, optimizer groups, the CMML trainer iteration, masking."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from ignite.engine import Events

from cmml_monai.engines import (
    CMMLEvaluator,
    CMMLTrainer,
    autocast_context,
    stage_epochs,
    stage_optimizer,
    stage_parameter_groups,
)
from cmml_monai.handlers import EpochLossAverager, MacroAUC, latest_checkpoint
from cmml_monai.losses import CMMLLoss
from cmml_monai.metrics import classification_metrics, expected_calibration_error, macro_auc
from cmml_monai.networks import MultiModalEncoder

from bundle_helpers import RESNET10, method_network


def _net(method: str = "cmml", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        image_modalities=2,
        image_channels=3,
        spatial_dims=2,
        num_classes=3,
        tabular_cardinalities=[0, 3],
        feature_dim=16,
        encoder=RESNET10,
    )
    args.update(kw)
    return method_network(method, **args)


def _batches(n_batches: int = 2, b: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        image = torch.randn(b, 6, 16, 16, generator=g)
        image[0, :3] = float("nan")  # first image modality missing in case 0
        tab = torch.stack([torch.randn(b, generator=g), torch.randint(0, 3, (b,), generator=g).float()], 1)
        tab[1] = float("nan")  # table missing in case 1
        label = torch.arange(b) % 3
        out.append({"image": image, "tabular": tab, "label": label, "case_id": [f"c{i}_{j}" for j in range(b)]})
    return out


def test_macro_auc_skips_absent_class_and_names_it(caplog):
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    labels = np.array([0, 1, 0, 1])  # class 2 absent
    auc, skipped = macro_auc(probs, labels)
    assert skipped == [2]
    assert auc == pytest.approx(1.0)
    assert "[2]" in caplog.text
    m = classification_metrics(probs, labels)
    assert m["acc"] == 1.0 and m["n"] == 4 and m["skipped"] == [2]


def test_macro_auc_multilabel_per_label_mean():
    probs = np.array([[0.9, 0.2], [0.1, 0.8], [0.8, 0.15], [0.2, 0.1]])
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    auc, skipped = macro_auc(probs, labels, multi_label=True)
    assert skipped == []
    assert auc == pytest.approx((1.0 + 0.75) / 2)
    m = classification_metrics(probs, labels, multi_label=True)
    assert m["acc"] == pytest.approx(7 / 8)


def test_expected_calibration_error_values():
    # 80% sure of every case and right on 4 of 5: calibrated
    calibrated = np.tile([[0.8, 0.2]], (5, 1))
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 0, 1])) == pytest.approx(0.0)
    # sure (0.95) but right on 2 of 4 in one bin, and 0.55 sure and always right in another
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.05, 0.95], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0, 0, 1])
    expected = (4 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.55)) / 6
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(expected)
    # one bin: the mean confidence against the accuracy over all cases
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(4 / 6 - np.mean(probs.max(1))))
    # multi-label: each label's probability against its outcome, averaged over labels
    ml = np.array([[0.3, 0.9], [0.3, 0.9], [0.3, 0.9]])
    ml_labels = np.array([[1, 1], [0, 1], [0, 1]])
    assert expected_calibration_error(ml, ml_labels, multi_label=True) == pytest.approx((abs(1 / 3 - 0.3) + 0.1) / 2)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros((0,))))
    assert math.isnan(classification_metrics(np.zeros((0, 2)), np.zeros((0,)))["ece"])
    with pytest.raises(ValueError, match="bins must be >= 1, got 0"):
        expected_calibration_error(probs, labels, bins=0)


def test_macro_auc_refuses_out_of_range_label():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    for bad in (3, -1):  # once clipped into a class: scored as a wrong or right guess of a real class
        with pytest.raises(ValueError, match=rf"label {bad} is outside the 3 classes \[0, 2\]"):
            macro_auc(probs, np.array([0, 1, bad]))
        with pytest.raises(ValueError, match=rf"label {bad} is outside"):
            classification_metrics(probs, np.array([0, 1, bad]))


def test_macro_auc_all_skipped_is_nan():
    auc, skipped = macro_auc(np.array([[0.5, 0.5]]), np.array([0]))
    assert math.isnan(auc) and skipped == [0, 1]


def test_stage_epochs_same_budget():
    assert stage_epochs([1, 2], 2, 3) == [2, 3]
    assert stage_epochs([2], 2, 3) == [0, 5]
    assert stage_epochs([1], 2, 3) == [5, 0]
    with pytest.raises(ValueError, match=r"\[2, 1\]"):
        stage_epochs([2, 1], 1, 1)


def test_stage2_groups_lower_lr_or_freeze_crta():
    net = _net()
    crta = {id(p) for p in net.crta_parameters()}
    g1 = stage_parameter_groups(net, 1, lr=1e-3)
    assert len(g1) == 1 and crta <= {id(p) for p in g1[0]["params"]}
    g2 = stage_parameter_groups(net, 2, lr=1e-3, crta_lr_scale=0.1)
    by_name = {g["name"]: g for g in g2}
    assert by_name["crta"]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in by_name["crta"]["params"]} == crta
    assert not crta & {id(p) for p in by_name["main"]["params"]}
    encoder = {id(p) for p in net.encoder.parameters()}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-3)  # default: the encoders keep the full LR
    assert {id(p) for p in by_name["encoder"]["params"]} == encoder
    assert not encoder & {id(p) for p in by_name["main"]["params"]}
    slow = {g["name"]: g["lr"] for g in stage_parameter_groups(net, 2, lr=1e-3, encoder_lr_scale=0.1)}
    assert slow == pytest.approx({"main": 1e-3, "encoder": 1e-4, "crta": 1e-4})
    # the encoders' fraction of the LR holds in stage 1 too (the fine-tuning recipe of a pretrained encoder)
    slow1 = {g["name"]: g["lr"] for g in stage_parameter_groups(net, 1, lr=1e-3, encoder_lr_scale=0.1)}
    assert slow1 == pytest.approx({"all": 1e-3, "encoder": 1e-4})
    frozen = stage_parameter_groups(net, 2, lr=1e-3, freeze_crta=True, encoder_lr_scale=0.0)
    assert [g["name"] for g in frozen] == ["main"]
    with pytest.raises(ValueError, match="encoder_lr_scale must be >= 0, got -1"):
        stage_parameter_groups(net, 2, lr=1e-3, encoder_lr_scale=-1)
    # baselines: their encoders get the same fraction of the LR as CMML's
    base = {g["name"]: g["lr"] for g in stage_parameter_groups(_net("zero_fill"), 2, lr=1e-3, encoder_lr_scale=0.1)}
    assert base == pytest.approx({"main": 1e-3, "encoder": 1e-4})
    with pytest.raises(ValueError, match="stage"):
        stage_parameter_groups(net, 3, lr=1e-3)


def test_stage2_groups_hold_the_stage2_parts_after_stage1_and_never_a_frozen_backbone():
    net = _net(encoder=partial(MultiModalEncoder, image_encoder="resnet10", freeze_backbone=True))
    stage1 = {id(p) for g in stage_parameter_groups(net, 1, lr=1e-3) for p in g["params"]}
    for p in net.parameters():  # what the stage-1 trainer does at its start
        p.requires_grad_(id(p) in stage1)
    stage2 = {id(p) for g in stage_parameter_groups(net, 2, lr=1e-3) for p in g["params"]}
    backbones = {id(p) for enc in net.encoder.image_encoders for p in enc.backbone.parameters()}
    assert not backbones & (stage1 | stage2)
    assert {id(p) for p in net.parameters()} - backbones == stage2  # fusion, reference, alignment included


@pytest.mark.parametrize("stage", [1, 2])
def test_cmml_trainer_two_iterations_update_and_log(stage):
    net = _net()
    opt = stage_optimizer(net, stage, lr=1e-3, freeze_crta=(stage == 2))
    trainer = CMMLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_batches(),
        network=net,
        optimizer=opt,
        loss_function=CMMLLoss(stage=stage),
        stage=stage,
        amp=True,
        grad_clip=1.0,
        decollate=False,
    )
    EpochLossAverager().attach(trainer)
    head = (net.aux_head if stage == 1 else net.fusion).parameters().__next__()
    before = head.detach().clone()
    trainer.run()
    assert trainer.state.iteration == 2
    out = trainer.state.output
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (6, 3)
    expected = "train_loss_rec" if stage == 1 else "train_loss_align"
    assert expected in trainer.state.metrics and math.isfinite(trainer.state.metrics["train_loss"])
    assert trainer.state.metrics["train_lr"] == pytest.approx(1e-3)
    assert not torch.equal(before, head.detach())
    if stage == 2:  # a frozen CRTA gets no gradients
        assert all(not p.requires_grad for p in net.crta_parameters())


def test_epoch_loss_means_are_the_means_of_the_iteration_losses():
    """Two epochs of three steps, decollated as in the bundle: every output item holds the same 0-d loss
    tensors, and each epoch's ``train_loss*`` is the mean of that epoch's iteration losses."""
    net = _net()
    trainer = CMMLTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=_batches(3),
        network=net,
        optimizer=stage_optimizer(net, 2, lr=1e-3),
        loss_function=CMMLLoss(stage=2),
        stage=2,
    )
    EpochLossAverager().attach(trainer)
    seen: list[dict[str, float]] = []
    means: list[dict[str, float]] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        out = engine.state.output
        assert isinstance(out, list) and len(out) == 6
        losses = {k: v for k, v in out[0].items() if k.startswith("loss")}
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in losses.values())
        assert all(item[k] is v for item in out for k, v in losses.items())  # shared, not copied
        seen.append({k: float(v) for k, v in losses.items()})

    @trainer.on(Events.EPOCH_COMPLETED)
    def epoch_means(engine):
        means.append({k: v for k, v in engine.state.metrics.items() if k.startswith("train_loss")})

    trainer.run()
    assert len(seen) == 6 and {"loss", "loss_cls", "loss_align"} <= set(seen[0])
    for epoch, got in enumerate(means):
        steps = seen[3 * epoch : 3 * epoch + 3]
        want = {f"train_{k}": sum(step[k] for step in steps) / 3 for k in steps[0]}
        assert got == pytest.approx(want, rel=1e-6)
    assert means[0]["train_loss"] != pytest.approx(means[1]["train_loss"])  # epoch 2 is not a running mean


class _NanAt:
    """``CMMLLoss`` whose total loss is NaN at the given call (1-based)."""

    def __init__(self, at: int) -> None:
        self.loss, self.at, self.calls = CMMLLoss(stage=2), at, 0

    def __call__(self, outputs, label):
        self.calls += 1
        terms = self.loss(outputs, label)
        if self.calls == self.at:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


@pytest.mark.parametrize("interval, at, raised_at", [(1, 2, 2), (2, 1, 2), (50, 2, 3), (50, 4, 6)])
def test_nan_loss_raises_naming_stage_and_iteration(interval, at, raised_at):
    """Checked every ``interval`` steps and at the last step of an epoch (3 here), before that step's
    backward: the error names the stage and the iteration of the NaN."""
    net = _net()
    steps = []
    trainer = CMMLTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=_batches(3),
        network=net,
        optimizer=stage_optimizer(net, 2, lr=1e-3),
        loss_function=_NanAt(at),
        stage=2,
        finite_check_interval=interval,
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.iteration))
    with pytest.raises(FloatingPointError, match=rf"^stage 2: the loss is nan at iteration {at}$"):
        trainer.run()
    assert trainer.state.iteration == raised_at and steps == list(range(1, raised_at))
    with pytest.raises(ValueError, match="finite_check_interval"):
        CMMLTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=_batches(1),
            network=net,
            optimizer=stage_optimizer(net, 2),
            loss_function=CMMLLoss(stage=2),
            finite_check_interval=0,
        )


def test_early_stop_bound_to_trainer_stops_on_plateau():
    from monai.handlers import EarlyStopHandler, ValidationHandler, stopping_fn_from_metric

    net = _net("zero_fill")
    stop = EarlyStopHandler(patience=1, score_function=stopping_fn_from_metric("val_const"), trainer=None)

    class ConstantMetric:  # a validation score that never improves
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_const=0.5))

    ev = CMMLEvaluator(
        device="cpu", val_data_loader=_batches(1), network=net, decollate=False, val_handlers=[ConstantMetric(), stop]
    )
    trainer = CMMLTrainer(
        device="cpu",
        max_epochs=5,
        train_data_loader=_batches(1),
        network=net,
        optimizer=stage_optimizer(net, 2),
        loss_function=CMMLLoss(stage=2),
        decollate=False,
        train_handlers=[ValidationHandler(interval=1, validator=ev)],
    )
    stop.set_trainer(trainer)
    trainer.run()
    assert trainer.state.epoch == 2  # no improvement after epoch 1, patience 1


def test_autocast_is_a_noop_on_cpu():
    ctx = autocast_context(True, "cpu")
    with ctx:
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


@pytest.mark.parametrize(
    "device, amp, expected", [("cuda", True, {"dtype": torch.bfloat16}), ("cuda", False, {}), ("cpu", True, {})]
)
def test_one_amp_path_for_trainer_and_evaluator(device, amp, expected):
    """Both engines take MONAI's ``amp`` / ``amp_kwargs`` from the same rule (built only: no CUDA needed)."""
    net = _net("zero_fill")
    trainer = CMMLTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=_batches(1),
        network=net,
        optimizer=stage_optimizer(net, 2),
        loss_function=CMMLLoss(stage=2),
        amp=amp,
    )
    evaluator = CMMLEvaluator(device=device, val_data_loader=_batches(1), network=net, amp=amp)
    for engine in (trainer, evaluator):
        assert engine.amp is bool(expected) and engine.amp_kwargs == expected


def test_evaluator_macro_auc_metric_on_served_path():
    net = _net("zero_fill")
    ev = CMMLEvaluator(
        device="cpu",
        val_data_loader=_batches(2),
        network=net,
        amp=True,
        decollate=False,
        key_val_metric={"val_auc": MacroAUC(activation="softmax", output_transform=lambda o: (o["pred"], o["label"]))},
    )
    ev.run()
    auc = ev.state.metrics["val_auc"]
    assert 0.0 <= auc <= 1.0


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    for e in (1, 3, 2):
        (tmp_path / f"checkpoint_epoch={e}.pt").write_bytes(b"x")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_epoch=3.pt")
    assert latest_checkpoint(str(tmp_path / "none")) is None


def test_final_checkpoint_is_the_last_epoch_file_not_a_second_copy(tmp_path):
    """StageCheckpointSaver: checkpoint_final.pt shares the last epoch checkpoint's bytes (a hard link here),
    stays readable when that epoch file is deleted, and a run with nothing left to train writes a fresh one."""
    import os

    from ignite.engine import Engine

    from cmml_monai.handlers import StageCheckpointSaver

    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        net(batch).sum().backward()
        optimizer.step()

    def trainer_with_saver():
        engine = Engine(step)
        saver = StageCheckpointSaver(str(tmp_path), {"network": net, "optimizer": optimizer})
        saver.attach(engine)
        return engine, saver

    data = [torch.randn(4, 3)] * 2
    trainer_with_saver()[0].run(data, max_epochs=3)
    final, last = tmp_path / "checkpoint_final.pt", tmp_path / "checkpoint_epoch=3.pt"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=3.pt", "checkpoint_final.pt"]
    assert os.path.samefile(final, last)
    state = torch.load(final, weights_only=True)
    assert state["trainer"]["iteration"] == 6 and torch.equal(state["network"]["weight"], net.weight.detach())
    # a later process that saved nothing (a finished stage run again) or failed writes a new final file:
    # the epoch checkpoint it was linked to keeps its own state
    for event in ("completed", "exception_raised"):
        engine, saver = trainer_with_saver()
        engine.state.epoch, engine.state.iteration = 3, 7
        if event == "completed":
            saver.completed(engine)
        else:
            with pytest.raises(RuntimeError, match="stop"):  # MONAI saves, then re-raises
                saver.exception_raised(engine, RuntimeError("stop"))
        assert not os.path.samefile(final, last) and not os.path.exists(f"{final}.tmp"), event
        assert torch.load(final, weights_only=True)["trainer"]["iteration"] == 7, event
        assert torch.load(last, weights_only=True)["trainer"]["iteration"] == 6, event
        os.remove(final)
        os.link(last, final)
    # the link outlives the epoch file (n_saved=1 deletes it when a longer run saves epoch 4)
    os.remove(last)
    assert torch.load(final, weights_only=True)["trainer"]["iteration"] == 6


def _epoch_lrs(scheduler, optimizer, epochs: int) -> list[float]:
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_scheduler_warmup_then_cosine_values():
    from cmml_monai.engines.optim import cosine_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _epoch_lrs(cosine_scheduler(opt, 6, eta_min_ratio=0.0, warmup_epochs=2, warmup_start_factor=0.1), opt, 6)
    # linear 0.1 -> 1 over 2 epochs, then the cosine over the 4 epochs left: (1 + cos(pi t / 4)) / 2
    expected = [0.1, 0.55] + [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert lrs == pytest.approx(expected, abs=1e-6)
    # without warm-up: the plain cosine over all epochs, as before
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _epoch_lrs(cosine_scheduler(opt, 4, eta_min_ratio=0.0), opt, 4) == pytest.approx(
        [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)], abs=1e-6
    )


@pytest.mark.parametrize(
    "kwargs", [{"warmup_epochs": -1}, {"warmup_epochs": 4}, {"warmup_epochs": 1, "warmup_start_factor": 0.0}]
)
def test_cosine_scheduler_bad_warmup(kwargs):
    from cmml_monai.engines.optim import cosine_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup"):
        cosine_scheduler(opt, 4, **kwargs)
