"""TorchScript export of the served network with both inputs, ``image`` and ``tabular``.

``python -m monai.bundle ckpt_export`` traces ``forward(self, image)`` and so drops the table. This
export traces ``net(image, tabular)`` on a complete example (presence is derived from the NaNs inside
the network without data-dependent branches, so one trace serves every missing pattern), saves
``models/model.ts`` with ``network.json`` embedded, and checks the file against the eager network on
every one of the 2^k - 1 non-empty subsets of the k modalities, at another batch size than the trace's.

``--onnx`` also writes ``models/model.onnx`` (inputs ``image`` and ``tabular``, dynamic batch, the
description in the model's metadata under ``network.json``) and checks it in onnxruntime the same way;
it needs ``pip install onnx onnxruntime``.

Command::

    python -m cmml_monai.deploy.export OUT/models                 # writes OUT/models/model.ts
    python -m cmml_monai.deploy.export OUT/models --onnx          # and OUT/models/model.onnx
    python -m cmml_monai.deploy.export OUT/models --checkpoint OUT/stage2/model_best.pt --out model.ts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cmml_monai.data.errors import DataError
from cmml_monai.data.missingness import all_subsets, apply_presence_mask
from cmml_monai.deploy.description import DESCRIPTION_NAME, check_description, load_description, load_network

__all__ = [
    "TORCHSCRIPT_NAME",
    "ONNX_NAME",
    "example_inputs",
    "check_export",
    "export_torchscript",
    "export_onnx",
    "resolve_torchscript",
    "load_torchscript",
    "main",
]

logger = logging.getLogger(__name__)

TORCHSCRIPT_NAME = "model.ts"
ONNX_NAME = "model.onnx"
#: the largest ``|exported - eager|`` logit difference accepted on any missing pattern
DEFAULT_ATOL = 1e-4


def example_inputs(
    description: Mapping[str, Any], batch_size: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A complete random batch of the described inputs: ``image`` ``[B, M*C, *spatial]`` and ``tabular``
    ``[B, F]`` (numeric columns standard normal, categorical columns valid codes), or ``None`` without a table.

    Example:
        >>> image, tabular = example_inputs(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        >>> image.shape, tabular.shape
        (torch.Size([2, 6, 64, 64]), torch.Size([2, 3]))
    """
    gen = torch.Generator().manual_seed(int(seed))
    image = torch.randn(int(batch_size), *description["inputs"]["image"], generator=gen)
    schema = description["data"].get("table_schema")
    if schema is None:
        return image, None
    columns = []
    for col in schema["columns"]:
        if col["type"] == "numeric":
            columns.append(torch.randn(int(batch_size), generator=gen))
        else:
            n = max(1, len(col["vocabulary"]))
            columns.append(torch.randint(0, n, (int(batch_size),), generator=gen).float())
    return image, torch.stack(columns, dim=1)


