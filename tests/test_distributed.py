"""configs/multi_gpu_train.json with 2 processes (torchrun, gloo on CPU) on tiny synthetic data.

The test starts ``torchrun --standalone --nproc_per_node 2`` on this file (``--worker``): each rank runs
``train.json`` + ``multi_gpu_train.json`` (both stages, 1 + 1 epochs), then saves its network state, its
last validation metric and a memory-bank write of its half of a fixed batch. The test then checks that the
replicas are identical (parameters and buffers, memory banks included), that the metric equals one
process's on the same cases with the same weights, and that the all-reduced memory write equals one
process's write of the whole batch. ``--no-sync`` trains without DDP (each rank on its own shard): the
replicas then differ, which shows the comparison can fail (``test_without_ddp_replicas_differ``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch

from bundle_helpers import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
MULTI = os.path.join(ROOT, "configs", "multi_gpu_train.json")
CASES = 30
BANK = {"num_modalities": 3, "feature_dim": 8, "num_slots": 4}


def tiny(data_dir: str, out: str, **extra) -> dict:
    """Overrides that make train.json run in seconds on CPU (32 px, resnet10, feature_dim 16, 1 + 1 epochs)."""
    return tiny_overrides(data_dir, out, **{"synthetic_cases": CASES, "batch_size": 4, **extra})


def bank_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded memory bank's slots and a fixed batch of 8 features with random presence."""
    g = torch.Generator().manual_seed(0)
    k, d, s = BANK["num_modalities"], BANK["feature_dim"], BANK["num_slots"]
    memory = torch.randn(k, s, d, generator=g)
    features = torch.randn(8, k, d, generator=g)
    present = torch.rand(8, k, generator=g) > 0.3
    return memory, features, present


def seeded_bank():
    from cmml_monai.networks.memory import ModalityMemoryBank

    bank = ModalityMemoryBank(**BANK)
    memory, _, _ = bank_batch()
    bank.memory.copy_(memory)
    bank.initialized.fill_(True)
    return bank


def worker(out: str, data_dir: str, no_sync: bool) -> None:
    """One rank: the memory write of its half batch, then both stages of the bundle."""
    from monai.bundle import ConfigWorkflow

    from cmml_monai.engines.distributed import get_rank, get_world_size

    extra = {"stage1#trainer#network": "@network", "train#trainer#network": "@network"} if no_sync else {}
    w = ConfigWorkflow(config_file=[TRAIN, MULTI], workflow_type="train", **tiny(data_dir, out, **extra))
    w.initialize()  # initialises the process group
    rank, world = get_rank(), get_world_size()
    bank = seeded_bank()
    _, features, present = bank_batch()
    half = features.shape[0] // world
    bank.update(features[rank * half : (rank + 1) * half], present[rank * half : (rank + 1) * half])
    w.run()
    evaluator = w.parser.get_parsed_content("validate#evaluator")
    result = {
        "world": world,
        "state": w.parser.get_parsed_content("network").state_dict(),
        "val_auc": evaluator.state.metrics["val_auc"],
        "val_cases": len(evaluator.data_loader.sampler),
        "train_sampler": type(w.parser.get_parsed_content("train#dataloader").sampler).__name__,
        "bank": bank.memory.clone(),
    }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    w.finalize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out: str, data_dir: str, no_sync: bool = False) -> list[dict]:
    # the CPU (gloo) form on every machine: two processes would need two GPUs for NCCL
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "--worker",
        out,
        data_dir,
    ] + (["--no-sync"] if no_sync else [])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from cmml_monai.data.synthetic import make_synthetic

    path = str(tmp_path_factory.mktemp("ddp_data") / "derm7pt")
    make_synthetic("derm7pt", path, cases=CASES, seed=0)
    return path


def _one_process_auc(data_dir: str, out: str, state: dict) -> tuple[float, int]:
    """The validation AUC of ``state`` over every validation view, computed by one process."""
    from monai.bundle import ConfigWorkflow

    from cmml_monai.metrics import macro_auc

    # on the CPU like the two processes (no bf16 autocast where a GPU is present)
    w = ConfigWorkflow(config_file=TRAIN, workflow_type="train", **tiny(data_dir, out, device="$torch.device('cpu')"))
    w.initialize()
    network = w.parser.get_parsed_content("network")
    network.load_state_dict(state)
    network.eval()
    views = w.parser.get_parsed_content("val_dataloader").dataset
    probs, labels = [], []
    with torch.no_grad():
        for item in views:
            tab = item.get("tabular")
            logits = network(item["image"][None].float(), None if tab is None else tab[None].float())
            probs.append(torch.softmax(logits.float(), dim=1)[0])
            labels.append(int(item["label"]))
    auc, _ = macro_auc(torch.stack(probs).numpy(), labels)
    return auc, len(views)


