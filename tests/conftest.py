"""Shared pytest fixtures: small synthetic datasets in their native layouts, generated once per session."""

from __future__ import annotations

import os

import pytest
import torch
from monai.utils import set_determinism

from cmml_monai.data.synthetic import make_synthetic


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Factory ``(dataset, cases, dicom=False) -> (dataset_dir, manifest)``, cached for the session."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("synthetic_datasets")

    def make(dataset: str, cases: int, dicom: bool = False, seed: int = 0):
        key = (dataset, cases, dicom, seed)
        if key not in cache:
            out = os.path.join(str(root), f"{dataset}_{cases}_{'dicom' if dicom else 'std'}_{seed}")
            cache[key] = (out, make_synthetic(dataset, out, cases=cases, seed=seed, dicom=dicom))
        return cache[key]

    return make


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny tensors only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    """MONAI's determinism with seed 0 for the test, reset afterwards."""
    set_determinism(seed=0)
    yield
    set_determinism(seed=None)
