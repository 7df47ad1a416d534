"""The combined CMML objective for stage 1 and stage 2 (and the baselines, which give only logits)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmml_monai.losses.alignment import AlignmentLoss
from cmml_monai.losses.reconstruction import ReconstructionLoss
from cmml_monai.losses.supcon import SupConLoss

__all__ = ["CMMLLoss"]


class CMMLLoss(nn.Module):
    """Combine the CMML terms from a ``forward_train`` output dict.

    Each term is computed only when its keys are in ``outputs``:

    - ``cls``: CE (single-label, ``label [B]`` int) or BCE-with-logits (multi-label, ``label [B, L]``)
      on ``logits``; weight ``w_aux`` in stage 1 (the auxiliary head), 1 in stage 2. In stage 2,
      plus ``w_cls_dropped`` times the same loss on ``logits_dropped`` when given (the second view,
      with extra modalities dropped and completed by the CRTA), so the classifier learns from
      completed cases as it meets them at test time.
    - ``rec`` (``synth``, ``target``, ``recon_mask``): ``w_rec * ReconstructionLoss``; with
      ``rec_all_blocks`` and ``synth_blocks`` in the outputs, averaged over every CRTA block (deep
      supervision of the cascade).
    - ``distill`` (stage 2, ``logits`` and ``logits_dropped``): ``w_distill * T^2 * KL(p_T(view 1) || p_T(view 2))``
      with the first view's predictions detached (sigmoid targets for multi-label): the case as
      observed teaches the same case with further modalities dropped and completed, so the completed
      view is trained towards what the full evidence says about this case, not only towards its label.
    - ``align`` (``aligned``, ``reference``, optional ``align_mask``): ``w_align * AlignmentLoss``.
    - ``supcon`` (``proj`` ``[V*B, p]``, ``V`` views stacked view by view): ``w_supcon * SupConLoss``
      with the labels repeated ``V`` times.

    Stage 1: ``L = w_aux L_cls + w_rec L_rec``; stage 2:
    ``L = L_cls + w_cls_dropped L_cls(view 2) + w_distill L_distill + w_align L_align + w_supcon L_supcon``.

    Args:
        stage: 1 or 2.
        multi_label: BCE instead of CE.
        w_rec, w_aux, w_align, w_supcon, w_cls_dropped: term weights.
        w_rec_stage2: weight of the reconstruction term in stage 2 (on the second view's dropped
            slots, keeping the CRTA consistent with the encoders as they keep training; 0 = off).
        temperature: SupCon temperature.
        rec_all_blocks: reconstruct from every cascade block (``synth_blocks``), not only the last.
        label_smoothing: smoothing of the classification targets.
        w_distill: weight of the view-1 -> view-2 distillation term (stage 2; 0 = off).
        distill_temperature: softmax (sigmoid) temperature ``T`` of the distillation term.
        class_weight: per-class weights of the cross-entropy (single-label) or positive weights of
            the binary cross-entropy (multi-label), e.g. from ``cmml_monai.data.balance.class_weights``;
            ``None``: unweighted.

    Returns (``forward``):
        dict with ``loss`` and the weighted terms that were computed (``cls``, ``rec``, ``align``,
        ``supcon``, ``cls_dropped``, ``distill``), all scalars.

    Example::

        >>> out = {"logits": torch.randn(4, 5)}
        >>> sorted(CMMLLoss(stage=2, multi_label=False)(out, torch.tensor([0, 1, 2, 3])))
        ['cls', 'loss']
    """

    def __init__(
        self,
        stage: int,
        multi_label: bool = False,
        w_rec: float = 1.0,
        w_aux: float = 1.0,
        w_align: float = 0.5,
        w_supcon: float = 0.1,
        temperature: float = 0.07,
        rec_all_blocks: bool = False,
        w_cls_dropped: float = 1.0,
        w_rec_stage2: float = 0.0,
        label_smoothing: float = 0.0,
        class_weight: Sequence[float] | None = None,
        w_distill: float = 0.0,
        distill_temperature: float = 2.0,
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}.")
        for name, w in (
            ("w_rec", w_rec),
            ("w_aux", w_aux),
            ("w_align", w_align),
            ("w_supcon", w_supcon),
            ("w_cls_dropped", w_cls_dropped),
            ("w_rec_stage2", w_rec_stage2),
            ("w_distill", w_distill),
        ):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}.")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)
        if class_weight is not None and (len(class_weight) == 0 or any(float(w) <= 0 for w in class_weight)):
            raise ValueError(f"class_weight must be positive weights, one per class, got {class_weight}.")
        # a buffer follows the module to the device; None keeps the unweighted loss
        self.register_buffer(
            "class_weight", None if class_weight is None else torch.tensor([float(w) for w in class_weight])
        )
        self.stage = stage
        self.multi_label = multi_label
        self.w_rec, self.w_aux, self.w_align, self.w_supcon = w_rec, w_aux, w_align, w_supcon
        self.w_cls_dropped = w_cls_dropped
        self.w_rec_stage2 = w_rec_stage2
        self.w_distill = w_distill
        self.distill_temperature = float(distill_temperature)
        self.rec_all_blocks = rec_all_blocks
        self.reconstruction = ReconstructionLoss()
        self.alignment = AlignmentLoss()
        self.supcon = SupConLoss(temperature)

    def classification(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            target = label.to(logits.dtype)
            if self.label_smoothing > 0:
                # each label's binary target moves toward 1/2, as CE's smoothing moves toward uniform
                target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            pos_weight = self._weight(logits)
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        if label.dim() == 2 and label.shape[1] == 1:
            label = label[:, 0]
        return F.cross_entropy(logits, label.long(), weight=self._weight(logits), label_smoothing=self.label_smoothing)

    def distillation(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(p_T(teacher) || p_T(student))`` per case (mean), the teacher detached.

        ``T^2`` keeps the gradient's size independent of ``T`` (Hinton et al., 2015).
        """
        t = self.distill_temperature
        teacher, student = teacher.detach().float() / t, student.float() / t  # full precision under autocast
        if self.multi_label:
            # per label, the KL of two Bernoullis = BCE(student, p_teacher) - H(p_teacher)
            p = torch.sigmoid(teacher)
            kd = F.binary_cross_entropy_with_logits(student, p) - F.binary_cross_entropy_with_logits(teacher, p)
        else:
            kd = F.kl_div(
                F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True
            )
        return t * t * kd

    def _weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.class_weight is None:
            return None
        if self.class_weight.numel() != logits.shape[-1]:
            raise ValueError(
                f"class_weight has {self.class_weight.numel()} weights but the logits have {logits.shape[-1]} classes."
            )
        return self.class_weight.to(device=logits.device, dtype=logits.dtype)

    def forward(self, outputs: dict[str, torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        if "logits" not in outputs:
            raise ValueError(f"outputs must contain 'logits', got keys {sorted(outputs)}.")
        terms: dict[str, torch.Tensor] = {}
        w_cls = self.w_aux if self.stage == 1 else 1.0
        terms["cls"] = w_cls * self.classification(outputs["logits"], label)
        dropped = outputs.get("logits_dropped") if self.stage == 2 else None  # the second view
        if dropped is not None and self.w_cls_dropped > 0:
            terms["cls_dropped"] = self.w_cls_dropped * self.classification(dropped, label)
        if dropped is not None and self.w_distill > 0:
            terms["distill"] = self.w_distill * self.distillation(outputs["logits"], dropped)
        w_rec = self.w_rec if self.stage == 1 else self.w_rec_stage2
        if w_rec > 0 and all(k in outputs for k in ("synth", "target", "recon_mask")):
            synth = outputs["synth_blocks"] if self.rec_all_blocks and "synth_blocks" in outputs else outputs["synth"]
            terms["rec"] = w_rec * self.reconstruction(synth, outputs["target"], outputs["recon_mask"])
        if self.stage == 2 and all(k in outputs for k in ("aligned", "reference")):
            terms["align"] = self.w_align * self.alignment(
                outputs["aligned"], outputs["reference"], outputs.get("align_mask")
            )
        if self.stage == 2 and "proj" in outputs:
            proj = outputs["proj"]
            views = proj.shape[0] // label.shape[0]
            if views * label.shape[0] != proj.shape[0]:
                raise ValueError(f"proj rows ({proj.shape[0]}) must be a multiple of the batch ({label.shape[0]}).")
            labels = label.repeat(views) if label.dim() == 1 else label.repeat(views, 1)
            terms["supcon"] = self.w_supcon * self.supcon(proj, labels)
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms
