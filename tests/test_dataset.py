"""Transform chains, packing into the batch contract, datasets with and without caching, loaders."""

from __future__ import annotations

import glob
import os
import shutil
from functools import partial

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import build_dataloader, build_dataset, collate_cases, data_dicts
from cmml_monai.data.errors import DataError
from cmml_monai.data.readers import load_image
from cmml_monai.data.table import TableSchema
from cmml_monai.data.transforms import ApplyToPresentd, PackModalitiesd, image_transforms, resolve_pixdim

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
SIZE_2D = (16, 20)


def _jpeg(path, seed, shape=(24, 36)):
    arr = np.random.default_rng(seed).integers(0, 256, size=(*shape, 3)).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=92)
    return str(path)


@pytest.fixture
def derm_like(tmp_path):
    """Four 2D cases: clinic missing in c1, the whole table empty in c2, one empty cell in c3."""
    rows = {
        "c0": {"sex": "female", "age": 50.0},
        "c1": {"sex": "male", "age": 70.0},
        "c2": {"sex": None, "age": float("nan")},
        "c3": {"sex": "", "age": 60.0},
    }
    cases = []
    for i, (cid, row) in enumerate(rows.items()):
        paths = {
            "clinic": None if cid == "c1" else _jpeg(tmp_path / f"{cid}_clinic.jpg", 10 * i),
            "derm": _jpeg(tmp_path / f"{cid}_derm.JPG", 10 * i + 1),
        }
        cases.append(Case(cid, "train" if i < 3 else "test", paths, label=i % 2, table=row))
    mods = [ModalitySpec("clinic", "image2d", 3), ModalitySpec("derm", "image2d", 3), ModalitySpec("table", "table")]
    case_list = CaseList("toy", mods, ["a", "b"], False, ["sex", "age"], cases)
    schema = TableSchema.fit([c.table for c in case_list.split("train")], ["sex", "age"], {"sex": "categorical"})
    return case_list, schema


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        assert x["case_id"] == y["case_id"]
        for k in ("image", "tabular", "label"):
            if k in x:
                torch.testing.assert_close(x[k], y[k], equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# chains and packing
# ------------------------------------------------------------------------------------------------
def test_2d_chain_resizes_scales_and_normalises(tmp_path):
    white = str(tmp_path / "white.png")
    Image.fromarray(np.full((30, 40, 3), 255, np.uint8)).save(white)
    out = image_transforms("image2d", (8, 10), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(load_image(white, "image2d"))
    assert tuple(out.shape) == (3, 8, 10) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [2.0, 1.0, 0.5], rtol=1e-5)  # (1 - 0.5) / std
    raw = image_transforms("image2d", (8, 10), mean=None, std=None)(load_image(white, "image2d"))
    np.testing.assert_allclose(raw.numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="spatial_size"):
        image_transforms("image2d", (8, 10, 4))
    with pytest.raises(ValueError, match="pixdim"):
        image_transforms("image2d", (8, 10), pixdim=(1.0, 1.0))


def test_3d_chain_takes_nifti_to_fixed_roi_with_requested_spacing():
    path = os.path.join(NIB_DATA, "anatomical.nii")  # 33 x 41 x 25 at 2 mm
    ref = nib.load(path)
    img = load_image(path, "image3d")
    chain = image_transforms("image3d", (20, 12, 16), pixdim=(3.0, 3.0, 4.0), keep_meta=True)
    out = chain(img)
    assert tuple(out.shape) == (1, 20, 12, 16)
    np.testing.assert_allclose(out.pixdim.numpy(), [3.0, 3.0, 4.0], rtol=1e-5)
    # nonzero z-score: the nonzero voxels of the resampled volume have mean 0 and std 1 before the
    # crop/pad, so the values stay in a plausible standardised range
    assert abs(float(out[out != 0].mean())) < 0.5 and 0.5 < float(out[out != 0].std()) < 1.5
    # the extent covered matches the source field of view: 33*2 mm / 3 mm = 22 voxels in x, cropped to 20
    extent = np.array(ref.shape) * np.array(ref.header.get_zooms()[:3]) / np.array([3.0, 3.0, 4.0])
    assert extent[0] > 20 and extent[1] > 12  # x, y cropped; z (12.5) padded to 16 with zeros
    assert torch.all(out[0, :, :, 0] == 0) and torch.all(out[0, :, :, -1] == 0)
    plain = image_transforms("image3d", (20, 12, 16), pixdim=(3.0, 3.0, 4.0))(img)
    assert type(plain) is torch.Tensor
    torch.testing.assert_close(plain, out.as_tensor())


def test_native_spacing_by_word_since_the_cli_drops_none():
    """``--pixdim native`` undoes an overlay's spacing (MONAI's command line ignores ``--pixdim None``)."""
    path = os.path.join(NIB_DATA, "anatomical.nii")  # 33 x 41 x 25 at 2 mm
    img = load_image(path, "image3d")
    native = image_transforms("image3d", (20, 12, 16), pixdim="native", keep_meta=True)(img)
    np.testing.assert_allclose(native.pixdim.numpy(), [2.0, 2.0, 2.0], rtol=1e-5)  # not resampled
    unresampled = image_transforms("image3d", (8, 8, 8), pixdim="None").transforms
    assert not any(type(t).__name__ == "Spacing" for t in unresampled)
    assert resolve_pixdim([1, 1, 2]) == (1.0, 1.0, 2.0) and resolve_pixdim(None) is None
    for bad in ("fast", [1.0, 2.0], [1.0, 0.0, 1.0], [1, "x", 1]):
        with pytest.raises(ValueError, match="pixdim must be 3 positive spacings in mm or 'native'"):
            resolve_pixdim(bad)


def test_apply_to_present_skips_missing():
    t = ApplyToPresentd(["a", "b"], image_transforms("image2d", (4, 4), mean=None, std=None))
    out = t({"a": None, "b": torch.full((3, 8, 8), 255.0)})
    assert out["a"] is None and tuple(out["b"].shape) == (3, 4, 4) and torch.allclose(out["b"], torch.ones(1))


def test_pack_nan_exactly_in_missing_channels_and_cells():
    schema = TableSchema.fit([{"sex": "f", "age": 40}, {"sex": "m", "age": 60}], ["sex", "age"], {"sex": "categorical"})
    pack = PackModalitiesd(["x", "y", "z"], 2, (3, 4), schema=schema)
    y = torch.randn(2, 3, 4)
    out = pack(
        {"case_id": 5, "x": torch.zeros(2, 3, 4), "y": y, "z": None, "table": {"sex": "m", "age": None}, "label": 1}
    )
    img = out["image"]
    assert tuple(img.shape) == (6, 3, 4) and img.dtype == torch.float32
    nan_channels = [bool(img[c].isnan().all()) for c in range(6)]
    assert nan_channels == [False, False, False, False, True, True]
    assert not img[:4].isnan().any()
    torch.testing.assert_close(img[2:4], y)
    assert out["tabular"].dtype == torch.float32 and out["tabular"][0] == 1.0 and out["tabular"][1].isnan()
    assert out["label"].dtype == torch.int64 and out["label"].ndim == 0 and int(out["label"]) == 1
    assert out["case_id"] == "5" and "x" not in out and "table" not in out
    empty = pack({"case_id": "6", "x": None, "y": y, "z": None, "table": {"sex": " ", "age": float("nan")}, "label": 0})
    assert empty["tabular"].isnan().all() and empty["tabular"].shape == (2,)


def test_pack_multilabel_no_table_and_errors():
    pack = PackModalitiesd(["l", "r"], 3, (2, 2), multi_label=True)
    out = pack({"case_id": "a", "l": torch.ones(3, 2, 2), "r": None, "label": [0, 1, 1, 0]})
    assert "tabular" not in out
    assert out["label"].dtype == torch.float32 and out["label"].tolist() == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(DataError, match="case b, modality l"):
        pack({"case_id": "b", "l": torch.ones(1, 2, 2), "r": None, "label": [0, 1]})
    with pytest.raises(DataError, match="case c: no label"):
        pack({"case_id": "c", "l": torch.ones(3, 2, 2), "r": None})
    unlabelled = PackModalitiesd(["l", "r"], 3, (2, 2), with_label=False)
    assert "label" not in unlabelled({"case_id": "d", "l": None, "r": torch.ones(3, 2, 2)})
    with pytest.raises(ValueError, match="channels"):
        PackModalitiesd(["l", "r"], [3, 1], (2, 2))


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def test_data_dicts(derm_like):
    case_list, _ = derm_like
    train = data_dicts(case_list, "train")
    assert [d["case_id"] for d in train] == ["c0", "c1", "c2"]
    assert train[1]["clinic"] is None and train[1]["derm"].endswith("c1_derm.JPG")
    assert train[0]["table"] == {"sex": "female", "age": 50.0} and train[0]["label"] == 0
    assert "label" not in data_dicts(case_list, None, with_label=False)[0]
    assert len(data_dicts(case_list, ["train", "test"])) == 4
    assert data_dicts(case_list, "valid") == []  # a standard split may be empty
    with pytest.raises(ValueError, match="validation"):
        data_dicts(case_list, "validation")


def test_build_dataset_items_follow_batch_contract(derm_like):
    case_list, schema = derm_like
    items = _items(build_dataset(case_list, "train", schema, spatial_size=SIZE_2D))
    assert [it["case_id"] for it in items] == ["c0", "c1", "c2"]
    for it in items:
        assert set(it) == {"image", "tabular", "label", "case_id"}
        assert tuple(it["image"].shape) == (6, *SIZE_2D) and it["image"].dtype == torch.float32
        assert tuple(it["tabular"].shape) == (2,) and it["label"].dtype == torch.int64
    assert items[1]["image"][:3].isnan().all() and not items[1]["image"][3:].isnan().any()
    assert not items[0]["image"].isnan().any()
    assert items[2]["tabular"].isnan().all()  # whole table missing
    assert not items[0]["tabular"].isnan().any()


def test_cached_and_persistent_match_uncached_and_cache_is_reused(derm_like, tmp_path):
    case_list, schema = derm_like
    kw = dict(spatial_size=SIZE_2D)
    plain = _items(build_dataset(case_list, "train", schema, **kw))
    cached_ds = build_dataset(case_list, "train", schema, cache="cache", num_workers=1, **kw)
    cached = _items(cached_ds)
    _assert_same_items(plain, cached)
    cached[0].pop("label")  # a consumer changing its item leaves the cache intact
    assert "label" in cached_ds[0]
    cache_dir = tmp_path / "cache"
    persistent = _items(build_dataset(case_list, "train", schema, cache="persistent", cache_dir=cache_dir, **kw))
    _assert_same_items(plain, persistent)
    files = sorted(glob.glob(str(cache_dir / "*" / "*.pt")))
    assert len(files) == 3
    stamps = [os.stat(f).st_mtime_ns for f in files]
    again = _items(build_dataset(case_list, "train", schema, cache="persistent", cache_dir=cache_dir, **kw))
    _assert_same_items(plain, again)
    assert sorted(glob.glob(str(cache_dir / "*" / "*.pt"))) == files
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # read back, not rewritten
    # reuse is real: a marker written into every cached item comes back from a fresh dataset
    for f in files:
        item = torch.load(f, weights_only=False)
        item["image"][:, 0, 0] = 123.0
        torch.save(item, f)
    marked = _items(build_dataset(case_list, "train", schema, cache="persistent", cache_dir=cache_dir, **kw))
    assert all(bool((it["image"][:, 0, 0] == 123.0).all()) for it in marked)
    # a rewritten source image is decoded again instead of served stale
    derm0 = case_list.cases[0].paths["derm"]
    Image.fromarray(np.zeros((24, 36, 3), np.uint8)).save(derm0)
    fresh = build_dataset(case_list, "train", schema, cache="persistent", cache_dir=cache_dir, **kw)[0]
    assert not bool((fresh["image"][:, 0, 0] == 123.0).any())
    black = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])  # (0 - mean) / std
    np.testing.assert_allclose(fresh["image"][3:, 0, 0].numpy(), black, rtol=1e-5)
    # other preprocessing settings never reuse those items: they decode again (and fail once files are gone)
    for case in case_list.cases:
        for p in case.paths.values():
            if p is not None:
                os.remove(p)
    with pytest.raises(DataError, match="c0"):
        build_dataset(case_list, "train", schema, cache="persistent", cache_dir=cache_dir, spatial_size=(8, 8))[0]
    with pytest.raises(ValueError, match="cache_dir"):
        build_dataset(case_list, "train", schema, cache="persistent", **kw)
    with pytest.raises(ValueError, match="memory"):
        build_dataset(case_list, "train", schema, cache="memory", **kw)


