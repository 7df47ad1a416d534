"""Tests of cmml_monai.networks (tiny sizes: d=32, 16 px images, 16^3 volumes, resnet10)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from monai.utils import set_determinism

from cmml_monai.losses import CMMLLoss
from cmml_monai.networks import (
    CascadedResidualTransformerAE,
    CMMLNet,
    CMMLOptions,
    ContextTokens,
    InputSpec,
    InstanceAdaptiveReference,
    LateFusionNet,
    ModalityMemoryBank,
    MultiModalEncoder,
    presence_from_nan,
    random_keep_mask,
)

from bundle_helpers import RESNET10, build_network

NAN = float("nan")
D = 32
CARDS = [0, 3, 0]  # numeric, categorical (3 codes), numeric
SMALL_CRTA = partial(CascadedResidualTransformerAE, num_blocks=2)
SMALL = dict(
    feature_dim=D,
    encoder=RESNET10,
    crta=SMALL_CRTA,
    memory=partial(ModalityMemoryBank, num_slots=8),
    projection_dim=16,
    dropout=0.0,
)
# the component options the variants below change (train.json: instance_context, crta_reads_context, ...)
NO_CONTEXT = dict(context=None)
NO_MEMORY = dict(memory=None)
INSTANCE_CONTEXT = dict(context=partial(ContextTokens, conditioned=True))
CRTA_WITHOUT_CONTEXT = dict(crta=partial(SMALL_CRTA, reads_context=False))


pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def make_batch(present: torch.Tensor, spatial=(16, 16), channels: int = 3, table: bool = True):
    """Images (NaN where a modality is missing) and a table (all NaN when missing, one NaN cell)."""
    b, k = present.shape
    m = k - 1 if table else k
    image = torch.randn(b, m * channels, *spatial)
    for i in range(m):
        image[~present[:, i], i * channels : (i + 1) * channels] = NAN
    if not table:
        return image, None
    tab = torch.stack([torch.randn(b), torch.randint(0, 3, (b,)).float(), torch.randn(b)], dim=1)
    tab[::2, 2] = NAN  # missing cells in present tables (incl. the table-only row of all_patterns)
    tab[~present[:, -1]] = NAN
    return image, tab


def all_patterns(k: int) -> torch.Tensor:
    """Every non-empty presence pattern of k modalities, one per row."""
    rows = [p for p in itertools.product([True, False], repeat=k) if any(p)]
    return torch.tensor(rows)


ENCODER_OPTIONS = ("image_encoder", "share_image_encoder", "pretrained_path", "tabular_layers", "encode_present_only")


def cmml(**kw) -> CMMLNet:
    """A small CMMLNet; the encoder's options in ``kw`` go to its encoder component, as train.json's ``encoder``,
    the input spec's and ``CMMLOptions``' fields to ``spec`` and ``options``."""
    args = dict(image_modalities=2, image_channels=3, spatial_dims=2, num_classes=5, tabular_cardinalities=CARDS)
    args.update(SMALL)
    options = {k: kw.pop(k) for k in ENCODER_OPTIONS if k in kw}
    if options:
        args["encoder"] = partial(MultiModalEncoder, **{"image_encoder": "resnet10", **options})
    args.update(kw)
    return build_network(CMMLNet, **args)


# ---------------------------------------------------------------------------------------------
def test_presence_from_nan_values():
    image = torch.randn(3, 6, 4, 4)
    image[0, :3] = NAN  # modality 0 missing
    image[1, 3, 0, 0] = NAN  # one NaN pixel: modality 1 still present
    tab = torch.randn(3, 2)
    tab[2] = NAN
    tab[1, 0] = NAN
    present, img, t, cells = presence_from_nan(image, tab, 2, 3)
    assert present.tolist() == [[False, True, True], [True, True, True], [True, True, False]]
    assert not torch.isnan(img).any() and not torch.isnan(t).any()
    assert img[0, :3].abs().sum() == 0 and img[1, 3, 0, 0] == 0
    assert cells.tolist() == [[True, True], [False, True], [False, False]]
    # no table in the network: k excludes it; a table network called with None: table missing
    p, _, t0, c0 = presence_from_nan(image, None, 2, 3)
    assert p.shape == (3, 2) and t0 is None and c0 is None
    p, _, t0, c0 = presence_from_nan(image, None, 2, 3, num_features=4)
    assert p[:, -1].tolist() == [False] * 3 and t0.shape == (3, 4) and not c0.any()
    with pytest.raises(ValueError, match="image must be"):
        presence_from_nan(image, tab, 3, 3)


def test_random_keep_mask_keeps_one_and_is_subset():
    present = all_patterns(3).repeat(20, 1)
    keep = random_keep_mask(present, 0.9)
    assert not (keep & ~present).any()
    assert keep.any(dim=1).all()
    assert (keep.sum(1) < present.sum(1)).any()  # something was dropped
    assert torch.equal(random_keep_mask(present, 0.0), present)
    set_determinism(seed=3)
    a = random_keep_mask(present, 0.5)
    set_determinism(seed=3)
    assert torch.equal(a, random_keep_mask(present, 0.5))


def test_crta_keeps_present_slots():
    crta = CascadedResidualTransformerAE(3, D, num_blocks=3)
    f = torch.randn(4, 3, D)
    present = torch.tensor([[True, False, True], [False, False, True], [True, True, True], [True, False, False]])
    out, ctx, blocks = crta(f, present, torch.randn(4, 8, D))
    assert torch.equal(out[present], f[present])
    assert blocks.shape == (3, 4, 3, D) and ctx.shape == (4, 8, D)
    assert not torch.allclose(out[~present], crta.missing_token.expand(4, 3, D)[~present])


def test_memory_bank_read_write():
    bank = ModalityMemoryBank(2, 4, num_slots=2, tau=0.1, momentum=0.5)
    f = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]], [[0, 0, 1.0, 0], [0, 0, 0, 1.0]]])
    present = torch.tensor([[True, True], [True, False]])
    bank.update(f, present)  # first write: slots filled from the real features
    assert bank.initialized.all()
    assert torch.allclose(bank.memory[0], torch.stack([f[0, 0], f[1, 0]]), atol=0.05)
    before = bank.memory[0].clone()
    bank.update(torch.tensor([[[3.0, 0, 0, 0], [0, 1.0, 0, 0]]]), torch.tensor([[True, False]]))
    # nearest slot of (3,0,0,0) is slot 0: 0.5 * slot + 0.5 * feature; slot 1 unchanged
    assert torch.allclose(bank.memory[0, 0], 0.5 * before[0] + 0.5 * torch.tensor([3.0, 0, 0, 0]))
    assert torch.equal(bank.memory[0, 1], before[1])
    out = bank(f, present)
    assert torch.equal(out[present], f[present])  # present tokens pass unchanged
    assert not torch.equal(out[1, 1], f[1, 1])


def test_encoder_output_independent_of_missing_content():
    enc = MultiModalEncoder(2, 3, 2, CARDS, feature_dim=D, image_encoder="resnet10")
    present = torch.tensor([[False, True, True], [True, True, False], [True, False, True], [True, True, True]])
    image, tab = torch.randn(4, 6, 16, 16), torch.randn(4, 3).round().abs()
    other_img, other_tab = image.clone(), tab.clone()
    other_img[0, :3] = torch.randn(3, 16, 16) * 5
    other_img[2, 3:] = 7.0
    other_tab[1] = torch.tensor([9.0, 2.0, -4.0])
    cells = torch.ones(4, 3, dtype=torch.bool)
    for train in (True, False):  # train mode too: BN batch statistics must not see the content
        enc.train(train)
        a = enc.encode(image, tab, cells, present)
        b = enc.encode(other_img, other_tab, cells, present)
        assert torch.equal(a, b)
        assert a[~present].abs().sum() == 0
    # and a present modality's content does change its token (the check can fail)
    other_img[3, :3] += 1.0
    assert not torch.allclose(enc.encode(other_img, tab, cells, present)[3, 0], a[3, 0])


@pytest.mark.parametrize("share", [False, True])
def test_encode_present_only_matches_vectorised(share):
    dense = MultiModalEncoder(2, 3, 2, CARDS, feature_dim=D, image_encoder="resnet10", share_image_encoder=share)
    sparse = MultiModalEncoder(
        2, 3, 2, CARDS, feature_dim=D, image_encoder="resnet10", share_image_encoder=share, encode_present_only=True
    )
    sparse.load_state_dict(dense.state_dict())
    present = torch.tensor([[False, True, True], [True, True, False], [True, False, True], [True, False, True]])
    image, tab = make_batch(present)
    dense.eval(), sparse.eval()
    a, pa = dense(image, tab)
    b, pb = sparse(image, tab)
    assert torch.equal(pa, pb) and torch.allclose(a, b, atol=1e-5)
    # training: modality 1 is present in 2 cases only, gradient reaches the encoders
    sparse.train()
    tokens, _ = sparse(image, tab)
    tokens.sum().backward()
    assert all(p.grad is not None for p in sparse.image_encoders.parameters())
    one = present.clone()
    one[:, 1] = torch.tensor([True, False, False, False])  # one case: falls back to the vectorised path
    image, tab = make_batch(one)
    assert torch.isfinite(sparse(image, tab)[0]).all()


def test_stage1_synthesis_ignores_dropped_content():
    net = cmml(stage1_drop_prob=1.0).eval()  # one modality kept per case
    present = torch.tensor([[True, True, False]] * 4)
    image, tab = make_batch(present)
    set_determinism(seed=1)
    out = net.forward_train(image, tab, stage=1)
    dropped = 0 if not out["keep"][0, 0] else 1
    changed = image.clone()
    changed[0, dropped * 3 : (dropped + 1) * 3] += 3.0
    set_determinism(seed=1)
    out2 = net.forward_train(changed, tab, stage=1)
    assert torch.equal(out["keep"], out2["keep"])
    assert torch.allclose(out["synth"][0], out2["synth"][0], atol=1e-6)
    assert not torch.allclose(out["target"][0, dropped], out2["target"][0, dropped])
    assert out["recon_mask"][0, dropped]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cmml_shapes_every_pattern(spatial_dims):
    spatial = (16, 16) if spatial_dims == 2 else (16, 16, 16)
    channels = 3 if spatial_dims == 2 else 1
    net = cmml(spatial_dims=spatial_dims, image_channels=channels)
    present = all_patterns(3)  # 7 patterns incl. table only and one image only
    image, tab = make_batch(present, spatial, channels)
    b = present.shape[0]
    net.train()
    s1 = net.forward_train(image, tab, stage=1)
    assert s1["logits"].shape == (b, 5) and s1["synth"].shape == (b, 3, D) and s1["target"].shape == (b, 3, D)
    assert torch.equal(s1["present"], present)
    assert not (s1["recon_mask"] & ~present).any() and (s1["keep"].any(1)).all()
    s2 = net.forward_train(image, tab, stage=2)
    assert s2["logits"].shape == (b, 5) and s2["aligned"].shape == (b, 3, 16) and s2["reference"].shape == (b, 16)
    assert s2["proj"].shape == (2 * b, 16) and s2["align_mask"].shape == (b, 3)
    assert s2["logits_dropped"].shape == (b, 5)
    assert torch.allclose(s2["proj"].norm(dim=1), torch.ones(2 * b), atol=1e-4)
    net.eval()
    logits = net(image, tab)
    assert logits.shape == (b, 5)
    for value in list(s1.values()) + list(s2.values()) + [logits]:
        assert torch.isfinite(value.float()).all()


def test_no_nan_table_missing_and_one_image():
    net = cmml().eval()
    image, _ = make_batch(torch.tensor([[True, False, False], [False, True, False]]))
    out = net(image, None)  # table network called without a table: table treated as missing
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    image, tab = make_batch(torch.tensor([[False, False, True]] * 2))  # every image missing
    assert torch.isfinite(net(image, tab)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(**NO_CONTEXT, **NO_MEMORY),
        dict(share_image_encoder=True),
        dict(mark_synthesized=True),
        dict(residual_head=False),
        dict(stage1_head="concat_mlp"),
        dict(stage1_head="norm_mean"),
        INSTANCE_CONTEXT,
        CRTA_WITHOUT_CONTEXT,
    ],
    ids=[
        "cmml",
        "no_context_no_memory",
        "shared_encoder",
        "mark_synthesized",
        "no_residual_head",
        "concat_head",
        "norm_mean_head",
        "instance_context",
        "crta_without_context",
    ],
)
def test_every_parameter_gets_gradient_from_its_stage(kwargs):
    net = cmml(**kwargs).train()
    present = all_patterns(3)
    image, tab = make_batch(present)
    label = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    names = {id(p): n for n, p in net.named_parameters()}
    # Without context tokens the reference is one token (the mean of the completed tokens), and
    # attention over a single key weighs it 1 whatever the query: the alignment's query path has no
    # effect. Its gradient is exactly 0 or rounding noise, depending on the CPU's attention kernel.
    query_path = (
        "alignment.attn.norm_q.weight",
        "alignment.attn.norm_q.bias",
        "alignment.attn.q.weight",
        "alignment.attn.q.bias",
    )
    dead = set() if kwargs.get("context", ContextTokens) is not None else set(query_path)
    for stage in (1, 2):
        net.zero_grad(set_to_none=True)
        loss = CMMLLoss(stage=stage)(net.forward_train(image, tab, stage=stage), label)["loss"]
        loss.backward()
        own = {id(p) for p in net.stage_parameters(stage)}
        no_grad = [
            names[id(p)]
            for p in net.stage_parameters(stage)
            if names[id(p)] not in dead and (p.grad is None or p.grad.abs().sum() == 0)
        ]
        assert no_grad == [], f"stage {stage}: no gradient for {no_grad}"
        alive = [n for n, p in net.named_parameters() if n in dead and p.grad is not None and p.grad.abs().max() > 1e-6]
        assert alive == [], f"stage {stage}: {alive} were expected to have no effect with a one-token reference"
        leaked = [
            n for n, p in net.named_parameters() if id(p) not in own and p.grad is not None and p.grad.abs().sum() > 0
        ]
        assert leaked == [], f"stage {stage}: gradient outside the stage for {leaked}"
    assert {id(p) for p in net.parameters()} == {id(p) for s in (1, 2) for p in net.stage_parameters(s)}
    crta = {id(p) for p in net.crta_parameters()}
    unread = set() if net.crta.reads_context or net.context is None else {id(p) for p in net.context.parameters()}
    assert crta - unread <= {id(p) for p in net.stage_parameters(1)} and crta <= {
        id(p) for p in net.stage_parameters(2)
    }


def test_memory_written_only_in_stage1_training():
    net = cmml()
    image, tab = make_batch(all_patterns(3))
    before = net.memory.memory.clone()
    net.eval().forward_train(image, tab, stage=1)
    assert torch.equal(before, net.memory.memory)
    net.train().forward_train(image, tab, stage=2)
    assert torch.equal(before, net.memory.memory)
    net.forward_train(image, tab, stage=1)
    assert not torch.equal(before, net.memory.memory)


def test_memory_write_stage2_keeps_the_banks_on_the_current_features():
    net = cmml(memory=partial(ModalityMemoryBank, num_slots=8, write_stage2=True))
    image, tab = make_batch(all_patterns(3))
    net.train().forward_train(image, tab, stage=1)
    after_stage1 = net.memory.memory.clone()
    torch.manual_seed(7)  # the same dropout draws as the encoder pass inside forward_train
    tokens, present = net.encoder(image, tab)
    bank = net.memory
    expected = ModalityMemoryBank(3, D, num_slots=bank.memory.shape[1], tau=bank.tau, momentum=bank.momentum)
    expected.load_state_dict(bank.state_dict())
    expected.update(tokens, present)  # the same EMA write on the real tokens of this batch
    torch.manual_seed(7)
    net.forward_train(image, tab, stage=2)
    assert not torch.equal(after_stage1, net.memory.memory)
    torch.testing.assert_close(net.memory.memory, expected.memory)
    before_eval = net.memory.memory.clone()
    net.eval().forward_train(image, tab, stage=2)  # never written outside training
    assert torch.equal(before_eval, net.memory.memory)


@pytest.mark.parametrize(
    "make",
    [
        # eager runs the gather/scatter encoders, the trace the vectorised ones: same logits in eval
        lambda: cmml(encode_present_only=True),
        lambda: cmml(mark_synthesized=True),
        lambda: cmml(residual_head=False),
        lambda: cmml(stage1_head="concat_mlp"),
        lambda: cmml(stage1_head="norm_mean"),
        lambda: cmml(**INSTANCE_CONTEXT),
        lambda: cmml(**CRTA_WITHOUT_CONTEXT),
        lambda: cmml(use_stage2=False, **NO_MEMORY, **NO_CONTEXT),
        lambda: LateFusionNet(InputSpec(2, 3, 2, 5, CARDS), feature_dim=D, encoder=RESNET10, mode="mean_impute"),
    ],
    ids=[
        "cmml_present_only",
        "mark_synthesized",
        "no_residual_head",
        "concat_head",
        "norm_mean_head",
        "instance_context",
        "crta_without_context",
        "stage1_no_memory_no_context",
        "mean_impute",
    ],
)
def test_trace_matches_eager_for_other_patterns(make):
    net = make().eval()
    if isinstance(net, CMMLNet):
        net.stage2_trained.fill_(True)  # serve the stage-2 path (a fresh net serves the stage-1 head)
    image, tab = make_batch(torch.ones(2, 3, dtype=torch.bool))  # traced with everything present
    present = all_patterns(3)
    image7, tab7 = make_batch(present)
    with torch.jit.optimized_execution(False):  # skip the JIT's profiling runs: same graph, faster test
        traced = torch.jit.trace(net, (image, tab), check_trace=False)
        assert torch.allclose(traced(image7, tab7), net(image7, tab7), atol=1e-5)
        if isinstance(net, CMMLNet) and net.use_stage2:
            # no table argument: the table-missing path depends on the argument, not the data
            traced_no_tab = torch.jit.trace(net, (image,), check_trace=False)
            assert torch.allclose(traced_no_tab(image7), net(image7), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(use_stage2=False, **NO_CONTEXT),
        dict(mark_synthesized=True),
        dict(residual_head=False),
        dict(stage1_head="concat_mlp"),
        dict(stage1_head="concat_mlp", use_stage2=False),
        dict(stage1_head="norm_mean"),
        INSTANCE_CONTEXT,
        CRTA_WITHOUT_CONTEXT,
    ],
    ids=[
        "cmml",
        "stage1_only",
        "mark_synthesized",
        "no_residual_head",
        "concat_head",
        "concat_head_stage1_only",
        "norm_mean_head",
        "instance_context",
        "crta_without_context",
    ],
)
def test_script_matches_eager(kwargs):
    net = cmml(**kwargs).eval()
    image, tab = make_batch(all_patterns(3))
    with torch.jit.optimized_execution(False):
        scripted = torch.jit.script(net)
        for trained in (False, True):  # the stage-1 head, then the stage-2 path, in one scripted model
            net.stage2_trained.fill_(trained)
            scripted.stage2_trained.fill_(trained)
            assert torch.allclose(scripted(image, tab), net(image, tab), atol=1e-5)
            assert torch.allclose(scripted(image), net(image), atol=1e-5)


def test_served_head_follows_the_trained_stage():
    """A fresh (or stage-1-only) CMMLNet serves the stage-1 head; after a stage-2 training step it
    serves the fusion head. The flag travels with the weights; weights saved without it are refused."""
    torch.manual_seed(0)
    net = cmml(residual_head=False)
    image, tab = make_batch(all_patterns(3))
    net.eval()
    tokens, present = net.encoder(image, tab)
    synth, _, _ = net.crta(tokens, present, net._context(tokens, present))
    stage1_logits = net._stage1_head(synth)
    stage2_logits = net._stage2(tokens, present)[0]
    assert not bool(net.stage2_trained)
    assert torch.allclose(net(image, tab), stage1_logits, atol=1e-6)
    assert not torch.allclose(stage1_logits, stage2_logits, atol=1e-3)
    net.train().forward_train(image, tab, stage=1)
    assert not bool(net.stage2_trained)  # stage 1 does not flip it
    net.eval().forward_train(image, tab, stage=2)
    assert not bool(net.stage2_trained)  # nor does a stage-2 pass outside training
    net.train().forward_train(image, tab, stage=2)
    assert bool(net.stage2_trained)
    net.eval()
    assert torch.allclose(net(image, tab), net._stage2(*net.encoder(image, tab))[0], atol=1e-6)
    state = net.state_dict()
    assert bool(state["stage2_trained"])
    fresh = cmml(residual_head=False)
    with pytest.raises(RuntimeError, match='Missing key.*"stage2_trained"'):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "stage2_trained"})
    fresh.load_state_dict(state)
    assert bool(fresh.stage2_trained)
    fresh.load_state_dict({**state, "stage2_trained": torch.tensor(False)})
    assert not bool(fresh.stage2_trained)


def test_determinism():
    image, tab = make_batch(all_patterns(3))
    results = []
    for _ in range(2):
        set_determinism(seed=7)
        net = cmml().train()
        s1 = net.forward_train(image, tab, stage=1)
        s2 = net.forward_train(image, tab, stage=2)
        results.append((s1["synth"], s1["keep"], s2["logits"], s2["proj"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        NO_MEMORY,
        NO_CONTEXT,
        dict(use_stage2=False),
        dict(share_image_encoder=True),
        dict(tabular_cardinalities=None),
    ],
    ids=["no_memory", "no_context", "no_stage2", "shared_encoder", "no_table"],
)
def test_ablations_build_and_run(kwargs):
    net = cmml(**kwargs).train()
    k = 3 if kwargs.get("tabular_cardinalities", CARDS) is not None else 2
    present = all_patterns(k)
    image, tab = make_batch(present, table=k == 3)
    out = net.forward_train(image, tab, stage=1)
    assert out["synth"].shape == (present.shape[0], k, D) and torch.isfinite(out["logits"]).all()
    if net.use_stage2:
        out = net.forward_train(image, tab, stage=2)
        assert torch.isfinite(out["proj"]).all()
    else:
        with pytest.raises(ValueError, match="use_stage2"):
            net.forward_train(image, tab, stage=2)
    logits = net.eval()(image, tab)
    assert logits.shape == (present.shape[0], 5) and torch.isfinite(logits).all()
    if kwargs.get("share_image_encoder"):
        assert len(net.encoder.image_encoders) == 1


@pytest.mark.parametrize("mode", ["zero_fill", "modality_dropout", "mean_impute"])
def test_late_fusion_baselines(mode):
    net = LateFusionNet(
        InputSpec(2, 3, 2, 4, CARDS, multi_label=True), feature_dim=D, encoder=RESNET10, mode=mode, dropout_prob=0.5
    )
    present = all_patterns(3)
    image, tab = make_batch(present)
    out = net.train().forward_train(image, tab, stage=2)
    assert out["logits"].shape == (7, 4) and torch.isfinite(out["logits"]).all()
    assert torch.equal(out["present"], present)
    loss = CMMLLoss(stage=1, multi_label=True)(out, torch.randint(0, 2, (7, 4)).float())
    assert set(loss) == {"loss", "cls"}
    loss["loss"].backward()
    if mode == "mean_impute":
        assert net.mean_initialized.all() and net.running_mean.abs().sum() > 0
    if mode == "modality_dropout":  # training drops tokens: rows with several modalities change
        net = LateFusionNet(
            InputSpec(2, 3, 2, 4, CARDS), feature_dim=D, encoder=RESNET10, mode=mode, dropout_prob=1.0, dropout=0.0
        ).train()
        dropped, full = net.forward_train(image, tab)["logits"], net(image, tab)
        several = present.sum(1) > 1
        assert not torch.allclose(dropped[several], full[several])
        assert torch.allclose(dropped[~several], full[~several], atol=1e-6)
    logits = net.eval()(image, tab)
    assert torch.isfinite(logits).all()


def test_modality_dropout_two_view_gives_the_observed_and_the_dropped_view():
    present = all_patterns(3)
    image, tab = make_batch(present)
    torch.manual_seed(0)
    net = LateFusionNet(
        InputSpec(2, 3, 2, 4, CARDS),
        feature_dim=D,
        encoder=RESNET10,
        mode="modality_dropout",
        dropout_prob=1.0,
        dropout=0.0,
        two_view="true",
    ).train()
    out = net.forward_train(image, tab)
    several = present.sum(1) > 1
    full = net(image, tab)  # the served path sees the observed case
    assert torch.allclose(out["logits"], full, atol=1e-6)
    assert not torch.allclose(out["logits_dropped"][several], full[several])
    assert torch.allclose(out["logits_dropped"][~several], full[~several], atol=1e-6)
    # the stage-2 loss classifies both views and distils the observed one into the dropped one
    label = torch.randint(0, 4, (7,))
    loss = CMMLLoss(stage=2, w_distill=2.0)(out, label)
    assert set(loss) == {"loss", "cls", "cls_dropped", "distill"}
    loss["loss"].backward()
    assert all(p.grad is not None for p in net.head.parameters())
    assert set(net.eval().forward_train(image, tab)) == {"logits", "present"}  # one view outside training
    with pytest.raises(ValueError, match="two_view"):
        LateFusionNet(InputSpec(2, 3, 2, 4, CARDS), feature_dim=D, encoder=RESNET10, mode="mean_impute", two_view=True)


def test_3d_and_densenet_and_pretrained(tmp_path):
    net = build_network(CMMLNet, image_modalities=3, image_channels=1, spatial_dims=3, num_classes=2, **SMALL).eval()
    vol = torch.randn(2, 3, 16, 16, 16)
    vol[0, 1] = NAN
    assert net(vol).shape == (2, 2)
    dense = cmml(image_encoder="densenet121", share_image_encoder=True).eval()
    image, tab = make_batch(torch.tensor([[True, False, True], [False, True, False]]), spatial=(32, 32))
    assert torch.isfinite(dense(image, tab)).all()
    # pretrained: a local state dict is loaded into every image backbone
    src = cmml()
    path = tmp_path / "backbone.pt"
    torch.save(src.encoder.image_encoders[0].backbone.state_dict(), path)
    loaded = cmml(pretrained_path=str(path))
    for enc in loaded.encoder.image_encoders:
        assert torch.equal(enc.backbone.conv1.weight, src.encoder.image_encoders[0].backbone.conv1.weight)
    with pytest.raises(ValueError, match="not an existing file"):
        cmml(pretrained_path=str(tmp_path / "missing.pt"))


def test_argument_checks():
    with pytest.raises(ValueError, match="image_encoder"):
        cmml(image_encoder="vgg")
    with pytest.raises(ValueError, match="spatial_dims"):
        cmml(spatial_dims=4)
    with pytest.raises(ValueError, match="stage1_drop_prob"):
        cmml(stage1_drop_prob=1.5)
    with pytest.raises(ValueError, match="mode"):
        LateFusionNet(InputSpec(2, 3, 2, 5), mode="bogus")
    with pytest.raises(ValueError, match="stage"):
        cmml().forward_train(torch.randn(1, 6, 16, 16), None, stage=3)


def test_bf16_autocast_training_step_is_finite():
    net = cmml().train()
    image, tab = make_batch(all_patterns(3))
    label = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    for stage in (1, 2):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            losses = CMMLLoss(stage=stage)(net.forward_train(image, tab, stage=stage), label)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
        losses["loss"].backward()


def test_benchmark_script_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("cmml_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    report = bench.main(
        [
            "--batch-size",
            "2",
            "--image-size",
            "16",
            "--feature-dim",
            "32",
            "--image-encoder",
            "resnet10",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    torch.set_num_threads(threads)
    assert set(report["results"]) == {
        "cmml_stage1",
        "cmml_stage2",
        "cmml_stage2_frozen",
        "cmml_stage2_frozen_cached",
        "zero_fill",
    }
    assert report["results"]["zero_fill"]["ratio_to_zero_fill"] == 1.0
    assert json.loads(out.read_text())["results"]["cmml_stage2"]["median_s"] > 0


def test_fusion_head_pools_only_the_modality_tokens():
    """With ``num_pooled`` the reference tokens join the attention but not the pooled evidence."""
    from cmml_monai.networks.alignment import FusionHead

    torch.manual_seed(0)
    head = FusionHead(16, 3, num_layers=0).eval()
    reference, modality = torch.randn(2, 8, 16), torch.randn(2, 3, 16)
    _, pooled = head(torch.cat([reference, modality], dim=1), num_pooled=3)
    assert torch.allclose(pooled, head.norm(modality.mean(dim=1)), atol=1e-6)
    _, pooled_all = head(torch.cat([reference, modality], dim=1))
    assert not torch.allclose(pooled, pooled_all, atol=1e-3)


def test_residual_head_starts_stage2_from_the_stage1_prediction():
    """``residual_head``: stage-2 logits = fusion head + the stage-1 head (trained on in stage 2), and
    the fusion classifier starts near zero, so the first stage-2 step serves what stage 1 learned."""
    torch.manual_seed(0)
    net = cmml(residual_head=True).eval()
    assert net.fusion.classifier.weight.abs().max() < 0.1 and not net.fusion.classifier.bias.any()
    aux = {id(p) for p in list(net.aux_head.parameters()) + list(net.aux_norm.parameters())}
    assert aux <= {id(p) for p in net.stage_parameters(2)}
    image, tab = make_batch(all_patterns(3))
    net.stage2_trained.fill_(True)
    tokens, present = net.encoder(image, tab)
    synth, _, _ = net.crta(tokens, present, net._context(tokens, present))
    with torch.no_grad():
        net.fusion.classifier.weight.zero_()
    assert torch.allclose(net(image, tab), net._stage1_head(synth), atol=1e-6)
    plain = cmml(residual_head=False)
    plain_aux = {id(p) for p in list(plain.aux_head.parameters()) + list(plain.aux_norm.parameters())}
    assert not plain_aux & {id(p) for p in plain.stage_parameters(2)}  # without it stage 2 leaves that head
    # the head layout travels with the weights: loading into the other layout is refused, by name
    with pytest.raises(
        RuntimeError, match="trained with residual_head=True .* --network_def#options#residual_head true"
    ):
        plain.load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match='Missing key.*"residual_head_flag"'):  # the flag travels with the weights
        cmml().load_state_dict({k: v for k, v in plain.state_dict().items() if k != "residual_head_flag"})


def test_concat_stage1_head_gives_each_modality_slot_its_own_weights():
    """``stage1_head="concat_mlp"``: the head sees the slots in order (swapping two tokens changes the
    logits, which the mean head cannot see), and the layout is checked on load, by name."""
    torch.manual_seed(0)
    net = cmml(stage1_head="concat_mlp").eval()
    k, d = net.num_modalities, SMALL["feature_dim"]
    assert net.aux_head[0].in_features == k * d
    tokens = torch.randn(2, k, d)
    swapped = tokens[:, [1, 0, 2]]
    assert not torch.allclose(net._stage1_head(tokens), net._stage1_head(swapped), atol=1e-4)
    mean = cmml().eval()
    assert torch.allclose(mean._stage1_head(tokens), mean._stage1_head(swapped), atol=1e-5)
    with pytest.raises(RuntimeError, match="with stage1_head='concat_mlp' .* --stage1_head concat_mlp"):
        mean.load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="trained with stage1_head='mean' .* --stage1_head mean"):
        net.load_state_dict(mean.state_dict())
    cmml(stage1_head="concat_mlp").load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="stage1_head must be one of .* got 'concat'"):
        cmml(stage1_head="concat")


def test_mean_stage1_head_keeps_the_length_of_the_pooled_token():
    """``stage1_head="mean"`` (default) is a linear layer on the plain mean of the tokens: modalities
    that agree give a longer mean and larger logits; ``"norm_mean"`` layer-norms
    the mean, so scaling every token leaves its logits unchanged. Weights of one are refused by the other."""
    torch.manual_seed(0)
    mean, norm = cmml().eval(), cmml(stage1_head="norm_mean").eval()
    assert isinstance(mean.aux_norm, torch.nn.Identity) and isinstance(norm.aux_norm, torch.nn.LayerNorm)
    k, d = mean.num_modalities, SMALL["feature_dim"]
    tokens = torch.randn(2, k, d)
    bias = mean.aux_head.bias
    assert torch.allclose(mean._stage1_head(3 * tokens) - bias, 3 * (mean._stage1_head(tokens) - bias), atol=1e-5)
    assert torch.allclose(mean._stage1_head(tokens), mean.aux_head(tokens.mean(dim=1)), atol=1e-6)
    assert torch.allclose(norm._stage1_head(3 * tokens), norm._stage1_head(tokens), atol=1e-4)
    with pytest.raises(RuntimeError, match="trained with stage1_head='norm_mean' .* --stage1_head norm_mean"):
        mean.load_state_dict(norm.state_dict())
    with pytest.raises(RuntimeError, match="trained with stage1_head='mean' .* --stage1_head mean"):
        norm.load_state_dict(mean.state_dict())
    cmml(stage1_head="norm_mean").load_state_dict(norm.state_dict())
    cmml().load_state_dict(mean.state_dict())


@pytest.mark.parametrize("reads_context", [True, False])
def test_reference_keys_follow_reference_reads_context(reads_context):
    net = cmml(reference=partial(InstanceAdaptiveReference, reads_context=reads_context)).eval()
    image, tab = make_batch(all_patterns(3))
    with torch.no_grad():
        out = net.forward_train(image, tab, stage=2)
        b = image.shape[0]
        tokens, present = net.encoder(image, tab)
        prior = net.context(b, None)
        synth, context, _ = net.crta(tokens, present, prior)
        completed = net.memory(synth, present)
        keys = torch.cat([context, completed], dim=1) if reads_context else completed
        expected = net.reference_proj(net.reference.attn(prior, keys).mean(dim=1))
        other = torch.cat([context, completed], dim=1) if not reads_context else completed
        not_expected = net.reference_proj(net.reference.attn(prior, other).mean(dim=1))
    torch.testing.assert_close(out["reference"], expected)
    assert not torch.allclose(out["reference"], not_expected)


def test_components_handed_by_reference_keep_the_default_build():
    """configs/train.json hands CMMLNet its encoder, CRTA, memory, reference and alignment as components (classes
    or partials); the default ones give the same parameter names and, from one seed, the same weights."""
    from cmml_monai.networks import CrossModalAlignment

    torch.manual_seed(0)
    default = CMMLNet(InputSpec(2, 3, 2, 5, CARDS), feature_dim=D)
    torch.manual_seed(0)
    composed = CMMLNet(
        InputSpec(2, 3, 2, 5, CARDS),
        feature_dim=D,
        encoder=partial(MultiModalEncoder, image_encoder="resnet18"),
        context=partial(ContextTokens, num_tokens=8, conditioned=False),
        crta=partial(CascadedResidualTransformerAE, num_blocks=3, mlp_ratio=2.0, reads_context=True),
        memory=partial(ModalityMemoryBank, num_slots=64, tau=0.1, momentum=0.9, write_stage2=False),
        reference=partial(InstanceAdaptiveReference, reads_context=True),
        alignment=CrossModalAlignment,
        options=CMMLOptions(),
    )
    a, b = default.state_dict(), composed.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(cmml(crta=partial(CascadedResidualTransformerAE, num_blocks=1)).crta.blocks) == 1
    with pytest.raises(ValueError, match="crta must be a class or callable .* got 3"):
        cmml(crta=3)


def test_instance_context_is_the_prior_shifted_by_the_observed_tokens():
    """``C_i = C + W mean(present tokens of case i)``: the shared prior at initialisation (W = 0), then a shift
    that reads only the observed (or, in stage 1, kept) modality tokens; weights of the other setting are refused."""
    net = cmml(**INSTANCE_CONTEXT).eval()
    present = all_patterns(3)
    image, tab = make_batch(present)
    tokens, observed = net.encoder(image, tab)
    torch.testing.assert_close(net._context(tokens, observed), net.context.tokens.expand(len(present), -1, -1))
    with torch.no_grad():
        net.context.condition.weight.normal_(std=0.1)
        net.context.condition.bias.normal_(std=0.1)
        pooled = torch.stack([tokens[i, observed[i]].mean(0) for i in range(len(present))])
        expected = net.context.tokens + (pooled @ net.context.condition.weight.T + net.context.condition.bias).view(
            len(present), *net.context.tokens.shape
        )
        torch.testing.assert_close(net._context(tokens, observed), expected)
        # a modality the mask leaves out is not read, whatever its token holds
        changed = tokens.clone()
        changed[~observed] = 100.0
        torch.testing.assert_close(net._context(changed, observed), expected)
        assert not torch.allclose(expected[0], expected[1])  # cases with different inputs get different tokens
    with pytest.raises(RuntimeError, match="--instance_context true"):
        cmml().load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="--instance_context false"):
        net.load_state_dict(cmml().state_dict())


def test_crta_without_context_completes_from_the_observed_tokens_only():
    """``crta_reads_context=False``: the completed tokens do not change with the context tokens, the reference
    still does; stage 1 does not train the context tokens."""
    net = cmml(**CRTA_WITHOUT_CONTEXT).eval()
    image, tab = make_batch(all_patterns(3))
    with torch.no_grad():
        torch.manual_seed(1)  # the same extra drops of the second view in both calls
        before = net.forward_train(image, tab, stage=2)
        net.context.tokens.add_(torch.randn_like(net.context.tokens))
        torch.manual_seed(1)
        after = net.forward_train(image, tab, stage=2)
        tokens, present = net.encoder(image, tab)
        expected, _, _ = net.crta(tokens, present, None)
    torch.testing.assert_close(after["synth"], before["synth"])
    torch.testing.assert_close(net.crta(tokens, present, net._context(tokens, present))[0], expected)
    assert not torch.allclose(after["reference"], before["reference"])
    stage1 = {id(p) for p in net.stage_parameters(1)}
    assert id(net.context.tokens) not in stage1 and id(net.context.tokens) in {id(p) for p in net.stage_parameters(2)}


@pytest.mark.parametrize(
    "make",
    [
        lambda multi: cmml(multi_label=multi),
        lambda multi: LateFusionNet(
            InputSpec(2, 3, 2, 5, CARDS, multi_label=multi), feature_dim=D, encoder=RESNET10, mode="zero_fill"
        ),
    ],
)
def test_multi_label_is_accepted_and_changes_nothing(make):
    """``multi_label`` is part of the input spec (it describes the outputs), not network state: same logits."""
    torch.manual_seed(0)
    single = make(False).eval()
    torch.manual_seed(0)
    multi = make(True).eval()
    assert not hasattr(single, "multi_label") and not hasattr(multi, "multi_label")
    image, tab = make_batch(torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(single(image, tab), multi(image, tab))
