"""Value checks of the CMML mechanisms whose slips would only show as "CMML behind the baselines".

Each test asserts numbers computed independently of the code under test (NumPy / scikit-learn by
hand, or the served path on explicitly masked inputs), so a mechanism that silently does nothing,
or does the wrong thing, fails here instead of looking like a weak method on real data:

- the missing-rate sweep scores every rate on that rate's saved masks, and on the checkpoint's weights;
- stage 2's second view really drops modalities (and is the served path on those inputs);
- the alignment loss covers the real modalities only;
- SupCon uses its temperature;
- the CRTA completes missing slots from the present tokens;
- the memory read is ``softmax(cos(q, M) / tau) @ M``;
- every method overlay of the bundle builds the network it names.

Tiny sizes throughout (resnet10, d = 16, 32 px, a dozen test cases) so the file runs in seconds on CPU.
"""

from __future__ import annotations

import csv
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from sklearn.metrics import roc_auc_score

from cmml_monai.data import DatasetInfo, fit_schema, load_cases
from cmml_monai.data.dataset import build_dataset
from cmml_monai.evaluation import MissingRateSweep
from cmml_monai.losses import AlignmentLoss, CMMLLoss, SupConLoss
from cmml_monai.metrics import expected_calibration_error
from cmml_monai.networks import CascadedResidualTransformerAE, CMMLNet, ContextTokens, LateFusionNet, ModalityMemoryBank

from bundle_helpers import RESNET10, build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
NAN = float("nan")
D = 16
SMALL = dict(
    feature_dim=D,
    encoder=RESNET10,
    crta=partial(CascadedResidualTransformerAE, num_blocks=2),
    memory=partial(ModalityMemoryBank, num_slots=8),
    projection_dim=8,
    context=partial(ContextTokens, num_tokens=4),
    dropout=0.0,
)
SWEEP_RATES = [0.0, 0.3, 0.7]
MASK_SEED = 3
# a synthetic test case has a location unseen in training (encoded as a missing cell): expected here
pytestmark = [pytest.mark.filterwarnings("ignore:table column"), pytest.mark.usefixtures("one_thread", "seeded")]


# ---------------------------------------------------------------------------------------------
# helpers
def tiny_cmml(**kw) -> CMMLNet:
    """CMML for two 3-channel 2D images and a 3-feature table (numeric, 4 codes, numeric), 5 classes."""
    args = dict(image_modalities=2, image_channels=3, spatial_dims=2, num_classes=5, tabular_cardinalities=[0, 4, 0])
    args.update(SMALL)
    args.update(kw)
    return build_network(CMMLNet, **args)


