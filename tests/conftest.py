"""Shared pytest fixtures: small synthetic datasets in their native layouts and a real MLflow server, made once
per session (per xdist worker), and the thread budget of a worker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from monai.utils import set_determinism

from cmml_monai.data.synthetic import make_synthetic

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist (addopts: -n auto): the cores are shared by the workers, so each worker, and the runs it starts
    # in subprocesses, gets its share of threads instead of all of them (2 workers x 2 threads on 2 cores thrash)
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real ``mlflow server`` on 127.0.0.1 with a sqlite store, started once for the tests that use it."""
    tmp_path = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server_artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
