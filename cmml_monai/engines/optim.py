"""Optimizers, schedules and epoch budgets per training stage, from ``network.stage_parameters(stage)``.

Stage 2 fine-tunes the CRTA (``network.crta_parameters()``: CRTA + context tokens) at
``lr * crta_lr_scale`` or freezes it (``freeze_crta``), and the encoders (parameters under
``encoder.``) at ``lr * encoder_lr_scale``. Networks without ``crta_parameters`` are split by name
prefix, so baselines without a CRTA get one group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from cmml_monai.networks import ImageEncoder
from cmml_monai.utils import as_bool

__all__ = [
    "STAGE_PLANS",
    "stage_epochs",
    "frozen_backbone_parameters",
    "stage_parameter_groups",
    "stage_optimizer",
    "cosine_scheduler",
]

logger = logging.getLogger(__name__)

CRTA_PREFIXES: tuple[str, ...] = ("crta", "memory", "context")

#: the stages a method trains: CMML both, ``cmml_no_stage2`` stage 1 only, the late-fusion baselines
#: their single (classification) stage, which runs as stage 2
STAGE_PLANS: tuple[tuple[int, ...], ...] = ((1, 2), (1,), (2,))


def stage_epochs(stages: Sequence[int], stage1: int, stage2: int) -> list[int]:
    """``[stage-1 epochs, stage-2 epochs]`` for a method that trains ``stages``, on a budget of
    ``stage1 + stage2`` epochs: every method gets the same total, a single stage gets all of it.

    Args:
        stages: the stages the method trains, one of ``STAGE_PLANS`` (a method overlay sets ``stages``).
        stage1: stage-1 epochs of the two-stage plan.
        stage2: stage-2 epochs of the two-stage plan.

    Raises:
        ValueError: ``stages`` is not a plan of ``STAGE_PLANS``, or a negative number of epochs.

    Example:
        >>> stage_epochs([1, 2], 2, 3), stage_epochs([2], 2, 3), stage_epochs([1], 2, 3)
        ([2, 3], [0, 5], [5, 0])
    """
    plan = tuple(int(s) for s in stages)
    if plan not in STAGE_PLANS:
        raise ValueError(f"stages must be one of {[list(p) for p in STAGE_PLANS]}, got {list(stages)!r}")
    if stage1 < 0 or stage2 < 0:
        raise ValueError(f"epochs must be >= 0, got stage1={stage1}, stage2={stage2}")
    total = stage1 + stage2
    if plan == (1, 2):
        return [stage1, stage2]
    return [total, 0] if plan == (1,) else [0, total]


def frozen_backbone_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the image backbones built with ``freeze_backbone`` (never optimised).

    Example:
        >>> enc = ImageEncoder("resnet10", 2, 3, 8, freeze_backbone=True)
        >>> len(frozen_backbone_parameters(enc)) == len(list(enc.backbone.parameters()))
        True
    """
    return [
        p
        for m in network.modules()
        if isinstance(m, ImageEncoder) and m.freeze_backbone
        for p in m.backbone.parameters()
    ]


def _stage_params(network: torch.nn.Module, stage: int) -> list[torch.nn.Parameter]:
    fn = getattr(network, "stage_parameters", None)
    if fn is None:
        return [p for p in network.parameters()]
    if stage == 2 and getattr(network, "use_stage2", True) is False:
        # a method without stage 2 (its stage-2 trainer has 0 epochs and never steps this optimizer)
        logger.info("network has no stage 2: the stage-2 optimizer is a placeholder over the stage-1 parameters")
        stage = 1
    params = fn(stage)
    if isinstance(params, dict):  # {group name: params}
        out: list[torch.nn.Parameter] = []
        for group in params.values():
            out.extend(group)
        return out
    out = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


