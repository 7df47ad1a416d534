"""Training augmentation (present modalities only, after the cache) and class-balanced losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Compose

from cmml_monai.data.augmentation import AugmentPresentd, augmentation_chain, build_augmentation
from cmml_monai.data.balance import class_weights
from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import build_dataset
from cmml_monai.losses import CMMLLoss


@pytest.mark.parametrize("dims,preset", [(2, "light"), (2, "default"), (3, "light"), (3, "default")])
def test_missing_modality_stays_nan_present_one_changes(dims: int, preset: str) -> None:
    spatial = (16,) * dims
    image = torch.randn(2 * 3, *spatial)
    image[3:] = float("nan")  # second modality missing
    aug = build_augmentation([3, 3], dims, preset, seed=1)
    changed = 0
    for _ in range(5):
        out = aug({"image": image.clone(), "case_id": "a"})
        assert out["case_id"] == "a"
        assert out["image"].shape == image.shape
        assert bool(out["image"][3:].isnan().all()), "a missing modality must stay all-NaN"
        assert bool(out["image"][:3].isfinite().all()), "augmentation must not bring NaN into a present modality"
        changed += int(not torch.equal(out["image"][:3], image[:3]))
    assert changed >= 4  # flips alone change a random image with probability 0.75 (2D) / 0.875 (3D)


def test_each_modality_gets_its_own_draw_and_the_seed_repeats() -> None:
    image = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8).repeat_interleave(1, 0)
    image = torch.cat([image[:1], image[:1]])  # two identical one-channel modalities
    # a chain that flips with probability 1/2: identical inputs differ when the draws differ
    chain = Compose([augmentation_chain(2, "light").transforms[0]])
    outs = [AugmentPresentd([1, 1], chain).set_random_state(3)({"image": image})["image"] for _ in range(2)]
    assert torch.equal(outs[0], outs[1]), "the same seed gives the same augmentation"
    draws = [AugmentPresentd([1, 1], chain).set_random_state(s)({"image": image})["image"] for s in range(12)]
    assert any(not torch.equal(d[0], d[1]) for d in draws), "modalities are augmented independently"


def test_bad_arguments_raise_value_error() -> None:
    assert build_augmentation([3], 2, "none") is None
    with pytest.raises(ValueError, match="augmentation must be one of"):
        build_augmentation([3], 2, "strong")
    with pytest.raises(ValueError, match="spatial_dims"):
        augmentation_chain(4)
    with pytest.raises(ValueError, match="channels"):
        AugmentPresentd([0], augmentation_chain(2))
    with pytest.raises(ValueError, match="has 4 channels"):
        build_augmentation([3], 2, "light")({"image": torch.zeros(4, 8, 8)})


def _case_list(labels: list, multi_label: bool = False) -> CaseList:
    cases = [
        Case(case_id=str(i), split="train", paths={}, label=lab, table={"x": float(i)}) for i, lab in enumerate(labels)
    ]
    names = ["a", "b", "c"]
    return CaseList("toy", [ModalitySpec("table", "table", 1)], names, multi_label, ["x"], cases)


def test_class_weights_inverse_frequency_keeps_the_loss_scale() -> None:
    labels = [0] * 6 + [1] * 3 + [2] * 1
    w = np.asarray(class_weights(_case_list(labels), "balanced"))
    counts = np.array([6, 3, 1])
    # inverse frequency, rescaled so that the weighted mean over the cases is 1
    raw = 10 / (3 * counts)
    np.testing.assert_allclose(w, raw / ((raw * counts).sum() / 10), rtol=1e-6)
    np.testing.assert_allclose((w * counts).sum() / 10, 1.0, rtol=1e-6)
    w_sqrt = np.asarray(class_weights(_case_list(labels), "sqrt"))
    np.testing.assert_allclose(w_sqrt[2] / w_sqrt[0], np.sqrt(6.0), rtol=1e-6)
    assert class_weights(_case_list(labels), "none") is None
    with pytest.raises(ValueError, match=r"no train case of classes \['c'\]"):
        class_weights(_case_list([0, 1, 1]), "balanced")
    with pytest.raises(ValueError, match="class_balance must be one of"):
        class_weights(_case_list(labels), "inverse")


def test_multi_label_weights_are_negative_over_positive() -> None:
    labels = [[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 1]]
    w = class_weights(_case_list(labels, multi_label=True), "balanced")
    assert w is not None
    np.testing.assert_allclose(w[:2], [3.0, 3.0])
    with pytest.raises(ValueError, match=r"labels \['c'\]"):
        class_weights(_case_list([[1, 0, 0], [0, 1, 0]], multi_label=True), "balanced")


def test_loss_uses_the_class_weights() -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 2])
    weight = [0.5, 1.0, 3.0]
    got = CMMLLoss(stage=2, class_weight=weight)({"logits": logits}, label)["cls"]
    expected = F.cross_entropy(logits, label, weight=torch.tensor(weight))
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, F.cross_entropy(logits, label))
    multi = torch.tensor([[1.0, 0.0, 1.0]] * 6)
    got = CMMLLoss(stage=2, multi_label=True, class_weight=weight)({"logits": logits}, multi)["cls"]
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(logits, multi, pos_weight=torch.tensor(weight)))
    with pytest.raises(ValueError, match="class_weight has 3 weights but the logits have 2"):
        CMMLLoss(stage=2, class_weight=weight)({"logits": torch.randn(2, 2)}, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positive"):
        CMMLLoss(stage=2, class_weight=[1.0, 0.0])


def test_cached_dataset_decodes_once_and_augments_per_access(tmp_path) -> None:
    from PIL import Image

    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    cases = [
        Case(case_id="0", split="train", paths={"photo": paths[0], "derm": None}, label=0, table={}),
        Case(case_id="1", split="train", paths={"photo": paths[1], "derm": paths[0]}, label=1, table={}),
    ]
    mods = [ModalitySpec("photo", "image2d", 3), ModalitySpec("derm", "image2d", 3)]
    case_list = CaseList("toy", mods, ["a", "b"], False, [], cases)
    aug = build_augmentation([3, 3], 2, "default", seed=0)
    ds = build_dataset(case_list, "train", None, spatial_size=(16, 16), cache="cache", augment=aug)
    plain = build_dataset(case_list, "train", None, spatial_size=(16, 16), cache="cache")
    first, second = ds[0]["image"], ds[0]["image"]
    assert bool(first[3:].isnan().all()) and bool(first[:3].isfinite().all())
    assert not torch.equal(first, second), "each access draws a new augmentation"
    assert torch.equal(plain[0]["image"][:3], plain[0]["image"][:3])
    # the cache holds the un-augmented item: augmentation never writes into it
    assert not torch.equal(plain[0]["image"][:3], first[:3]) or not torch.equal(plain[0]["image"][:3], second[:3])
