"""Time per case of the case pages (issue #32) on CPU: the prediction alone (batch 1) against the maps
(Grad-CAM on each present modality's encoder, or occlusion for TorchScript) and the page (render + PNG).

The networks have the dataset configs' sizes (Derm7pt: two 224 px photos + table, ResNet-18, d = 256; MEN:
four 96^3 MRI + table, ResNet-18, d = 256) with random weights: the time does not depend on the weights.
Prints a Markdown table; asserts nothing.

    python scripts/benchmark_explain.py --threads 2 --cases 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmml_monai.evaluation.casepage import save_page  # noqa: E402
from cmml_monai.evaluation.explain import Explainer  # noqa: E402
from cmml_monai.networks import CMMLNet, InputSpec, MultiModalEncoder  # noqa: E402

SETUPS = {
    "2D (Derm7pt: 2 x 224 px RGB + table)": dict(m=2, c=3, spatial=(224, 224), classes=5),
    "3D (MEN: 4 x 96^3 MRI + table)": dict(m=4, c=1, spatial=(96, 96, 96), classes=3),
}


def _median_time(fn, cases: int) -> float:
    times = []
    for _ in range(cases):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", type=int, default=5, help="cases timed per setup (median)")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--occlusion", action="store_true", help="also time occlusion on the traced 2D network")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.encoder}, median of {args.cases} case(s)\n")
    print("| setup | maps | prediction s/case | maps s/case | page s/case | explain total s/case |")
    print("|---|---|---|---|---|---|")
    out = tempfile.mkdtemp()
    for name, s in SETUPS.items():
        net = CMMLNet(
            InputSpec(s["m"], s["c"], len(s["spatial"]), s["classes"], [0, 3]),
            feature_dim=256,
            encoder=partial(MultiModalEncoder, image_encoder=args.encoder),
        ).eval()
        image = torch.randn(1, s["m"] * s["c"], *s["spatial"])
        image[:, s["c"] : 2 * s["c"]] = float("nan")  # one modality missing: completed by CMML, no map
        tabular = torch.tensor([[0.3, 1.0]])
        mods = [(f"m{i}", s["c"]) for i in range(s["m"])]
        runs = [("Grad-CAM", net, "auto")]
        if args.occlusion and len(s["spatial"]) == 2:
            runs.append(("occlusion (TorchScript)", torch.jit.trace(net, (image.nan_to_num(), tabular)), "auto"))
        for label, model, method in runs:
            explainer = Explainer(
                model, mods, True, [str(k) for k in range(s["classes"])], table_name="table", method=method
            )
            # each timed callable binds this iteration's objects (default arguments), not the loop's last ones
            with torch.no_grad():
                predict = _median_time(lambda m=model, x=image, t=tabular: m(x, t), args.cases)
            explanation = explainer(image, tabular, "bench")  # warm-up (hooks, first allocation)
            maps = _median_time(lambda e=explainer, x=image, t=tabular: e(x, t, "bench"), args.cases)
            page_path = os.path.join(out, "bench.png")
            page = _median_time(lambda e=explanation, p=page_path: save_page(e, p), args.cases)
            print(f"| {name} | {label} | {predict:.3f} | {maps:.3f} | {page:.3f} | {maps + page:.3f} |")


if __name__ == "__main__":
    main()
