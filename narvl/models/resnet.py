"""ResNet bottleneck stages 1-3 (stride 16), the image half of the OFA/NARVL encoder.

images (B, 3, S, S) -> features (B, 1024, S/16, S/16). torchvision has no CPU build here, so the
backbone is written in the package; the layout (names, shapes) follows torchvision's resnet so a
torchvision state dict's ``conv1/bn1/layer1-3`` entries load with ``load_torchvision_state``.

Inference: ``fold_batchnorm_`` folds every BatchNorm into its conv (the folded network is still
plain modules); serving copies also pre-pack the folded convs for fused oneDNN primitives
(``narvl.models.inference.pack_for_cpu_``).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        nn.init.zeros_(self.bn3.weight)  # residual branch starts at zero (stable from scratch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNetStages(nn.Module):
    """Stem (7x7/2 conv + 3x3/2 max-pool) and bottleneck stages 1-3 with ``layers`` blocks.

    Output channels 1024, stride 16. ``layers`` = (3, 4, 6) is resnet50's, (3, 4, 23) resnet101's,
    (3, 8, 36) resnet152's.
    """

    out_channels = 1024

    def __init__(self, layers=(3, 4, 6)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256), layers)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=2 if (i > 0 and j == 0) else 1))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def load_torchvision_state(self, state: dict) -> list[str]:
        """Load ``conv1``, ``bn1`` and ``layer1-3`` entries of a torchvision resnet state dict;
        returns the names that were absent (``layer4``/``fc`` entries are ignored)."""
        own = self.state_dict()
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked))
        self.load_state_dict(picked, strict=False)
        return missing


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode bn as one conv: w' = w * g / sqrt(var + eps),
    b' = beta - mean * g / sqrt(var + eps)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, bias=True).to(conv.weight)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_(bn.bias + (b - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def fold_batchnorm_(backbone: ResNetStages) -> ResNetStages:
    """Fold every eval-mode BatchNorm into the conv before it, in place (inference only: the
    folded network computes the same function as ``backbone.eval()``)."""
    backbone.conv1, backbone.bn1 = _fold(backbone.conv1, backbone.bn1), nn.Identity()
    for m in backbone.modules():
        if isinstance(m, Bottleneck):
            m.conv1, m.bn1 = _fold(m.conv1, m.bn1), nn.Identity()
            m.conv2, m.bn2 = _fold(m.conv2, m.bn2), nn.Identity()
            m.conv3, m.bn3 = _fold(m.conv3, m.bn3), nn.Identity()
            if m.downsample is not None:
                m.downsample = _fold(m.downsample[0], m.downsample[1])
    return backbone
