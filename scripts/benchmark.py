"""Benchmarks: one training step of CMML (stage 1, stage 2) against zero-fill late fusion.

Each benchmark is a function ``bench_<name>(cfg) -> step`` registered in ``BENCHMARKS`` that
prepares one unit of work (model built, batch made) and returns it as a callable; ``run_benchmarks``
warms every step up and times them interleaved, so other benchmarks (e.g. data loading) can be
added beside them. A training step is ``forward_train + CMMLLoss + backward + optimizer step`` on the
same batch with the same encoders; the reported time is the median over ``--iters`` rounds after
``--warmup`` steps.

    python scripts/benchmark.py                                  # CPU, defaults of the issue
    python scripts/benchmark.py --batch-size 4 --image-size 32 --iters 3 --json out.json
    python scripts/benchmark.py --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cmml_monai.losses import CMMLLoss
from cmml_monai.networks import CMMLNet, LateFusionNet, random_keep_mask


@dataclass
class BenchConfig:
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    batch_size: int = 16
    image_size: int = 64
    image_modalities: int = 2
    spatial_dims: int = 2
    num_classes: int = 5
    feature_dim: int = 256
    image_encoder: str = "resnet18"
    missing_rate: float = 0.3
    encode_present_only: bool = False
    warmup: int = 2
    iters: int = 5
    seed: int = 0


def make_batch(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One fixed batch: RGB images (2D) or 1-channel volumes (3D), a 3-column table, NaN-missing."""
    g = torch.Generator().manual_seed(cfg.seed)
    channels = 3 if cfg.spatial_dims == 2 else 1
    shape = (cfg.batch_size, cfg.image_modalities * channels) + (cfg.image_size,) * cfg.spatial_dims
    image = torch.randn(shape, generator=g)
    cards = [0, 4, 0]  # age-like, a categorical, another numeric
    tab = torch.stack(
        [torch.randn(cfg.batch_size, generator=g), torch.randint(0, 4, (cfg.batch_size,), generator=g).float(),
         torch.randn(cfg.batch_size, generator=g)], dim=1)
    torch.manual_seed(cfg.seed)
    present = random_keep_mask(torch.ones(cfg.batch_size, cfg.image_modalities + 1, dtype=torch.bool), cfg.missing_rate)
    for i in range(cfg.image_modalities):
        image[~present[:, i], i * channels:(i + 1) * channels] = float("nan")
    tab[~present[:, -1]] = float("nan")
    label = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)
    return image, tab, label, cards


def training_step(net: torch.nn.Module, stage: int, cfg: BenchConfig) -> Callable[[], None]:
    """A prepared step: forward_train + CMMLLoss + backward + optimizer step on one fixed batch."""
    device = torch.device(cfg.device)
    image, tab, label, _ = make_batch(cfg)
    memory_format = torch.contiguous_format
    if cfg.channels_last:
        memory_format = torch.channels_last if cfg.spatial_dims == 2 else torch.channels_last_3d
    net = net.to(device=device, memory_format=memory_format).train()
    image = image.to(device=device, memory_format=memory_format)
    tab, label = tab.to(device), label.to(device)
    loss_fn = CMMLLoss(stage=stage)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            out = net.forward_train(image, tab, stage=stage)
            loss = loss_fn(out, label)["loss"]
        loss.backward()
        opt.step()

    return step


def run_benchmarks(names: list[str], cfg: BenchConfig) -> dict[str, dict]:
    """Warm up every prepared step, then time them interleaved (one step of each per round).

    Interleaving makes the ratios robust to slow drifts of a shared machine's load; the reported
    time is the median over ``cfg.iters`` rounds.
    """
    device = torch.device(cfg.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = {name: BENCHMARKS[name](cfg) for name in names}
    for step in steps.values():
        for _ in range(cfg.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(cfg.iters):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {"median_s": median, "min_s": min(ts), "max_s": max(ts), "cases_per_s": cfg.batch_size / median}
    return results


def _net_args(cfg: BenchConfig) -> dict:
    _, _, _, cards = make_batch(BenchConfig(batch_size=1, image_size=1, spatial_dims=cfg.spatial_dims))
    return dict(
        image_modalities=cfg.image_modalities, image_channels=3 if cfg.spatial_dims == 2 else 1,
        spatial_dims=cfg.spatial_dims, num_classes=cfg.num_classes, tabular_cardinalities=cards,
        feature_dim=cfg.feature_dim, image_encoder=cfg.image_encoder, encode_present_only=cfg.encode_present_only,
    )


# each benchmark prepares one step (built model, fixed batch) and returns it; run_benchmarks times it
def bench_cmml_stage1(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(CMMLNet(**_net_args(cfg)), 1, cfg)


def bench_cmml_stage2(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(CMMLNet(**_net_args(cfg)), 2, cfg)


def bench_zero_fill(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(LateFusionNet(**_net_args(cfg), mode="zero_fill"), 1, cfg)


# name -> benchmark; add data benchmarks here (a function returning a prepared step)
BENCHMARKS: dict[str, Callable[[BenchConfig], Callable[[], None]]] = {
    "cmml_stage1": bench_cmml_stage1,
    "cmml_stage2": bench_cmml_stage2,
    "zero_fill": bench_zero_fill,
}


def main(argv: list[str] | None = None) -> dict:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=defaults.device, help="cpu (default) or cuda")
    parser.add_argument("--amp", default=defaults.amp, choices=["none", "bf16"], help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--image-modalities", type=int, default=defaults.image_modalities)
    parser.add_argument("--spatial-dims", type=int, default=defaults.spatial_dims, choices=[2, 3])
    parser.add_argument("--feature-dim", type=int, default=defaults.feature_dim)
    parser.add_argument("--image-encoder", default=defaults.image_encoder)
    parser.add_argument("--missing-rate", type=float, default=defaults.missing_rate)
    parser.add_argument("--encode-present-only", action="store_true", help="skip missing images in the encoders")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--iters", type=int, default=defaults.iters)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run a subset")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        device=args.device, amp=args.amp, channels_last=args.channels_last, batch_size=args.batch_size,
        image_size=args.image_size, image_modalities=args.image_modalities, spatial_dims=args.spatial_dims,
        feature_dim=args.feature_dim, image_encoder=args.image_encoder, missing_rate=args.missing_rate,
        encode_present_only=args.encode_present_only,
        warmup=args.warmup, iters=args.iters,
    )
    results = run_benchmarks(list(args.only or BENCHMARKS), cfg)
    base = results.get("zero_fill")
    # the min ratio is the least disturbed by other processes on a shared machine
    header = ("benchmark", "median s/step", "min s/step", "cases/s", "x zf (median)", "x zf (min)")
    print(f"{header[0]:<14}{header[1]:>15}{header[2]:>12}{header[3]:>10}{header[4]:>15}{header[5]:>12}")
    for name, r in results.items():
        r["ratio_to_zero_fill"] = r["median_s"] / base["median_s"] if base else float("nan")
        r["min_ratio_to_zero_fill"] = r["min_s"] / base["min_s"] if base else float("nan")
        print(
            f"{name:<14}{r['median_s']:>15.4f}{r['min_s']:>12.4f}{r['cases_per_s']:>10.1f}"
            f"{r['ratio_to_zero_fill']:>15.3f}{r['min_ratio_to_zero_fill']:>12.3f}"
        )
    report = {"config": asdict(cfg), "torch_threads": torch.get_num_threads(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
