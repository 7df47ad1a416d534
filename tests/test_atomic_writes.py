"""Output files are written atomically: a writer interrupted by an exception leaves no partial file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from ignite.engine import Engine, Events

from cmml_monai.data.jsonio import atomic_open, atomic_path, atomic_write_json, atomic_write_text
from cmml_monai.evaluation.report import write_comparison_table
from cmml_monai.handlers.checkpoint import BestCheckpointSaver, StageCheckpointSaver


class Interrupted(RuntimeError):
    pass


def _rows_then_interrupt():
    yield {"method": "cmml", "AVG AUC": 0.9}
    raise Interrupted("killed mid-write")


def test_atomic_helpers_keep_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("old complete content\n")
    with pytest.raises(Interrupted):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("method,auc\n")
            f.flush()
            raise Interrupted
    assert path.read_text() == "old complete content\n" and os.listdir(tmp_path) == ["sweep.csv"]
    with pytest.raises(Interrupted):
        with atomic_path(tmp_path / "new.png") as tmp:
            assert tmp.endswith("new.png") and os.path.dirname(tmp) == str(tmp_path)
            open(tmp, "wb").write(b"\x89PNG half")
            raise Interrupted
    assert os.listdir(tmp_path) == ["sweep.csv"]
    atomic_write_text(tmp_path / "a.md", "| a |\n")
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.md", "b.json", "sweep.csv"]
    assert os.stat(tmp_path / "a.md").st_mode & 0o044 == os.stat(tmp_path / "sweep.csv").st_mode & 0o044  # umask
    with pytest.raises(ValueError, match="mode must contain 'w' or 'x'"):
        with atomic_open(tmp_path / "a.md", "a"):
            pass


def test_interrupted_comparison_table_leaves_no_csv(tmp_path):
    with pytest.raises(Interrupted):
        write_comparison_table(["method", "AVG AUC"], _rows_then_interrupt(), str(tmp_path))
    assert os.listdir(tmp_path) == []


class _Unpicklable:
    """A checkpointed object whose state cannot be pickled: torch.save fails after opening its file."""

    def state_dict(self) -> dict:
        return {"f": lambda: 0}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.parametrize("saver_cls", [StageCheckpointSaver, BestCheckpointSaver])
def test_interrupted_checkpoint_save_leaves_no_partial_file(tmp_path, saver_cls):
    net = torch.nn.Linear(2, 1)
    save_dict = {"network": net, "bad": _Unpicklable()}
    engine = Engine(lambda e, b: None)
    if saver_cls is StageCheckpointSaver:
        saver = StageCheckpointSaver(str(tmp_path), save_dict, save_final=False)
    else:
        saver = BestCheckpointSaver(str(tmp_path), save_dict, key_metric_name="val_auc")
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=0.5))
    saver.attach(engine)
    with pytest.raises(Exception, match="pickle|lambda"):
        engine.run([0], max_epochs=1)
    assert os.listdir(tmp_path) == []
