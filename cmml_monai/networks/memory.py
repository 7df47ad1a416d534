"""Modality-specific memory banks: typical real-feature patterns that enrich synthesized tokens."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cmml_monai.networks.utils import GroupedLinear
from cmml_monai.utils import as_bool

__all__ = ["ModalityMemoryBank"]


class ModalityMemoryBank(nn.Module):
    """Per-modality bank ``M_m in R^{S x d}`` read by synthesized tokens, written from real ones.

    Read: ``r_m = softmax(cos(f_m, M_m) / tau) M_m``; a learned gate
    ``g_m = sigmoid(W_m [f_m; r_m] + b_m)`` enriches synthesized tokens only:
    ``f~_m = f_m + (1 - delta_m) g_m * r_m``. Write (``update``, stage-1 training, no grad): every
    real feature of a present sample is assigned to its nearest slot (cosine) and each assigned
    slot moves to ``momentum * slot + (1 - momentum) * mean(assigned)``. Slots start as random unit
    vectors; the first write fills the slots with (jittered) real features instead, so no slot starts far
    from the data. The banks are buffers: saved with the model.

    Under several processes (an initialised ``torch.distributed`` group, e.g. DDP) every rank writes the
    same update: the per-slot counts and feature sums are all-reduced before the EMA move, so the write
    equals what one process makes from the global batch (all ranks' features) and the replicas never
    diverge. The first write seeds the slots from rank 0's features (broadcast to all ranks).

    Args:
        num_modalities: ``k``.
        feature_dim: ``d``.
        num_slots: ``S`` (our default 64; the paper's abstract gives no value).
        tau: softmax temperature of the read.
        momentum: EMA momentum of the write.
        write_stage2: :class:`CMMLNet` also writes the bank in stage-2 training (docs/method.md §6); off, the
            slots keep the stage-1 encoders' features while stage 2 trains the encoders on.

    Example::

        >>> bank = ModalityMemoryBank(3, 32, num_slots=16)
        >>> f, present = torch.randn(4, 3, 32), torch.rand(4, 3) > 0.5
        >>> bank.update(f, present)
        >>> bank(f, present).shape
        torch.Size([4, 3, 32])
    """

    def __init__(
        self,
        num_modalities: int,
        feature_dim: int = 256,
        num_slots: int = 64,
        tau: float = 0.1,
        momentum: float = 0.9,
        write_stage2: bool = False,
    ) -> None:
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}.")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.tau = tau
        self.momentum = momentum
        self.write_stage2 = as_bool(write_stage2, "write_stage2")
        self.register_buffer("memory", F.normalize(torch.randn(num_modalities, num_slots, feature_dim), dim=-1))
        self.register_buffer("initialized", torch.zeros(num_modalities, dtype=torch.bool))
        self.gate = GroupedLinear(num_modalities, 2 * feature_dim, feature_dim)
        self._ready = False  # Python cache of initialized.all(), avoids a host sync per step

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        """``r [B, k, d]``: each token's softmax(cos / tau)-weighted mix of its modality's slots."""
        mem = self.memory.to(tokens.dtype)
        sim = torch.einsum("bkd,ksd->bks", F.normalize(tokens, dim=-1), F.normalize(mem, dim=-1))
        return torch.einsum("bks,ksd->bkd", torch.softmax(sim / self.tau, dim=-1), mem)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Enrich the synthesized (``present`` False) tokens; present tokens pass unchanged."""
        r = self.read(tokens)
        g = torch.sigmoid(self.gate(torch.cat([tokens, r], dim=-1)))
        return tokens + (~present).unsqueeze(-1).to(tokens.dtype) * g * r

    @torch.no_grad()
    def update(self, features: torch.Tensor, present: torch.Tensor) -> None:
        """EMA write of real ``features [B, k, d]`` where ``present [B, k]`` (training only)."""
        features = features.detach().to(self.memory.dtype)
        if not self._ready:  # host sync only until every bank has been seeded
            self._seed(features, present)
            # every rank starts from rank 0's seeds, so all ranks assign features against the same slots
            _broadcast(self.memory, self.initialized)
            self._ready = bool(self.initialized.all())
        # all modalities at once: nearest slot per real feature, then masked per-slot means
        sim = torch.einsum("bkd,ksd->bks", F.normalize(features, dim=-1), F.normalize(self.memory, dim=-1))
        onehot = F.one_hot(sim.argmax(dim=-1), self.memory.shape[1]).to(features.dtype)
        onehot = onehot * present.unsqueeze(-1).to(features.dtype)  # [B, k, S]
        counts = onehot.sum(dim=0)  # [k, S]
        sums = torch.einsum("bks,bkd->ksd", onehot, features)
        counts, sums = _all_reduce_sum(counts, sums)  # the global batch's per-slot statistics
        mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
        moved = self.momentum * self.memory + (1.0 - self.momentum) * mean
        self.memory.copy_(torch.where((counts > 0).unsqueeze(-1), moved, self.memory))

    def _seed(self, features: torch.Tensor, present: torch.Tensor) -> None:
        """Fill the slots of not yet seeded banks with (jittered) real features, cycled over slots."""
        for m in range(self.memory.shape[0]):
            real = features[present[:, m], m]
            if bool(self.initialized[m]) or real.shape[0] == 0:
                continue
            idx = torch.arange(self.memory.shape[1], device=real.device) % real.shape[0]
            seed = real[idx]
            # jitter so duplicated features land in distinct slots
            self.memory[m] = seed + 0.01 * seed.std() * torch.randn_like(seed)
            self.initialized[m] = True


def _several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(counts: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts [k, S]`` and ``sums [k, S, d]`` summed over ranks in one collective (as they are alone)."""
    if not _several_processes():
        return counts, sums
    flat = torch.cat([counts.reshape(-1), sums.reshape(-1)])
    dist.all_reduce(flat)
    return flat[: counts.numel()].view_as(counts), flat[counts.numel() :].view_as(sums)


def _broadcast(memory: torch.Tensor, initialized: torch.Tensor) -> None:
    """Rank 0's ``memory`` and ``initialized`` to every rank (bool as uint8: gloo has no bool)."""
    if not _several_processes():
        return
    flags = initialized.to(torch.uint8)
    dist.broadcast(memory, 0)
    dist.broadcast(flags, 0)
    initialized.copy_(flags.bool())
