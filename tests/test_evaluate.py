"""configs/evaluate.json: the missing-rate sweep on saved masks, subsets, ROC plots, and the comparison table."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from scipy import stats

from cmml_monai.evaluation import (
    POOLED_PAIRED_COLUMNS,
    comparison_table,
    paired_table,
    pooled_comparison_table,
    pooled_paired_table,
    read_sweep,
    write_comparison_table,
    write_paired_table,
)
from cmml_monai.handlers import save_executed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
EVALUATE = os.path.join(ROOT, "configs", "evaluate.json")
RATES = [0.0, 0.1, 0.3, 0.5, 0.7]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("evaluate")
    return {"dataset_dir": str(base / "syn"), "shared_dir": str(base / "shared"), "base": base}


def _evaluate(method: str, shared: dict) -> tuple[ConfigWorkflow, str]:
    out = str(shared["base"] / method)
    w = ConfigWorkflow(
        config_file=[TRAIN, EVALUATE, os.path.join(ROOT, "configs", "methods", f"{method}.json")],
        workflow_type="train",
        bundle_root=ROOT,
        dataset_dir=shared["dataset_dir"],
        synthetic_cases=30,
        output_dir=out,
        shared_dir=shared["shared_dir"],
        spatial_size=[32, 32],
        feature_dim=16,
        batch_size=8,
        mlflow_enabled=False,
    )
    w.initialize()
    # a saved model to evaluate (its weights do not matter here)
    network = w.parser.get_parsed_content("network")
    path = w.parser.get_parsed_content("checkpoint")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(network.state_dict(), path)
    w.run()
    w.finalize()
    return w, out


def _read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_csv_rows_columns_and_ranges(shared):
    _, out = _evaluate("cmml", shared)
    rows = _read(os.path.join(out, "eval", "sweep.csv"))
    assert list(rows[0]) == ["method", "rate", "auc", "acc", "f1", "ece", "n"]
    assert [float(r["rate"]) for r in rows] == RATES
    assert {r["method"] for r in rows} == {"cmml"}
    for r in rows:
        for k in ("auc", "acc", "f1", "ece"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
    n_test = int(rows[0]["n"])
    assert n_test > 0 and all(int(r["n"]) == n_test for r in rows)  # rates never drop a case
    subsets = _read(os.path.join(out, "eval", "subsets.csv"))
    assert list(subsets[0]) == ["method", "subset", "auc", "acc", "f1", "ece", "n"]
    assert len(subsets) == 7 and subsets[0]["subset"] == "clinic+derm+table"
    assert all(int(r["n"]) <= n_test for r in subsets)
    for name in ["sweep.png", *(f"roc_rate{r:g}.png" for r in RATES)]:
        assert os.path.getsize(os.path.join(out, "eval", name)) > 0, name
    summary = json.load(open(os.path.join(out, "eval", "summary.json")))
    assert summary["avg_auc"] == pytest.approx(np.mean([float(r["auc"]) for r in rows]))
    masks = json.load(open(os.path.join(shared["shared_dir"], "masks_test.json")))
    assert sorted(float(k) for k in masks["masks"]) == RATES
    # the rate-0 mask is the natural presence; higher rates only remove modalities, never all of them
    m0 = np.array([[c == "1" for c in row] for row in masks["masks"]["0.0"]])
    m7 = np.array([[c == "1" for c in row] for row in masks["masks"]["0.7"]])
    assert (m7 <= m0).all() and m7.any(axis=1).all() and m7.sum() < m0.sum()


def test_second_method_reuses_the_same_masks_and_compares(shared):
    mask_file = os.path.join(shared["shared_dir"], "masks_test.json")
    if not os.path.isfile(mask_file):
        _evaluate("cmml", shared)
    before = open(mask_file).read()
    _, out = _evaluate("zero_fill", shared)
    assert open(mask_file).read() == before
    rows = read_sweep(str(shared["base"] / "cmml")) + read_sweep(out)
    columns, table = comparison_table(rows)
    assert [r["method"] for r in table] == ["cmml", "zero_fill"]
    assert columns[:7] == ["method", "AUC@0", "AUC@0.1", "AUC@0.3", "AUC@0.5", "AUC@0.7", "AVG AUC"]
    for row in table:
        assert row["AVG AUC"] == pytest.approx(np.mean([row[f"AUC@{r:g}"] for r in RATES]))
    csv_path, md_path = write_comparison_table(*comparison_table(rows), str(shared["base"] / "cmp"))
    assert len(_read(csv_path)) == 2
    assert open(md_path).read().count("\n") == 4


def test_comparison_rejects_different_rates():
    rows = [
        {"method": "a", "rate": 0.0, "auc": 0.5, "acc": 0.5, "f1": 0.5, "n": 1},
        {"method": "b", "rate": 0.3, "auc": 0.5, "acc": 0.5, "f1": 0.5, "n": 1},
    ]
    with pytest.raises(ValueError, match="rates"):
        comparison_table(rows)


def _sweep_rows(method: str, run: str, aucs: list[float], ece: float = 0.1) -> list[dict]:
    return [
        {"method": method, "rate": rate, "auc": auc, "acc": 0.5, "f1": 0.5, "ece": ece, "n": 10, "run": run}
        for rate, auc in zip([0.0, 0.5], aucs)
    ]


def test_comparison_ece_columns_bold_the_lowest_and_tolerate_old_sweeps(tmp_path):
    rows = _sweep_rows("cmml", "a", [0.9, 0.7], ece=0.05) + _sweep_rows("zero_fill", "b", [0.8, 0.6], ece=0.2)
    columns, table = comparison_table(rows)
    assert columns[columns.index("AVG F1") + 1 :][:3] == ["ECE@0", "ECE@0.5", "AVG ECE"]
    assert table[0]["AVG ECE"] == pytest.approx(0.05) and table[1]["AVG ECE"] == pytest.approx(0.2)
    _, md_path = write_comparison_table(*comparison_table(rows), str(tmp_path))
    cmml, zero = open(md_path).read().splitlines()[2:]
    assert "**0.0500**" in cmml and "0.2000" in zero and "**0.2000**" not in zero  # lower ECE is better
    # a sweep.csv without the ece column still compares; its ECE is NaN, never bold
    old = tmp_path / "old.csv"
    old.write_text("method,rate,auc,acc,f1,n\nold,0.0,0.8,0.5,0.5,10\nold,0.5,0.6,0.5,0.5,10\n")
    old_rows = read_sweep(str(old))
    assert np.isnan(old_rows[0]["ece"])
    columns, table = comparison_table(old_rows + _sweep_rows("cmml", "a", [0.9, 0.7], ece=0.05))
    assert np.isnan(table[0]["AVG ECE"]) and table[1]["AVG ECE"] == pytest.approx(0.05)
    # one method with an old and a new run: the ECE columns average the run that has them
    mixed = [dict(r, method="cmml") for r in old_rows] + _sweep_rows("cmml", "a", [0.9, 0.7], ece=0.05)
    (row,) = comparison_table(mixed)[1]
    assert row["AVG ECE"] == pytest.approx(0.05) and row["AVG AUC"] == pytest.approx((0.7 + 0.8) / 2)
    _, md_path = write_comparison_table(
        *comparison_table(old_rows + _sweep_rows("cmml", "a", [0.9, 0.7], ece=0.05)), str(tmp_path), "mixed"
    )
    assert "**0.0500**" in open(md_path).read().splitlines()[3]


def test_comparison_averages_runs_of_one_method():
    rows = (
        _sweep_rows("cmml", "seed0", [0.9, 0.7])
        + _sweep_rows("cmml", "seed1", [0.8, 0.6])
        + _sweep_rows("zero_fill", "seed0", [0.7, 0.5])
    )
    columns, table = comparison_table(rows)
    assert columns[-2:] == ["runs", "AVG AUC std"]
    cmml, zero = table
    assert cmml["runs"] == 2 and zero["runs"] == 1
    assert cmml["AUC@0"] == pytest.approx(0.85) and cmml["AUC@0.5"] == pytest.approx(0.65)
    assert cmml["AVG AUC"] == pytest.approx(0.75)
    assert cmml["AVG AUC std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert zero["AVG AUC std"] == 0.0
    with pytest.raises(ValueError, match="appears twice"):
        comparison_table(_sweep_rows("cmml", "seed0", [0.9, 0.7]) * 2)
    ragged = _sweep_rows("cmml", "seed0", [0.9, 0.7]) + _sweep_rows("cmml", "seed1", [0.8, 0.6])[:1]
    with pytest.raises(ValueError, match="run seed1"):
        comparison_table(ragged)


def _finished_run(out, method: str, aucs: list[float], seed: int | None, n: int = 10) -> str:
    """An output dir as train.json leaves it: sweep/sweep.csv, and config_executed.json with the seed."""
    os.makedirs(out / "sweep")
    rows = "".join(f"{method},{rate},{auc},0.5,0.5,0.1,{n}\n" for rate, auc in zip([0.0, 0.5], aucs))
    (out / "sweep" / "sweep.csv").write_text("method,rate,auc,acc,f1,ece,n\n" + rows)
    if seed is not None:
        (out / "config_executed.json").write_text(json.dumps({"method": method, "seed": seed}))
    return str(out)


def test_paired_table_differences_interval_and_errors(tmp_path):
    # per seed, AVG AUC cmml 0.80 / 0.70 / 0.90, zero_fill 0.75 / 0.70 / 0.80: differences -0.05, 0, -0.10
    runs = {
        ("cmml", 0): [0.9, 0.7],
        ("cmml", 1): [0.8, 0.6],
        ("cmml", 2): [1.0, 0.8],
        ("zero_fill", 0): [0.8, 0.7],
        ("zero_fill", 1): [0.8, 0.6],
        ("zero_fill", 2): [0.9, 0.7],
    }
    rows = [r for (m, s), a in runs.items() for r in read_sweep(_finished_run(tmp_path / f"{m}{s}", m, a, s))]
    assert {r["seed"] for r in rows} == {0, 1, 2}
    columns, (row,) = paired_table(rows)
    assert columns[:5] == ["method", "reference", "pairs", "seeds", "AVG AUC diff"]
    assert (row["method"], row["reference"], row["pairs"], row["seeds"]) == ("zero_fill", "cmml", 3, "0 1 2")
    assert row["AVG AUC diff"] == pytest.approx(-0.05) and row["diff std"] == pytest.approx(0.05)
    half = 4.302653 * 0.05 / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert row["CI low"] == pytest.approx(-0.05 - half) and row["CI high"] == pytest.approx(-0.05 + half)
    assert row["ahead"] == 0
    assert row["p"] == pytest.approx(0.2254, abs=1e-3)  # t = -sqrt(3), 2 degrees of freedom
    # the other way round: the same difference with the sign flipped
    (back,) = paired_table(rows, reference="zero_fill")[1]
    assert back["AVG AUC diff"] == pytest.approx(0.05) and back["ahead"] == 2 and back["p"] == pytest.approx(row["p"])
    csv_path, md_path = write_paired_table(*paired_table(rows, confidence=0.9), str(tmp_path / "cmp"), confidence=0.9)
    assert _read(csv_path)[0]["pairs"] == "3"
    assert "90% CI low" in open(md_path).read().splitlines()[0]
    # a run without a recorded seed pairs nothing; one pair gives no interval
    lone = read_sweep(_finished_run(tmp_path / "noseed", "mean_impute", [0.9, 0.9], None))
    one = read_sweep(_finished_run(tmp_path / "md0", "modality_dropout", [0.9, 0.9], 0))
    table = {r["method"]: r for r in paired_table(rows + lone + one)[1]}
    assert table["mean_impute"]["pairs"] == 0 and np.isnan(table["mean_impute"]["AVG AUC diff"])
    assert table["modality_dropout"]["pairs"] == 1 and np.isnan(table["modality_dropout"]["CI low"])
    # a sweep.csv next to its config is read too; a config two folders up of another kind of folder is not
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "sweep.csv").write_text((tmp_path / "cmml0" / "sweep" / "sweep.csv").read_text())
    (flat / "config_executed.json").write_text(json.dumps({"seed": 7}))
    assert read_sweep(str(flat / "sweep.csv"))[0]["seed"] == 7
    (flat / "other").mkdir()
    (flat / "other" / "sweep.csv").write_text((flat / "sweep.csv").read_text())
    assert read_sweep(str(flat / "other"))[0]["seed"] is None
    with pytest.raises(ValueError, match="reference method 'nope'"):
        paired_table(rows, reference="nope")
    with pytest.raises(ValueError, match="two runs with seed 0"):
        paired_table(rows + read_sweep(_finished_run(tmp_path / "again", "cmml", [0.5, 0.5], 0)))
    with pytest.raises(ValueError, match="same rates and cases"):
        paired_table(rows[:2] + read_sweep(_finished_run(tmp_path / "n20", "zero_fill", [0.5, 0.5], 0, n=20)))
    with pytest.raises(ValueError, match="confidence"):
        paired_table(rows, confidence=1.0)


def _compare_script():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import compare
    finally:
        sys.path.pop(0)
    return compare


def test_compare_script_collects_labelled_runs(shared, tmp_path):
    """scripts/compare.py: LABEL=PATH renames a run; the table lands as CSV and Markdown."""
    run = str(shared["base"] / "cmml")
    if not os.path.isfile(os.path.join(run, "eval", "sweep.csv")):
        _evaluate("cmml", shared)
    compare = _compare_script()
    out = str(tmp_path / "cmp")
    assert compare.main(["--runs", run, f"cmml_again={run}", "--out", out]) == 0
    table = _read(os.path.join(out, "comparison.csv"))
    assert [r["method"] for r in table] == ["cmml", "cmml_again"]
    assert table[0]["AVG AUC"] == table[1]["AVG AUC"] and table[0]["runs"] == "1"
    # no executed config (the run was made in-process), so no seed and no paired table
    assert not os.path.exists(os.path.join(out, "comparison_paired.csv"))
    # with the training run's config (train.json writes it), the relabelled copy pairs with it: difference 0
    with open(os.path.join(run, "config_executed.json"), "w") as f:
        json.dump({"method": "cmml", "seed": 3}, f)
    assert compare.main(["--runs", run, f"cmml_again={run}", "--out", out]) == 0
    (paired,) = _read(os.path.join(out, "comparison_paired.csv"))
    assert (paired["method"], paired["reference"], paired["pairs"]) == ("cmml_again", "cmml", "1")
    assert float(paired["AVG AUC diff"]) == 0.0 and paired["ahead"] == "0"
    assert compare.main(["--runs", str(tmp_path / "nothing_here"), "--out", out]) == 2


def test_compare_pools_strata_stratified_mean_and_welch_interval(tmp_path):
    """compare.py --pool: two draws, each compared on its own masks, pooled with equal weight per draw."""
    compare = _compare_script()
    # AVG AUC per seed; draw a: cmml - zero_fill = -0.05, 0, -0.10 (mean -0.05, std 0.05)
    # draw b: +0.02, +0.04, +0.03 (mean +0.03, std 0.01)
    draws = {
        "a": {"cmml": [0.80, 0.70, 0.90], "zero_fill": [0.75, 0.70, 0.80]},
        "b": {"cmml": [0.60, 0.70, 0.80], "zero_fill": [0.62, 0.74, 0.83]},
    }
    folders = []
    for draw, methods in draws.items():
        runs = [
            _finished_run(tmp_path / draw / f"{m}{s}", m, [avg + 0.05, avg - 0.05], s)
            for m, avgs in methods.items()
            for s, avg in enumerate(avgs)
        ]
        folder = str(tmp_path / f"compare_{draw}")
        assert compare.main(["--runs", *runs, "--out", folder]) == 0
        folders.append(f"draw_{draw}={folder}")
    out = str(tmp_path / "pooled")
    assert compare.main(["--pool", *folders, "--out", out]) == 0
    cmml, zero = _read(os.path.join(out, "comparison_pooled.csv"))
    assert (cmml["AVG AUC draw_a"], cmml["AVG AUC draw_b"], cmml["mean over strata"]) == ("0.8000", "0.7000", "0.7500")
    assert (zero["mean over strata"], cmml["strata best"], zero["strata best"]) == ("0.7400", "1", "1")
    (row,) = _read(os.path.join(out, "comparison_pooled_paired.csv"))
    assert (row["method"], row["reference"], row["strata"], row["pairs"], row["strata ahead"]) == (
        "zero_fill",
        "cmml",
        "2",
        "6",
        "1",
    )
    assert float(row["AVG AUC diff"]) == pytest.approx(-0.01)
    # variance (0.05^2/3 + 0.01^2/3) / 2^2; Welch-Satterthwaite df = 0.0026^2 / ((0.0025^2 + 0.0001^2) / 2)
    se, df = math.sqrt(0.0026 / 3) / 2, 0.0026**2 / ((0.0025**2 + 0.0001**2) / 2)
    assert float(row["df"]) == pytest.approx(df, abs=1e-4) and df == pytest.approx(2.1597, abs=1e-4)
    half = stats.t.ppf(0.975, df) * se
    assert float(row["CI low"]) == pytest.approx(-0.01 - half, abs=1e-4)
    assert float(row["CI high"]) == pytest.approx(-0.01 + half, abs=1e-4)
    assert "95% CI low" in open(os.path.join(out, "comparison_pooled_paired.md")).read()
    # a folder without a paired table (runs without seeds), and pooling next to training, are refused
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "comparison.csv").write_text((tmp_path / "compare_a" / "comparison.csv").read_text())
    assert compare.main(["--pool", folders[0], str(bare), "--out", out]) == 2
    with pytest.raises(SystemExit):
        compare.main(["--pool", folders[0], "--runs", folders[1], "--out", out])


def test_pooled_tables_refuse_strata_that_do_not_pool():
    def rows(method="zero_fill", pairs=3, std=0.01, reference="cmml"):
        return [{"method": method, "reference": reference, "pairs": pairs, "AVG AUC diff": 0.01, "diff std": std}]

    columns, (row,) = pooled_paired_table({"a": rows(), "b": rows(std=0.0)})
    assert columns == list(POOLED_PAIRED_COLUMNS) and row["AVG AUC diff"] == pytest.approx(0.01)
    # no spread anywhere: the difference, a zero-width interval and no p
    (flat,) = pooled_paired_table({"a": rows(std=0.0), "b": rows(std=0.0)})[1]
    assert flat["CI low"] == flat["CI high"] == pytest.approx(0.01) and math.isnan(flat["p"])
    with pytest.raises(ValueError, match="stratum 'b', method 'zero_fill': 1 seed pair"):
        pooled_paired_table({"a": rows(), "b": rows(pairs=1, std=math.nan)})
    with pytest.raises(ValueError, match="stratum 'b' has no seed-paired 'zero_fill'"):
        pooled_paired_table({"a": rows(), "b": rows(method="mean_impute")})
    with pytest.raises(ValueError, match="different references"):
        pooled_paired_table({"a": rows(), "b": rows(reference="zero_fill", method="cmml")})
    with pytest.raises(ValueError, match="no strata"):
        pooled_paired_table({})
    with pytest.raises(ValueError, match="confidence"):
        pooled_paired_table({"a": rows()}, confidence=95)
    with pytest.raises(ValueError, match=r"stratum 'b' has no runs of \['mean_impute'\]"):
        pooled_comparison_table(
            {
                "a": [{"method": "cmml", "AVG AUC": 0.8}, {"method": "mean_impute", "AVG AUC": 0.7}],
                "b": [{"method": "cmml", "AVG AUC": 0.8}],
            }
        )


def test_executed_config_rebuilt_from_command_line(tmp_path):
    argv = [
        "monai.bundle",
        "run",
        "--config_file",
        repr([TRAIN, os.path.join(ROOT, "configs", "methods", "zero_fill.json")]),
        "--stage1_epochs",
        "4",
        "--spatial_size",
        "[48, 48]",
        "--logging_file",
        "x.conf",
        "--freeze_crta",
        "true",
    ]
    path = save_executed_config(str(tmp_path / "c.json"), argv)
    cfg = json.load(open(path))
    assert cfg["method"] == "zero_fill" and cfg["stage1_epochs"] == 4 and cfg["spatial_size"] == [48, 48]
    assert cfg["freeze_crta"] is True and "logging_file" not in cfg
    assert save_executed_config(str(tmp_path / "none.json"), ["pytest"]) is None