def _modalities(description: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    mods = description["data"]["modalities"]
    names = [m["name"] for m in mods if m["kind"] != "table"] + [m["name"] for m in mods if m["kind"] == "table"]
    channels = [int(m["channels"]) for m in mods if m["kind"] != "table"]
    return names, channels


def check_export(
    exported: torch.nn.Module,
    network: torch.nn.Module,
    description: Mapping[str, Any],
    batch_size: int = 3,
    seed: int = 1,
) -> dict[str, float]:
    """The largest ``|exported - eager|`` logit difference on each non-empty subset of modalities.

    Args:
        exported: the TorchScript module (called as ``exported(image, tabular)``, or ``exported(image)``
            when the network has no table).
        network: the eager network in eval mode.
        description: the network description (modalities, input shapes, table schema).
        batch_size: cases per pattern (not the trace's, so a fixed batch size baked into the trace shows).
        seed: seed of the random inputs.

    Returns:
        ``{"clinic+table": 1.2e-07, ...}``: one entry per pattern, named by the modalities present.

    Example:
        >>> check_export(torch.jit.load("models/model.ts"), net, desc)  # doctest: +SKIP
        {'clinic+derm+table': 0.0, 'derm+table': 4.7e-07, ...}
    """
    names, channels = _modalities(description)
    device = next(network.parameters()).device
    image, tabular = example_inputs(description, batch_size, seed)
    diffs = {}
    with torch.no_grad():
        for pattern in all_subsets(len(names)):
            present = torch.tensor([pattern] * int(batch_size), dtype=torch.bool)
            img, tab = apply_presence_mask(image, tabular, present, channels)
            img = img.to(device)
            args = (img,) if tab is None else (img, tab.to(device))
            diff = (exported(*args).float() - network(*args).float()).abs().max().item()
            diffs["+".join(n for n, p in zip(names, pattern) if p)] = float(diff)
    return diffs


def export_torchscript(
    model_dir: str,
    checkpoint: str | None = None,
    out: str | None = None,
    atol: float = DEFAULT_ATOL,
    device: str | torch.device = "cpu",
) -> tuple[str, dict[str, float]]:
    """Trace the served network with ``image`` and ``tabular`` and save it as TorchScript.

    Args:
        model_dir: a training run's ``models/`` folder (``network.json`` + ``model.pt``).
        checkpoint: weights to export (default ``<model_dir>/model.pt``).
        out: the file written (default ``<model_dir>/model.ts``); ``network.json`` is embedded as an extra
            file (``torch.jit.load(path, _extra_files={"network.json": ""})`` reads it back).
        atol: the largest logit difference to the eager network accepted on any missing pattern.
        device: where to trace (the file loads on any device with ``map_location``).

    Returns:
        the path written and :func:`check_export`'s differences per pattern.

    Raises:
        DataError: no description, or a checkpoint that does not fit it.
        RuntimeError: the exported module differs from the eager one by more than ``atol`` on a pattern (the
            file is removed).

    Example:
        >>> path, diffs = export_torchscript("outputs/derm7pt_cmml/models")  # doctest: +SKIP
        >>> torch.jit.load(path)(image, tabular).shape
        torch.Size([1, 5])
    """
    description = load_description(model_dir)
    network = load_network(model_dir, checkpoint, device)
    out = out or os.path.join(description["model_dir"], TORCHSCRIPT_NAME)
    image, tabular = example_inputs(description, batch_size=2)
    args = (image.to(device),) if tabular is None else (image.to(device), tabular.to(device))
    with torch.no_grad():
        traced = torch.jit.trace(network, args, check_trace=False)
    text = json.dumps({k: v for k, v in description.items() if k != "model_dir"}, indent=2)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.jit.save(traced, out, _extra_files={DESCRIPTION_NAME: text})
    diffs = check_export(torch.jit.load(out, map_location=device), network, description)
    worst = _check_or_remove(out, diffs, atol, "TorchScript")
    logger.info("TorchScript export: %s (max |export - eager| %.3g, %d patterns)", out, worst, len(diffs))
    return out, diffs


def _check_or_remove(path: str, diffs: dict[str, float], atol: float, what: str) -> float:
    worst = max(diffs, key=lambda name: diffs[name])
    if not diffs[worst] <= atol:
        os.remove(path)
        raise RuntimeError(
            f"the {what} export differs from the eager network by {diffs[worst]:.3g} (> atol {atol}) "
            f"with only {worst} present; the file was removed, report this with the network description"
        )
    return diffs[worst]


def resolve_torchscript(path: str) -> str:
    """The TorchScript file of ``path``: the file itself, or ``models/model.ts`` of a bundle folder, or
    ``model.ts`` of a ``models/`` folder.

    Raises:
        DataError: none of them exists (the message names ``path`` and how to write the file).

    Example:
        >>> resolve_torchscript("bundle/men_cmml")  # doctest: +SKIP
        'bundle/men_cmml/models/model.ts'
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, "models", TORCHSCRIPT_NAME), os.path.join(path, TORCHSCRIPT_NAME)):
        if os.path.isfile(candidate):
            return candidate
    raise DataError(
        f"{path}: no TorchScript model (neither the file, nor models/{TORCHSCRIPT_NAME} nor "
        f"{TORCHSCRIPT_NAME} in it); package the run with scripts/package_bundle.py or write it with "
        "python -m cmml_monai.deploy.export MODELS"
    )


def load_torchscript(path: str, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported network (:func:`export_torchscript`) in eval mode and the description embedded in it.

    Args:
        path: the ``model.ts`` file, a bundle folder or its ``models/`` folder (:func:`resolve_torchscript`).
        device: where the module goes.

    Returns:
        the module (called as ``module(image, tabular)``) and its description, whose ``model_dir`` is the
        folder of the file.

    Raises:
        DataError: no such file, not a TorchScript archive, or no cmml-monai description embedded.

    Example:
        >>> net, desc = load_torchscript("bundle/men_cmml")  # doctest: +SKIP
        >>> desc["data"]["class_names"]
        ['low', 'high']
    """
    ts = resolve_torchscript(path)
    extra = {DESCRIPTION_NAME: ""}
    try:
        module = torch.jit.load(ts, map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"{ts}: not a TorchScript model ({str(e).splitlines()[0] if str(e) else e})") from e
    if not extra[DESCRIPTION_NAME]:
        raise DataError(
            f"{ts} has no embedded {DESCRIPTION_NAME}; export it again with python -m cmml_monai.deploy.export MODELS"
        )
    try:
        desc = json.loads(extra[DESCRIPTION_NAME])
    except json.JSONDecodeError as e:
        raise DataError(f"{ts}: its embedded {DESCRIPTION_NAME} is not JSON ({e}); export it again") from e
    desc = check_description(desc, f"{ts} ({DESCRIPTION_NAME})")
    desc["model_dir"] = os.path.dirname(os.path.abspath(ts))
    return module.eval(), desc


def _write_onnx(network: torch.nn.Module, description: Mapping[str, Any], out: str, opset: int) -> list[str]:
    """Export ``network`` to ``out`` (dynamic batch) with ``network.json`` in its metadata; returns the input names."""
    import onnx

    image, tabular = example_inputs(description, batch_size=2)
    names = ["image"] if tabular is None else ["image", "tabular"]
    args = (image,) if tabular is None else (image, tabular)
    dynamic = {name: {0: "batch"} for name in [*names, "logits"]}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with torch.no_grad():
        # the TorchScript-based exporter: it follows the traced graph that export_torchscript checks
        torch.onnx.export(
            network,
            args,
            out,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(out)
    entry = model.metadata_props.add()
    entry.key = DESCRIPTION_NAME
    entry.value = json.dumps({k: v for k, v in description.items() if k != "model_dir"})
    onnx.save(model, out)
    return names


def export_onnx(
    model_dir: str,
    checkpoint: str | None = None,
    out: str | None = None,
    atol: float = DEFAULT_ATOL,
    opset: int = 17,
) -> tuple[str, dict[str, float]]:
    """Export the served network to ONNX with ``image`` and ``tabular`` inputs and a dynamic batch, and check
    it in onnxruntime against the eager network on every missing pattern (:func:`check_export`).

    Args:
        model_dir, checkpoint, atol: see :func:`export_torchscript`.
        out: the file written (default ``<model_dir>/model.onnx``); ``network.json`` goes into its metadata.
        opset: the ONNX opset.

    Returns:
        the path written and the differences per pattern.

    Raises:
        ModuleNotFoundError: onnx or onnxruntime is not installed (``pip install onnx onnxruntime``).
        DataError: no description, or a checkpoint that does not fit it.
        RuntimeError: onnxruntime differs from eager by more than ``atol`` on a pattern (the file is removed).

    Example:
        >>> path, diffs = export_onnx("outputs/derm7pt_cmml/models")  # doctest: +SKIP
        >>> onnxruntime.InferenceSession(path).run(None, {"image": image, "tabular": tabular})[0].shape
        (1, 5)
    """
    try:
        import onnx  # noqa: F401  (needed by _write_onnx: refused here, before any work)
        import onnxruntime
    except ImportError as e:
        raise ModuleNotFoundError(f"ONNX export needs onnx and onnxruntime ({e}): pip install onnx onnxruntime") from e
    description = load_description(model_dir)
    network = load_network(model_dir, checkpoint, "cpu")
    out = out or os.path.join(description["model_dir"], ONNX_NAME)
    names = _write_onnx(network, description, out, int(opset))
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])

    diffs = check_export(run, network, description)  # type: ignore[arg-type]
    worst = _check_or_remove(out, diffs, atol, "ONNX")
    logger.info("ONNX export: %s (max |onnxruntime - eager| %.3g, %d patterns)", out, worst, len(diffs))
    return out, diffs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmml_monai.deploy.export MODEL_DIR [--checkpoint PT] [--out TS] [--atol A] [--onnx]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cmml_monai.deploy.export",
        description="Export a trained run's models/model.pt to TorchScript with image and tabular inputs.",
    )
    parser.add_argument("model_dir", help="the run's models/ folder (network.json + model.pt)")
    parser.add_argument("--checkpoint", default=None, help="weights to export (default MODEL_DIR/model.pt)")
    parser.add_argument("--out", default=None, help="file to write (default MODEL_DIR/model.ts)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="accepted max logit difference to eager")
    parser.add_argument("--onnx", action="store_true", help="also write MODEL_DIR/model.onnx (needs onnx, onnxruntime)")
    args = parser.parse_args(argv)
    try:
        results = [export_torchscript(args.model_dir, args.checkpoint, args.out, args.atol)]
        if args.onnx:
            results.append(export_onnx(args.model_dir, args.checkpoint, None, args.atol))
    except (DataError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, diffs in results:
        print(f"wrote {path}")
        print("max |export - eager| per present subset:")
        for pattern, diff in diffs.items():
            print(f"  {pattern}: {diff:.3g}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
