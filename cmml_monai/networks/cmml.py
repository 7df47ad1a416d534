"""CMMLNet: context-driven missing-modality learning (docs/method.md §3-§16), one module for both stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from cmml_monai.networks.alignment import (
    CrossModalAlignment,
    FusionHead,
    InstanceAdaptiveReference,
    ProjectionHead,
    normalize,
)
from cmml_monai.networks.context import ContextTokens
from cmml_monai.networks.crta import CascadedResidualTransformerAE
from cmml_monai.networks.encoders import MultiModalEncoder
from cmml_monai.networks.memory import ModalityMemoryBank
from cmml_monai.networks.utils import constructor_args, masked_mean, random_keep_mask
from cmml_monai.utils import as_bool

__all__ = ["CMMLNet", "STAGE1_HEADS"]

#: stage-1 (auxiliary) head layouts: a linear classifier on the mean of the completed modality tokens,
#: the same on the layer-normed mean, or an MLP on their concatenation
#: (each token layer-normed first)
STAGE1_HEADS = ("mean", "norm_mean", "concat_mlp")


def _refuse_another_head_layout(module: CMMLNet, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook of :class:`CMMLNet`: weights of another head layout are refused by name."""
    error_msgs = args[-1]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    mismatch = module._head_layout_mismatch(state_dict, prefix)
    if mismatch and isinstance(error_msgs, list):
        error_msgs.append(mismatch)


