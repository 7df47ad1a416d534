"""The CUDA code path: bf16 autocast in the trainer and evaluator, CPU/CUDA agreement, cross-device weights.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
The rest of the suite also takes the CUDA path there, since the bundle's ``device`` is CUDA when present.
"""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.utils import set_determinism

from cmml_monai.data.missingness import all_subsets, apply_presence_mask
from cmml_monai.engines import CMMLEvaluator, CMMLTrainer, stage_optimizer
from cmml_monai.handlers import LoadNetworkHandler, MacroAUC
from cmml_monai.losses import CMMLLoss

from bundle_helpers import RESNET10, method_network

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CLASSES = 3


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 convolutions and matmuls would blur the CPU/CUDA comparison; bf16 autocast is unaffected."""
    set_determinism(seed=0)
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul
    set_determinism(seed=None)


def _net(method: str = "cmml") -> torch.nn.Module:
    torch.manual_seed(0)
    return method_network(
        method,
        image_modalities=2,
        image_channels=3,
        spatial_dims=2,
        num_classes=CLASSES,
        tabular_cardinalities=[0, 3],
        feature_dim=16,
        encoder=RESNET10,
    )


def _batches(n_batches: int = 2, seed: int = 0) -> list[dict]:
    """Batches holding every presence pattern of (image 1, image 2, table) plus a complete case, NaN where missing."""
    present = torch.tensor(all_subsets(3) + [(True, True, True)])
    b = present.shape[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        image = torch.randn(b, 6, 16, 16, generator=g)
        tab = torch.stack([torch.randn(b, generator=g), torch.randint(0, 3, (b,), generator=g).float()], 1)
        image, tab = apply_presence_mask(image, tab, present, 3)
        label = torch.arange(b) % CLASSES
        out.append({"image": image, "tabular": tab, "label": label, "case_id": [f"c{i}_{j}" for j in range(b)]})
    return out


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("amp", [True, False])
def test_trainer_runs_the_head_in_bf16_under_amp_and_keeps_float32_weights(stage, amp):
    net = _net().to(CUDA)
    head = net.aux_head if stage == 1 else net.fusion
    seen: list[torch.dtype] = []
    linear = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = [p.detach().clone() for p in net.parameters()]
    trainer = CMMLTrainer(
        device=CUDA,
        max_epochs=1,
        train_data_loader=_batches(),
        network=net,
        optimizer=stage_optimizer(net, stage, lr=1e-3, freeze_crta=(stage == 2)),
        loss_function=CMMLLoss(stage=stage),
        stage=stage,
        amp=amp,
        decollate=False,
    )
    trainer.run()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16 if amp else torch.float32}
    out = trainer.state.output
    assert out["pred"].dtype == torch.float32 and out["pred"].device.type == CUDA.type
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())
    assert all(p.dtype == torch.float32 and p.device.type == CUDA.type for p in net.parameters())
    assert all(torch.isfinite(p).all() for p in net.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert changed > 0


@pytest.mark.parametrize("method", ["cmml", "zero_fill", "modality_dropout", "mean_impute"])
def test_cuda_float32_forward_matches_cpu_for_every_pattern(method):
    net = _net(method).eval()
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = net(batch["image"], batch["tabular"])
        got = net.to(CUDA)(batch["image"].to(CUDA), batch["tabular"].to(CUDA)).cpu()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_bf16_inference_stays_close_to_float32():
    net = _net().to(CUDA).eval()
    batch = _batches(1)[0]
    image, tab = batch["image"].to(CUDA), batch["tabular"].to(CUDA)
    with torch.no_grad():
        full = torch.softmax(net(image, tab), dim=1)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            half = torch.softmax(net(image, tab).float(), dim=1)
    assert torch.isfinite(half).all()
    assert (half - full).abs().max().item() < 0.02


def test_evaluator_scores_bf16_predictions_like_float32_ones():
    net = _net("zero_fill").to(CUDA)

    def auc(amp: bool) -> float:
        metric = MacroAUC(activation="softmax", output_transform=lambda o: (o["pred"], o["label"]))
        ev = CMMLEvaluator(
            device=CUDA,
            val_data_loader=_batches(3),
            network=net,
            amp=amp,
            decollate=False,
            key_val_metric={"val_auc": metric},
        )
        ev.run()
        return ev.state.metrics["val_auc"]

    full, half = auc(False), auc(True)
    assert 0.0 <= half <= 1.0 and abs(half - full) < 0.05


def test_weights_trained_on_cuda_load_on_cpu(tmp_path):
    net = _net().to(CUDA)
    CMMLTrainer(
        device=CUDA,
        max_epochs=1,
        train_data_loader=_batches(),
        network=net,
        optimizer=stage_optimizer(net, 1, lr=1e-3),
        loss_function=CMMLLoss(stage=1),
        stage=1,
        amp=True,
        decollate=False,
    ).run()
    torch.save({"network": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    cpu_net = _net()
    loader = LoadNetworkHandler(str(tmp_path), cpu_net, required=True)  # how stage 2 starts from stage 1
    loader(Engine(lambda engine, batch: None))
    assert loader.loaded_from is not None
    batch = _batches(1, seed=1)[0]
    with torch.no_grad():
        on_cpu = cpu_net.eval()(batch["image"], batch["tabular"])
        on_cuda = net.eval()(batch["image"].to(CUDA), batch["tabular"].to(CUDA)).cpu()
    assert torch.allclose(on_cpu, on_cuda, atol=1e-4, rtol=1e-4)
    # the memory banks (buffers written in stage 1) travel with the weights
    assert any(not torch.equal(b, torch.zeros_like(b)) for n, b in cpu_net.named_buffers() if "memory" in n)


def test_sync_batchnorm_on_cuda_converts_the_network():
    """``multi_gpu_train.json``'s ``sync_batchnorm true``: the DDP training view converts the network's BatchNorms."""
    from cmml_monai.engines.distributed import DistributedTrainNetwork

    net = _net().to(CUDA)
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    wrapped = DistributedTrainNetwork(net, sync_batchnorm=True)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.network.modules()) == count > 0
