"""cmml_monai.networks: encoders, CRTA, memory, alignment, the CMML net and the late-fusion baselines.

The layer above ``data``: ``torch.nn`` modules that take image tensors and NaN-coded table rows.
"""

from cmml_monai.networks.alignment import CrossModalAlignment, FusionHead, InstanceAdaptiveReference, ProjectionHead
from cmml_monai.networks.baselines import LATE_FUSION_MODES, LateFusionNet
from cmml_monai.networks.cmml import CMMLNet
from cmml_monai.networks.context import ContextTokens
from cmml_monai.networks.crta import CascadedResidualTransformerAE
from cmml_monai.networks.encoders import (
    IMAGE_ENCODERS,
    ImageEncoder,
    MultiModalEncoder,
    attach_feature_cache,
    build_image_backbone,
    load_pretrained,
)
from cmml_monai.networks.feature_cache import FeatureCache
from cmml_monai.networks.memory import ModalityMemoryBank
from cmml_monai.networks.pretrained import (
    EFFICIENTNET_BN,
    EFFICIENTNET_LITE,
    EfficientNetFeatures,
    input_normalization,
)
from cmml_monai.networks.spec import STAGE1_HEADS, CMMLOptions, InputSpec
from cmml_monai.networks.tabular import TabularEncoder
from cmml_monai.networks.utils import masked_mean, presence_from_nan, random_keep_mask
from cmml_monai.networks.wrappers import TrainingForward

__all__ = [
    "CMMLNet",
    "CMMLOptions",
    "InputSpec",
    "STAGE1_HEADS",
    "LateFusionNet",
    "LATE_FUSION_MODES",
    "MultiModalEncoder",
    "ImageEncoder",
    "TabularEncoder",
    "IMAGE_ENCODERS",
    "build_image_backbone",
    "load_pretrained",
    "attach_feature_cache",
    "FeatureCache",
    "input_normalization",
    "EFFICIENTNET_LITE",
    "EFFICIENTNET_BN",
    "EfficientNetFeatures",
    "ContextTokens",
    "CascadedResidualTransformerAE",
    "ModalityMemoryBank",
    "InstanceAdaptiveReference",
    "CrossModalAlignment",
    "FusionHead",
    "ProjectionHead",
    "presence_from_nan",
    "masked_mean",
    "random_keep_mask",
    "TrainingForward",
]
