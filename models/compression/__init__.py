"""Compression of the open-vocabulary detector into a lighter student (`ovd compress`):
TID feature distillation, CID region distillation, the Light-ML box-head module, a narrow
ResNet-FPN backbone and the student meta-architecture. Importing this registers them."""

from . import backbone as _backbone  # noqa: F401  registers build_narrow_resnet_fpn_backbone
from .cid import CenternessInstanceDistiller
from .light_ml import LightML
from .student import FrozenTeacher, StudentOutputLayers, StudentRCNN, StudentROIHeads
from .tid import TaskIntegrationDistiller

__all__ = ["CenternessInstanceDistiller", "FrozenTeacher", "LightML", "StudentOutputLayers",
           "StudentRCNN", "StudentROIHeads", "TaskIntegrationDistiller"]
