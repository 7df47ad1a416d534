"""Data-parallel training over several processes (GPUs, nodes): ``configs/multi_gpu_train.json``.

One process per device, started by ``torchrun``; the process group is NCCL on CUDA and gloo on CPU, so the
same code path runs a 2-process CPU test and an 8-GPU job. What each part does under several processes:

- training: :class:`DistributedTrainNetwork` runs ``network.forward_train`` through
  ``DistributedDataParallel`` (gradients all-reduced in the backward), rebuilt whenever the set of trained
  parameters changes (stage 1 and stage 2 train different parts), and broadcasts rank 0's buffers after
  every optimizer step (BatchNorm statistics, the memory banks, ``stage2_trained``), so validation and
  checkpoints see identical replicas. The memory-bank write itself is all-reduced
  (``ModalityMemoryBank.update``): every rank applies the update one process would make on the global batch.
- validation: every rank scores its shard (:func:`shard_sampler`, no padding) with the unwrapped network,
  and MONAI's cumulative metrics all-gather the predictions, so every rank gets the one-process metric and
  early stopping / best-model selection agree on all ranks.
- files: checkpoints are written by rank 0 (ignite's ``DiskSaver`` saves on rank 0 only); the served
  weights, the executed config, MLflow and the missing-rate sweep run on rank 0 (:func:`is_main_process`);
  the other ranks build the test set without a cache (``test_dataset#cache``), since they never read it.
  Why the two metric choices: every rank needs the validation score (early stopping, best checkpoint), so
  all score shards and gather; the sweep runs once after training and decides nothing, so rank 0 scores all
  test cases (one process's numbers by construction) while the others finish.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.data import DistributedSampler
from monai.engines.utils import IterationEvents
from torch.nn.parallel import DistributedDataParallel

from cmml_monai.networks.wrappers import TrainingForward
from cmml_monai.utils import as_bool

__all__ = [
    "init_distributed",
    "local_device",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "wait_for_main_process",
    "release_other_processes",
    "cleanup_distributed",
    "broadcast_buffers",
    "shard_sampler",
    "convert_sync_batchnorm",
    "DistributedTrainNetwork",
]

logger = logging.getLogger(__name__)

# the DDP argument that turns off the buffer broadcast at every forward (buffers still sync at construction):
# ``forward_sync_buffers`` in newer PyTorch, where ``broadcast_buffers`` is deprecated
_NO_FORWARD_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


def is_distributed() -> bool:
    """A ``torch.distributed`` process group is initialised (with any number of ranks)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes files and logs to MLflow."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU (one device per process)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 60.0) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment and return this process's device.

    The rendezvous (single node or several: ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``) is
    torchrun's; this function only reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` through the default
    ``env://`` init method. Calling it again is a no-op that returns the device.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; ``None`` picks NCCL when CUDA is available, else gloo.
        timeout_minutes: collective timeout; generous because rank 0 alone runs the files-only steps
            (served weights) while the others may wait at a barrier.

    Raises:
        RuntimeError: not started by ``torchrun`` (no ``WORLD_SIZE`` / ``RANK`` in the environment).
    """
    device = local_device()
    if device.type == "cuda":
        # before the group exists, so NCCL binds this process to its own GPU
        torch.cuda.set_device(device)
    if is_distributed():
        return device
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError(
            "configs/multi_gpu_train.json needs torchrun: torchrun --nproc_per_node N -m monai.bundle run "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\""
        )
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=float(timeout_minutes))}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU (no guessing at the first collective)
    dist.init_process_group(**kwargs)
    logger.info("process group: %s, rank %d of %d, device %s", backend, get_rank(), get_world_size(), device)
    return device


def wait_for_main_process() -> None:
    """Ranks > 0 wait here until rank 0 calls :func:`release_other_processes` (rank 0 passes).

    ``multi_gpu_train.json``'s ``initialize`` puts the case list between the two, so rank 0 alone writes
    the synthetic data (or anything else a first run creates on disk) and the others then read it.
    """
    if not is_main_process():
        barrier()


def release_other_processes() -> None:
    """Rank 0's side of :func:`wait_for_main_process` (ranks > 0 pass)."""
    if is_main_process():
        barrier()