class CMMLNet(nn.Module):
    """CMML for images (2D or 3D, several modalities) plus an optional clinical table.

    ``forward(image, tabular=None) -> logits`` is the served / exported path: presence from NaN,
    encoders, CRTA completion of the missing tokens, memory enrichment, instance-adaptive
    reference, alignment, fusion, classifier (with ``use_stage2=False``: CRTA + the stage-1
    auxiliary head). Until stage 2 has trained (the ``stage2_trained`` buffer, set by the first
    stage-2 training step and saved with the weights) it serves the stage-1 head instead, so
    stage-1 validation and a model trained by stage 1 alone are scored on the head that was
    trained, not on an untrained fusion head. It has no data-dependent Python branch (the heads are
    selected with ``torch.where``), so a trace made with one missing pattern handles every pattern;
    it is also scriptable (`torch.jit.script`).

    ``forward_train(image, tabular=None, stage) -> dict`` is the training path. Every present
    modality is encoded once; the extra missingness is made by masking tokens afterwards.

    - stage 1: ``logits`` (stage-1 head on the completed modality tokens), ``synth`` ``[B, k, d]``
      (final CRTA tokens), ``synth_blocks`` ``[N, B, k, d]`` (the cascade), ``target`` ``[B, k, d]``
      (real tokens, detached), ``recon_mask`` ``[B, k]`` (dropped but truly present slots),
      ``present``, ``keep`` (the reduced mask). The memory banks are written when training; they are
      read only in stage 2 (docs/method.md §6).
    - stage 2: two views in one batched pass: view 1 keeps the observed presence (what the served
      path sees), view 2 drops further present modalities at random (``stage2_drop_prob``).
      ``logits`` (view 1), ``logits_dropped`` (view 2: the classifier on CRTA-completed tokens),
      ``aligned`` ``[B, k, p]`` and ``reference`` ``[B, p]`` (view 1 projections), ``synth``
      ``[B, k, d]`` (view-2 CRTA output), ``target`` and ``recon_mask`` (view 2's dropped but truly
      present slots, for an optional stage-2 reconstruction term), ``align_mask`` ``[B, k]``
      (= ``present``: only real modalities are aligned),
      ``proj`` ``[2B, p]`` (normalised projections, view 1 rows then view 2 rows),
      ``proj_present`` ``[2B, k]`` and ``present``.

    Args:
        image_modalities: number of image modalities ``M`` (packed along channels).
        image_channels: channels per image modality ``C``.
        spatial_dims: 2 or 3.
        num_classes: number of classes (single-label) or labels (multi-label).
        tabular_cardinalities: table feature cardinalities (0 = numeric), None for no table.
        multi_label: accepted so every method shares one constructor (configs pass it); the network returns
            logits either way, and the loss and the activation read ``multi_label`` themselves.
        feature_dim: token width ``d``.
        encoder: builds the encoders of every modality: called as ``encoder(image_modalities=M,
            image_channels=C, spatial_dims=..., tabular_cardinalities=..., feature_dim=d, num_heads=...)``;
            a class or a ``functools.partial`` holding its own options (the backbone ``image_encoder``:
            ``resnet10/18/34/50`` or ``densenet121``, ``share_image_encoder``, ``pretrained_path``,
            ``tabular_layers``, ``encode_present_only``; see :class:`MultiModalEncoder`).
        num_context_tokens: ``K``.
        crta: builds the CRTA: called as ``crta(num_modalities=k, feature_dim=d, num_heads=..., dropout=...)``;
            a class or a ``functools.partial`` holding its own options (``configs/train.json``'s ``crta``
            component, ``"_mode_": "callable"``), e.g. ``partial(CascadedResidualTransformerAE, num_blocks=2)``.
        memory: builds the memory bank: ``memory(num_modalities=k, feature_dim=d)`` (its slots, read
            temperature and write momentum are its own options); not called with ``use_memory=False``.
        reference: builds the instance-adaptive reference: ``reference(feature_dim=d, num_heads=..., dropout=...)``;
            not called with ``use_context=False`` or ``use_stage2=False``.
        alignment: builds the cross-modal alignment, called as ``reference`` is; not called with
            ``use_stage2=False``.
        use_memory: ablation flag: memory bank enrichment.
        use_context: ablation flag: context tokens (without them the CRTA runs over modality tokens
            only and the reference is the pooled CRTA output).
        use_stage2: ablation flag: build stage 2; without it the served path is the stage-1 head.
        stage1_drop_prob: probability of dropping each present modality in stage 1.
        stage2_drop_prob: probability of dropping each present modality in the second stage-2 view
            (0.5: the sweep tests rates up to 0.7, so the classifier must see heavily completed cases).
        projection_dim: width ``p`` of the alignment / contrastive projections.
        num_heads: attention heads of every transformer part (must divide ``feature_dim``).
        fusion_layers: transformer layers of the fusion head.
        dropout: dropout in the transformer parts.
        mark_synthesized: add a learned per-modality embedding to synthesized slots before the
            reference, alignment and fusion, so stage 2 knows which tokens are real.
        residual_head: the stage-2 logits are the fusion head's plus the stage-1 head's (on the same
            CRTA output, trained on in stage 2 too), and the fusion classifier starts near zero, so
            stage 2 refines the trained stage-1 prediction instead of restarting from an untrained
            head. Saved with the weights; weights trained with the other setting are refused on load.
        stage1_head: layout of the stage-1 (auxiliary) head, one of ``STAGE1_HEADS``: ``"mean"``, a
            linear classifier on the mean of the completed modality tokens (its length grows when the
            modalities agree, so it is not normalised away); ``"norm_mean"``, the same on the
            layer-normed mean; or ``"concat_mlp"``, an MLP (hidden width
            ``feature_dim``) on the concatenated, layer-normed tokens, which gives each modality slot
            its own weights. With ``residual_head`` it is also part of the stage-2 logits. Weights
            trained with another layout are refused on load.
        memory_write_stage2: also write the memory banks from the real tokens in stage-2 training.
            Off, the banks keep the stage-1 encoders' features while stage 2 trains the encoders on.
        reference_reads_context: the reference's cross-attention reads the CRTA-refined context tokens
            as well as the completed modality tokens; False reads the modality tokens only, so every
            key carries the case (the refined context tokens start from the shared prior and can make
            the reference nearly the same for every case).
        instance_context: the context tokens are shifted per case by a linear map (starting at zero) of the
            mean of the case's observed modality tokens (:class:`ContextTokens` ``conditioned``), so the CRTA
            and the reference start from the case instead of one prior shared by all; the stage-1 drops are
            applied first, so dropped modalities are not read. Weights trained with the other setting are
            refused on load.
        crta_reads_context: the CRTA attends to the context tokens as well as the modality tokens; False
            runs it over the modality tokens only (missing slots are then completed from the case's observed
            tokens alone) while the reference still queries with the context tokens. The context tokens are
            then trained in stage 2 only.

    The components (``encoder``, ``crta``, ``memory``, ``reference``, ``alignment``) are built where the
    constructor always built them, so a network built from the
    default components has the same parameter names and, from the same seed, the same initial weights
    as one built without them; the built modules are ``crta``, ``memory``, ``reference`` and ``alignment``.

    Example::

        >>> from functools import partial
        >>> resnet10 = partial(MultiModalEncoder, image_encoder="resnet10")
        >>> net = CMMLNet(2, 3, 2, 5, tabular_cardinalities=[0, 4], feature_dim=32, encoder=resnet10)
        >>> image = torch.randn(4, 6, 32, 32); image[0, :3] = float("nan")   # case 0: first image missing
        >>> net(image, torch.randn(4, 2)).shape
        torch.Size([4, 5])
        >>> sorted(net.forward_train(image, torch.randn(4, 2), stage=1))
        ['keep', 'logits', 'present', 'recon_mask', 'synth', 'synth_blocks', 'target']
    """

    # constant for TorchScript: the stage-2 branch is not compiled when the modules do not exist
    __constants__ = [
        "use_stage2",
        "mark_synthesized",
        "residual_head",
        "stage1_head",
        "reference_reads_context",
        "crta_reads_context",
    ]

    def __init__(
        self,
        image_modalities: int,
        image_channels: int,
        spatial_dims: int,
        num_classes: int,
        tabular_cardinalities: Sequence[int] | None = None,
        multi_label: bool = False,
        feature_dim: int = 256,
        encoder: Callable[..., nn.Module] = MultiModalEncoder,
        num_context_tokens: int = 8,
        crta: Callable[..., nn.Module] = CascadedResidualTransformerAE,
        memory: Callable[..., nn.Module] = ModalityMemoryBank,
        reference: Callable[..., nn.Module] = InstanceAdaptiveReference,
        alignment: Callable[..., nn.Module] = CrossModalAlignment,
        use_memory: bool = True,
        use_context: bool = True,
        use_stage2: bool = True,
        stage1_drop_prob: float = 0.5,
        stage2_drop_prob: float = 0.5,
        projection_dim: int = 128,
        num_heads: int = 4,
        fusion_layers: int = 1,
        dropout: float = 0.1,
        mark_synthesized: bool = False,
        residual_head: bool = True,
        stage1_head: str = "mean",
        memory_write_stage2: bool = False,
        reference_reads_context: bool = True,
        instance_context: bool = False,
        crta_reads_context: bool = True,
    ) -> None:
        # before any other local: the arguments as given, for the served model's description
        build_args = constructor_args(locals())
        super().__init__()
        self.build_args = build_args
        # switches may arrive as command-line strings ("false"); the encoder checks its own
        use_memory = as_bool(use_memory, "use_memory")
        use_context = as_bool(use_context, "use_context")
        use_stage2 = as_bool(use_stage2, "use_stage2")
        mark_synthesized = as_bool(mark_synthesized, "mark_synthesized")
        residual_head = as_bool(residual_head, "residual_head")
        memory_write_stage2 = as_bool(memory_write_stage2, "memory_write_stage2")
        self.reference_reads_context = as_bool(reference_reads_context, "reference_reads_context")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        for name, p in (("stage1_drop_prob", stage1_drop_prob), ("stage2_drop_prob", stage2_drop_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if feature_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide feature_dim ({feature_dim}).")
        if stage1_head not in STAGE1_HEADS:
            raise ValueError(f"stage1_head must be one of {STAGE1_HEADS}, got {stage1_head!r}.")
        parts = {"encoder": encoder, "crta": crta, "memory": memory, "reference": reference, "alignment": alignment}
        for name, factory in parts.items():
            if not callable(factory):
                raise ValueError(f"{name} must be a class or callable that builds the module, got {factory!r}.")
        self.num_classes = num_classes
        self.use_memory = use_memory
        self.use_context = use_context
        self.use_stage2 = use_stage2
        self.mark_synthesized = mark_synthesized
        self.residual_head = residual_head and use_stage2
        self.memory_write_stage2 = memory_write_stage2
        self.stage1_drop_prob = stage1_drop_prob
        self.stage2_drop_prob = stage2_drop_prob
        self.encoder = encoder(
            image_modalities=image_modalities,
            image_channels=image_channels,
            spatial_dims=spatial_dims,
            tabular_cardinalities=tabular_cardinalities,
            feature_dim=feature_dim,
            num_heads=num_heads,
        )
        k = self.encoder.num_modalities
        self.num_modalities = k
        self.instance_context = as_bool(instance_context, "instance_context") and use_context
        self.crta_reads_context = as_bool(crta_reads_context, "crta_reads_context")
        self.context = (
            ContextTokens(num_context_tokens, feature_dim, conditioned=self.instance_context) if use_context else None
        )
        # every part is built in this order (the random initialisation depends on it)
        self.crta = crta(num_modalities=k, feature_dim=feature_dim, num_heads=num_heads, dropout=dropout)
        self.stage1_head = stage1_head
        # "mean" reads the pooled token as it is: a LayerNorm would remove its length, which carries
        # how strongly the modalities agree
        self.aux_norm = nn.Identity() if stage1_head == "mean" else nn.LayerNorm(feature_dim)
        self.aux_head = (
            nn.Sequential(
                nn.Linear(k * feature_dim, feature_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(feature_dim, num_classes),
            )
            if stage1_head == "concat_mlp"
            else nn.Linear(feature_dim, num_classes)
        )
        self.memory: ModalityMemoryBank | None = (
            memory(num_modalities=k, feature_dim=feature_dim) if use_memory else None
        )
        # False until the first stage-2 training step: the served path uses the stage-1 head until then
        self.register_buffer("stage2_trained", torch.zeros((), dtype=torch.bool))
        # saved with the weights, so weights trained with the other head layout are refused on load
        self.register_buffer("residual_head_flag", torch.tensor(self.residual_head))
        self.register_load_state_dict_pre_hook(_refuse_another_head_layout)
        if use_stage2:
            self.reference = (
                reference(feature_dim=feature_dim, num_heads=num_heads, dropout=dropout) if use_context else None
            )
            self.alignment = alignment(feature_dim=feature_dim, num_heads=num_heads, dropout=dropout)
            self.fusion = FusionHead(feature_dim, num_classes, fusion_layers, num_heads, dropout)
            self.align_proj = ProjectionHead(feature_dim, projection_dim)
            self.reference_proj = ProjectionHead(feature_dim, projection_dim)
            self.contrast_proj = ProjectionHead(feature_dim, projection_dim)
            if self.residual_head:
                # the fusion head starts as a near-zero correction of the trained stage-1 head
                nn.init.normal_(self.fusion.classifier.weight, std=0.01)
                nn.init.zeros_(self.fusion.classifier.bias)
            if mark_synthesized:
                # learned per-modality offset added to synthesized slots only (starts as a no-op)
                self.synth_embedding = nn.Parameter(torch.zeros(k, feature_dim))

    # ----------------------------------------------------------------------------------------
    # parameter groups (the trainer freezes / lowers the LR of the CRTA in stage 2)
    def crta_parameters(self) -> list[nn.Parameter]:
        """Context tokens + CRTA: trained in stage 1, fine-tuned at a lower LR or frozen in stage 2."""
        params = list(self.crta.parameters())
        if self.context is not None:
            params += list(self.context.parameters())
        return params

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters that the loss of ``stage`` (1 or 2) trains.

        Stage 1: encoders, context, CRTA, auxiliary head. Stage 2: encoders, context, CRTA, memory
        gate, reference, alignment, fusion head and projection heads, plus the auxiliary head when
        ``residual_head`` is on (docs/method.md §13).
        """
        if stage == 1:
            # without the CRTA reading them, nothing in stage 1 reads the context tokens
            crta = self.crta_parameters() if self.crta_reads_context else list(self.crta.parameters())
            return (
                list(self.encoder.parameters())
                + crta
                + list(self.aux_norm.parameters())
                + list(self.aux_head.parameters())
            )
        if stage == 2:
            if not self.use_stage2:
                raise ValueError("stage 2 parameters requested but the network was built with use_stage2=False.")
            seen = {id(p) for p in self.stage_parameters(1)}
            aux = (
                set()
                if self.residual_head
                else {id(p) for p in list(self.aux_norm.parameters()) + list(self.aux_head.parameters())}
            )
            params = [p for p in self.stage_parameters(1) if id(p) not in aux]
            return params + [p for p in self.parameters() if id(p) not in seen]
        raise ValueError(f"stage must be 1 or 2, got {stage}.")

    # ----------------------------------------------------------------------------------------
    def _context(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor | None:
        """The context tokens for this batch; conditioned ones read the mean of the ``present`` tokens only."""
        if self.context is None:
            return None
        if not self.instance_context:  # the shared prior: no pooling on every step
            return self.context(tokens.shape[0])
        return self.context(tokens.shape[0], masked_mean(tokens, present))

    def _crta_context(self, prior: torch.Tensor | None) -> torch.Tensor | None:
        """The context tokens the CRTA attends to (none with ``crta_reads_context=False``)."""
        return prior if self.crta_reads_context else None

    def _stage1_head(self, tokens: torch.Tensor) -> torch.Tensor:
        # the completed modality tokens carry the case; the context tokens (a shared prior) are not read
        if self.stage1_head == "concat_mlp":
            # one weight block per modality slot, as the late-fusion baselines' MLP has
            return self.aux_head(self.aux_norm(tokens).flatten(1))
        return self.aux_head(self.aux_norm(tokens.mean(dim=1)))

    def _stage2(
        self, tokens: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CRTA -> memory -> reference -> alignment -> fusion.

        Returns logits, the stage-1 head's logits (on the same CRTA output), u, R, pooled, CRTA output.
        """
        prior = self._context(tokens, present)
        synth, context, _ = self.crta(tokens, present, self._crta_context(prior))
        completed = synth
        if self.memory is not None:
            completed = self.memory(completed, present)
        if self.mark_synthesized:
            # tells alignment and fusion which slots were synthesized, so the classifier can weigh
            # them against real evidence (the baselines' presence indicators do the same)
            synthesized = (~present).unsqueeze(-1).to(completed.dtype)
            completed = completed + self.synth_embedding.to(completed.dtype) * synthesized
        if self.reference is not None and prior is not None:
            # R_i = C + CrossAttn(C, CRTA output of case i): the dataset prior C queries the
            # case's refined context and completed (memory-enriched) modality tokens
            keys = completed
            if self.reference_reads_context and context is not None:
                keys = torch.cat([context, completed], dim=1)
            reference = self.reference(prior, keys)
        else:
            reference = completed.mean(dim=1, keepdim=True)
        aligned = self.alignment(completed, reference)
        logits, pooled = self.fusion(torch.cat([reference, aligned], dim=1), aligned.shape[1])
        stage1_logits = self._stage1_head(synth)
        if self.residual_head:
            logits = logits + stage1_logits
        return logits, stage1_logits, aligned, reference, pooled, synth

    def forward(self, image: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        """Served path: ``image [B, M*C, *spatial]`` (NaN = missing), ``tabular [B, F]`` -> logits."""
        tokens, present = self.encoder(image, tabular)
        if self.use_stage2:
            logits, stage1_logits, _, _, _, _ = self._stage2(tokens, present)
            return torch.where(self.stage2_trained, logits, stage1_logits)
        completed, _, _ = self.crta(tokens, present, self._crta_context(self._context(tokens, present)))
        return self._stage1_head(completed)

    def _head_layout_mismatch(self, state_dict: dict, prefix: str) -> str:
        """Why weights of another head layout cannot load here ("" when they can).

        The stage-1 head layout shows in the state-dict keys; the residual setting is the saved
        ``residual_head_flag`` (weights without it are refused as missing that key).
        """
        saved: dict[str, object] = {}
        if prefix + "aux_head.0.weight" in state_dict:
            saved["stage1_head"] = "concat_mlp"
        elif prefix + "aux_head.weight" in state_dict:
            # a LayerNorm before the linear head means the layer-normed mean layout
            saved["stage1_head"] = "norm_mean" if prefix + "aux_norm.weight" in state_dict else "mean"
        if self.use_context:
            saved["instance_context"] = prefix + "context.condition.weight" in state_dict
        if self.use_stage2:
            flag = state_dict.get(prefix + "residual_head_flag")
            if flag is not None:
                saved["residual_head"] = bool(flag)
        for name, value in saved.items():
            built = getattr(self, name)
            if value != built:
                word = str(value).lower() if isinstance(value, bool) else value
                return (
                    f"the weights were trained with {name}={value!r} but the network was built with "
                    f"{name}={built!r}: build it with network_def#{name} {word}"
                )
        return ""

    def forward_train(
        self, image: torch.Tensor, tabular: torch.Tensor | None = None, stage: int = 2
    ) -> dict[str, torch.Tensor]:
        """Training path, see the class docstring for the returned keys."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}.")
        tokens, present = self.encoder(image, tabular)  # the only encoder pass of the step
        if stage == 1:
            keep = random_keep_mask(present, self.stage1_drop_prob)
            synth, _, cascade = self.crta(tokens, keep, self._crta_context(self._context(tokens, keep)))
            if self.training and self.memory is not None:
                self.memory.update(tokens, present)
            return {
                "logits": self._stage1_head(synth),
                "synth": synth,
                "synth_blocks": cascade,
                "target": tokens.detach(),
                "recon_mask": present & ~keep,
                "present": present,
                "keep": keep,
            }
        if not self.use_stage2:
            raise ValueError("forward_train(stage=2) needs a network built with use_stage2=True.")
        if self.training:
            self.stage2_trained.fill_(True)
            if self.memory is not None and self.memory_write_stage2:
                # the encoders keep training in stage 2: keep the slots in their current feature space
                self.memory.update(tokens, present)
        b = tokens.shape[0]
        view2 = random_keep_mask(present, self.stage2_drop_prob)
        masks = torch.cat([present, view2], dim=0)
        logits, _, aligned, reference, pooled, synth = self._stage2(torch.cat([tokens, tokens], dim=0), masks)
        return {
            "logits": logits[:b],
            "logits_dropped": logits[b:],
            "synth": synth[b:],
            "target": tokens.detach(),
            "recon_mask": present & ~view2,
            "aligned": self.align_proj(aligned[:b]),
            "reference": self.reference_proj(reference[:b].mean(dim=1)),
            "align_mask": present,
            "proj": normalize(self.contrast_proj(pooled)),
            "proj_present": masks,
            "present": present,
        }
