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

``--e2e`` measures the whole training pipeline instead (``run_e2e``): on synthetic Derm7pt (a 2D image
pair + table) and MEN (four 3D sequences + table), one timed training epoch of CMML stage 2 through the
real data path (``build_dataset`` with the in-memory cache, ``build_dataloader`` with worker processes,
``CMMLPrepareBatch``) against the model-only steps on the same batches already on the device
(``e2e_over_model``: 1.0 means the data path costs nothing), CMML against zero-fill late fusion on those
batches (``cmml_over_zero_fill``), the served path's latency per case (``infer_ms_p50``, batch 1) and
peak memory (CPU RSS; GPU max allocated on CUDA). It asserts nothing about time (usable in CI):

    python scripts/benchmark.py --e2e --image-encoder resnet10 --feature-dim 32 --image-size 32 \\
        --volume-size 24 --batch-size 4 --e2e-cases 24 --json e2e.json     # short CPU form
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from cmml_monai.losses import CMMLLoss
from cmml_monai.networks import (
    CMMLNet,
    InputSpec,
    LateFusionNet,
    MultiModalEncoder,
    attach_feature_cache,
    random_keep_mask,
)


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
        [
            torch.randn(cfg.batch_size, generator=g),
            torch.randint(0, 4, (cfg.batch_size,), generator=g).float(),
            torch.randn(cfg.batch_size, generator=g),
        ],
        dim=1,
    )
    torch.manual_seed(cfg.seed)
    present = random_keep_mask(torch.ones(cfg.batch_size, cfg.image_modalities + 1, dtype=torch.bool), cfg.missing_rate)
    for i in range(cfg.image_modalities):
        image[~present[:, i], i * channels : (i + 1) * channels] = float("nan")
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


def _net_args(cfg: BenchConfig, **encoder_options) -> dict:
    _, _, _, cards = make_batch(BenchConfig(batch_size=1, image_size=1, spatial_dims=cfg.spatial_dims))
    return dict(
        spec=InputSpec(
            image_modalities=cfg.image_modalities,
            image_channels=3 if cfg.spatial_dims == 2 else 1,
            spatial_dims=cfg.spatial_dims,
            num_classes=cfg.num_classes,
            tabular_cardinalities=cards,
        ),
        feature_dim=cfg.feature_dim,
        encoder=partial(
            MultiModalEncoder,
            image_encoder=cfg.image_encoder,
            encode_present_only=cfg.encode_present_only,
            **encoder_options,
        ),
    )