def stage_parameter_groups(
    network: torch.nn.Module,
    stage: int,
    lr: float,
    crta_lr_scale: float = 0.1,
    freeze_crta: bool = False,
    crta_prefixes: Sequence[str] = CRTA_PREFIXES,
    encoder_lr_scale: float = 1.0,
) -> list[dict]:
    """Param groups of ``stage``: stage 1 one group (the encoders apart at ``lr * encoder_lr_scale`` when it is not
    1); stage 2 the new stage-2 modules at ``lr``, the encoders at ``lr * encoder_lr_scale`` and the CRTA at
    ``lr * crta_lr_scale`` (left out when ``freeze_crta``). The backbones of ``freeze_backbone`` encoders are
    left out (:func:`frozen_backbone_parameters`); ``encoder_lr_scale`` 0 freezes the encoders' other parameters.

    Raises:
        ValueError: bad stage, negative scale, or a stage with no trainable parameters.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    for name, scale in (("crta_lr_scale", crta_lr_scale), ("encoder_lr_scale", encoder_lr_scale)):
        if scale < 0:
            raise ValueError(f"{name} must be >= 0, got {scale!r}")
    freeze_crta = as_bool(freeze_crta, "freeze_crta")
    chosen = {id(p) for p in _stage_params(network, stage)}
    # not requires_grad: the trainer sets it from the optimizer, so after stage 1 it is off for stage-2 parts
    frozen = {id(p) for p in frozen_backbone_parameters(network)}
    crta_fn = getattr(network, "crta_parameters", None)
    crta_ids = {id(p) for p in crta_fn()} if callable(crta_fn) else None

    def part(item: tuple[str, torch.nn.Parameter]) -> str | None:
        """``"crta"``, ``"encoder"`` or ``"rest"`` for a parameter this stage trains, else None."""
        name, p = item
        if id(p) not in chosen or id(p) in frozen:
            return None
        if (id(p) in crta_ids) if crta_ids is not None else name.split(".")[0] in crta_prefixes:
            return "crta"
        return "encoder" if name.startswith("encoder.") else "rest"

    parts: dict[str | None, list[torch.nn.Parameter]] = {"crta": [], "encoder": [], "rest": [], None: []}
    for item in network.named_parameters():
        parts[part(item)].append(item[1])
    crta, encoder, rest = parts["crta"], parts["encoder"], parts["rest"]
    if stage == 1 and encoder_lr_scale == 1.0:
        groups = [{"params": crta + encoder + rest, "lr": lr, "name": "all"}]
    elif stage == 1:
        groups = [{"params": crta + rest, "lr": lr, "name": "all"}]
        if encoder and encoder_lr_scale > 0:
            groups.append({"params": encoder, "lr": lr * encoder_lr_scale, "name": "encoder"})
    else:
        groups = [{"params": rest, "lr": lr, "name": "main"}]
        if encoder and encoder_lr_scale > 0:
            groups.append({"params": encoder, "lr": lr * encoder_lr_scale, "name": "encoder"})
        elif encoder:
            logger.info("stage 2: %d encoder parameter tensors frozen", len(encoder))
        if crta and not freeze_crta and crta_lr_scale > 0:
            groups.append({"params": crta, "lr": lr * crta_lr_scale, "name": "crta"})
        elif crta:
            logger.info("stage 2: %d CRTA parameter tensors frozen", len(crta))
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"stage {stage}: the network has no parameters to train")
    return groups


def stage_optimizer(
    network: torch.nn.Module,
    stage: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    crta_lr_scale: float = 0.1,
    freeze_crta: bool = False,
    encoder_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW over ``stage_parameter_groups``."""
    groups = stage_parameter_groups(network, stage, lr, crta_lr_scale, freeze_crta, encoder_lr_scale=encoder_lr_scale)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    eta_min_ratio: float = 0.01,
    warmup_epochs: int = 0,
    warmup_start_factor: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay over ``max_epochs`` epochs, after an optional linear warm-up (stepped once per epoch).

    Not MONAI's ``WarmupCosineSchedule``: its cosine falls to 0 and clips at ``end_lr``, where this one
    (torch's ``CosineAnnealingLR``) scales the cosine between the LR and its floor; the warm-up is the same.

    With ``warmup_epochs = W > 0`` the first ``W`` epochs rise linearly from ``warmup_start_factor``
    times each group's LR to the LR (torch's ``LinearLR``), then the cosine runs over the remaining
    ``max_epochs - W`` epochs (``SequentialLR``): a freshly initialised head or fusion block does not
    take full-size steps on the pretrained or stage-1 weights around it.

    Args:
        optimizer: the stage's optimizer.
        max_epochs: epochs of the stage.
        eta_min_ratio: the cosine's floor as a share of the smallest group LR.
        warmup_epochs: epochs of linear warm-up (0: none); must be < ``max_epochs`` when > 0 (a stage of
            0 epochs, which a method skips, gets the plain cosine).
        warmup_start_factor: LR factor of the first warm-up epoch, in (0, 1].

    Raises:
        ValueError: a negative ``warmup_epochs``, one that leaves no cosine epoch, or a start factor
            outside (0, 1].

    Example::

        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = cosine_scheduler(opt, max_epochs=4, warmup_epochs=2, warmup_start_factor=0.5)
        >>> [round(g["lr"], 2) for g in opt.param_groups]
        [0.5]
    """
    warmup_epochs = int(warmup_epochs)
    trained_epochs = int(max_epochs)
    max_epochs = max(1, trained_epochs)
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor}.")
    eta_min = min(g["lr"] for g in optimizer.param_groups) * eta_min_ratio
    if warmup_epochs == 0 or trained_epochs == 0:  # a stage the method skips never steps its scheduler
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=eta_min)
    if warmup_epochs >= max_epochs:
        raise ValueError(
            f"warmup_epochs ({warmup_epochs}) must be smaller than the stage's epochs ({max_epochs}): "
            "lower --warmup_epochs or train longer."
        )
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_epochs
    )
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs, eta_min=eta_min)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])
