#!/usr/bin/env python
"""Summarise a dataset read through its adapter: cases, splits, labels, missing inputs, table columns.

Usage:
    python scripts/inspect_data.py --dataset derm7pt --dataset_dir /data/derm7pt/release_v0
    python scripts/inspect_data.py --dataset manifest --dataset_dir /data/cases.csv   # prints the column roles
    python scripts/inspect_data.py --dataset men --dataset_dir /data/MEN --json \
        --column_map '{"case_id": "BraTS ID", "grade": "WHO grade"}' --sequences '["t1c", "t2f"]'

Any further ``--<option> <value>`` is passed to the adapter (values are parsed as JSON when they can be,
e.g. lists and maps); see docs/architecture.md, "Data sources". Bad data prints ``error: ...`` and exits 2.
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

from cmml_monai.data.adapters import DATASET_NAMES, adapter_options, load_dataset  # noqa: E402
from cmml_monai.data.adapters.manifest import MANIFEST_NAME, manifest_roles  # noqa: E402
from cmml_monai.data.errors import DataError  # noqa: E402
from cmml_monai.data.report import format_summary, summarize  # noqa: E402


def _parse_extra(extra: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    i = 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--") or len(key) < 3:
            raise ValueError(f"unexpected argument {key!r}; adapter options are given as --name value")
        key = key[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            value = extra[i + 1]
            i += 2
        else:
            raise ValueError(f"option --{key} needs a value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args, extra = parser.parse_known_args(argv)
    try:
        options = _parse_extra(extra)
        roles = None
        if args.dataset == MANIFEST_NAME:
            # the roles first: a user checks (and copies into the overlay) what was inferred
            role_keys = set(adapter_options(MANIFEST_NAME)) - {
                "table_types",
                "class_names",
                "split_file",
                "split_fractions",
                "split_seed",
            }
            roles = manifest_roles(args.dataset_dir, **{k: v for k, v in options.items() if k in role_keys})
        case_list = load_dataset(args.dataset, args.dataset_dir, **options)
        summary = summarize(case_list)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        extra = {"column_roles": roles.to_options(), "inferred_roles": roles.inferred} if roles is not None else {}
        print(json.dumps({**extra, **summary}, sort_keys=False))
    else:
        if roles is not None:
            print(f"column roles (dataset_options; inferred: {', '.join(roles.inferred) or 'none'}):")
            print(f"  {json.dumps(roles.to_options())}")
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