def test_case_cache_serves_what_monai_cache_dataset_serves(derm_like):
    """CaseCacheDataset fills its cache through CacheDataset's public ``runtime_cache`` container: the same
    cached items and, with a random augmentation after the cache, the same random draws as MONAI's own
    CacheDataset (filling the cache draws no random number); the preflight's cached part is that content."""
    from monai.data import CacheDataset
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from cmml_monai.data.augmentation import build_augmentation
    from cmml_monai.data.caching import CaseCacheDataset
    from cmml_monai.data.dataset import case_transforms
    from cmml_monai.data.preflight import _deterministic

    case_list, schema = derm_like
    chain = case_transforms(case_list, schema, SIZE_2D)
    data = data_dicts(case_list, "train")

    def dataset(kind):  # a Compose is seeded from MONAI's global seed when built: the same seed for both
        set_determinism(0)
        augment = build_augmentation([3, 3], 2, "default", seed=0)
        return kind(data, Compose([*chain.transforms, augment]), cache_rate=0.7, progress=False)

    try:
        ours, monai_cache = dataset(CaseCacheDataset), dataset(CacheDataset)
    finally:
        set_determinism(None)
    assert ours.cache_num == monai_cache.cache_num == 2
    assert all(ours.runtime_cache[i] is not None for i in range(ours.cache_num))
    _assert_same_items(_items(monai_cache) + _items(monai_cache), _items(ours) + _items(ours))
    deterministic = _deterministic(ours.transform)
    _assert_same_items([ours.runtime_cache[i] for i in range(2)], [deterministic(dict(d)) for d in data[:2]])
    with pytest.raises(ValueError, match="runtime_cache"):
        CaseCacheDataset(data, chain, runtime_cache=True)


