#!/usr/bin/env python
"""Package a trained run as a self-contained, model-zoo-style MONAI bundle (folder, optionally a zip).

Usage:
    python scripts/package_bundle.py outputs/derm7pt_cmml --out bundle/derm7pt_cmml
    python scripts/package_bundle.py outputs/men_cmml --out bundle/men_cmml --zip --version 1.0.0 \
        --changelog "first release on the hospital's data"

The bundle holds configs/ (metadata.json, inference.json, logging.conf), models/ (model.pt, network.json,
model.ts), docs/README.md (a model card from the run) and LICENSE; see cmml_monai/deploy/package.py.
Bad input prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import cmml_monai  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmml_monai.data.errors import DataError  # noqa: E402
from cmml_monai.deploy.package import DEFAULT_VERSION, package_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output folder (models/model.pt + models/network.json)")
    parser.add_argument("--out", required=True, help="the bundle folder to write, e.g. bundle/NAME")
    parser.add_argument("--zip", action="store_true", help="also write <out>.zip")
    parser.add_argument("--version", default=DEFAULT_VERSION, help=f"bundle version (default {DEFAULT_VERSION})")
    parser.add_argument("--changelog", default=None, help="the changelog entry of this version")
    parser.add_argument("--license", default=None, help="LICENSE file to include (default the project's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    args = parser.parse_args(argv)
    try:
        out = package_bundle(
            args.run_dir,
            args.out,
            version=args.version,
            changelog={args.version: args.changelog} if args.changelog else None,
            license_file=args.license,
            make_zip=args.zip,
            overwrite=args.overwrite,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out + (f"\n{out}.zip" if args.zip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
