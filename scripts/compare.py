"""Compare methods on the same masks: train + sweep each method (or collect finished runs), one table.

Examples::

    # collect runs that already finished (their sweep.csv)
    python scripts/compare.py --runs outputs/derm7pt_cmml outputs/derm7pt_zero_fill --out outputs/compare

    # a run under another name (an ablation made with an override): LABEL=PATH
    python scripts/compare.py --runs cmml=outputs/a cmml_obs=outputs/b --out outputs/compare

    # train and sweep every method with the same data, masks and epoch budget, three training
    # seeds each (mean and std over the seeds), then compare
    python scripts/compare.py --methods cmml zero_fill modality_dropout mean_impute --seeds 0 1 2 \\
        --config configs/datasets/odir.json --out outputs/compare_odir -- --dataset_dir /data/ODIR-5K

    # pool several such folders (dataset draws, sites, folds): is a method ahead on data of this kind?
    python scripts/compare.py --pool drawA=outputs/compare_a drawB=outputs/compare_b --out outputs/pooled

Besides ``comparison.csv`` / ``.md`` (every method's mean over its runs) it writes
``comparison_paired.csv`` / ``.md`` when runs of two methods share a training seed: each method's
AVG AUC minus the reference's (``--reference``, default the first method), seed by seed, with the
95% interval of the mean difference, the seeds in which it was ahead and the paired t-test's p.

``--pool`` reads each folder's ``comparison.csv`` and ``comparison_paired.csv`` and writes
``comparison_pooled.csv`` / ``.md`` (each method's AVG AUC per stratum, the mean over strata, in how
many it was the best) and ``comparison_pooled_paired.csv`` / ``.md``: the seed-paired difference
against the reference averaged over strata (each stratum weighs the same), with a Welch-Satterthwaite
t interval built from every stratum's seed-to-seed spread (at least two seeds per stratum).

Arguments after ``--`` are passed to every ``python -m monai.bundle run`` call unchanged. The masks,
the data split and the table schema come from one ``shared`` folder under ``--out``, so every method
and seed is evaluated on the same cases with the same missing modalities.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(method: str, configs: list[str], out: str, extra: list[str], seed: int | None = None) -> str:
    output_dir = os.path.join(out, method if seed is None else f"{method}_seed{seed}")
    files = [
        os.path.join(ROOT, "configs", "train.json"),
        *configs,
        os.path.join(ROOT, "configs", "methods", f"{method}.json"),
    ]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(files),
        "--bundle_root",
        ROOT,
        "--output_dir",
        output_dir,
        "--shared_dir",
        os.path.join(out, "shared"),
        "--logging_file",
        os.path.join(ROOT, "configs", "logging.conf"),
        *extra,
    ]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return output_dir


def _label_and_path(spec: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain path (even one containing "=") -> (None, PATH)."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and not os.path.exists(spec) else (None, spec)


def _pool(specs: list[str], out: str, name: str) -> int:
    """``--pool``: one stratum per compare.py output folder; writes ``<name>_pooled`` and ``<name>_pooled_paired``."""
    from cmml_monai.evaluation.pooled import pooled_comparison_table, pooled_paired_table, read_comparison_folder
    from cmml_monai.evaluation.report import write_comparison_table, write_paired_table

    try:
        comparisons, paired = {}, {}
        for spec in specs:
            label, folder = _label_and_path(spec)
            label = label or os.path.basename(os.path.normpath(folder))
            if label in comparisons:
                raise ValueError(f"two strata named {label!r}: name them with LABEL=FOLDER")
            comparisons[label], paired[label] = read_comparison_folder(folder, name)
        columns, table = pooled_comparison_table(comparisons)
        paired_columns, pooled = pooled_paired_table(paired)
        paths = [
            *write_comparison_table(columns, table, out, f"{name}_pooled"),
            *write_paired_table(paired_columns, pooled, out, f"{name}_pooled"),
        ]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nAVG AUC over {len(comparisons)} strata ({', '.join(comparisons)}):")
    for row in table:
        print(
            f"{row['method']}: mean {row['mean over strata']:.4f}, best in {row['strata best']} of {len(comparisons)}"
        )
    if pooled:
        print(f"\npooled seed-paired AVG AUC difference against {pooled[0]['reference']} (95% CI; strata where ahead):")
    for row in pooled:
        print(
            f"{row['method']}: {row['AVG AUC diff']:+.4f} [{row['CI low']:+.4f}, {row['CI high']:+.4f}]"
            f" ahead in {row['strata ahead']} of {row['strata']} strata ({row['pairs']} pairs)"
        )
    print(f"\nwritten: {', '.join(paths)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="finished output dirs (or sweep.csv files) to collect; LABEL=PATH renames the method",
    )
    parser.add_argument("--methods", nargs="*", default=[], help="methods to train and sweep (configs/methods/*.json)")
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=None,
        help="train each method once per seed (runs of one method are averaged)",
    )
    parser.add_argument("--config", nargs="*", default=[], help="overlays after train.json (e.g. a dataset overlay)")
    parser.add_argument("--out", required=True, help="output folder of the table (and of the trained runs)")
    parser.add_argument("--name", default="comparison", help="file name stem of the table")
    parser.add_argument(
        "--reference",
        default=None,
        help="method the seed-paired table measures the others against (default: the first)",
    )
    parser.add_argument(
        "--pool",
        nargs="*",
        default=[],
        help="pool finished compare.py output folders (one per dataset draw, site or fold; "
        "LABEL=FOLDER names it) into <name>_pooled tables, against the reference the "
        "folders were compared with; trains nothing",
    )
    args = parser.parse_args(argv)
    if args.pool:
        if args.runs or args.methods:
            parser.error("--pool collects finished compare.py folders: give it without --runs / --methods")
        return _pool(args.pool, args.out, args.name)
    from cmml_monai.evaluation.report import (
        comparison_table,
        paired_table,
        read_sweep,
        write_comparison_table,
        write_paired_table,
    )

    runs: list[tuple[str | None, str]] = [_label_and_path(spec) for spec in args.runs]
    configs = [os.path.abspath(c) for c in args.config]
    for method in args.methods:
        for seed in args.seeds if args.seeds else [None]:
            runs.append((None, _train(method, configs, os.path.abspath(args.out), extra, seed)))
    if not runs:
        parser.error("give --runs and/or --methods")
    try:
        rows = [row for label, run in runs for row in read_sweep(run, label)]
        columns, table = comparison_table(rows)
        csv_path, md_path = write_comparison_table(columns, table, args.out, args.name)
        paired_columns, paired = paired_table(rows, args.reference) if len(table) > 1 else ([], [])
        has_pairs = any(row["pairs"] for row in paired)
        paired_paths = write_paired_table(paired_columns, paired, args.out, args.name) if has_pairs else ()
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = [c for c in columns if c == "method" or c.startswith("AUC@") or c == "AVG AUC"]
    print("\n" + " | ".join(shown + ["std", "runs"]))
    for row in table:
        cells = [f"{row[c]:.4f}" for c in shown[1:]] + [f"{row['AVG AUC std']:.4f}", str(row["runs"])]
        print(" | ".join([row["method"]] + cells))
    if has_pairs:
        print(f"\nseed-paired AVG AUC difference against {paired[0]['reference']} (95% CI; pairs where ahead):")
        for row in paired:
            if row["pairs"]:
                interval = f" [{row['CI low']:+.4f}, {row['CI high']:+.4f}]" if row["pairs"] > 1 else " (one pair)"
                print(
                    f"{row['method']}: {row['AVG AUC diff']:+.4f}{interval} ahead in {row['ahead']} of {row['pairs']}"
                )
    elif len(table) > 1:
        print("\nno seed-paired table: no two methods have runs with a recorded training seed in common")
    print(f"\nwritten: {', '.join([csv_path, md_path, *paired_paths])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
