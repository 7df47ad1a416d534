"""cmml_monai.deploy: serving a trained model (the top layer).

It owns what runs a published ``models/model.pt`` outside training: the network description written
beside it (``description``), the inference entry point of the bundle (``inference``,
``configs/inference.json``), the TorchScript export (``export``), the model-zoo bundle (``package``, its
metadata and model card ``card``) and the PACS pipeline: a DICOM study as the network's batch (``study``:
``scan``, ``select``, ``geometry``, ``clinical``), the DICOM SR + JSON result (``report``, highdicom), both together
(``pipeline``, ``python -m cmml_monai.deploy``) and the DICOM listener (``listener``, pynetdicom; its
allowlist and TLS ``access``, its durable study inbox ``inbox`` and crash-safe outbox ``outbox``), the
MLflow Model Registry entry (``register``, ``python -m cmml_monai.deploy.register``) and MONAI Label's
request transforms (``label``). It may import every layer below it; no other layer imports it.
``report``, ``pipeline``, ``listener``, ``register`` and ``label`` are imported by their module path (they
pull in highdicom, pynetdicom or MLflow's model flavours, or serve one client).
"""

from cmml_monai.deploy.description import (
    DESCRIPTION_NAME,
    DESCRIPTION_VERSION,
    WEIGHTS_NAME,
    build_from_description,
    completes_missing,
    describe_network,
    description_preprocessing,
    description_schema,
    file_sha256,
    load_description,
    load_network,
    resolve_model_dir,
    save_description,
)
from cmml_monai.deploy.export import (
    ONNX_NAME,
    TORCHSCRIPT_NAME,
    check_export,
    example_inputs,
    export_onnx,
    export_torchscript,
)
from cmml_monai.deploy.inference import (
    METRICS_NAME,
    PREDICTIONS_NAME,
    Predictor,
    check_cases,
    inference_cases,
    inference_dataset,
    probabilities,
    score_predictions,
)
from cmml_monai.deploy.study import (
    ClinicalSource,
    SeriesRules,
    StudyCase,
    load_study,
    pseudonym,
    scan_studies,
    study_case,
)

__all__ = [
    "DESCRIPTION_NAME",
    "DESCRIPTION_VERSION",
    "WEIGHTS_NAME",
    "build_from_description",
    "completes_missing",
    "describe_network",
    "description_preprocessing",
    "description_schema",
    "file_sha256",
    "load_description",
    "load_network",
    "resolve_model_dir",
    "save_description",
    "METRICS_NAME",
    "PREDICTIONS_NAME",
    "Predictor",
    "check_cases",
    "inference_cases",
    "inference_dataset",
    "probabilities",
    "score_predictions",
    "TORCHSCRIPT_NAME",
    "check_export",
    "example_inputs",
    "export_torchscript",
    "ONNX_NAME",
    "export_onnx",
    "ClinicalSource",
    "SeriesRules",
    "StudyCase",
    "load_study",
    "pseudonym",
    "scan_studies",
    "study_case",
]
