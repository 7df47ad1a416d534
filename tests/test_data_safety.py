"""Loading a checkpoint never runs code from it: every ``torch.load`` is ``weights_only=True``."""

from __future__ import annotations

import ast
import os
import pickle

import pytest
import torch
from ignite.engine import Engine

from cmml_monai.evaluation import publish_model
from cmml_monai.handlers.checkpoint import LoadNetworkHandler, ResumeHandler
from cmml_monai.networks.encoders import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Payload:
    """Unpickling it without ``weights_only`` calls ``open(path, "w")``: the file appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _torch_loads(folder: str) -> list[tuple[str, int, ast.Call]]:
    calls = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    func = getattr(node, "func", None)
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(func, ast.Attribute)
                        and func.attr == "load"
                        and isinstance(func.value, ast.Name)
                        and func.value.id == "torch"
                    ):
                        calls.append((path, node.lineno, node))
    return calls


def test_every_torch_load_in_the_package_and_scripts_is_weights_only():
    calls = _torch_loads(os.path.join(ROOT, "cmml_monai")) + _torch_loads(os.path.join(ROOT, "scripts"))
    assert len(calls) >= 4  # the sweep, publish_model, LoadNetworkHandler, load_pretrained
    unsafe = [
        f"{path}:{line}"
        for path, line, call in calls
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_checkpoint_loaders_refuse_a_file_that_would_run_code(tmp_path):
    marker = str(tmp_path / "code_ran")
    stage = tmp_path / "stage1"
    stage.mkdir()
    net = torch.nn.Linear(2, 2)
    torch.save({"network": net.state_dict(), "extra": _Payload(marker)}, stage / "checkpoint_epoch=1.pt")
    torch.save({"state_dict": net.state_dict(), "extra": _Payload(marker)}, tmp_path / "pretrained.pt")

    with pytest.raises(pickle.UnpicklingError):
        publish_model(str(tmp_path / "run"), [str(stage)], serve="last")
    with pytest.raises(pickle.UnpicklingError):
        LoadNetworkHandler(str(stage), net)(Engine(lambda e, b: None))
    with pytest.raises(pickle.UnpicklingError):
        load_pretrained(net, str(tmp_path / "pretrained.pt"))
    engine = Engine(lambda e, b: None)
    engine.state.device = torch.device("cpu")
    with pytest.raises(pickle.UnpicklingError):
        ResumeHandler(str(stage), {"network": net})(engine)
    assert not os.path.exists(marker)
    # the same file does run code when loaded without weights_only: the payload is real
    torch.load(stage / "checkpoint_epoch=1.pt", weights_only=False)
    assert os.path.exists(marker)
