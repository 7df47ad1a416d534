"""Crash safety: a real ``monai.bundle run`` process is SIGKILLed at several points and rerun with the same command.

The rerun must resume from the last complete epoch (at most one epoch lost), keep the stage-2 best score and
early-stopping state, leave no partial or temporary file, and end with the same sweep metrics as an
uninterrupted run of the same seed on CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from bundle_helpers import ROOT, TRAIN

EPOCHS = {"stage 1": 2, "stage 2": 3}
STAGE_RE = re.compile(r"cmml_monai\.evaluation\.workflow - INFO - (stage [12]): training for")
TRAINED_RE = re.compile(r"CMMLEvaluator - INFO - Engine run resuming from iteration 0, epoch (\d+) until")
RESUMED_RE = re.compile(r"resumed from \S*/(stage[12])/checkpoint_epoch=(\d+)\.pt at epoch (\d+)")
EPOCH_DONE_RE = re.compile(r"CMMLTrainer - INFO - Epoch\[(\d+)\] Complete")
TEMP_RE = re.compile(r"(^|/)(\.tmp-|tmp[a-z0-9_]{8}$)|\.tmp$")

# kill point -> (stage whose log line triggers it, the trigger)
KILL_POINTS = {
    # stage 1, epoch 2 trained but not yet validated nor saved: the worst case, a whole epoch lost
    "stage1_mid_epoch": ("stage 1", "CMMLEvaluator - INFO - Engine run resuming from iteration 0, epoch 1 until"),
    "between_stages": ("stage 2", "stage 2: training for"),
    # stage 2, epoch 3 trained: the best score and early-stop state of epochs 1-2 must survive
    "stage2_mid_epoch": ("stage 2", "CMMLEvaluator - INFO - Engine run resuming from iteration 0, epoch 2 until"),
    "sweep": ("stage 2", "sweep: loaded"),
}


def command(dataset_dir: str, out: str, *extra: str) -> list[str]:
    """The training command with tiny overrides (32 px, feature_dim 16, 2 + 3 epochs, 30 synthetic cases)."""
    args = {
        "bundle_root": ROOT,
        "dataset_dir": dataset_dir,
        "output_dir": out,
        "shared_dir": os.path.join(out, "shared"),
        "spatial_size": "[32,32]",
        "feature_dim": "16",
        "batch_size": "8",
        "synthetic_cases": "30",
        "stage1_epochs": str(EPOCHS["stage 1"]),
        "stage2_epochs": str(EPOCHS["stage 2"]),
        "progress_bar": "False",
        "missing_rates": "[0.0,0.5]",
        "sweep#subsets": "False",
        "sweep#roc": "False",
        "mlflow_enabled": "False",
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", TRAIN]
    for key, value in args.items():
        cmd += [f"--{key}", value]
    return cmd + list(extra)


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> str:
    """Run ``cmd`` to the end; its output (stdout and stderr)."""
    done = subprocess.run(
        cmd, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def run_and_kill(cmd: list[str], stage: str, trigger: str) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``trigger`` is logged while ``stage`` trains; the output up to then."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, current = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STAGE_RE.search(line)
            current = m.group(1) if m else current
            if current == stage and trigger in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the run ended before the kill point:\n" + "".join(lines[-30:]))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return "".join(lines)


def trained_epochs(log: str) -> dict[str, int]:
    """Per stage, the last epoch whose training pass finished in ``log`` (its validation started)."""
    reached, current = {}, None
    for line in log.splitlines():
        m = STAGE_RE.search(line)
        if m:
            current = m.group(1)
            reached[current] = 0
        m = TRAINED_RE.search(line)
        if m and current:
            reached[current] = int(m.group(1)) + 1
    return reached


def resumed_epochs(log: str) -> dict[str, int]:
    """Per stage, the epoch the rerun restored (0 where it started fresh)."""
    found = {f"stage {m.group(1)[-1]}": int(m.group(3)) for m in RESUMED_RE.finditer(log)}
    return {stage: found.get(stage, 0) for stage in EPOCHS}


def files(out: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names}


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def stage2_state(out: str) -> dict:
    state = torch.load(os.path.join(out, "stage2", "checkpoint_final.pt"), map_location="cpu", weights_only=True)
    return {"best": state["best"], "early_stop": state["early_stop"], "iteration": state["trainer"]["iteration"]}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("kill_resume_data") / "derm7pt")


@pytest.fixture(scope="module")
def reference(dataset_dir, tmp_path_factory) -> str:
    """One uninterrupted run, shared by every kill point."""
    out = str(tmp_path_factory.mktemp("kill_resume_reference") / "run")
    log = run(command(dataset_dir, out))
    # the run itself: every epoch trained once, nothing resumed
    assert [int(e) for e in EPOCH_DONE_RE.findall(log)] == [1, 2, 1, 2, 3]
    assert "resumed from" not in log
    return out


# the two kill points inside an epoch run by default; the other two are slow (~20 s each), run by .ci/run
POINTS = [p if "mid_epoch" in p else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS]


@pytest.mark.parametrize("point", POINTS)
def test_kill_and_rerun_matches_uninterrupted_run(point, dataset_dir, reference, tmp_path):
    out = str(tmp_path / "run")
    cmd = command(dataset_dir, out)
    killed = run_and_kill(cmd, *KILL_POINTS[point])
    temporaries = sorted(f for f in files(out) if TEMP_RE.search(f))  # a kill mid-write leaves one
    rerun = run(cmd)

    # resumed from the last complete epoch: at most one epoch of training is lost
    reached, restored = trained_epochs(killed), resumed_epochs(rerun)
    lost = {stage: reached.get(stage, 0) - restored[stage] for stage in EPOCHS}
    print(
        f"{point}: trained before the kill {reached}, resumed at {restored}, epochs lost {lost}, "
        f"temporary files after the kill {temporaries}"
    )
    assert all(0 <= n <= 1 for n in lost.values()), (point, reached, restored)
    # the rerun trains exactly the epochs after the restored ones, each stage in order
    expected = [e for stage in EPOCHS for e in range(restored[stage] + 1, EPOCHS[stage] + 1)]
    assert [int(e) for e in EPOCH_DONE_RE.findall(rerun)] == expected

    # the best score and the early-stopping state of stage 2 are those of the uninterrupted run
    assert stage2_state(out) == stage2_state(reference)

    # the same weights and metrics as the uninterrupted run of the same seed
    ours = torch.load(os.path.join(out, "models", "model.pt"), weights_only=True)
    theirs = torch.load(os.path.join(reference, "models", "model.pt"), weights_only=True)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert read(os.path.join(out, "sweep", "sweep.csv")) == read(os.path.join(reference, "sweep", "sweep.csv"))
    summary = json.loads(read(os.path.join(out, "sweep", "summary.json")))
    assert summary == json.loads(read(os.path.join(reference, "sweep", "summary.json")))

    # no partial or temporary file: the same files as the uninterrupted run
    assert files(out) == files(reference)


def test_error_inside_an_epoch_keeps_its_message_and_a_resumable_state(dataset_dir, tmp_path):
    """A Python error in stage 1's second epoch (here: a real handler that raises) surfaces as itself, not as a
    checkpoint error, leaves ``checkpoint_final.pt`` with the state at the error, and the rerun resumes epoch 2."""
    from ignite.engine import Events

    from bundle_helpers import tiny_overrides, workflow

    out = str(tmp_path / "run")
    overrides = tiny_overrides(
        dataset_dir,
        out,
        synthetic_cases=30,
        stage1_epochs=2,
        run=["$cmml_monai.evaluation.run_stage(@stage1#trainer, 'stage 1')"],
    )
    w = workflow(TRAIN, **overrides)
    trainer = w.parser.get_parsed_content("stage1#trainer")

    def fail(engine):
        raise ValueError("a bad batch in epoch 2")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=trainer.state.epoch_length + 1), fail)
    with pytest.raises(Exception) as raised:
        w.run()
    chain, e = [], raised.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, ValueError) and "a bad batch in epoch 2" in str(x) for x in chain)
    assert not any(isinstance(x, FileNotFoundError) for x in chain), chain
    stage1 = os.path.join(out, "stage1")
    assert sorted(os.listdir(stage1)) == ["checkpoint_epoch=1.pt", "checkpoint_final.pt"]
    final = torch.load(os.path.join(stage1, "checkpoint_final.pt"), weights_only=True)
    assert final["trainer"]["iteration"] == trainer.state.iteration == trainer.state.epoch_length + 1

    w = workflow(TRAIN, **overrides)
    w.run()
    assert w.parser.get_parsed_content("stage1#handlers#0").loaded_from.endswith("checkpoint_epoch=1.pt")
    assert w.parser.get_parsed_content("stage1#trainer").state.epoch == 2


def test_killed_run_continues_its_mlflow_runs(dataset_dir, tmp_path):
    """Killed in stage 2 and rerun, the run logs into the same MLflow parent and stage runs (local store)."""
    import mlflow

    out = str(tmp_path / "run")
    cmd = command(dataset_dir, out, "--mlflow_enabled", "True", "--experiment_name", "kill_resume")
    run_and_kill(cmd, *KILL_POINTS["stage2_mid_epoch"])
    before = json.loads(read(os.path.join(out, "mlflow_run.json")))
    rerun = run(cmd)
    assert "MLflow: continuing run" in rerun
    assert json.loads(read(os.path.join(out, "mlflow_run.json"))) == before

    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.join(out, "mlruns.db"))
    runs = client.search_runs([client.get_experiment_by_name("kill_resume").experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert [r.info.run_id for r in parents] == [before["parent"]]
    children = {r.data.tags["stage"]: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags}
    assert {k: r.info.run_id for k, r in children.items()} == before["children"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # every stage-2 epoch is in the one history: those before the kill and those after the resume
    steps = {m.step for m in client.get_metric_history(before["children"]["stage2"], "val_auc")}
    assert steps == set(range(1, EPOCHS["stage 2"] + 1))
    assert "test_avg_auc" in parents[0].data.metrics
