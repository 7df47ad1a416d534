"""cmml_monai.losses: reconstruction, alignment, supervised contrastive and the combined CMML loss.

The layer above ``networks``: losses of the network outputs, one per term of each CMML stage.
"""

from cmml_monai.losses.alignment import AlignmentLoss
from cmml_monai.losses.cmml_loss import CMMLLoss
from cmml_monai.losses.reconstruction import ReconstructionLoss
from cmml_monai.losses.supcon import SupConLoss

__all__ = ["CMMLLoss", "ReconstructionLoss", "AlignmentLoss", "SupConLoss"]
