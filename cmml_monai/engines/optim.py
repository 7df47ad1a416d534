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

from cmml_monai.utils import as_bool

__all__ = ["STAGE_PLANS", "stage_epochs", "stage_parameter_groups", "stage_optimizer", "cosine_scheduler"]

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
    """Param groups of ``stage``: stage 1 one group; stage 2 the new stage-2 modules at ``lr``, the
    encoders at ``lr * encoder_lr_scale`` and the CRTA at ``lr * crta_lr_scale`` (left out when
    ``freeze_crta``).

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
    crta_fn = getattr(network, "crta_parameters", None)
    crta_ids = {id(p) for p in crta_fn()} if callable(crta_fn) else None
    crta, encoder, rest = [], [], []
    for name, p in network.named_parameters():
        if id(p) not in chosen:
            continue
        is_crta = id(p) in crta_ids if crta_ids is not None else name.split(".")[0] in crta_prefixes
        if is_crta:
            crta.append(p)
        elif crta_ids is not None and name.startswith("encoder."):
            encoder.append(p)
        else:
            rest.append(p)
    if stage == 1:
        groups = [{"params": crta + encoder + rest, "lr": lr, "name": "all"}]
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
    groups = stage_parameter_groups(
        network, stage, lr, crta_lr_scale, freeze_crta, encoder_lr_scale=encoder_lr_scale
    )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def cosine_scheduler(optimizer: torch.optim.Optimizer, max_epochs: int, eta_min_ratio: float = 0.01):
    """Cosine decay over ``max_epochs`` epochs (stepped once per epoch by ``LrScheduleHandler``)."""
    eta_min = min(g["lr"] for g in optimizer.param_groups) * eta_min_ratio
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(max_epochs)), eta_min=eta_min)

