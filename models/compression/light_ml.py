"""Light-ML: task-wise mutual lifting of the box head's classification and regression branches
(Du et al., arXiv 2411.02861; docs/methods.md section 3).

The paper mixes two convolutional branch maps by channel shuffle and a light convolution, so
that a teacher's supervision of one task reaches the other in back-propagation. Our box head's
branches are FC vectors, so the module is adapted *(our formulation)*: each (N, d) branch vector
is viewed as C channels of length L = d / C, and the 2-D depthwise 3x3 convolution becomes a
1-D depthwise convolution along L.
"""

from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (N, groups * c, L) -> (N, c * groups, L), interleaved.

    With groups = 2 and x = concat(a, b) the result is a0, b0, a1, b1, ...
    """
    n, channels, length = x.shape
    return x.view(n, groups, channels // groups, length).transpose(1, 2).reshape(n, channels, length)


class LightConv1d(nn.Sequential):
    """Depthwise conv (kernel k, along L) + pointwise conv + GroupNorm + ReLU: (N, C, L) -> same.

    GroupNorm with one group normalises each region over (C, L) on its own, so a region's output
    never depends on the other regions in the batch (BatchNorm's would, in training).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels),
            nn.Conv1d(channels, channels, 1),
            nn.GroupNorm(1, channels),
            nn.ReLU(inplace=True),
        )


class LightML(nn.Module):
    """Mutually lift the classification and regression branch vectors of a box head.

        X = shuffle(concat(F_cls, F_reg))            (N, 2C, L), channels alternate cls / reg
        X_cls, X_reg = split(X)                       each (N, C, L), half of each branch
        F_cls' = F_cls + g_cls * light_conv_cls(X_cls)    (N, d)
        F_reg' = F_reg + g_reg * light_conv_reg(X_reg)    (N, d)

    Every output therefore depends on both branches: a loss on the classification output (e.g.
    logit distillation) produces gradients in the regression branch, and vice versa.

    Args:
        dim: d, the width of each branch vector.
        channels: C, the channels each vector is viewed as (even; divides d).
        kernel_size: depthwise kernel along L (odd).
        at_inference: apply the module in eval mode too; False makes it the identity at
            inference (a training-time aid only; the box head then sees un-lifted features).
        zero_init: *(our addition; False = the paper's form, g = 1)* learnable gains g_cls,
            g_reg that start at 0, so the module starts as the identity and the lift grows only
            as far as the losses ask (ReZero-style). Without them a freshly initialised lift
            adds a unit-scale, per-region normalised vector to both branches from the first step.
    """

    def __init__(self, dim: int, *, channels: int = 16, kernel_size: int = 3, at_inference: bool = True,
                 zero_init: bool = False):
        super().__init__()
        if channels % 2 or dim % channels:
            raise ValueError(f"Light-ML needs an even channel count dividing the branch width, "
                             f"got {channels} channels for width {dim}")
        if kernel_size % 2 == 0:
            raise ValueError(f"Light-ML kernel size must be odd, got {kernel_size}")
        self.dim, self.channels = dim, channels
        self.at_inference = at_inference
        self.lift_cls = LightConv1d(channels, kernel_size)
        self.lift_reg = LightConv1d(channels, kernel_size)
        # Only created when asked for, so checkpoints of the paper's form keep their keys.
        self.gains = nn.Parameter(torch.zeros(2)) if zero_init else None

    def forward(self, f_cls: torch.Tensor, f_reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d), (N, d) -> lifted (N, d), (N, d); the inputs unchanged when switched off."""
        if not self.training and not self.at_inference:
            return f_cls, f_reg
        n = f_cls.shape[0]
        length = self.dim // self.channels
        x = torch.cat([f_cls.reshape(n, self.channels, length),
                       f_reg.reshape(n, self.channels, length)], dim=1)
        x_cls, x_reg = channel_shuffle(x, 2).split(self.channels, dim=1)
        lift_cls = self.lift_cls(x_cls).reshape(n, self.dim)
        lift_reg = self.lift_reg(x_reg).reshape(n, self.dim)
        if self.gains is not None:
            lift_cls, lift_reg = self.gains[0] * lift_cls, self.gains[1] * lift_reg
        return f_cls + lift_cls, f_reg + lift_reg
