"""as_bool: command-line strings such as ``--amp false`` must not read as true."""

from __future__ import annotations

import pytest

from cmml_monai.utils import as_bool


@pytest.mark.parametrize("value", [True, 1, "true", "True", "YES", "on", "1", " true "])
def test_true_values(value):
    assert as_bool(value) is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "off", "0", "none", ""])
def test_false_values(value):
    assert as_bool(value) is False


@pytest.mark.parametrize("value", ["flase", 2, [True], "maybe"])
def test_other_values_name_the_option(value):
    with pytest.raises(ValueError, match=r"mlflow_enabled must be true or false, got"):
        as_bool(value, "mlflow_enabled")


def test_lowercase_false_reaches_the_consumers(tmp_path):
    from functools import partial

    from cmml_monai.engines.optim import stage_parameter_groups
    from cmml_monai.handlers import MLflowTracker, ResumeHandler
    from cmml_monai.networks import CMMLNet, CMMLOptions, InputSpec, MultiModalEncoder

    RESNET10 = partial(MultiModalEncoder, image_encoder="resnet10")

    assert MLflowTracker(str(tmp_path), enabled="false").enabled is False
    assert ResumeHandler(str(tmp_path), {}, enabled="false").enabled is False
    net = CMMLNet(InputSpec(1, 3, 2, 2), feature_dim=16, encoder=RESNET10)
    groups = stage_parameter_groups(net, 2, 1e-3, freeze_crta="true")
    assert [g["name"] for g in groups] == ["main", "encoder"]  # the CRTA group is left out, not trained
    options = CMMLOptions(use_stage2="true", mark_synthesized="False")
    off = CMMLNet(InputSpec(1, 3, 2, 2, multi_label="no"), feature_dim=16, encoder=RESNET10, options=options)
    assert off.use_stage2 and not hasattr(off, "synth_embedding") and off.spec.multi_label is False
