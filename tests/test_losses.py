"""Tests of cmml_monai.losses on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmml_monai.losses import AlignmentLoss, CMMLLoss, ReconstructionLoss, SupConLoss


def test_supcon_hand_value_single_label():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # anchors 0 and 1: one positive (sim 1) against {1, 0}; anchor 2 has no positive -> excluded
    expected = math.log(1 + math.exp(-1.0))
    assert SupConLoss(temperature=1.0)(z, torch.tensor([0, 0, 1])).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_hand_value_multi_label():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]]).float()
    # positives: 0-1, 1-0, 1-2, 2-1 (0 and 2 share no label); T = 1
    a0 = -(0.0 - math.log(math.exp(0.0) + math.exp(-1.0)))  # anchor 0: pos sim 0, others {0, -1}
    a1 = -0.5 * (2 * (0.0 - math.log(2.0)))  # anchor 1: both sims 0
    a2 = -(0.0 - math.log(math.exp(-1.0) + math.exp(0.0)))
    expected = (a0 + a1 + a2) / 3
    assert SupConLoss(temperature=1.0)(z, labels).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_guard_no_positive_rows():
    z = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    loss = SupConLoss()(z, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # multi-label rows with no label have no positive either
    loss = SupConLoss()(F.normalize(torch.randn(3, 4), dim=1), torch.zeros(3, 2))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)


def test_supcon_prefers_clustered_features():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert SupConLoss(0.5)(good, labels) < SupConLoss(0.5)(bad, labels)


def test_reconstruction_loss_values_and_stop_gradient():
    synth = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    loss = ReconstructionLoss()(synth, target, mask)
    assert loss.item() == pytest.approx(2.0)  # MSE (1 + 1) / 2 = 1, plus 1 - cos 0 = 1
    loss.backward()
    assert target.grad is None and synth.grad[0, 1].abs().sum() == 0 and synth.grad[0, 0].abs().sum() > 0
    empty = ReconstructionLoss()(synth, target, torch.zeros(1, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_alignment_loss_values():
    ref = torch.tensor([[1.0, 0.0]])
    aligned = torch.tensor([[[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]])
    assert AlignmentLoss()(aligned, ref, torch.tensor([[True, False, False]])).item() == pytest.approx(0.0, abs=1e-6)
    assert AlignmentLoss()(aligned, ref, torch.tensor([[True, True, True]])).item() == pytest.approx(1.0)
    assert AlignmentLoss()(aligned, ref, torch.tensor([[False, True, False]])).item() == pytest.approx(2.0)
    assert AlignmentLoss()(aligned, ref).item() == pytest.approx(1.0)


def test_cmml_loss_stage1_terms():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    label = torch.tensor([0, 1])
    synth = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = {"logits": logits, "synth": synth, "target": -synth, "recon_mask": torch.tensor([[True], [False]])}
    res = CMMLLoss(stage=1, w_rec=2.0, w_aux=0.5)(out, label)
    ce = F.cross_entropy(logits, label).item()
    assert res["cls"].item() == pytest.approx(0.5 * ce)
    assert res["rec"].item() == pytest.approx(2.0 * (2.0 + 2.0))  # MSE 4/2 = 2, 1 - cos(-1) = 2
    assert res["loss"].item() == pytest.approx(res["cls"].item() + res["rec"].item())
    assert "align" not in res and "supcon" not in res


def test_cmml_loss_stage2_terms_multi_label():
    b, k, p = 3, 2, 4
    torch.manual_seed(0)
    label = torch.tensor([[1, 0], [1, 1], [0, 1]]).float()
    out = {
        "logits": torch.randn(b, 2),
        "aligned": torch.randn(b, k, p),
        "reference": torch.randn(b, p),
        "align_mask": torch.ones(b, k, dtype=torch.bool),
        "proj": F.normalize(torch.randn(2 * b, p), dim=1),
        # stage-1 keys are ignored in stage 2
        "synth": torch.randn(b, k, p),
        "target": torch.randn(b, k, p),
        "recon_mask": torch.ones(b, k, dtype=torch.bool),
    }
    res = CMMLLoss(stage=2, multi_label=True)(out, label)
    assert set(res) == {"loss", "cls", "align", "supcon"}
    assert res["cls"].item() == pytest.approx(F.binary_cross_entropy_with_logits(out["logits"], label).item())
    assert res["align"].item() == pytest.approx(0.5 * AlignmentLoss()(out["aligned"], out["reference"]).item())
    sup = SupConLoss(0.07)(out["proj"], label.repeat(2, 1)).item()
    assert res["supcon"].item() == pytest.approx(0.1 * sup, rel=1e-5)
    assert res["loss"].item() == pytest.approx(res["cls"].item() + res["align"].item() + res["supcon"].item(), rel=1e-5)


def test_cmml_loss_stage2_classifies_the_dropped_view():
    label = torch.tensor([0, 2, 1])
    out = {"logits": torch.randn(3, 3), "logits_dropped": torch.randn(3, 3)}
    res = CMMLLoss(stage=2, w_cls_dropped=0.5)(out, label)
    assert set(res) == {"loss", "cls", "cls_dropped"}
    assert res["cls_dropped"].item() == pytest.approx(0.5 * F.cross_entropy(out["logits_dropped"], label).item())
    assert res["loss"].item() == pytest.approx(res["cls"].item() + res["cls_dropped"].item(), rel=1e-6)
    assert set(CMMLLoss(stage=2, w_cls_dropped=0.0)(out, label)) == {"loss", "cls"}
    assert "cls_dropped" not in CMMLLoss(stage=1)(out, label)  # stage 1 has one view
    with pytest.raises(ValueError, match="w_cls_dropped"):
        CMMLLoss(stage=2, w_cls_dropped=-1.0)


def test_cmml_loss_distils_the_observed_view_into_the_dropped_view():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    label = torch.tensor([0, 2, 1, 0])
    res = CMMLLoss(stage=2, w_cls_dropped=0.0, w_distill=0.5, distill_temperature=3.0)(
        {"logits": teacher, "logits_dropped": student}, label
    )
    assert set(res) == {"loss", "cls", "distill"}
    p_t, p_s = torch.softmax(teacher / 3.0, -1), torch.softmax(student / 3.0, -1)
    expected = 0.5 * 9.0 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()  # T^2 KL(teacher || student)
    assert res["distill"].item() == pytest.approx(expected.item(), rel=1e-5)
    res["distill"].backward()
    assert teacher.grad is None or torch.count_nonzero(teacher.grad) == 0  # the observed view is the teacher only
    assert torch.count_nonzero(student.grad) > 0
    same = CMMLLoss(stage=2, w_distill=1.0)({"logits": teacher, "logits_dropped": teacher.detach().clone()}, label)
    assert same["distill"].item() == pytest.approx(0.0, abs=1e-6)
    # off by default, and never in stage 1
    assert "distill" not in CMMLLoss(stage=2)({"logits": teacher, "logits_dropped": student}, label)
    assert "distill" not in CMMLLoss(stage=1, w_distill=1.0)({"logits": teacher, "logits_dropped": student}, label)
    with pytest.raises(ValueError, match="distill_temperature"):
        CMMLLoss(stage=2, distill_temperature=0.0)
    with pytest.raises(ValueError, match="w_distill"):
        CMMLLoss(stage=2, w_distill=-1.0)


def test_cmml_loss_distillation_multi_label_is_the_bernoulli_kl():
    torch.manual_seed(1)
    teacher, student = torch.randn(5, 4), torch.randn(5, 4)
    label = (torch.rand(5, 4) > 0.5).float()
    res = CMMLLoss(stage=2, multi_label=True, w_cls_dropped=0.0, w_distill=1.0, distill_temperature=2.0)(
        {"logits": teacher, "logits_dropped": student}, label
    )
    p_t, p_s = torch.sigmoid(teacher / 2.0), torch.sigmoid(student / 2.0)
    kl = p_t * (p_t.log() - p_s.log()) + (1 - p_t) * ((1 - p_t).log() - (1 - p_s).log())
    assert res["distill"].item() == pytest.approx(4.0 * kl.mean().item(), rel=1e-5)


def test_cmml_loss_optional_stage2_reconstruction():
    b, k, d = 3, 2, 4
    torch.manual_seed(0)
    out = {
        "logits": torch.randn(b, 2),
        "synth": torch.randn(b, k, d),
        "target": torch.randn(b, k, d),
        "recon_mask": torch.tensor([[True, False], [False, False], [False, True]]),
    }
    label = torch.tensor([0, 1, 1])
    assert "rec" not in CMMLLoss(stage=2)(out, label)  # off by default (the design's stage-2 loss)
    res = CMMLLoss(stage=2, w_rec_stage2=0.5)(out, label)
    expected = 0.5 * ReconstructionLoss()(out["synth"], out["target"], out["recon_mask"]).item()
    assert res["rec"].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="w_rec_stage2"):
        CMMLLoss(stage=2, w_rec_stage2=-0.1)


def test_cmml_loss_baseline_and_checks():
    res = CMMLLoss(stage=2)(
        {"logits": torch.zeros(2, 4), "present": torch.ones(2, 3, dtype=torch.bool)}, torch.tensor([1, 3])
    )
    assert set(res) == {"loss", "cls"} and res["loss"].item() == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="stage"):
        CMMLLoss(stage=0)
    with pytest.raises(ValueError, match="w_align"):
        CMMLLoss(stage=2, w_align=-1.0)
    with pytest.raises(ValueError, match="logits"):
        CMMLLoss(stage=2)({}, torch.tensor([0]))


def test_reconstruction_over_the_cascade():
    torch.manual_seed(0)
    blocks, target = torch.randn(3, 2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    per_block = [ReconstructionLoss()(blocks[i], target, mask) for i in range(3)]
    assert ReconstructionLoss()(blocks, target, mask).item() == pytest.approx(sum(per_block).item() / 3, rel=1e-5)
    out = {
        "logits": torch.zeros(2, 3),
        "synth": blocks[-1],
        "synth_blocks": blocks,
        "target": target,
        "recon_mask": mask,
    }
    label = torch.tensor([0, 1])
    last = CMMLLoss(stage=1)(out, label)["rec"].item()
    deep = CMMLLoss(stage=1, rec_all_blocks=True)(out, label)["rec"].item()
    assert last == pytest.approx(per_block[-1].item()) and deep == pytest.approx(sum(per_block).item() / 3, rel=1e-5)


def test_cmml_loss_label_smoothing_values():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_p = F.log_softmax(logits, dim=1)[0]
    eps = 0.3
    smoothed = CMMLLoss(stage=2, label_smoothing=eps)({"logits": logits}, torch.tensor([0]))["cls"]
    # CE against (1 - eps) one-hot + eps / classes
    assert smoothed.item() == pytest.approx(-((1 - eps) * log_p[0] + eps * log_p.mean()).item())
    plain = CMMLLoss(stage=2)({"logits": logits}, torch.tensor([0]))["cls"]
    assert plain.item() == pytest.approx(-log_p[0].item())
    # multi-label: each binary target moves toward 1/2
    multi = CMMLLoss(stage=2, multi_label=True, label_smoothing=eps)(
        {"logits": torch.tensor([[1.0, -1.0]])}, torch.tensor([[1, 0]])
    )["cls"]
    expected = F.binary_cross_entropy_with_logits(torch.tensor([1.0, -1.0]), torch.tensor([1 - eps / 2, eps / 2]))
    assert multi.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        CMMLLoss(stage=2, label_smoothing=1.0)