def test_dataloader_collates_and_seeds(derm_like):
    case_list, schema = derm_like
    ds = build_dataset(case_list, ["train", "test"], schema, spatial_size=SIZE_2D, cache="cache")
    batches = list(build_dataloader(ds, batch_size=3, shuffle=False))
    assert [len(b["case_id"]) for b in batches] == [3, 1]
    b = batches[0]
    assert b["case_id"] == ["c0", "c1", "c2"] and all(isinstance(c, str) for c in b["case_id"])
    assert tuple(b["image"].shape) == (3, 6, *SIZE_2D) and tuple(b["tabular"].shape) == (3, 2)
    assert b["label"].dtype == torch.int64 and tuple(b["label"].shape) == (3,)

    def order(seed: int) -> list[str]:
        return [c for bb in build_dataloader(ds, 2, shuffle=True, seed=seed) for c in bb["case_id"]]

    assert order(3) == order(3) and sorted(order(3)) == ["c0", "c1", "c2", "c3"]
    assert any(order(s) != order(3) for s in range(4, 10))
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(ds, 0)
    # DDP: each rank gets its own shard, together every case once
    from monai.data import DistributedSampler

    shards = [
        [
            c
            for bb in build_dataloader(ds, 2, sampler=DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False))
            for c in bb["case_id"]
        ]
        for r in range(2)
    ]
    assert sorted(shards[0] + shards[1]) == ["c0", "c1", "c2", "c3"] and len(shards[0]) == len(shards[1]) == 2
    with pytest.raises(ValueError, match="different keys"):
        collate_cases([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def test_inference_without_labels(derm_like):
    case_list, schema = derm_like
    for c in case_list.cases:
        c.label = None
    ds = build_dataset(case_list, None, schema, spatial_size=SIZE_2D, with_label=False)
    batch = collate_cases(_items(ds))
    assert "label" not in batch and batch["case_id"] == ["c0", "c1", "c2", "c3"]
    with pytest.raises(DataError, match="no label"):
        build_dataset(case_list, None, schema, spatial_size=SIZE_2D)[0]


def test_bad_image_in_dataset_names_case_and_file(derm_like):
    case_list, schema = derm_like
    bad = case_list.cases[0].paths["derm"]
    raw = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        build_dataset(case_list, "train", schema, spatial_size=SIZE_2D)[0]
    assert "case c0" in str(info.value) and "c0_derm.JPG" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="c0_derm.JPG"):  # the in-memory cache decodes when built
        build_dataset(case_list, "train", schema, spatial_size=SIZE_2D, cache="cache")


def test_3d_dataset_with_missing_sequence(tmp_path):
    src = os.path.join(NIB_DATA, "anatomical.nii")
    cases = []
    for i in range(2):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        shutil.copy(src, folder / f"case{i}-t1c.nii")
        t2 = None
        if i == 0:
            t2 = str(folder / f"case{i}-t2w.nii.gz")
            nib.save(nib.load(src), t2)
        cases.append(Case(f"case{i}", "train", {"t1c": str(folder / f"case{i}-t1c.nii"), "t2w": t2}, label=i))
    mods = [ModalitySpec("t1c", "image3d", 1), ModalitySpec("t2w", "image3d", 1)]
    case_list = CaseList("men_toy", mods, ["low", "high"], False, [], cases)
    ds = build_dataset(case_list, "train", None, spatial_size=(12, 12, 8), pixdim=(4.0, 4.0, 4.0), cache="cache")
    a, b = ds[0], ds[1]
    assert "tabular" not in a
    assert tuple(a["image"].shape) == (2, 12, 12, 8)
    torch.testing.assert_close(a["image"][0], a["image"][1])  # same volume, .nii and .nii.gz
    assert b["image"][1].isnan().all() and not b["image"][0].isnan().any()


@pytest.mark.parametrize(
    "dataset, dicom, size, pixdim",
    [
        ("derm7pt", False, (24, 24), None),
        ("men", True, (16, 16, 12), (6.0, 6.0, 6.0)),
    ],
)
def test_real_adapters_on_synthetic_data(synthetic_dataset, dataset, dicom, size, pixdim):
    from cmml_monai.data.adapters import load_dataset

    dataset_dir, _ = synthetic_dataset(dataset, 12, dicom=dicom)
    case_list = load_dataset(dataset, dataset_dir)
    schema = TableSchema.fit([c.table for c in case_list.split("train")], case_list.table_columns)
    ds = build_dataset(case_list, "train", schema, spatial_size=size, pixdim=pixdim)
    batch = next(iter(build_dataloader(ds, batch_size=len(ds))))
    mods = case_list.image_modalities
    c = mods[0].channels
    assert tuple(batch["image"].shape) == (len(ds), len(mods) * c, *size)
    assert tuple(batch["tabular"].shape) == (len(ds), schema.num_features)
    # NaN channels exactly where the adapter says a modality is missing
    cases = {cc.case_id: cc for cc in case_list.split("train")}
    for row, cid in enumerate(batch["case_id"]):
        for i, m in enumerate(mods):
            missing = cases[cid].paths.get(m.name) is None
            block = batch["image"][row, i * c : (i + 1) * c]
            assert bool(block.isnan().all()) == missing and bool(block.isnan().any()) == missing
    if dicom:  # both DICOM readers give the same packed tensors through the whole chain
        other = build_dataset(case_list, "train", schema, spatial_size=size, pixdim=pixdim, reader="pydicom")
        again = collate_cases(_items(other))
        assert again["case_id"] == batch["case_id"]
        torch.testing.assert_close(again["image"], batch["image"], equal_nan=True, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bounded caches
# ------------------------------------------------------------------------------------------------
def test_item_size_matches_a_decoded_item(derm_like):
    from cmml_monai.data.dataset import item_nbytes

    case_list, schema = derm_like
    item = build_dataset(case_list, "train", schema, spatial_size=SIZE_2D)[0]
    decoded = item["image"].numel() * 4 + item["tabular"].numel() * 4
    # the estimate: 6 channels x 16 x 20 float32, plus the 2 table columns and one spare float
    assert item_nbytes(case_list, SIZE_2D) == 4 * (6 * 16 * 20 + 2 + 1)
    assert decoded <= item_nbytes(case_list, SIZE_2D) <= decoded + 8


def test_memory_cache_keeps_only_what_fits(derm_like, caplog):
    from cmml_monai.data.dataset import item_nbytes

    caplog.set_level("INFO", logger="cmml_monai.data.dataset")
    case_list, schema = derm_like
    one = item_nbytes(case_list, SIZE_2D)
    kw = dict(spatial_size=SIZE_2D, cache="cache", num_workers=1)
    bounded = build_dataset(case_list, "train", schema, cache_max_gb=2.5 * one / 1e9, **kw)
    assert bounded.cache_num == 2 and "2 of 3 items fit in cache_max_gb" in caplog.text
    # the items past the bound are decoded at each access, identical to the cached ones
    _assert_same_items(_items(bounded), _items(build_dataset(case_list, "train", schema, **kw)))
    assert build_dataset(case_list, "train", schema, cache_max_gb=1.0, **kw).cache_num == 3
    with pytest.raises(ValueError, match="cache_max_gb must be > 0"):
        build_dataset(case_list, "train", schema, cache_max_gb=0, **kw)


def test_persistent_cache_over_its_bound_is_refused_before_writing(derm_like, tmp_path):
    from cmml_monai.data.dataset import item_nbytes

    case_list, schema = derm_like
    one = item_nbytes(case_list, SIZE_2D)
    cache_dir = tmp_path / "pcache"
    persistent = partial(
        build_dataset, case_list, "train", schema, spatial_size=SIZE_2D, cache="persistent", cache_dir=str(cache_dir)
    )
    with pytest.raises(DataError, match=r"persistent cache of split train needs about .* GB \(3 items\), more than"):
        persistent(cache_max_gb=2 * one / 1e9)
    assert not cache_dir.exists()  # nothing written
    ds = persistent(cache_max_gb=4 * one / 1e9)
    assert len(_items(ds)) == 3
