"""Case pictures (issue #32): saliency maps per present modality, the case page, ``--explain true`` of
configs/inference.json, and the page as a DICOM Secondary Capture in the study (CLI and listener).

(a) a tiny network trained on hand-made images whose class is decided by one square: the Grad-CAM map's mass
falls in the square's quadrant and moves with it; (b) a missing modality has no map and the marking of its
method; (c) the PNG page and the HTML index; (d) the SC: the study's UID, the page's pixels, referenced from the
SR, sent with it; the PHI marker only in the DICOM files.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.setup import DatasetInfo, fit_schema
from cmml_monai.data.synthetic import make_synthetic
from cmml_monai.deploy import completes_missing, save_description
from cmml_monai.deploy.__main__ import main
from cmml_monai.deploy.access import Access
from cmml_monai.deploy.listener import Listener, PacsNode
from cmml_monai.deploy.pipeline import StudyPipeline
from cmml_monai.evaluation.casepage import (
    PAGE_SIZE,
    RESEARCH_USE_ONLY,
    orthogonal_slices,
    read_page,
    save_page,
    write_index,
)
from cmml_monai.evaluation.explain import MISSING_COMPLETED, MISSING_NOT_USED, PRESENT, Explainer
from cmml_monai.networks import (
    CascadedResidualTransformerAE,
    CMMLNet,
    InputSpec,
    LateFusionNet,
    ModalityMemoryBank,
    MultiModalEncoder,
)

from bundle_helpers import RESNET10, build_network, run_bundle
from pacs_helpers import (
    MARKER,
    MARKER_DATE,
    PHI,
    ROOT,
    STUDY_ATTRIBUTES,
    free_port,
    make_study,
    send_study,
    study_files,
)

INFERENCE = os.path.join(ROOT, "configs", "inference.json")
S = 64  # image side: resnet10's last stage is 2 x 2, one cell per quadrant
NAN = float("nan")
SMALL_CMML = dict(
    crta=partial(CascadedResidualTransformerAE, num_blocks=1),
    memory=partial(ModalityMemoryBank, num_slots=4),
    projection_dim=8,
)


# -- (a) the maps follow the evidence ------------------------------------------------------------------------
def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 1-channel modalities of noise; class 1 has a bright square in modality 0, inside a random quadrant
    (returned); class 0 has none. Only the square decides the class."""
    image = torch.randn(n, 2, S, S, generator=gen) * 0.3
    label = torch.randint(0, 2, (n,), generator=gen)
    quad = torch.randint(0, 4, (n,), generator=gen)
    w = S // 5
    for b in range(n):
        if label[b]:
            r0, c0 = int(quad[b]) // 2 * S // 2, int(quad[b]) % 2 * S // 2
            r = r0 + int(torch.randint(2, S // 2 - w - 2, (1,), generator=gen))
            c = c0 + int(torch.randint(2, S // 2 - w - 2, (1,), generator=gen))
            image[b, 0, r : r + w, c : c + w] += 2.0
    return image, label, quad


def quadrant_mass(saliency: np.ndarray, quad: int) -> float:
    h = S // 2
    r0, c0 = quad // 2 * h, quad % 2 * h
    return float(saliency[r0 : r0 + h, c0 : c0 + h].sum() / max(saliency.sum(), 1e-12))


@pytest.fixture(scope="module")
def square_net() -> LateFusionNet:
    """Trained 30 steps (seconds on one thread): test accuracy 1.0 on the seeded draw below."""
    torch.manual_seed(0)
    net = LateFusionNet(InputSpec(2, 1, 2, 2), feature_dim=8, encoder=RESNET10, mode="zero_fill", dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(30):
        image, label, _ = draw(16, gen)
        loss = torch.nn.functional.cross_entropy(net(image), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.usefixtures("one_thread")
def test_map_mass_falls_in_the_deciding_square(square_net):
    image, label, quad = draw(48, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (square_net(image).argmax(1) == label).float().mean() >= 0.95
    explainer = Explainer(square_net, [("a", 1), ("b", 1)], completes=False, class_names=["none", "square"])
    masses = []
    for b in torch.nonzero(label == 1).flatten().tolist():
        e = explainer(image[b : b + 1], None, f"c{b}")
        assert e.method == "Grad-CAM" and e.target == "square"
        masses.append(quadrant_mass(e.maps[0].saliency, int(quad[b])))
    # a quarter of the image holds the square: chance is 0.25
    assert np.median(masses) > 0.6 and np.mean(np.array(masses) > 0.5) >= 0.75, np.round(masses, 2)
    # MONAI's hooks went on a copy: the served network shares no module or tensor with it
    assert explainer.network is not square_net
    served = {p.data_ptr() for p in square_net.parameters()}
    assert not served & {p.data_ptr() for p in explainer.network.parameters()}


@pytest.mark.usefixtures("one_thread")
def test_map_moves_when_its_modality_image_changes(square_net):
    image, label, quad = draw(48, torch.Generator().manual_seed(1))
    explainer = Explainer(square_net, [("a", 1), ("b", 1)], completes=False, class_names=["none", "square"])
    b = next(
        i
        for i in torch.nonzero(label == 1).flatten().tolist()
        if quadrant_mass(explainer(image[i : i + 1], None, "c").maps[0].saliency, int(quad[i])) > 0.6
    )
    before = explainer(image[b : b + 1], None, "c")
    moved = image[b : b + 1].clone()
    moved[0, 0] = torch.flip(moved[0, 0], dims=(0, 1))  # the square to the opposite quadrant
    after = explainer(moved, None, "c")
    assert quadrant_mass(after.maps[0].saliency, 3 - int(quad[b])) > 0.5
    assert np.abs(after.maps[0].saliency - before.maps[0].saliency).mean() > 0.1
    # the other modality's image changed: modality a's map stays (its own encoder; zero fill)
    other = image[b : b + 1].clone()
    other[0, 1] = torch.randn(S, S) * 0.3
    assert np.abs(explainer(other, None, "c").maps[0].saliency - before.maps[0].saliency).max() < 0.2


# -- (b) missing modalities ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,marking",
    [
        ("cmml", MISSING_COMPLETED),
        ("mean_impute", MISSING_COMPLETED),
        ("zero_fill", MISSING_NOT_USED),
        ("modality_dropout", MISSING_NOT_USED),
    ],
)
@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
@pytest.mark.usefixtures("one_thread", "seeded")
def test_a_missing_modality_has_no_map_and_its_marking(method, marking, spatial):
    sd = len(spatial)
    args = dict(
        image_modalities=3,
        image_channels=1,
        spatial_dims=sd,
        num_classes=3,
        tabular_cardinalities=[0, 2],
        feature_dim=8,
        encoder=RESNET10,
    )
    net = (
        build_network(CMMLNet, **args, **SMALL_CMML)
        if method == "cmml"
        else build_network(LateFusionNet, **args, mode=method)
    ).eval()
    explainer = Explainer(
        net, [("t1", 1), ("t2", 1), ("flair", 1)], completes_missing(net), ["a", "b", "c"], table_name="table"
    )
    image = torch.randn(1, 3, *spatial)
    image[:, 1] = NAN
    e = explainer(image, torch.full((1, 2), NAN), "case-1", {"age": None, "sex": None})
    assert [m.status for m in e.maps] == [PRESENT, marking, PRESENT] and e.table_status == marking
    assert e.maps[1].saliency is None and e.maps[1].image is None
    assert all(
        m.saliency.shape == spatial and m.saliency.min() >= 0 and m.saliency.max() <= 1 for m in (e.maps[0], e.maps[2])
    )
    assert e.completed == (["t2", "table"] if marking == MISSING_COMPLETED else [])
    assert sum(e.probabilities.values()) == pytest.approx(1.0)


@pytest.mark.usefixtures("one_thread", "seeded")
def test_the_pretrained_frozen_efficientnet_of_the_derm7pt_overlays_gets_gradcam_maps():
    enc = partial(MultiModalEncoder, image_encoder="efficientnet-lite0", pretrained=True, freeze_backbone=True)
    spec = dict(image_modalities=2, image_channels=3, spatial_dims=2, num_classes=3, tabular_cardinalities=[0, 2])
    net = build_network(CMMLNet, **spec, feature_dim=8, encoder=enc, **SMALL_CMML).eval()
    explainer = Explainer(net, [("clinic", 3), ("derm", 3)], True, ["a", "b", "c"], table_name="table")
    assert explainer.method == "gradcam" and explainer.layers[0].endswith("backbone.net._bn1")
    image = torch.randn(1, 6, 64, 64)
    image[:, 3:] = NAN
    e = explainer(image, torch.randn(1, 2), "case-1", {"age": 1.0, "sex": "f"})
    assert [m.status for m in e.maps] == [PRESENT, MISSING_COMPLETED]
    assert e.maps[0].saliency.shape == (64, 64) and e.maps[0].saliency.std() > 0


@pytest.mark.usefixtures("one_thread", "seeded")
def test_torchscript_gets_occlusion_and_a_shared_encoder_its_own_row(square_net):
    image, label, quad = draw(8, torch.Generator().manual_seed(1))
    b = int(torch.nonzero(label == 1)[0])
    traced = torch.jit.trace(square_net, (image[:1],))
    # patches larger than the square: hiding part of it leaves the rest to decide
    e = Explainer(traced, [("a", 1), ("b", 1)], completes=False, class_names=["none", "square"], mask_size=(24, 24))(
        image[b : b + 1], None, "c"
    )
    assert e.method == "occlusion" and e.maps[0].saliency.shape == (S, S)
    assert quadrant_mass(e.maps[0].saliency, int(quad[b])) > 0.5  # hiding the square is what costs the class
    with pytest.raises(ValueError, match="occlusion"):
        Explainer(traced, [("a", 1), ("b", 1)], False, ["none", "square"], method="gradcam")
    shared = LateFusionNet(
        InputSpec(2, 1, 2, 2),
        feature_dim=8,
        mode="zero_fill",
        encoder=partial(RESNET10, share_image_encoder=True, encode_present_only=True),
    ).eval()
    x = image[b : b + 1].clone()
    x[0, 0] = NAN  # the shared backbone then sees modality b alone
    e = Explainer(shared, [("a", 1), ("b", 1)], completes=False, class_names=["none", "square"])(x, None, "c")
    assert e.maps[0].saliency is None and e.maps[1].saliency.shape == (S, S)


# -- (c) the page --------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread", "seeded")
def test_page_png_has_the_page_size_and_no_text_chunk(square_net, tmp_path):
    image, label, _ = draw(4, torch.Generator().manual_seed(2))
    image[:, 1] = NAN
    e = Explainer(square_net, [("a", 1), ("b", 1)], completes=True, class_names=["none", "square"])(
        image[:1], None, "case-7"
    )
    path = str(tmp_path / "case-7.png")
    pixels = save_page(e, path)
    assert pixels.shape == (PAGE_SIZE[1], PAGE_SIZE[0], 3) and pixels.dtype == np.uint8
    with Image.open(path) as im:
        assert im.size == PAGE_SIZE and im.format == "PNG" and not im.info.get("dpi") and not getattr(im, "text", {})
    assert np.array_equal(read_page(path), pixels)
    # "RESEARCH USE ONLY" is drawn in its red at the top right and across the bottom
    red = np.all(np.abs(pixels.astype(int) - [192, 57, 43]) < 30, axis=-1)
    assert red[-60:].sum() > 500 and red[:70, PAGE_SIZE[0] // 2 :].sum() > 300
    index = write_index(
        [{"case_id": "case-<7>", "prediction": "square", "present": ["a"], "completed": ["b"], "page": "case-7.png"}],
        str(tmp_path / "index.html"),
    )
    text = open(index, encoding="utf-8").read()
    assert "case-&lt;7&gt;" in text and 'href="case-7.png"' in text and RESEARCH_USE_ONLY in text


def test_3d_slices_go_through_the_map_maximum():
    picture = np.random.default_rng(0).random((1, 10, 12, 8)).astype(np.float32)
    saliency = np.zeros((10, 12, 8), np.float32)
    saliency[3, 9, 6] = 1.0
    slices = orthogonal_slices(picture, saliency)
    assert [label for label, _, _ in slices] == ["sagittal 3", "coronal 9", "axial 6"]
    assert all(sal.max() == 1.0 for _, _, sal in slices)
    # shown superior up: the sagittal picture is [z, y] with z flipped
    assert np.array_equal(slices[0][1][0], picture[0, 3].T[::-1])


def _served(tmp_path, dataset: str, method: str, spatial: tuple[int, ...], **synthetic) -> tuple[str, str]:
    """An untrained served model (models/network.json + model.pt) of ``dataset`` and its synthetic cases."""
    data = str(tmp_path / dataset)
    make_synthetic(dataset, data, cases=12, seed=0, **synthetic)
    cases = load_dataset(dataset, data)
    schema = fit_schema(cases)
    info = DatasetInfo(cases, schema)
    args = dict(
        image_modalities=info.image_modalities,
        image_channels=info.image_channels,
        spatial_dims=info.spatial_dims,
        num_classes=info.num_classes,
        tabular_cardinalities=info.tabular_cardinalities,
        feature_dim=8,
        encoder=RESNET10,
    )
    torch.manual_seed(0)
    net = (
        build_network(CMMLNet, **args, **SMALL_CMML)
        if method == "cmml"
        else build_network(LateFusionNet, **args, mode=method)
    )
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "models"))
    torch.save(net.state_dict(), os.path.join(run, "models", "model.pt"))
    save_description(
        run, net, cases, schema, spatial_size=spatial, pixdim=(2.0,) * 3 if len(spatial) == 3 else None, method=method
    )
    return run, data


@pytest.mark.parametrize(
    "dataset,method,spatial,synthetic",
    [
        ("derm7pt", "cmml", (32, 32), {}),
        ("men", "zero_fill", (8, 8, 8), {"shape": (8, 8, 8)}),
    ],
)
def test_inference_config_explain_writes_one_page_per_case(tmp_path, dataset, method, spatial, synthetic):
    run, data = _served(tmp_path, dataset, method, spatial, **synthetic)
    pred = str(tmp_path / "pred")
    done = run_bundle(
        INFERENCE,
        ROOT,
        "--model_dir",
        os.path.join(run, "models"),
        "--dataset_dir",
        data,
        "--dataset",
        dataset,
        "--output_dir",
        pred,
        "--device",
        "cpu",
        "--explain",
        "true",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cases = sorted(f[:-5] for f in os.listdir(os.path.join(pred, "cases")) if f.endswith(".json"))
    pages = sorted(f[:-4] for f in os.listdir(os.path.join(pred, "cases")) if f.endswith(".png"))
    with open(os.path.join(pred, "predictions.csv"), encoding="utf-8") as f:
        predicted = len(f.readlines()) - 1
    assert pages == cases and len(cases) == predicted >= 10
    for name in pages:
        with Image.open(os.path.join(pred, "cases", name + ".png")) as im:
            assert im.size == PAGE_SIZE
    index = open(os.path.join(pred, "cases", "index.html"), encoding="utf-8").read()
    assert all(f'href="{name}.png"' in index for name in pages)
    assert f"case pages (Grad-CAM maps) for {predicted} case(s)" in done.stderr + done.stdout


# -- (d) the Secondary Capture in the PACS ------------------------------------------------------------------
@pytest.fixture(scope="module")
def men_bundle(tmp_path_factory) -> str:
    return _served(tmp_path_factory.mktemp("men_served"), "men", "cmml", (8, 8, 8), shape=(8, 8, 8))[0]


class TwoClassPacs:
    """A second Storage SCP taking SRs and Secondary Captures; keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.node = PacsNode("127.0.0.1", self.server.server_address[1], "PACS")

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _check_sc(sc_path: str, png_path: str, study_uid: str, sr: pydicom.Dataset) -> None:
    sc = pydicom.dcmread(sc_path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.StudyInstanceUID == study_uid
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID and sc.BurnedInAnnotation == "YES"
    assert np.array_equal(sc.pixel_array, read_page(png_path))
    # the marker sits only in the attributes copied from the study
    with_marker = {e.keyword for e in sc.iterall() if MARKER in str(e.value) or MARKER_DATE in str(e.value)}
    assert with_marker and with_marker <= STUDY_ATTRIBUTES, with_marker
    refs = [item for item in sr.ContentSequence if item.ValueType == "IMAGE"]
    assert [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs] == [sc.SOPInstanceUID]


def test_cli_explain_writes_the_sc_beside_the_sr_without_phi_elsewhere(men_bundle, tmp_path, capsys, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2", "FLAIR"), patient=PHI)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert (
            main([study["folder"], "--bundle", men_bundle, "--out", str(out), "--key", "k", "--explain", "--verbose"])
            == 0
        )
    printed = capsys.readouterr()
    sr_path, json_path, sc_path = printed.out.split()
    png_path = sc_path[: -len(".sc.dcm")] + ".png"
    sr = pydicom.dcmread(sr_path)
    _check_sc(sc_path, png_path, study["uid"], sr)
    assert "RESEARCH USE ONLY" in pydicom.dcmread(sc_path).ImageComments
    # outside DICOM: no marker in the page's pixels' file, the index, the JSON, nor the logs
    for name in os.listdir(out):
        data = open(out / name, "rb").read()
        found = MARKER.encode() in data or MARKER_DATE.encode() in data
        assert found == name.endswith(".dcm"), name
    with Image.open(png_path) as im:
        assert not getattr(im, "text", {}) and im.size == PAGE_SIZE
    assert os.path.basename(png_path) in open(out / "index.html", encoding="utf-8").read()
    for text in (printed.out, printed.err, caplog.text):
        assert MARKER not in text and MARKER_DATE not in text
    assert "case page (Grad-CAM maps)" in caplog.text


def test_listener_sends_the_sc_with_the_sr(men_bundle, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pacs = TwoClassPacs()
    pipeline = StudyPipeline(men_bundle, str(tmp_path / "out"), key="k", explain=True)
    node = Listener(
        pipeline, pacs.node, port=free_port(), access=Access(("MODALITY",)), stable_age=0.5, retry_interval=0.2
    )
    study = make_study(str(tmp_path / "study"), ("T1c", "T1", "T2", "FLAIR"), patient=PHI)
    node.start()
    try:
        send_study(study_files(study), node.port)
        end = time.monotonic() + 120
        while len(pacs.received) < 2 and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        node.stop()
        pacs.stop()
    kinds = sorted(str(ds.SOPClassUID) for ds in pacs.received)
    assert kinds == sorted([ComprehensiveSRStorage, SecondaryCaptureImageStorage]), node.results
    sr = next(ds for ds in pacs.received if ds.SOPClassUID == ComprehensiveSRStorage)
    sc = next(ds for ds in pacs.received if ds.SOPClassUID == SecondaryCaptureImageStorage)
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == study["uid"]
    ((sr_path, _),) = node.results
    png = pipeline.captures[sr_path][: -len(".sc.dcm")] + ".png"
    assert np.array_equal(sc.pixel_array, read_page(png))
    refs = [item for item in sr.ContentSequence if item.ValueType == "IMAGE"]
    assert refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert "case page (Grad-CAM maps)" in caplog.text and "stored at PACS" in caplog.text
    assert MARKER not in caplog.text and MARKER_DATE not in caplog.text


def test_page_marks_a_cell_missing_by_the_rule_that_made_it_nan_for_the_model():
    # a blank or NA cell is missing for the model (data.table.is_empty_cell), so the page must not call it given
    from cmml_monai.evaluation.casepage import _inputs_text
    from cmml_monai.evaluation.explain import PRESENT, CaseExplanation

    table = {"age": "  ", "sex": float("nan"), "site": None, "size": 3.5, "kind": "ab"}
    text = _inputs_text(CaseExplanation("c1", {"a": 1.0}, "a", "Grad-CAM", [], 2, table, PRESENT))
    for column in ("age", "sex", "site"):
        assert f"    {column}: (missing)" in text
    assert "    size: 3.5" in text and "    kind: ab" in text
