"""CMML multimodal diagnosis as a MONAI Deploy application: a DICOM MR study in, a DICOM Comprehensive SR and
a JSON out (research use only); on request also the case page (PNG) and its DICOM Secondary Capture.

The SDK's standard command line (``-i`` input, ``-o`` output, ``-m`` model; or the environment variables
``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH`` that a MONAI Application Package
sets)::

    python deploy_app/app.py -i STUDY_DIR -o OUT -m BUNDLE_DIR

``-m`` is a bundle packaged by ``scripts/package_bundle.py`` (its ``models/model.ts`` is served), its
``models/`` folder, or the ``model.ts`` file itself. The SDK's parser takes no other option, so the rest
comes from the environment, with the meaning of ``python -m cmml_monai.deploy``'s options of the same name:

- ``CMML_PSEUDONYM_KEY``: the pseudonym key (cases are named by the keyed hash of the StudyInstanceUID);
- ``CMML_SERIES_RULES``: JSON file of series rules (``--rules``);
- ``CMML_CLINICAL_CSV``, ``CMML_ID_COLUMN``, ``CMML_KEY_ATTRIBUTE``: clinical values from a table;
- ``CMML_IRREGULAR``: ``refuse`` (default) or ``resample``;
- ``CMML_EACH_STUDY``: ``1`` to process each study of the input folder (default: exactly one);
- ``CMML_DEVICE``: where the network runs (default ``cuda`` when available, else ``cpu``);
- ``CMML_VERBOSE``: ``1`` to log the series selection of each case (``--verbose``);
- ``CMML_EXPLAIN``: ``1`` (or ``gradcam``) to also write the case page ``<case>.png``, its Secondary Capture
  ``<case>.sc.dcm`` (the study's, its own series, "RESEARCH USE ONLY" burned in, referenced from the SR) and
  ``index.html`` (``--explain``). The maps are Grad-CAM on the eager network rebuilt from the bundle's
  ``models/network.json`` and ``models/model.pt`` beside ``model.ts`` (a TorchScript module exposes no encoder
  layer to hook); ``occlusion``: MONAI's occlusion sensitivity on the served TorchScript module instead (no
  weights needed, many forward passes: slow). Default ``0``.

Bad input exits with status 2, its last stderr line ``error: ...`` (before it, holoscan logs the failed
operator); nothing is half-written. No line names a patient: cases are named by their pseudonym.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence

import torch
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from cmml_monai.data.errors import DataError
from cmml_monai.deploy.export import load_torchscript
from cmml_monai.deploy.pipeline import load_rules, pseudonym_key, set_log_levels
from cmml_monai.deploy.report import model_identity
from cmml_monai.deploy.study import ClinicalSource

# the app's folder is on sys.path when it runs as a script, as in the SDK's application layout
from cmml_operators import (
    CasePageOperator,
    SeriesSelectorOperator,
    SRWriterOperator,
    StudyLoaderOperator,
    TorchScriptInferenceOperator,
    explained_network,
)

__all__ = ["CMMLDiagnosisApp", "main"]

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes")


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def _explain_method() -> str | None:
    """``CMML_EXPLAIN``: None (no page), ``"gradcam"`` or ``"occlusion"``."""
    value = (_env("CMML_EXPLAIN", "0") or "0").lower()
    if value in ("0", "false", "no"):
        return None
    return "gradcam" if value in _TRUE else value


class CMMLDiagnosisApp(Application):
    """Loader -> series selector -> TorchScript inference -> (case page, with ``CMML_EXPLAIN``) -> SR writer, on
    one study folder.

    Example:
        >>> CMMLDiagnosisApp().run()  # reads -i/-o/-m from sys.argv  # doctest: +SKIP
    """

    def compose(self) -> None:
        """Build the operator graph from the SDK's app context (input, output, model) and the environment."""
        context = Application.init_app_context(self.argv)
        set_log_levels(verbose=_env("CMML_VERBOSE", "0").lower() in _TRUE)
        device = _env("CMML_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
        network, description = load_torchscript(str(context.model_path), device=device)
        name, version = model_identity(description, description["model_dir"])
        clinical = ClinicalSource(
            csv=_env("CMML_CLINICAL_CSV"),
            id_column=_env("CMML_ID_COLUMN", "case_id"),
            key_attribute=_env("CMML_KEY_ATTRIBUTE"),
        )
        loader = StudyLoaderOperator(
            self,
            CountCondition(self, 1),
            input_folder=str(context.input_path),
            each_study=_env("CMML_EACH_STUDY", "0").lower() in _TRUE,
            name="study_loader",
        )
        selector = SeriesSelectorOperator(
            self,
            description=description,
            rules=load_rules(_env("CMML_SERIES_RULES")),
            clinical=clinical,
            key=pseudonym_key(None),
            irregular=_env("CMML_IRREGULAR", "refuse"),
            name="series_selector",
        )
        inference = TorchScriptInferenceOperator(
            self, network=network, description=description, name="torchscript_inference"
        )
        writer = SRWriterOperator(
            self, output_folder=str(context.output_path), model_name=name, model_version=version, name="sr_writer"
        )
        self.add_flow(loader, selector, {("studies", "studies")})
        self.add_flow(selector, inference, {("cases", "cases")})
        method = _explain_method()
        if method is None:
            self.add_flow(inference, writer, {("results", "results")})
        else:  # the page and its SC before the SR, which references the SC
            pages = CasePageOperator(
                self,
                network=explained_network(network, description, method, device),
                description=description,
                output_folder=str(context.output_path),
                model_name=name,
                model_version=version,
                name="case_page",
            )
            self.add_flow(inference, pages, {("results", "results")})
            self.add_flow(pages, writer, {("results", "results")})
        logger.info("served model: %s %s on %s%s", name, version, device, f"; case pages: {method}" if method else "")


def _run(argv: Sequence[str] | None) -> str | None:
    """Run the application; the ``error:`` line of bad input, or ``None``."""
    app = CMMLDiagnosisApp() if argv is None else CMMLDiagnosisApp(list(argv))
    try:
        app.run()
    except (DataError, ValueError) as e:
        return f"error: {e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the application; returns the exit status (2: bad input, one ``error:`` line on stderr, the last).

    Example:
        >>> main(["app.py", "-i", "study", "-o", "out", "-m", "bundle/men_cmml"])  # doctest: +SKIP
        0
    """
    message = _run(argv)
    # the SDK's executor logs its teardown when the application is collected: before the error line
    gc.collect()
    if message is not None:
        print(message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