def cleanup_distributed() -> None:
    """Destroy the process group (``finalize``); a no-op without one."""
    if is_distributed():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers of ``module`` to every rank, one collective per dtype.

    Booleans travel as uint8 (gloo has no bool). A no-op without several processes.
    """
    if not is_distributed() or get_world_size() < 2:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        groups.setdefault(buf.dtype, []).append(buf)
    for dtype, bufs in groups.items():
        flat = torch.cat([b.detach().reshape(-1).to(torch.uint8 if dtype == torch.bool else dtype) for b in bufs])
        dist.broadcast(flat, src)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                n = b.numel()
                b.copy_(flat[offset : offset + n].view(b.shape).to(dtype))
                offset += n


def shard_sampler(dataset: torch.utils.data.Dataset) -> DistributedSampler | None:
    """This rank's shard of an evaluation set, in order and without padding (``None`` without a group).

    Without padding no case is scored twice, so the all-gathered metric equals one process's.
    """
    if not is_distributed():
        return None
    return DistributedSampler(dataset, even_divisible=False, shuffle=False)


#: the layers ``SyncBatchNorm.convert_sync_batchnorm`` converts, by their public classes
BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d,
    torch.nn.SyncBatchNorm,
)


def convert_sync_batchnorm(network: torch.nn.Module) -> int:
    """Replace every BatchNorm layer of ``network`` by ``torch.nn.SyncBatchNorm`` in place; returns how many.

    In training under several processes a ``SyncBatchNorm`` normalises with the statistics of the global
    batch instead of each rank's share, which matters when a rank holds few cases (3D MRI at batch 2 per
    GPU). Parameter and buffer names do not change, so the checkpoints load into a plain network; in eval
    mode (validation, the sweep, the served path) it computes what a ``BatchNorm`` does.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> convert_sync_batchnorm(net), type(net[1]).__name__
        (1, 'SyncBatchNorm')
    """
    if isinstance(network, BATCH_NORMS):
        raise ValueError("convert_sync_batchnorm converts the layers inside a network, not a single BatchNorm")
    count = sum(isinstance(m, BATCH_NORMS) for m in network.modules())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    if converted is not network:  # PyTorch replaces the children in place and returns the same object
        raise RuntimeError("torch.nn.SyncBatchNorm.convert_sync_batchnorm returned a new network")
    return count


class DistributedTrainNetwork(torch.nn.Module):
    """The training view of ``network`` for :class:`~cmml_monai.engines.CMMLTrainer` under several processes.

    ``forward_train`` runs ``DistributedDataParallel(TrainingForward(network))``, so the gradients of the
    parameters trained in this step are averaged over ranks in the backward. DDP is built at the first
    step and again whenever the trained parameter set changes (stage 1 and stage 2 train different
    parts; the trainer sets ``requires_grad`` at its start), after resume and stage-1 loading, and its
    construction broadcasts rank 0's parameters. ``forward`` is the served path of the plain network.

    Buffers are not broadcast by DDP (``forward_sync_buffers=False``) but by :meth:`sync_buffers` after each
    optimizer step (the trainer attaches it at ``MODEL_COMPLETED``): after the step, so the BatchNorm
    statistics of the epoch's last step are identical too when validation and checkpoints read them, and
    never between forward and backward, where a buffer saved for the backward (the memory bank read by
    stage 2) must not change in place. Running statistics are rank 0's (PyTorch DDP's convention).

    Checkpoints, validation and the sweep keep using ``network`` itself (no ``module.`` prefix).

    Args:
        network: the network (already on this process's device), e.g. ``CMMLNet``.
        find_unused_parameters: let DDP skip trained parameters that a step did not use (a modality absent
            from a batch with ``encode_present_only``, baselines); False is faster when every step uses all.
        sync_batchnorm: turn the network's BatchNorm layers into ``SyncBatchNorm``
            (:func:`convert_sync_batchnorm`); CUDA only, since PyTorch synchronises only GPU tensors.
        ddp_kwargs: other ``DistributedDataParallel`` arguments (e.g. ``gradient_as_bucket_view``).

    Example::

        >>> net = DistributedTrainNetwork(CMMLNet(...).to(device))  # doctest: +SKIP
        >>> CMMLTrainer(..., network=net, optimizer=stage_optimizer(net.network, stage=1))  # doctest: +SKIP
    """

    def __init__(
        self,
        network: torch.nn.Module,
        find_unused_parameters: bool = True,
        sync_batchnorm: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__()
        if not hasattr(network, "forward_train"):
            raise ValueError(f"network {type(network).__name__} has no forward_train(image, tabular, stage)")
        if isinstance(network, DistributedDataParallel):
            raise ValueError("give the plain network: DistributedTrainNetwork wraps it in DDP itself")
        if as_bool(sync_batchnorm, "sync_batchnorm"):
            device = next(network.parameters()).device
            if device.type != "cuda":
                raise ValueError(
                    f"sync_batchnorm needs CUDA (PyTorch's SyncBatchNorm synchronises GPU tensors only), but the "
                    f"network is on {device}: set sync_batchnorm false for CPU (gloo) training"
                )
            logger.info("SyncBatchNorm: %d BatchNorm layers converted", convert_sync_batchnorm(network))
        self.network = network
        self.find_unused_parameters = as_bool(find_unused_parameters, "ddp_find_unused_parameters")
        self.ddp_kwargs = ddp_kwargs
        self.ddp: DistributedDataParallel | None = None
        self._trained: tuple[bool, ...] = ()

    def forward(self, image: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(image, tabular)

    def forward_train(self, image: torch.Tensor, tabular: torch.Tensor | None = None, stage: int = 2) -> Any:
        """``network.forward_train`` under DDP (see the class docstring)."""
        trained = tuple(p.requires_grad for p in self.network.parameters())
        if self.ddp is None or trained != self._trained:
            self.ddp = self._build()
            self._trained = trained
        return self.ddp(image, tabular, stage=stage)

    def _build(self) -> DistributedDataParallel:
        if not is_distributed():
            raise RuntimeError("DistributedTrainNetwork needs an initialised process group (init_distributed)")
        device = next(self.network.parameters()).device
        self.ddp = None  # the old reducer (and its gradient hooks) goes before the new one registers its own
        kwargs = {_NO_FORWARD_BUFFER_SYNC: False, "find_unused_parameters": self.find_unused_parameters}
        return DistributedDataParallel(
            TrainingForward(self.network),
            device_ids=[device] if device.type == "cuda" else None,
            **{**kwargs, **self.ddp_kwargs},
        )

    def sync_buffers(self, engine: Engine | None = None) -> None:
        """Give every rank rank 0's buffers (an Ignite handler; ``engine`` is unused)."""
        broadcast_buffers(self.network)

    def attach(self, engine: Engine) -> None:
        """Run :meth:`sync_buffers` after every optimizer step of ``engine``."""
        if not engine.has_event_handler(self.sync_buffers, IterationEvents.MODEL_COMPLETED):
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self.sync_buffers)
