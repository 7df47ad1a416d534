#!/usr/bin/env python
"""Write a synthetic Derm7pt, ODIR-5K or MEN dataset in its exact native layout.

Usage:
    python scripts/make_synthetic.py --dataset derm7pt --out /tmp/derm7pt_synth
    python scripts/make_synthetic.py --dataset men --out /tmp/men_dicom --cases 20 --dicom --shape 40 40 24

The folder gets ``synthetic_manifest.json`` with the counts the adapter should find (compare with
``scripts/inspect_data.py --json``). The output is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import cmml_monai  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmml_monai.data.errors import DataError  # noqa: E402
from cmml_monai.data.synthetic import DEFAULT_CASES, SYNTHETIC_DATASETS, make_synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=SYNTHETIC_DATASETS)
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--cases", type=int, default=None, help=f"number of cases (default {DEFAULT_CASES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dicom", action="store_true", help="MEN: DICOM series folders instead of NIfTI")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="MEN: volume shape (default 40 40 24)")
    args = parser.parse_args(argv)
    try:
        manifest = make_synthetic(
            args.dataset, args.out, cases=args.cases, seed=args.seed, dicom=args.dicom, shape=args.shape
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {k: manifest[k] for k in ("n_cases", "splits", "label_counts", "missing", "dropped")}
    print(f"wrote {args.dataset} to {os.path.abspath(args.out)}: {json.dumps(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
