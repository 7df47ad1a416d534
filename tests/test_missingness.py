"""Missingness: natural presence, seeded simulation, fixed subsets, NaN masking, mask files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.missingness import (
    all_subsets,
    apply_presence_mask,
    ensure_masks,
    fixed_subset_presence,
    natural_presence,
    save_masks,
    simulate_presence,
)


def _case_list() -> CaseList:
    mods = [ModalitySpec("a", "image2d", 3), ModalitySpec("b", "image2d", 3), ModalitySpec("table", "table", 0)]
    cases = [
        Case("1", "test", {"a": "x.jpg", "b": "y.jpg"}, 0, {"age": 3}),
        Case("2", "test", {"a": None, "b": "y.jpg"}, 1, {"age": None}, {"a": "file absent"}),
        Case("3", "train", {"a": "x.jpg", "b": None}, 0, {"age": ""}, {"b": "file absent"}),
    ]
    return CaseList("toy", mods, ["n", "p"], False, ["age"], cases)


def test_natural_presence():
    cl = _case_list()
    np.testing.assert_array_equal(natural_presence(cl), [[1, 1, 1], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(natural_presence(cl, cl.split("test")), [[1, 1, 1], [0, 1, 0]])
    assert natural_presence(cl, []).shape == (0, 3)


def test_simulate_seeded_keeps_one_and_respects_natural():
    rng = np.random.default_rng(5)
    natural = rng.random((500, 4)) < 0.8
    natural[~natural.any(1), 0] = True
    a = simulate_presence(natural, 0.5, seed=3)
    np.testing.assert_array_equal(a, simulate_presence(natural, 0.5, seed=3))
    assert not np.array_equal(a, simulate_presence(natural, 0.5, seed=4))
    assert a.any(1).all() and not (a & ~natural).any()
    np.testing.assert_array_equal(simulate_presence(natural, 0.0, seed=3), natural)
    full = simulate_presence(natural, 1.0, seed=3)
    assert (full.sum(1) == 1).all() and not (full & ~natural).any()
    # nested masks across rates for one seed
    assert not (simulate_presence(natural, 0.7, 3) & ~simulate_presence(natural, 0.3, 3)).any()
    with pytest.raises(ValueError, match="1.5"):
        simulate_presence(natural, 1.5, 0)
    with pytest.raises(ValueError, match="no modality"):
        simulate_presence(np.zeros((2, 3), bool), 0.1, 0)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7])
def test_empirical_drop_rate(rate):
    k, n = 3, 40000
    mask = simulate_presence(np.ones((n, k), bool), rate, seed=11)
    # dropping each with prob r, then restoring one when all k went: E[dropped] = r - r^k / k
    expected = rate - rate**k / k
    assert abs((1 - mask.mean()) - expected) < 0.01
    assert mask.any(1).all()


def test_fixed_subsets():
    natural = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 0]], bool)
    kept = fixed_subset_presence(natural, [True, False, True])
    np.testing.assert_array_equal(kept, [[1, 0, 1], [0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="entries"):
        fixed_subset_presence(natural, [True, False])
    subsets = all_subsets(3)
    assert len(subsets) == 7 and subsets[0] == (True, True, True) and len(set(subsets)) == 7


def test_apply_presence_mask_writes_nan_in_the_right_channels():
    image = torch.arange(2 * 7 * 2 * 2, dtype=torch.float32).reshape(2, 7, 2, 2)
    tab = torch.ones(2, 4)
    present = torch.tensor([[True, False, True, False], [False, True, True, True]])
    out, tout = apply_presence_mask(image, tab, present, [3, 1, 3])
    nan_channels = torch.isnan(out).flatten(2).all(2)
    assert nan_channels[0].tolist() == [False] * 3 + [True] + [False] * 3
    assert nan_channels[1].tolist() == [True] * 3 + [False] * 4
    assert not torch.isnan(out[~torch.isnan(out)]).any()
    assert torch.equal(out[0, :3], image[0, :3])  # untouched values kept
    assert torch.isnan(tout[0]).all() and torch.equal(tout[1], tab[1])
    assert not torch.isnan(image).any() and not torch.isnan(tab).any()  # inputs not modified
    # one int for all modalities, no table column, tabular None
    out2, none = apply_presence_mask(image[:, :6], None, np.array([[1, 0], [0, 1]], bool), 3)
    assert none is None and torch.isnan(out2[0, 3:]).all() and not torch.isnan(out2[0, :3]).any()
    with pytest.raises(ValueError, match="channels_per_modality"):
        apply_presence_mask(image, tab, present, 2)
    with pytest.raises(ValueError, match="present"):
        apply_presence_mask(image, tab, present[:, :2], [3, 1, 3])


def test_save_load_and_ensure(tmp_path):
    natural = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]], bool)
    ids, names = ["a", "b", "c", "d"], ["x", "y", "table"]
    masks = {r: simulate_presence(natural, r, 0) for r in (0.0, 0.5)}
    path = tmp_path / "masks_test.json"
    save_masks(path, ids, names, masks)
    data = json.loads(path.read_text())
    assert set(data["masks"]) == {"0.0", "0.5"} and data["masks"]["0.0"][1] == "011"
    loaded = ensure_masks(path, ids, names, natural, rates=(0.0, 0.5))  # an existing file is read, not remade
    for r in masks:
        np.testing.assert_array_equal(loaded[r], masks[r])
    with pytest.raises(DataError, match="other cases"):
        ensure_masks(path, ["a", "b", "c", "e"], names, natural, rates=(0.0, 0.5))
    with pytest.raises(DataError, match="modalities"):
        ensure_masks(path, ids, ["x", "z", "table"], natural, rates=(0.0, 0.5))
    ens = tmp_path / "ens" / "masks_valid.json"
    first = ensure_masks(ens, ids, names, natural, rates=(0.0, 0.3), seed=2)
    mtime = ens.stat().st_mtime_ns
    again = ensure_masks(ens, ids, names, natural, rates=(0.0, 0.3), seed=2)
    assert ens.stat().st_mtime_ns == mtime  # loaded, not rewritten
    for r in first:
        np.testing.assert_array_equal(first[r], again[r])
    with pytest.raises(DataError, match="seed"):
        ensure_masks(ens, ids, names, natural, rates=(0.0, 0.3), seed=3)
    with pytest.raises(DataError, match="rates"):
        ensure_masks(ens, ids, names, natural, rates=(0.0, 0.7), seed=2)
