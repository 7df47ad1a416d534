"""MissingRateViews / validation_views: each validation case once per rate under its saved mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmml_monai.data.validation import MissingRateViews, PresenceMaskedDataset


def items(n: int, table: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        item = {"image": torch.full((6, 4, 4), float(i + 1)), "label": i % 2, "case_id": f"c{i}"}
        if table:
            item["tabular"] = torch.tensor([float(i), 1.0])
        out.append(item)
    return out


def test_views_apply_each_rates_mask():
    data = items(3)
    masks = {
        0.5: np.array([[True, False, True], [False, True, False], [True, True, False]]),
        0.0: np.ones((3, 3), dtype=bool),
    }
    views = MissingRateViews(data, ["c0", "c1", "c2"], masks, 3)
    assert len(views) == 6 and views.rates == [0.0, 0.5]
    for i in range(3):  # rates in ascending order: the first N views are the observed cases
        assert views[i]["missing_rate"] == 0.0 and torch.equal(views[i]["image"], data[i]["image"])
    v = views[3]  # case c0 at rate 0.5: second image and nothing else missing
    assert v["case_id"] == "c0" and v["missing_rate"] == 0.5 and v["label"] == 0
    assert torch.isnan(v["image"][3:]).all() and not torch.isnan(v["image"][:3]).any()
    assert not torch.isnan(v["tabular"]).any()
    v = views[4]  # c1: first image and the table missing
    assert torch.isnan(v["image"][:3]).all() and not torch.isnan(v["image"][3:]).any()
    assert torch.isnan(v["tabular"]).all()
    assert torch.isnan(views[-1]["tabular"]).all()  # negative index: the last view (c2, rate 0.5)
    assert not torch.isnan(data[1]["image"]).any()  # the wrapped items are not changed in place
    with pytest.raises(IndexError, match="out of range for 6 views"):
        views[6]


def test_views_without_a_table_use_only_the_image_columns():
    views = MissingRateViews(items(2, table=False), ["c0", "c1"], {0.3: np.array([[False, True], [True, True]])}, 3)
    assert torch.isnan(views[0]["image"][:3]).all() and "tabular" not in views[0]


def test_views_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="the dataset has 2 items but 3 case ids"):
        MissingRateViews(items(2), ["c0", "c1", "c2"], {0.0: np.ones((2, 3), bool)}, 3)
    with pytest.raises(ValueError, match=r"rate 0.5: the mask has shape \(3, 3\), expected \(2, k\)"):
        MissingRateViews(items(2), ["c0", "c1"], {0.5: np.ones((3, 3), bool)}, 3)
    with pytest.raises(ValueError, match="at least one rate"):
        MissingRateViews(items(2), ["c0", "c1"], {}, 3)
    views = MissingRateViews(items(2), ["c1", "c0"], {0.0: np.ones((2, 3), bool)}, 3)
    with pytest.raises(ValueError, match="item 0 is case 'c0', expected 'c1'"):
        views[0]


def test_validation_views_off_and_bad_rates(tmp_path):
    from cmml_monai.data.validation import validation_views

    data = items(2)
    assert validation_views(data, None, None, str(tmp_path)) is data
    assert validation_views(data, None, [], str(tmp_path)) is data
    with pytest.raises(ValueError, match=r"val_missing_rates must be in \[0, 1\), got \[1.0\]"):
        validation_views(data, None, [0.0, 1.0], str(tmp_path))


def test_presence_masked_dataset_exposes_the_chosen_cases_under_one_mask():
    data = items(3)
    mask = np.array([[False, False, False], [True, False, True], [False, True, True]])
    masked = PresenceMaskedDataset(data, ["c0", "c1", "c2"], mask, 3, indices=[2, 1], extra={"subset": "b"})
    assert len(masked) == 2 and [masked[i]["case_id"] for i in range(2)] == ["c2", "c1"]
    c2, c1 = masked[0], masked[1]
    assert torch.isnan(c2["image"][:3]).all() and torch.equal(c2["image"][3:], data[2]["image"][3:])
    assert torch.equal(c2["tabular"], data[2]["tabular"]) and c2["subset"] == "b"
    assert torch.isnan(c1["image"][3:]).all() and torch.equal(c1["image"][:3], data[1]["image"][:3])
    assert not torch.isnan(data[2]["image"]).any()  # masked copies
    with pytest.raises(ValueError, match=r"indices \[3\] are outside the dataset's 3 items"):
        PresenceMaskedDataset(data, ["c0", "c1", "c2"], mask, 3, indices=[3])
    with pytest.raises(IndexError, match="out of range for 2 items"):
        masked[2]