# each benchmark prepares one step (built model, fixed batch) and returns it; run_benchmarks times it
def bench_cmml_stage1(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(CMMLNet(**_net_args(cfg)), 1, cfg)


def bench_cmml_stage2(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(CMMLNet(**_net_args(cfg)), 2, cfg)


def bench_cmml_stage2_frozen(cfg: BenchConfig) -> Callable[[], None]:
    """Stage 2 with the image backbones frozen (``freeze_encoder``): no backbone backward, still its forward."""
    torch.manual_seed(cfg.seed)
    return training_step(CMMLNet(**_net_args(cfg, freeze_backbone=True)), 2, cfg)


def bench_cmml_stage2_frozen_cached(cfg: BenchConfig) -> Callable[[], None]:
    """The same with the feature cache (the warm-up steps fill it): the backbones' forward is a lookup."""
    torch.manual_seed(cfg.seed)
    return training_step(attach_feature_cache(CMMLNet(**_net_args(cfg, freeze_backbone=True))), 2, cfg)


def bench_zero_fill(cfg: BenchConfig) -> Callable[[], None]:
    torch.manual_seed(cfg.seed)
    return training_step(LateFusionNet(**_net_args(cfg), mode="zero_fill"), 1, cfg)


# name -> benchmark; add data benchmarks here (a function returning a prepared step)
BENCHMARKS: dict[str, Callable[[BenchConfig], Callable[[], None]]] = {
    "cmml_stage1": bench_cmml_stage1,
    "cmml_stage2": bench_cmml_stage2,
    "cmml_stage2_frozen": bench_cmml_stage2_frozen,
    "cmml_stage2_frozen_cached": bench_cmml_stage2_frozen_cached,
    "zero_fill": bench_zero_fill,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_step(net: torch.nn.Module, stage: int, multi_label: bool, cfg: BenchConfig) -> Callable[..., None]:
    """A training step on given tensors: forward_train + CMMLLoss + backward + optimizer step."""
    device = torch.device(cfg.device)
    loss_fn = CMMLLoss(stage=stage, multi_label=multi_label)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    net.train()

    def step(image: torch.Tensor, tab: torch.Tensor | None, label: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss = loss_fn(net.forward_train(image, tab, stage=stage), label)["loss"]
        loss.backward()
        opt.step()

    return step


def e2e_pipeline(
    dataset: str, spatial_size: list[int], cfg: BenchConfig, cases: int, workers: int, root: str, rounds: int = 2
) -> dict:
    """One dataset's end-to-end numbers (see the module docstring); ``rounds`` timed epochs after a warm-up."""
    from cmml_monai.data import DatasetInfo, fit_schema, load_cases
    from cmml_monai.data.dataset import build_dataloader, build_dataset
    from cmml_monai.data.synthetic import make_synthetic
    from cmml_monai.engines import CMMLPrepareBatch

    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data_dir = os.path.join(root, dataset)
    make_synthetic(dataset, data_dir, cases=cases, seed=cfg.seed)
    case_list = load_cases(dataset, data_dir)
    schema = fit_schema(case_list)
    info = DatasetInfo(case_list, schema)
    t0 = time.perf_counter()
    ds = build_dataset(case_list, "train", schema, spatial_size=spatial_size, cache="cache", num_workers=workers)
    cache_s = time.perf_counter() - t0
    loader = build_dataloader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        seed=cfg.seed,
        drop_last=len(ds) > cfg.batch_size,
        pin_memory=device.type == "cuda",
    )
    args = dict(
        spec=InputSpec(
            image_modalities=info.image_modalities,
            image_channels=info.image_channels,
            spatial_dims=info.spatial_dims,
            num_classes=info.num_classes,
            tabular_cardinalities=info.tabular_cardinalities,
            multi_label=info.multi_label,
        ),
        feature_dim=cfg.feature_dim,
        encoder=partial(MultiModalEncoder, image_encoder=cfg.image_encoder),
    )
    torch.manual_seed(cfg.seed)
    cmml = CMMLNet(**args).to(device)
    zero_fill = LateFusionNet(**args, mode="zero_fill").to(device)
    cmml_step = _batch_step(cmml, 2, info.multi_label, cfg)
    zf_step = _batch_step(zero_fill, 2, info.multi_label, cfg)  # a baseline's single stage runs as stage 2
    prepare = CMMLPrepareBatch()

    def e2e_epoch() -> tuple[float, list]:
        batches = []
        _sync(device)
        start = time.perf_counter()
        for batch in loader:  # noqa: F821 (bound above; the 'del loader' below runs after the last call)
            image, label, (tab,), _ = prepare(batch, device, non_blocking=True)
            cmml_step(image, tab, label)
            batches.append((image, tab, label))
        _sync(device)
        return time.perf_counter() - start, batches

    def model_only(step: Callable[..., None], batches: list) -> float:
        _sync(device)
        start = time.perf_counter()
        for b in batches:
            step(*b)
        _sync(device)
        return time.perf_counter() - start

    _, batches = e2e_epoch()  # warm-up: worker start, allocator, kernels
    zf_step(*batches[0])
    e2e_s, model_s, zf_s = 0.0, 0.0, 0.0
    for _ in range(max(1, rounds)):
        t, batches = e2e_epoch()
        e2e_s += t
        model_s += model_only(cmml_step, batches)
        zf_s += model_only(zf_step, batches)
    # served path, one case at a time (what a deployed model sees)
    cmml.eval()
    latencies = []
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
        for i in range(min(len(ds), 3 + max(8, cfg.iters))):
            item = ds[i]
            image = torch.as_tensor(item["image"])[None].to(device)
            tab = item.get("tabular")
            tab = None if tab is None else torch.as_tensor(tab)[None].to(device)
            _sync(device)
            start = time.perf_counter()
            cmml(image, tab)
            _sync(device)
            if i >= 3:  # the first calls warm up
                latencies.append(1000.0 * (time.perf_counter() - start))
    del loader  # ends the persistent workers
    result = {
        "dataset": dataset,
        "spatial_size": list(spatial_size),
        "train_cases": len(ds),
        "batches_per_epoch": len(batches),
        "rounds": max(1, rounds),
        "workers": workers,
        "cache_fill_s": cache_s,
        "e2e_epoch_s": e2e_s,
        "model_epoch_s": model_s,
        "zero_fill_epoch_s": zf_s,
        "e2e_over_model": e2e_s / model_s,
        "cmml_over_zero_fill": model_s / zf_s,
        "infer_ms_p50": statistics.median(latencies),
        "infer_cases": len(latencies),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if device.type == "cuda":
        result["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def run_e2e(cfg: BenchConfig, cases: int, workers: int, volume_size: int, rounds: int = 2) -> dict:
    """``e2e_pipeline`` for the 2D pair (Derm7pt layout) and 3D (MEN layout); top-level keys per dims."""
    with tempfile.TemporaryDirectory() as root:
        per = {
            "2d": e2e_pipeline("derm7pt", [cfg.image_size] * 2, cfg, cases, workers, root, rounds),
            "3d": e2e_pipeline("men", [volume_size] * 3, cfg, cases, workers, root, rounds),
        }
    out: dict = {
        key: {dims: r[key] for dims, r in per.items()}
        for key in ("e2e_over_model", "cmml_over_zero_fill", "infer_ms_p50", "peak_rss_mb")
    }
    if torch.device(cfg.device).type == "cuda":
        out["gpu_max_allocated_mb"] = {dims: r["gpu_max_allocated_mb"] for dims, r in per.items()}
    out["pipelines"] = per
    return out


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
    parser.add_argument("--e2e", action="store_true", help="the whole training pipeline (see the module docstring)")
    parser.add_argument("--e2e-cases", type=int, default=48, help="--e2e: synthetic cases per dataset")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="--e2e: timed epochs after the warm-up")
    parser.add_argument("--workers", type=int, default=2, help="--e2e: data loader worker processes")
    parser.add_argument("--volume-size", type=int, default=48, help="--e2e: 3D side (MEN layout)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        batch_size=args.batch_size,
        image_size=args.image_size,
        image_modalities=args.image_modalities,
        spatial_dims=args.spatial_dims,
        feature_dim=args.feature_dim,
        image_encoder=args.image_encoder,
        missing_rate=args.missing_rate,
        encode_present_only=args.encode_present_only,
        warmup=args.warmup,
        iters=args.iters,
    )
    if args.e2e:
        report = {
            "config": asdict(cfg),
            "torch_threads": torch.get_num_threads(),
            **run_e2e(cfg, args.e2e_cases, args.workers, args.volume_size, args.e2e_rounds),
        }
        for dims, r in report["pipelines"].items():
            print(
                f"{dims}: e2e/model {r['e2e_over_model']:.3f}  cmml/zero-fill {r['cmml_over_zero_fill']:.3f}  "
                f"infer p50 {r['infer_ms_p50']:.1f} ms/case  peak RSS {r['peak_rss_mb']:.0f} MB"
                + (f"  GPU {r['gpu_max_allocated_mb']:.0f} MB" if "gpu_max_allocated_mb" in r else "")
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return report
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
