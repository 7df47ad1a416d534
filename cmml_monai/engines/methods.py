"""Methods of the comparison (docs/method.md §15-§16): CMML, its ablations and the late-fusion baselines.

Every method shares the network constructor's first arguments, so a config selects one by name
(``--method zero_fill``) or with an overlay (``configs/methods/<name>.json``). Every method gets the
same total epoch budget: CMML splits it between stage 1 and stage 2, the baselines spend it all in
their single (classification) stage, ``cmml_no_stage2`` spends it all in stage 1.
"""

from __future__ import annotations

from typing import Any

import torch

from cmml_monai.networks import CMMLNet, LateFusionNet

__all__ = ["METHODS", "build_network", "stage_epochs"]

# name -> (network class, fixed kwargs, stages trained)
METHODS: dict[str, tuple[type, dict[str, Any], tuple[int, ...]]] = {
    "cmml": (CMMLNet, {}, (1, 2)),
    "cmml_no_memory": (CMMLNet, {"use_memory": False}, (1, 2)),
    "cmml_no_context": (CMMLNet, {"use_context": False}, (1, 2)),
    "cmml_no_stage2": (CMMLNet, {"use_stage2": False}, (1,)),
    "zero_fill": (LateFusionNet, {"mode": "zero_fill"}, (2,)),
    "modality_dropout": (LateFusionNet, {"mode": "modality_dropout"}, (2,)),
    "mean_impute": (LateFusionNet, {"mode": "mean_impute"}, (2,)),
}

_CMML_ONLY = ("num_context_tokens", "num_blocks", "memory_slots", "memory_tau", "stage1_drop_prob",
              "stage2_drop_prob", "projection_dim", "fusion_layers", "memory_momentum", "mark_synthesized",
              "residual_head", "stage1_head", "memory_write_stage2",
              "reference_reads_context")


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")


def build_network(method: str = "cmml", **kwargs: Any) -> torch.nn.Module:
    """The network of ``method`` with the shared constructor arguments ``kwargs``.

    CMML-only options (``num_blocks``, ``memory_slots``, ...) are dropped for the baselines. The network
    keeps ``build_args`` (``method`` and ``kwargs`` as given), what rebuilding it needs.

    Raises:
        ValueError: unknown method.
    """
    _check(method)
    cls, fixed, _ = METHODS[method]
    build_args = {"method": method, **kwargs}
    if cls is not CMMLNet:
        kwargs = {k: v for k, v in kwargs.items() if k not in _CMML_ONLY}
    net = cls(**{**kwargs, **fixed})
    # the resolved arguments, overrides included: cmml_monai.deploy writes them beside the served weights
    # so the network can be rebuilt without the training data
    net.build_args = build_args
    return net


def stage_epochs(method: str, stage1: int, stage2: int) -> list[int]:
    """``[stage-1 epochs, stage-2 epochs]`` of ``method`` for a budget of ``stage1 + stage2`` epochs."""
    _check(method)
    if stage1 < 0 or stage2 < 0:
        raise ValueError(f"epochs must be >= 0, got stage1={stage1}, stage2={stage2}")
    stages = METHODS[method][2]
    total = stage1 + stage2
    if stages == (1, 2):
        return [stage1, stage2]
    return [total, 0] if stages == (1,) else [0, total]
