"""Detectron2 components of the open-vocabulary detector; importing this registers them."""

# The compressed student (models/compression) is a detector too: registering it here lets every
# loader of detector configs (ovd eval, ovd export, ovd.models.exported.load_export) build one.
from ovd.models.compression import student as _student  # noqa: F401  registers the student

from . import meta_arch as _meta_arch  # noqa: F401  registers OpenVocabRCNN
from . import roi_heads as _roi_heads  # noqa: F401  registers EZSDROIHeads
from .config import add_ovd_config
from .meta_arch import OpenVocabRCNN
from .output_layers import EZSDOutputLayers, TextEmbeddingClassifier, distillation_loss
from .roi_heads import EZSDROIHeads

__all__ = ["EZSDOutputLayers", "EZSDROIHeads", "OpenVocabRCNN", "TextEmbeddingClassifier",
           "add_ovd_config", "distillation_loss"]
