"""CMMLNet: context-driven missing-modality learning (docs/method.md §3-§16), one module for both stages."""

from __future__ import annotations

from collections.abc import Callable

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
from cmml_monai.networks.spec import CMMLOptions, InputSpec
from cmml_monai.networks.utils import constructor_args, masked_mean, random_keep_mask

__all__ = ["CMMLNet"]

# the configs/train.json key that sets each setting the weights carry (named when weights are refused)
_OVERRIDE = {
    "stage1_head": "stage1_head",
    "instance_context": "instance_context",
    "residual_head": "network_def#options#residual_head",
}


def _check_components(feature_dim: int, options: CMMLOptions, *parts: Callable[..., nn.Module] | None) -> None:
    """Refuse a ``num_heads`` that does not divide ``feature_dim`` and a component that builds nothing."""
    if feature_dim % options.num_heads != 0:
        raise ValueError(f"num_heads ({options.num_heads}) must divide feature_dim ({feature_dim}).")
    names = ("encoder", "context", "crta", "memory", "reference", "alignment")
    for name, factory in zip(names, parts):
        if not (callable(factory) or (factory is None and name in ("context", "memory"))):
            raise ValueError(f"{name} must be a class or callable that builds the module, got {factory!r}.")


def _refuse_another_head_layout(module: CMMLNet, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` pre-hook of :class:`CMMLNet`: weights of another head layout are refused by name."""
    error_msgs = args[-1]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    mismatch = module._head_layout_mismatch(state_dict, prefix)
    if mismatch and isinstance(error_msgs, list):
        error_msgs.append(mismatch)


class CMMLNet(nn.Module):
    """CMML for images (2D or 3D, several modalities) plus an optional clinical table (docs/method.md §3-§16).

    ``forward(image, tabular=None) -> logits`` is the served and exported path (NaN = missing, §2, §14);
    ``forward_train(image, tabular=None, stage) -> dict`` the training path of stage 1 or 2 (§7, §13). The
    components are factories, ``configs/train.json``'s ``encoder``, ``context``, ``crta``, ``memory``,
    ``reference`` and ``alignment`` (``"_mode_": "callable"``), built in one fixed order (docs/method.md,
    "Building the network"), so one seed gives the same initial weights however they are handed over.

    Args:
        spec: the inputs and outputs the dataset fixes (``input_spec`` in ``configs/train.json``).
        feature_dim: token width ``d``.
        encoder: ``encoder(image_modalities=, image_channels=, spatial_dims=, tabular_cardinalities=,
            feature_dim=, num_heads=)`` builds every modality's encoder (:class:`MultiModalEncoder`).
        context: ``context(feature_dim=)`` builds the context tokens (:class:`ContextTokens`); None is the
            no-context ablation (no tokens, no reference).
        crta: ``crta(num_modalities=, feature_dim=, num_heads=, dropout=)`` builds the CRTA
            (:class:`CascadedResidualTransformerAE`).
        memory: ``memory(num_modalities=, feature_dim=)`` builds the memory bank (:class:`ModalityMemoryBank`);
            None is the no-memory ablation.
        reference: ``reference(feature_dim=, num_heads=, dropout=)`` builds the instance-adaptive reference
            (:class:`InstanceAdaptiveReference`); built with stage 2 and context tokens only.
        alignment: called as ``reference`` is, builds the cross-modal alignment (:class:`CrossModalAlignment`);
            built with stage 2 only.
        options: the options no single component holds (:class:`CMMLOptions`); None takes its defaults.

    Raises:
        ValueError: ``num_heads`` does not divide ``feature_dim``, or a component is not callable.

    Example::

        >>> from functools import partial
        >>> spec = InputSpec(2, 3, 2, 5, tabular_cardinalities=[0, 4])
        >>> encoder = partial(MultiModalEncoder, image_encoder="resnet10")
        >>> options = CMMLOptions(stage1_head="norm_mean")
        >>> net = CMMLNet(spec, feature_dim=32, encoder=encoder, memory=None, options=options)
        >>> image = torch.randn(4, 6, 32, 32); image[0, :3] = float("nan")   # case 0: first image missing
        >>> net(image, torch.randn(4, 2)).shape
        torch.Size([4, 5])
        >>> sorted(net.forward_train(image, torch.randn(4, 2), stage=1))
        ['keep', 'logits', 'present', 'recon_mask', 'synth', 'synth_blocks', 'target']
    """

    # constant for TorchScript: the stage-2 branch is not compiled when the modules do not exist
    __constants__ = ["use_stage2", "mark_synthesized", "residual_head", "stage1_head"]

    def __init__(
        self,
        spec: InputSpec,
        feature_dim: int = 256,
        encoder: Callable[..., nn.Module] = MultiModalEncoder,
        context: Callable[..., nn.Module] | None = ContextTokens,
        crta: Callable[..., nn.Module] = CascadedResidualTransformerAE,
        memory: Callable[..., nn.Module] | None = ModalityMemoryBank,
        reference: Callable[..., nn.Module] = InstanceAdaptiveReference,
        alignment: Callable[..., nn.Module] = CrossModalAlignment,
        options: CMMLOptions | None = None,
    ) -> None:
        # before any other local: the arguments as given, for the served model's description
        build_args = constructor_args(locals())
        super().__init__()
        self.build_args = build_args
        opts = options or CMMLOptions()
        _check_components(feature_dim, opts, encoder, context, crta, memory, reference, alignment)
        self.spec, self.options, self.num_classes = spec, opts, spec.num_classes
        self.use_stage2, self.mark_synthesized = opts.use_stage2, opts.mark_synthesized
        self.residual_head = opts.residual_head and opts.use_stage2
        self.stage1_head = opts.stage1_head
        self.stage1_drop_prob, self.stage2_drop_prob = opts.stage1_drop_prob, opts.stage2_drop_prob
        self.encoder = encoder(
            image_modalities=spec.image_modalities,
            image_channels=spec.image_channels,
            spatial_dims=spec.spatial_dims,
            tabular_cardinalities=None if spec.tabular_cardinalities is None else list(spec.tabular_cardinalities),
            feature_dim=feature_dim,
            num_heads=opts.num_heads,
        )
        k = self.num_modalities = self.encoder.num_modalities
        # every part is built in this order (the random initialisation depends on it)
        self.context = context(feature_dim=feature_dim) if context is not None else None
        self.use_context = self.context is not None
        self.instance_context = bool(getattr(self.context, "conditioned", False))
        self.crta = crta(num_modalities=k, feature_dim=feature_dim, num_heads=opts.num_heads, dropout=opts.dropout)
        self._build_stage1_head(k, feature_dim, opts)
        self.memory: ModalityMemoryBank | None = (
            memory(num_modalities=k, feature_dim=feature_dim) if memory is not None else None
        )
        # False until the first stage-2 training step: the served path uses the stage-1 head until then
        self.register_buffer("stage2_trained", torch.zeros((), dtype=torch.bool))
        # saved with the weights, so weights trained with the other head layout are refused on load
        self.register_buffer("residual_head_flag", torch.tensor(self.residual_head))
        self.register_load_state_dict_pre_hook(_refuse_another_head_layout)
        if self.use_stage2:
            self._build_stage2(k, feature_dim, opts, reference, alignment)

    def _build_stage1_head(self, k: int, feature_dim: int, opts: CMMLOptions) -> None:
        """The stage-1 head of ``opts.stage1_head`` (§8)."""
        # "mean" reads the pooled token as it is: a LayerNorm would remove its length, which carries
        # how strongly the modalities agree
        self.aux_norm = nn.Identity() if opts.stage1_head == "mean" else nn.LayerNorm(feature_dim)
        self.aux_head = (
            nn.Sequential(
                nn.Linear(k * feature_dim, feature_dim),
                nn.GELU(),
                nn.Dropout(opts.dropout),
                nn.Linear(feature_dim, self.num_classes),
            )
            if opts.stage1_head == "concat_mlp"
            else nn.Linear(feature_dim, self.num_classes)
        )

    def _build_stage2(
        self,
        k: int,
        feature_dim: int,
        opts: CMMLOptions,
        reference: Callable[..., nn.Module],
        alignment: Callable[..., nn.Module],
    ) -> None:
        """Reference, alignment, fusion and projection heads (§9-§12), in this order."""
        heads, drop = opts.num_heads, opts.dropout
        self.reference = reference(feature_dim=feature_dim, num_heads=heads, dropout=drop) if self.use_context else None
        self.alignment = alignment(feature_dim=feature_dim, num_heads=heads, dropout=drop)
        self.fusion = FusionHead(feature_dim, self.num_classes, opts.fusion_layers, heads, drop)
        self.align_proj = ProjectionHead(feature_dim, opts.projection_dim)
        self.reference_proj = ProjectionHead(feature_dim, opts.projection_dim)
        self.contrast_proj = ProjectionHead(feature_dim, opts.projection_dim)
        if self.residual_head:
            # the fusion head starts as a near-zero correction of the trained stage-1 head
            nn.init.normal_(self.fusion.classifier.weight, std=0.01)
            nn.init.zeros_(self.fusion.classifier.bias)
        if opts.mark_synthesized:
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
            crta = self.crta_parameters() if getattr(self.crta, "reads_context", True) else list(self.crta.parameters())
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
        synth, context, _ = self.crta(tokens, present, prior)
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
            reference = self.reference(prior, completed, context)
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
        completed, _, _ = self.crta(tokens, present, self._context(tokens, present))
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
                    f"{name}={built!r}: build it with --{_OVERRIDE[name]} {word}"
                )
        return ""

    def forward_train(
        self, image: torch.Tensor, tabular: torch.Tensor | None = None, stage: int = 2
    ) -> dict[str, torch.Tensor]:
        """Training path: one encoder pass, the extra missingness made by masking tokens (§7, §13).

        Returns:
            stage 1: ``logits`` (stage-1 head), ``synth`` ``[B, k, d]`` and ``synth_blocks`` ``[N, B, k, d]`` (the
            CRTA output and its cascade), ``target`` (the real tokens, detached), ``recon_mask`` (dropped but
            present slots), ``present`` and ``keep``. Stage 2: ``logits`` and ``logits_dropped`` (the observed
            and the dropped view), ``synth``, ``target``, ``recon_mask`` (view 2), ``aligned`` ``[B, k, p]``,
            ``reference`` ``[B, p]``, ``align_mask``, ``proj`` ``[2B, p]`` (normalised, view 1 rows first),
            ``proj_present`` ``[2B, k]`` and ``present``.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}.")
        tokens, present = self.encoder(image, tabular)  # the only encoder pass of the step
        if stage == 1:
            keep = random_keep_mask(present, self.stage1_drop_prob)
            synth, _, cascade = self.crta(tokens, keep, self._context(tokens, keep))
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
            if self.memory is not None and getattr(self.memory, "write_stage2", False):
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