def mask_inputs(
    image: torch.Tensor, tabular: torch.Tensor | None, present: np.ndarray | torch.Tensor, channels: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NaN into the absent modalities, written here by hand (not with ``apply_presence_mask``)."""
    present = np.asarray(present, dtype=bool)
    image, tabular = image.clone(), None if tabular is None else tabular.clone()
    m = image.shape[1] // channels
    for i in range(present.shape[0]):
        for j in range(m):
            if not present[i, j]:
                image[i, j * channels : (j + 1) * channels] = NAN
        if tabular is not None and not present[i, m]:
            tabular[i] = NAN
    return image, tabular


def batch_inputs(present: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 32 px images and a table for ``present [B, 3]`` (NaN where absent)."""
    g = torch.Generator().manual_seed(seed)
    b = present.shape[0]
    image = torch.randn(b, 6, 32, 32, generator=g)
    tab = torch.stack(
        [torch.randn(b, generator=g), torch.randint(0, 4, (b,), generator=g).float(), torch.randn(b, generator=g)],
        dim=1,
    )
    return mask_inputs(image, tab, present.numpy(), 3)


def hand_macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest macro AUC with scikit-learn over the classes that have both outcomes."""
    scored = [c for c in range(probs.shape[1]) if 0 < (labels == c).sum() < len(labels)]
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in scored]
    return float(np.mean(aucs))


def hand_presence(natural: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """The documented mask rule: one uniform draw per cell, drop when ``u < rate``; when a case would lose
    every modality, its present modality with the largest draw stays."""
    u = np.random.default_rng(seed).random(natural.shape)
    out = natural & (u >= rate)
    for i in np.flatnonzero(~out.any(axis=1)):
        out[i, np.argmax(np.where(natural[i], u[i], -1.0))] = True
    return out


def numpy_supcon(z: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """SupCon (Khosla et al. 2020) written out with loops: mean over anchors that have a positive."""
    n = z.shape[0]
    multi = labels.ndim == 2
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if (labels[i] @ labels[p] > 0 if multi else labels[i] == labels[p])]
        if not positives:
            continue
        log_denominator = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
        losses.append(-np.mean([z[i] @ z[p] / temperature - log_denominator for p in positives]))
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------------------
# the missing-rate sweep
@pytest.fixture(scope="module")
def derm(tmp_path_factory) -> dict:
    """Synthetic Derm7pt (29 cases, 12 in test), its schema, network arguments and the test dataset."""
    base = tmp_path_factory.mktemp("mechanics")
    case_list = load_cases("derm7pt", str(base / "syn"), synthetic=True, synthetic_cases=30, seed=0)
    schema = fit_schema(case_list, str(base / "table_schema.json"))
    info = DatasetInfo(case_list, schema)
    dataset = build_dataset(case_list, "test", schema, spatial_size=(32, 32), cache="none")
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "base": base,
        "case_list": case_list,
        "dataset": dataset,
        "net_args": dict(
            image_modalities=info.image_modalities,
            image_channels=info.image_channels,
            spatial_dims=info.spatial_dims,
            num_classes=info.num_classes,
            tabular_cardinalities=info.tabular_cardinalities,
        ),
        "image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
        "tabular": torch.stack([torch.as_tensor(it["tabular"]) for it in items]),
        "labels": np.array([int(it["label"]) for it in items]),
        "case_ids": [str(it["case_id"]) for it in items],
    }


def derm_net(derm: dict, seed: int) -> CMMLNet:
    torch.manual_seed(seed)
    return build_network(CMMLNet, **derm["net_args"], **SMALL).eval()


@torch.no_grad()
def expected_metrics(net: torch.nn.Module, derm: dict, present: np.ndarray) -> dict:
    """AUC (scikit-learn), accuracy and ECE of ``net`` on the test cases with ``present`` applied by hand."""
    image, tab = mask_inputs(derm["image"], derm["tabular"], present, derm["net_args"]["image_channels"])
    probs = torch.softmax(net.eval()(image, tab), dim=1).numpy().astype(np.float64)
    labels = derm["labels"]
    return {
        "auc": hand_macro_auc(probs, labels),
        "acc": float((probs.argmax(axis=1) == labels).mean()),
        "ece": expected_calibration_error(probs, labels),
        "probs": probs,
    }


def run_sweep(
    net: torch.nn.Module,
    derm: dict,
    name: str,
    rates: list[float],
    checkpoint: str | None = None,
    predictions: bool = False,
) -> list:
    sweep = MissingRateSweep(
        net,
        derm["case_list"],
        derm["dataset"],
        str(derm["base"] / name),
        str(derm["base"] / f"{name}_masks"),
        method=name,
        split="test",
        rates=rates,
        seed=MASK_SEED,
        subsets=False,
        roc=False,
        checkpoint=checkpoint,
        device="cpu",
        amp=False,
        batch_size=5,  # 5: the 12 test cases span several batches
        predictions=predictions,
    )
    return sweep.run()


def derm_natural(derm: dict) -> np.ndarray:
    """Natural presence of the test cases, read from the NaNs of the packed inputs."""
    c = derm["net_args"]["image_channels"]
    image, tab = derm["image"], derm["tabular"]
    m = image.shape[1] // c
    cols = [~torch.isnan(image[:, j * c : (j + 1) * c]).flatten(1).all(dim=1) for j in range(m)]
    cols.append(~torch.isnan(tab).all(dim=1))
    return torch.stack(cols, dim=1).numpy()


def test_sweep_scores_each_rate_on_its_own_saved_masks(derm):
    net = derm_net(derm, seed=1)
    rows = run_sweep(net, derm, "per_rate", SWEEP_RATES, predictions=True)
    with open(derm["base"] / "per_rate_masks" / "masks_test.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["case_ids"] == derm["case_ids"] and saved["seed"] == MASK_SEED
    masks = {float(r): np.array([[c == "1" for c in row] for row in rows_]) for r, rows_ in saved["masks"].items()}
    natural = masks[0.0]
    # rate 0 is the natural presence (this synthetic split lacks some modalities naturally)
    np.testing.assert_array_equal(natural, derm_natural(derm))
    assert natural.shape == (12, 3) and not natural.all()
    expected_by_rate = {}
    for rate, row in zip(SWEEP_RATES, rows):
        # the saved mask of each rate follows the documented rule (so a file holding rate-0 masks under
        # every rate fails here) ...
        wrong = int((masks[rate] != hand_presence(natural, rate, MASK_SEED)).sum())
        assert wrong == 0, f"saved mask of rate {rate} is not that rate's seeded mask ({wrong} cells differ)"
        # ... and the row of that rate is the network scored on exactly those masked inputs
        expected = expected_metrics(net, derm, masks[rate])
        expected_by_rate[rate] = expected
        assert row["rate"] == rate and row["n"] == 12
        assert row["auc"] == pytest.approx(expected["auc"], abs=1e-6), f"AUC at rate {rate}"
        assert row["acc"] == pytest.approx(expected["acc"], abs=1e-9), f"accuracy at rate {rate}"
        assert row["ece"] == pytest.approx(expected["ece"], abs=1e-5), f"ECE at rate {rate}"
        # the per-case predictions of the rate: the same probabilities, and the inputs each case kept
        with open(derm["base"] / "per_rate" / f"predictions_rate{rate:g}.csv", encoding="utf-8") as f:
            cases = list(csv.DictReader(f))
        assert [c["case_id"] for c in cases] == derm["case_ids"]
        names = derm["case_list"].class_names
        probs = np.array([[float(c[f"prob_{n}"]) for n in names] for c in cases])
        np.testing.assert_allclose(probs, expected["probs"], atol=1e-6)
        assert [c["prediction"] for c in cases] == [names[i] for i in probs.argmax(axis=1)]
        modalities = derm["case_list"].modality_names
        assert [c["present"] for c in cases] == ["+".join(m for m, p in zip(modalities, r) if p) for r in masks[rate]]
    # the test has teeth: masks and predictions differ between rates
    assert masks[0.7].sum() < masks[0.3].sum() < natural.sum()
    assert not np.allclose(expected_by_rate[0.7]["probs"], expected_by_rate[0.0]["probs"], atol=1e-4)
    assert expected_by_rate[0.7]["ece"] != pytest.approx(expected_by_rate[0.0]["ece"], abs=1e-4)


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "checkpoint_dict"])
def test_sweep_scores_the_checkpoint_weights_not_the_weights_in_memory(derm, wrapped):
    trained = derm_net(derm, seed=1)
    in_memory = derm_net(derm, seed=2)  # same architecture, other weights
    untouched = derm_net(derm, seed=2)  # a copy of the in-memory weights, for comparison
    path = str(derm["base"] / f"weights_{wrapped}.pt")
    state = trained.state_dict()
    torch.save({"network": state} if wrapped else state, path)
    rates = [0.0, 0.7]
    rows = run_sweep(in_memory, derm, f"ckpt_{wrapped}", rates, checkpoint=path)
    masks = {r: hand_presence(derm_natural(derm), r, MASK_SEED) for r in rates}
    for rate, row in zip(rates, rows):
        want = expected_metrics(trained, derm, masks[rate])
        before = expected_metrics(untouched, derm, masks[rate])
        # the two weight sets give distinguishable scores, so the check below means something
        assert want["ece"] != pytest.approx(before["ece"], abs=1e-4)
        why = "is not the checkpoint's weights on that rate's masks"
        assert row["ece"] == pytest.approx(want["ece"], abs=1e-5), f"ECE at rate {rate} {why}"
        assert row["auc"] == pytest.approx(want["auc"], abs=1e-6), f"AUC at rate {rate} {why}"
    for key, value in trained.state_dict().items():
        assert torch.equal(in_memory.state_dict()[key], value), f"{key} not loaded from the checkpoint"


# ---------------------------------------------------------------------------------------------
# stage 2: the second view
def test_stage2_second_view_drops_modalities_and_matches_the_served_path_on_them():
    net = tiny_cmml(stage2_drop_prob=1.0).eval()  # eval: no dropout / batch statistics, values comparable
    net.stage2_trained.fill_(True)  # served path = the stage-2 head, as after stage-2 training
    present = torch.tensor([[True, True, True], [True, True, False], [False, True, True], [True, True, True]])
    image, tab = batch_inputs(present)
    with torch.no_grad():
        out = net.forward_train(image, tab, stage=2)
        b = present.shape[0]
        view1, view2 = out["proj_present"][:b], out["proj_present"][b:]
        assert torch.equal(view1, present) and torch.equal(out["present"], present)
        # drop probability 1: every case keeps exactly one of its modalities in view 2
        assert view2.sum(dim=1).tolist() == [1, 1, 1, 1] and not (view2 & ~present).any()
        assert torch.equal(out["recon_mask"], present & ~view2)
        # view 2 is what the served network computes when view 2's dropped modalities are NaN
        served2 = net(*mask_inputs(image, tab, view2.numpy(), 3))
        torch.testing.assert_close(out["logits_dropped"], served2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["logits"], net(image, tab), atol=1e-5, rtol=1e-4)
        # so the two views, and their contrastive projections, differ case by case
        assert (out["logits_dropped"] - out["logits"]).abs().amax(dim=1).min() > 1e-4
        assert (out["proj"][b:] - out["proj"][:b]).abs().amax(dim=1).min() > 1e-4


def test_stage2_views_coincide_without_extra_drop():
    net = tiny_cmml(stage2_drop_prob=0.0).eval()
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    image, tab = batch_inputs(present, seed=1)
    with torch.no_grad():
        out = net.forward_train(image, tab, stage=2)
    b = present.shape[0]
    assert torch.equal(out["proj_present"][b:], present) and not out["recon_mask"].any()
    torch.testing.assert_close(out["logits_dropped"], out["logits"])
    torch.testing.assert_close(out["proj"][b:], out["proj"][:b])


# ---------------------------------------------------------------------------------------------
# alignment
def test_alignment_loss_excludes_masked_slots_hand_value():
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # 1 - cos per slot: case 0 -> 0, 1, 2; case 1 -> 1, 0, 2
    aligned = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [[5.0, 0.0], [0.0, 0.5], [0.0, -1.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert AlignmentLoss()(aligned, reference, mask).item() == pytest.approx((0 + 1 + 1) / 3, abs=1e-6)
    assert AlignmentLoss()(aligned, reference).item() == pytest.approx((0 + 1 + 2 + 1 + 0 + 2) / 6, abs=1e-6)


def test_stage2_alignment_term_covers_only_the_real_modalities():
    net = tiny_cmml().eval()
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [True, True, False]])
    image, tab = batch_inputs(present, seed=2)
    label = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        out = net.forward_train(image, tab, stage=2)
        terms = CMMLLoss(stage=2, w_align=0.5)(out, label)
    assert torch.equal(out["align_mask"], present), "align_mask must be the observed presence (real modalities)"
    aligned, reference = out["aligned"].double().numpy(), out["reference"].double().numpy()
    cos = np.einsum("bkp,bp->bk", aligned, reference) / (
        np.linalg.norm(aligned, axis=-1) * np.linalg.norm(reference, axis=-1, keepdims=True)
    )
    mask = present.numpy()
    by_hand = float((1.0 - cos)[mask].mean())
    assert abs(by_hand - float((1.0 - cos).mean())) > 1e-4  # the missing slots would change the value
    assert terms["align"].item() == pytest.approx(0.5 * by_hand, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# SupCon
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_numpy_at_temperature(temperature):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 1])  # class 2 has no positive: that anchor is excluded
    want = numpy_supcon(z.double().numpy(), labels.numpy(), temperature)
    assert SupConLoss(temperature)(z, labels).item() == pytest.approx(want, rel=1e-4)
    multi = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]]).float()
    want_multi = numpy_supcon(z.double().numpy(), multi.numpy(), temperature)
    assert SupConLoss(temperature)(z, multi).item() == pytest.approx(want_multi, rel=1e-4)


def test_cmml_loss_passes_its_temperature_to_supcon():
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 4, generator=g), dim=1)  # 2 views x 3 cases
    label = torch.tensor([0, 1, 0])
    terms = CMMLLoss(stage=2, w_supcon=1.0, temperature=0.3)({"logits": torch.zeros(3, 2), "proj": z}, label)
    want = numpy_supcon(z.double().numpy(), label.repeat(2).numpy(), 0.3)
    assert want != pytest.approx(numpy_supcon(z.double().numpy(), label.repeat(2).numpy(), 0.07), rel=1e-3)
    assert terms["supcon"].item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# CRTA
@pytest.mark.parametrize("with_context", [True, False], ids=["context", "no_context"])
def test_crta_missing_slot_is_completed_from_each_present_token(with_context):
    torch.manual_seed(0)
    crta = CascadedResidualTransformerAE(3, D, num_blocks=2, num_heads=4, dropout=0.0).eval()
    tokens = torch.randn(1, 3, D)
    present = torch.tensor([[True, False, True]])
    context = torch.randn(1, 4, D) if with_context else None
    with torch.no_grad():
        base, _, blocks = crta(tokens, present, context)
        # present slots are the encoder tokens, untouched
        torch.testing.assert_close(base[:, [0, 2]], tokens[:, [0, 2]], rtol=0, atol=0)
        for j in (0, 2):
            moved = tokens.clone()
            moved[:, j] += torch.randn(1, D)
            out, _, moved_blocks = crta(moved, present, context)
            change = (moved_blocks[:, :, 1] - blocks[:, :, 1]).abs().amax(dim=(1, 2))
            # every block's synthesis of slot 1 reads present slot j
            assert (change > 1e-3).all(), f"slot 1 ignores present slot {j}: change per block {change.tolist()}"
        # the content under a missing slot is never read
        junk = tokens.clone()
        junk[:, 1] = 100.0
        torch.testing.assert_close(crta(junk, present, context)[0], base, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# memory bank
def test_memory_read_is_softmax_of_cosine_over_tau_times_slots():
    torch.manual_seed(0)
    bank = ModalityMemoryBank(2, 4, num_slots=3, tau=0.2)
    slots = torch.tensor(
        [
            [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 3.0]],
            [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [1.0, -1.0, 1.0, -1.0]],
        ]
    )
    bank.memory.copy_(slots)  # unnormalised slots: the read mixes the raw slots, weighted by cosine
    q = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.1]], [[0.0, 1.0, 1.0, 1.0], [3.0, -1.0, 0.0, 0.0]]])
    qn, mn = q.double().numpy(), slots.double().numpy()
    want = np.zeros_like(qn)
    for b in range(2):
        for m in range(2):
            cos = mn[m] @ qn[b, m] / (np.linalg.norm(mn[m], axis=1) * np.linalg.norm(qn[b, m]))
            w = np.exp(cos / 0.2) / np.exp(cos / 0.2).sum()
            want[b, m] = w @ mn[m]
    r = bank.read(q)
    diff = float(np.abs(r.double().numpy() - want).max())
    assert diff < 1e-5, f"memory read != softmax(cos(q, M) / tau) @ M (max abs diff {diff:.3g})"
    # enrichment: f + sigmoid(W_m [f; r] + b_m) * r on the synthesised slot only
    present = torch.tensor([[True, False], [False, True]])
    with torch.no_grad():
        out = bank(q, present)
    w_gate, b_gate = bank.gate.weight.detach().double().numpy(), bank.gate.bias.detach().double().numpy()
    for b, m in ((0, 1), (1, 0)):
        gate = 1.0 / (1.0 + np.exp(-(np.concatenate([qn[b, m], want[b, m]]) @ w_gate[m] + b_gate[m])))
        np.testing.assert_allclose(out[b, m].double().numpy(), qn[b, m] + gate * want[b, m], atol=1e-5)
    torch.testing.assert_close(out[0, 0], q[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 1], q[1, 1], rtol=0, atol=0)


def test_stage2_served_logits_read_the_memory_for_synthesised_slots_only():
    net = tiny_cmml().eval()
    net.stage2_trained.fill_(True)
    present = torch.tensor([[True, True, True], [True, False, True], [True, True, False]])
    image, tab = batch_inputs(present, seed=3)
    with torch.no_grad():
        before = net(image, tab)
        net.memory.memory.copy_(torch.randn_like(net.memory.memory))
        after = net(image, tab)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)  # complete case: nothing is synthesised
    assert (after[1:] - before[1:]).abs().amax(dim=1).min() > 1e-4


# ---------------------------------------------------------------------------------------------
# bundle method overlays
# method -> (class, attributes of the built network that say what it is)
OVERLAYS = {
    "cmml": (CMMLNet, {"memory": ModalityMemoryBank, "context": "set", "use_stage2": True, "fusion": "set"}),
    "cmml_no_memory": (CMMLNet, {"memory": None, "context": "set", "use_stage2": True, "fusion": "set"}),
    "cmml_no_context": (
        CMMLNet,
        {"memory": ModalityMemoryBank, "context": None, "reference": None, "use_stage2": True, "fusion": "set"},
    ),
    "cmml_no_stage2": (
        CMMLNet,
        {"memory": ModalityMemoryBank, "context": "set", "use_stage2": False, "fusion": "absent"},
    ),
    "zero_fill": (LateFusionNet, {"mode": "zero_fill", "use_indicators": True}),
    "modality_dropout": (LateFusionNet, {"mode": "modality_dropout", "use_indicators": True, "two_view": False}),
    "modality_dropout_two_view": (
        LateFusionNet,
        {"mode": "modality_dropout", "use_indicators": True, "two_view": True},
    ),
    "mean_impute": (LateFusionNet, {"mode": "mean_impute", "use_indicators": False}),
}


@pytest.fixture(scope="module")
def overlay_dirs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("overlays")
    return {"dataset_dir": str(base / "syn"), "base": base}


@pytest.mark.parametrize("method", list(OVERLAYS))
def test_method_overlay_builds_the_network_it_names(method, overlay_dirs):
    parser = ConfigParser()
    parser.read_config([TRAIN, os.path.join(ROOT, "configs", "methods", f"{method}.json")])
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": overlay_dirs["dataset_dir"],
            "synthetic_cases": 30,
            "output_dir": str(overlay_dirs["base"] / method),
            "shared_dir": str(overlay_dirs["base"] / "shared"),
            "feature_dim": D,
            "spatial_size": [32, 32],
            "mlflow_enabled": False,
        }
    )
    net = parser.get_parsed_content("network_def")
    cls, want = OVERLAYS[method]
    assert parser.get_parsed_content("method") == method
    assert type(net) is cls, f"{method} built {type(net).__name__}"
    for name, value in want.items():
        got = getattr(net, name, "absent")
        if value == "set":
            assert got is not None and got != "absent", f"{method}: {name} missing"
        elif isinstance(value, type):
            assert isinstance(got, value), f"{method}: {name} is {type(got).__name__}"
        else:
            assert got == value, f"{method}: {name} = {got!r}, expected {value!r}"
    k = 3  # derm7pt: clinic, derm, table
    keys = set(net.state_dict())
    if cls is CMMLNet:
        assert ("memory.memory" in keys) == (want["memory"] is not None)
        assert any(s.startswith("context.") for s in keys) == (want["context"] == "set")
    else:
        # the head reads k tokens, plus the k presence indicators in the indicator modes
        assert net.head[0].in_features == k * D + (k if want["use_indicators"] else 0)
    stages = parser.get_parsed_content("epochs")
    s1, s2 = parser.get_parsed_content("stage1_epochs"), parser.get_parsed_content("stage2_epochs")
    expected_stages = {"cmml_no_stage2": [s1 + s2, 0]}.get(method, [s1, s2] if cls is CMMLNet else [0, s1 + s2])
    assert stages == expected_stages
