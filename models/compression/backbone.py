"""A ResNet-18/34 + FPN backbone of any width, for light students.

Detectron2's `build_resnet_backbone` insists on RES2_OUT_CHANNELS = 64 for ResNet-18/34; this
builder is the same network (BasicBlock stages, widths doubling per stage) with the stem and
res2 widths taken from MODEL.RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS. At 64/64 it has the
parameter shapes of Detectron2's R18/R34-FPN.
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet-18/34 (any stem / res2 width) with an FPN, from MODEL.RESNETS.* and MODEL.FPN.*.

    Returns:
        An FPN backbone whose levels (p2..p6 for the usual IN_FEATURES) have FPN.OUT_CHANNELS.
    """
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"build_narrow_resnet_fpn_backbone builds ResNet-18/34, not depth {depth}")
    norm = cfg.MODEL.RESNETS.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
                     norm=norm)
    in_channels, out_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stages = []
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        stages.append(ResNet.make_stage(
            block_class=BasicBlock, num_blocks=num_blocks,
            stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=norm))
        in_channels, out_channels = out_channels, out_channels * 2
    bottom_up = ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
                       freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
               top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
