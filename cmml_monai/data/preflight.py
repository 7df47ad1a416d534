"""Preflight: every file of every split a run will read is opened and checked before the first epoch.

A bad file found in the test split after hours of training (the sweep decodes the test split last) is
the failure this module prevents. :func:`run_preflight` takes the run's datasets (train, valid, test)
and makes every item go through the deterministic chain once - decode, dimensionality (2D photo / 3D
volume, a 4D NIfTI refused), channel count, DICOM pixel data, shape after preprocessing - in a thread
pool of ``num_workers`` (at least 1) with a progress bar. Then, depending on ``mode``:

* ``"fail"`` (default): every problem is listed at once (split, case, modality, file, what to do) in
  one :class:`~cmml_monai.data.errors.DataError`, and written to ``<output_dir>/preflight.json``.
* ``"mark_missing"``: each unusable image modality is marked missing (``Case.paths[m] = None`` with
  ``missing_reason[m] = "preflight: ..."``) and the run goes on, saying how many; problems that are
  not a file (a bad label) and cases left with no usable modality still stop the run.
* ``"off"``: nothing is checked; a bad file stops the run when it is first read.

No file is decoded twice for the preflight: with ``cache="cache"`` the in-memory cache fill *is* the
check (the datasets are built with ``defer_errors=True``, so the fill records bad items instead of
stopping at the first); with ``"persistent"`` the check writes the disk cache that training then reads;
only uncached items (``cache="none"``, or beyond ``cache_rate``) are decoded once more than without it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.pool import ThreadPool
from typing import Any

from monai.data import Dataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import optional_import

from cmml_monai.data.caching import CaseCacheDataset
from cmml_monai.data.cases import CaseList
from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.utils import as_bool

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["PREFLIGHT_MODES", "PreflightProblem", "PreflightReport", "run_preflight", "class_coverage", "MAX_LISTED"]

logger = logging.getLogger(__name__)

PREFLIGHT_MODES = ("fail", "mark_missing", "off")
MAX_LISTED = 30  # problems printed in the error; preflight.json keeps them all
REPORT_NAME = "preflight.json"


@dataclass
class PreflightProblem:
    """One unusable input.

    Args:
        split: the split of the case.
        case_id: the case.
        modality: the image modality whose file is unusable; ``None`` for a problem of the case itself
            (label, table), which marking a modality missing cannot fix.
        path: the file or DICOM folder (``None`` for a case problem).
        message: the reader's one-line error, which says what to do.
    """

    split: str
    case_id: str
    modality: str | None
    path: str | None
    message: str

    def line(self) -> str:
        return f"[{self.split}] {self.message}"


@dataclass
class PreflightReport:
    """What the preflight found.

    Args:
        mode: the preflight mode used.
        items: items (cases) checked, all splits together.
        checked: items this call decoded itself (0 for an in-memory cache: its fill was the check).
        problems: every problem found.
        marked_missing: ``(split, case_id, modality)`` marked missing (``mode="mark_missing"``).
        warnings: problems that do not stop the run (a class with no case in a split).
        seconds: wall time of the checks this call ran (the in-memory cache fill runs when the datasets
            are built, before this call, and is not included).
    """

    mode: str
    items: int = 0
    checked: int = 0
    problems: list[PreflightProblem] = field(default_factory=list)
    marked_missing: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "items": self.items,
            "checked": self.checked,
            "problems": [asdict(p) for p in self.problems],
            "marked_missing": [list(m) for m in self.marked_missing],
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


def _cached_part(transform: Callable) -> Callable:
    """The part of ``transform`` that a cache keeps: up to the first random (or non-MONAI) transform."""
    # MONAI has no public "cached part of a transform": this is its caches' rule (tests/test_dataset.py proves
    # it gives what CacheDataset caches)
    if not isinstance(transform, Compose):
        return transform
    first_random = transform.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    return Compose(transform.transforms[:first_random]) if first_random is not None else transform


def _deterministic(transform: Callable) -> Callable[[Any], Any]:
    """Run the part of ``transform`` that a cache keeps (threaded, as the caches run it)."""
    part = _cached_part(transform)
    return (lambda item: part(item, threading=True)) if isinstance(part, Compose) else part


def _cache_view(ds: PersistentDataset) -> PersistentDataset:
    """The same persistent cache (folder, file names) read through the deterministic transforms only.

    Reading item ``i`` of the view writes the cache file that ``ds`` reads for item ``i``, without running
    (and advancing the random state of) the training augmentation that follows the cache.
    """
    return PersistentDataset(ds.data, _cached_part(ds.transform), cache_dir=ds.cache_dir, hash_func=ds.hash_func)


def _checker(ds: Dataset) -> tuple[list[int], Callable[[int], None], dict[int, DataError]]:
    """Indices still to check, the check of one index, and the errors already known (the cache fill's)."""
    n = len(ds.data)
    if isinstance(ds, CaseCacheDataset):
        # the fill decoded the cached items (without defer_errors it would have raised on the first bad one)
        run = _deterministic(ds.transform)
        return list(range(ds.cache_num, n)), lambda i: run(ds.data[i]), dict(ds.load_errors)
    if isinstance(ds, PersistentDataset):
        # reading an item of the cache view decodes, preprocesses and writes its cache file: training reads it back
        view = _cache_view(ds)
        return list(range(n)), lambda i: view[i], {}
    run = _deterministic(ds.transform)
    return list(range(n)), lambda i: run(ds.data[i]), {}


def _run_checks(
    jobs: list[tuple[str, int, Callable[[int], None]]], num_workers: int, progress: bool
) -> dict[tuple[str, int], DataError]:
    """Run ``check(index)`` for every job in a thread pool; DataErrors are collected, others raised."""

    def one(job: tuple[str, int, Callable[[int], None]]) -> tuple[str, int, DataError | None]:
        split, index, check = job
        try:
            check(index)
        except Exception as err:
            found = find_data_error(err)
            if found is None:
                raise
            return split, index, found
        return split, index, None

    errors: dict[tuple[str, int], DataError] = {}
    if not jobs:
        return errors
    with ThreadPool(max(1, int(num_workers))) as pool:
        results = pool.imap_unordered(one, jobs)
        if progress and has_tqdm:
            results = tqdm(results, total=len(jobs), desc="Preflight")
        for split, index, err in results:
            if err is not None:
                errors[(split, index)] = err
    return errors


def _diagnose(
    split: str, item: Mapping[str, Any], image_keys: Sequence[str], run: Callable, error: DataError
) -> list[PreflightProblem]:
    """Which modality of a failing item is at fault: the case without images, then each image alone.

    Only failing items get here, so the extra decodes are few."""
    case = str(item.get("case_id"))
    present = [k for k in image_keys if item.get(k) is not None]
    base = {**item, **{k: None for k in image_keys}}
    try:
        run(base)
    except Exception as err:  # the case itself (label, table) is bad: no modality to blame
        found = find_data_error(err)
        if found is None:
            raise
        return [PreflightProblem(split, case, None, None, str(found))]
    out = []
    for key in present:
        try:
            run({**base, key: item[key]})
        except Exception as err:
            found = find_data_error(err)
            if found is None:
                raise
            out.append(PreflightProblem(split, case, key, str(item[key]), str(found)))
    return out or [PreflightProblem(split, case, None, None, str(error))]


def class_coverage(case_list: CaseList, splits: Sequence[str]) -> list[str]:
    """One line per split in which some class has no case: its AUC skips the class, training never sees it.

    Example:
        >>> class_coverage(cases, ["train", "valid"])  # doctest: +SKIP
        ["valid split: no case of class(es) ['SK']; its AUC averages over the other classes ..."]
    """
    out = []
    for split in splits:
        cases = case_list.split(split)
        if not cases:
            continue
        if all(c.label is None for c in cases):
            continue  # new cases read for inference (labels=False): no AUC is computed, nothing to say
        counts = [0] * len(case_list.class_names)
        for c in cases:
            if c.label is None:
                continue
            if case_list.multi_label:
                counts = [n + int(v) for n, v in zip(counts, c.label)]  # type: ignore[arg-type]
            else:
                counts[int(c.label)] += 1  # type: ignore[arg-type]
        absent = [name for name, n in zip(case_list.class_names, counts) if n == 0]
        if absent:
            out.append(
                f"{split} split: no case of class(es) {absent}; its AUC averages over the other classes "
                f"({'the model never learns them' if split == 'train' else 'move some cases into it'})"
            )
    return out


def _reload(ds: Dataset, index: int) -> None:
    if isinstance(ds, CaseCacheDataset):
        ds.reload(index)
    elif isinstance(ds, PersistentDataset):
        # the modality was marked missing in ds.data: its new cache file (new hash) is written now
        _cache_view(ds)[index]


def run_preflight(
    case_list: CaseList,
    datasets: Mapping[str, Dataset],
    mode: str = "fail",
    num_workers: int = 0,
    output_dir: str | os.PathLike | None = None,
    progress: bool | str = True,
) -> PreflightReport:
    """Check every item of ``datasets`` before training; stop with all problems listed, or mark them missing.

    Args:
        case_list: the run's cases (``mark_missing`` edits their paths and missing reasons, so later
            steps - masks, validation views, the sweep - see those modalities as missing).
        datasets: split name -> the dataset the run will read, ``None`` for a split it does not read (from
            :func:`cmml_monai.data.dataset.build_dataset`; ``cache="cache"`` ones built with ``defer_errors=True``).
        mode: ``"fail"``, ``"mark_missing"`` or ``"off"``.
        num_workers: threads for the checks (at least 1).
        output_dir: where ``preflight.json`` (every problem, atomically written) goes when there are problems.
        progress: show a progress bar.

    Returns:
        the report (``mode="off"``: an empty one).

    Raises:
        DataError: ``mode="fail"`` and a problem was found, or ``mode="mark_missing"`` and a problem cannot
            be fixed by marking a modality missing. The first line says how many and what to do; one line
            per problem follows (at most :data:`MAX_LISTED`; the file keeps all).
        DataError: an unknown ``mode`` (a ``ValueError``), named in the message.

    Example:
        >>> ds = {s: build_dataset(cases, s, schema, spatial_size=(64, 64), cache="cache", defer_errors=True)
        ...       for s in ("train", "valid", "test")}  # doctest: +SKIP
        >>> run_preflight(cases, ds, mode="fail", num_workers=4, output_dir="outputs/run")  # doctest: +SKIP
    """
    if mode not in PREFLIGHT_MODES:
        raise DataError(f"preflight must be one of {PREFLIGHT_MODES}, got {mode!r}: use --preflight fail")
    report = PreflightReport(mode)
    if mode == "off":
        return report
    # a split this process does not read (e.g. the test split on the other ranks of a DDP run) is None
    datasets = {split: ds for split, ds in datasets.items() if ds is not None}
    start = time.perf_counter()
    report.problems = _find_problems(case_list, datasets, report, num_workers, as_bool(progress, "progress"))
    report.seconds = time.perf_counter() - start
    report.warnings = class_coverage(case_list, list(datasets))
    for text in report.warnings:
        logger.warning("preflight: %s", text)
    if not report.problems:
        logger.info("preflight: %d items checked, no problem (%.1f s)", report.items, report.seconds)
        return report

    fatal = list(report.problems) if mode == "fail" else [p for p in report.problems if p.modality is None]
    if mode == "mark_missing" and not fatal:
        fatal = _mark_missing(case_list, datasets, report)
    path = None
    if output_dir is not None:
        path = os.path.join(os.fspath(output_dir), REPORT_NAME)
        atomic_write_json(path, report.to_json())
    if fatal:
        raise _problems_error(fatal, mode, report.items, path)
    logger.warning(
        "preflight: %d unusable image file(s) marked missing in %d case(s); training goes on without them%s",
        len(report.marked_missing),
        len({(s, c) for s, c, _ in report.marked_missing}),
        f" (listed in {path})" if path else "",
    )
    return report


def _find_problems(
    case_list: CaseList, datasets: Mapping[str, Dataset], report: PreflightReport, num_workers: int, progress: bool
) -> list[PreflightProblem]:
    """Check every item (counting them in ``report``); the problems, each blamed on its modality when it can be."""
    image_keys = [m.name for m in case_list.image_modalities]
    jobs, errors, runners = [], {}, {}
    for split, ds in datasets.items():
        todo, check, known = _checker(ds)
        jobs += [(split, i, check) for i in todo]
        errors.update({(split, i): e for i, e in known.items()})
        runners[split] = _deterministic(ds.transform)
        report.items += len(ds.data)
    report.checked = len(jobs)
    errors.update(_run_checks(jobs, num_workers, progress))
    problems = []
    for (split, index), err in sorted(errors.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        item = datasets[split].data[index]
        problems += _diagnose(split, item, image_keys, runners[split], err)
    return problems


def _problems_error(fatal: Sequence[PreflightProblem], mode: str, items: int, path: str | None) -> DataError:
    """One error listing the problems that stop the run: how many, what to do, one line each."""
    cases = len({(p.split, p.case_id) for p in fatal})
    fix = (
        "replace or remove these files (or fix the case), or set preflight to 'mark_missing' "
        "to train without the unusable modalities"
        if mode == "fail"
        else "these cannot be marked missing: fix the label/table or remove the case"
    )
    head = (
        f"preflight: {len(fatal)} problem(s) in {cases} case(s) of {items} checked, before training; "
        f"{fix}{f' (all listed in {path})' if path else ''}:"
    )
    lines = [f"  {p.line()}" for p in fatal[:MAX_LISTED]]
    if len(fatal) > MAX_LISTED:
        lines.append(f"  ... and {len(fatal) - MAX_LISTED} more")
    return DataError("\n".join([head, *lines]))


def _mark_missing(case_list: CaseList, datasets: Mapping[str, Dataset], report: PreflightReport) -> list:
    """Mark each problem's modality missing in the case list and the datasets; the problems it cannot fix."""
    by_id = {(c.split, str(c.case_id)): c for c in case_list.cases}
    touched: dict[tuple[str, int], None] = {}
    index_of = {split: {str(d.get("case_id")): i for i, d in enumerate(ds.data)} for split, ds in datasets.items()}
    for p in report.problems:
        case = by_id.get((p.split, p.case_id))
        if case is not None:
            case.paths[p.modality] = None  # type: ignore[index]
            case.missing_reason[p.modality] = f"preflight: {p.message}"  # type: ignore[index]
        index = index_of[p.split][p.case_id]
        datasets[p.split].data[index][p.modality] = None
        touched[(p.split, index)] = None
        report.marked_missing.append((p.split, p.case_id, str(p.modality)))
    fatal = []
    for split, index in touched:
        item = datasets[split].data[index]
        case = by_id.get((split, str(item.get("case_id"))))
        if case is not None and not any(case_list.present(case)):
            fatal.append(
                PreflightProblem(
                    split,
                    str(item.get("case_id")),
                    None,
                    None,
                    f"case {item.get('case_id')}: no usable modality is left; remove the case",
                )
            )
            continue
        _reload(datasets[split], index)
    return fatal