@pytest.mark.slow  # ~40 s, two processes: .ci/run runs it (pytest -m slow -k ...)
def test_two_processes_match_one(data_dir, tmp_path):
    out = str(tmp_path / "ddp")
    ranks = run_two_processes(out, data_dir)
    assert [r["world"] for r in ranks] == [2, 2]
    assert {r["train_sampler"] for r in ranks} == {"DistributedSampler"}
    # both stages ran and rank 0 wrote the files once
    for stage in ("stage1", "stage2"):
        assert os.path.isfile(os.path.join(out, stage, "checkpoint_epoch=1.pt")), stage
    assert os.path.isfile(os.path.join(out, "models", "model.pt"))
    assert os.path.isfile(os.path.join(out, "sweep", "sweep.csv"))
    # the replicas are identical: parameters and buffers (memory banks, BatchNorm statistics, flags)
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() and any(k.startswith("memory.memory") for k in s0)
    different = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not different, different[:5]
    assert bool(s0["stage2_trained"]) and bool(s0["memory.initialized"].all())
    # the served checkpoint is the trained network (stage 2's only epoch is its best), without DDP prefixes
    served = torch.load(os.path.join(out, "models", "model.pt"), weights_only=True)
    assert all(torch.equal(served[k], s0[k]) for k in s0)
    # validation: each rank scored its shard, the gathered metric is the one-process metric of all cases
    auc, cases = _one_process_auc(data_dir, str(tmp_path / "one"), s0)
    assert ranks[0]["val_cases"] + ranks[1]["val_cases"] == cases
    assert ranks[0]["val_auc"] == ranks[1]["val_auc"]
    assert ranks[0]["val_auc"] == pytest.approx(auc, abs=1e-6)
    # the all-reduced memory write of two half batches is one process's write of the whole batch
    bank = seeded_bank()
    _, features, present = bank_batch()
    bank.update(features, present)
    for r in ranks:
        torch.testing.assert_close(r["bank"], bank.memory, rtol=1e-6, atol=1e-6)


def test_overlay_run_list_follows_train_json():
    """multi_gpu_train.json replaces train.json's ``run`` list (rank-0 guards, barriers): every step of
    train.json must still be called there, so a step added to (or renamed in) train.json fails here."""
    import json
    import re

    with open(TRAIN) as f:
        single = json.load(f)["run"]
    with open(MULTI) as f:
        multi = " ".join(json.load(f)["run"])
    for step in single:
        callee = re.match(r"\$([\w.@#]+)\(", step).group(1)  # e.g. cmml_monai.evaluation.run_stage, @sweep.run
        assert callee in multi, f"train.json runs {callee}, configs/multi_gpu_train.json does not"


def test_one_process_without_group(monkeypatch):
    """Without a process group the helpers are no-ops; the DDP parts refuse with a message, not a hang."""
    from functools import partial

    from cmml_monai.engines import CMMLTrainer
    from cmml_monai.engines.distributed import (
        DistributedTrainNetwork,
        barrier,
        broadcast_buffers,
        get_rank,
        get_world_size,
        init_distributed,
        is_main_process,
        shard_sampler,
    )
    from cmml_monai.networks import CMMLNet, InputSpec, ModalityMemoryBank, MultiModalEncoder

    RESNET10 = partial(MultiModalEncoder, image_encoder="resnet10")

    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    barrier()
    net = CMMLNet(
        InputSpec(2, 3, 2, 3), feature_dim=16, encoder=RESNET10, memory=partial(ModalityMemoryBank, num_slots=4)
    )
    broadcast_buffers(net)
    assert shard_sampler(list(range(5))) is None
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()
    wrapped = DistributedTrainNetwork(net)
    assert wrapped(torch.randn(2, 6, 32, 32)).shape == (2, 3)  # forward is the served path
    with pytest.raises(RuntimeError, match="process group"):
        wrapped.forward_train(torch.randn(2, 6, 32, 32), None, stage=1)
    with pytest.raises(ValueError, match="forward_train"):
        DistributedTrainNetwork(torch.nn.Linear(2, 2))
    # the trainer attaches the buffer sync to the optimizer step
    trainer = CMMLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[],
        network=wrapped,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=lambda o, y: {},
        stage=1,
    )
    from monai.engines.utils import IterationEvents

    assert trainer.has_event_handler(wrapped.sync_buffers, IterationEvents.MODEL_COMPLETED)


def test_without_ddp_replicas_differ(data_dir, tmp_path):
    """The comparison above can fail: without DDP each rank steps on its own shard and the replicas drift."""
    if os.environ.get("CMML_SLOW_TESTS", "0") != "1":
        pytest.skip("negative control (another 2-process run): set CMML_SLOW_TESTS=1")
    ranks = run_two_processes(str(tmp_path / "nosync"), data_dir, no_sync=True)
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a rank of test_distributed (started by torchrun)")
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "DATA_DIR"), required=True)
    parser.add_argument("--no-sync", action="store_true", help="train without DDP (the negative control)")
    args = parser.parse_args()
    worker(*args.worker, no_sync=args.no_sync)


def test_sync_batchnorm_conversion_keeps_names_and_eval_outputs():
    """``convert_sync_batchnorm`` swaps every BatchNorm in place; checkpoints and the served path are unchanged.
    On CPU ``sync_batchnorm`` is refused with a message (PyTorch synchronises GPU tensors only)."""
    from functools import partial

    from cmml_monai.engines.distributed import DistributedTrainNetwork, convert_sync_batchnorm
    from cmml_monai.networks import CMMLNet, InputSpec, MultiModalEncoder

    torch.manual_seed(0)
    net = CMMLNet(
        InputSpec(2, 3, 2, 3), feature_dim=16, encoder=partial(MultiModalEncoder, image_encoder="resnet10")
    ).eval()
    image = torch.randn(2, 6, 32, 32)
    before, names = net(image), sorted(net.state_dict())
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert batchnorms > 0
    assert convert_sync_batchnorm(net) == batchnorms
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()) == batchnorms
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert sorted(net.state_dict()) == names
    torch.testing.assert_close(net(image), before)
    with pytest.raises(ValueError, match="not a single BatchNorm"):
        convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA.*on cpu"):
        DistributedTrainNetwork(net, sync_batchnorm=True)
