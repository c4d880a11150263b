"""ResNet bottleneck stages 1-3 (stride 16), the image half of the OFA/NARVL encoder.

images (B, 3, S, S) -> features (B, 1024, S/16, S/16). torchvision has no CPU build here, so the
backbone is written in the package; the layout (names, shapes) follows torchvision's resnet so a
torchvision state dict's ``conv1/bn1/layer1-3`` entries load with ``load_torchvision_state``.

Inference: ``fold_batchnorm_`` folds every BatchNorm into its conv; ``pack_for_cpu_`` (after it)
also pre-packs each folded conv's weight into oneDNN's blocked layout and runs the block as fused
oneDNN primitives (conv+ReLU, conv+residual-add+ReLU) through torch's ``mkldnn`` ops: at batch
1 that halves the backbone's time on CPU (the per-call weight reorder and the separate
ReLU/add passes are gone; bench/bench_model.py). Float32 CPU inputs without grad or autocast take
that path; any other input runs the folded modules, so the packed copy never changes a result.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from .cache import ParamStamp, param_refs


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

        self._packed = None  # set by pack_for_cpu_ (inference only)
        self._pack_stamp = None  # the folded weights the plan was packed from
        self._pack_size = None  # the image size packed for; None: not packed

    def __getstate__(self):
        # a copy (deepcopy, pickle) packs again at its first call: oneDNN's packed weights are
        # opaque tensors that cannot be copied
        state = self.__dict__.copy()
        state["_packed"] = state["_pack_stamp"] = None
        return state

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        if (self._pack_size is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            if self._packed is None or self._pack_stamp.stale():  # a copy, or weights changed: pack again
                pack_for_cpu_(self, self._pack_size)
            if self._packed is not None and _backend.cpu_fastpath_enabled(_FASTPATH):
                try:
                    return _run_packed(self._packed, x)
                except RuntimeError as e:  # a private op that raises: the folded modules from now on
                    _backend.cpu_fastpath_failed(_FASTPATH, e)
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


_FASTPATH = "packed_resnet"


def mkldnn_fusion_available() -> bool:
    """True when torch's oneDNN fused-conv ops (``torch.ops.mkldnn._convolution_pointwise``,
    used by inductor's CPU backend) exist in this build."""
    return _backend.mkldnn_ops_available("_convolution_pointwise", "_reorder_convolution_weight")


def _pack(conv: nn.Conv2d, input_size):
    """(oneDNN-blocked weight, bias, padding, stride) of a folded conv; ``input_size`` is the
    (B, C, H, W) it is packed for (any other size still runs; oneDNN reorders)."""
    pad, stride = list(conv.padding), list(conv.stride)
    w = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach().float().contiguous(), pad,
                                                      stride, [1, 1], 1, list(input_size))
    return w, conv.bias.detach().float().contiguous(), pad, stride


def _conv(x, p, unary):
    w, b, pad, stride = p
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, stride, [1, 1], 1, unary, [], "")


def _run_packed(plan, x):
    stem, blocks = plan
    x = F.max_pool2d(_conv(x, stem, "relu"), 3, 2, 1)
    for c1, c2, c3, ds in blocks:
        idt = x if ds is None else _conv(x, ds, "none")
        y = _conv(_conv(x, c1, "relu"), c2, "relu")
        w, b, pad, stride = c3
        # relu(conv3(y) + idt) as one primitive (sum post-op, then ReLU)
        x = torch.ops.mkldnn._convolution_pointwise.binary(y, idt, w, b, pad, stride, [1, 1], 1,
                                                             "add", 1.0, "relu", [], "")
    return x


@torch.no_grad()
def pack_for_cpu_(backbone: ResNetStages, image_size: int = 224) -> bool:
    """Pre-pack a BN-folded backbone (``fold_batchnorm_``) for fused oneDNN inference on CPU,
    in place. Returns False (and changes nothing) when the ops are absent or the weights are not
    float32 CPU tensors. ``image_size`` only picks the packed layout (batch 1, S x S).

    Inference only (``train.py`` and the benches call it on an inference copy): the packed
    weights are a snapshot, packed again at the next call when the folded weights change.
    """
    if not isinstance(backbone.bn1, nn.Identity):
        raise ValueError("pack_for_cpu_ needs a BN-folded backbone: call fold_batchnorm_ first")
    w = backbone.conv1.weight
    if (not mkldnn_fusion_available() or w.device.type != "cpu" or w.dtype != torch.float32
            or not _backend.cpu_fastpath_enabled(_FASTPATH)):
        backbone._packed = backbone._pack_size = None
        return False
    try:
        plan = _plan(backbone, int(image_size))
    except RuntimeError as e:
        _backend.cpu_fastpath_failed(_FASTPATH, e)
        backbone._packed = backbone._pack_size = None
        return False
    backbone._packed = plan
    backbone._pack_stamp = ParamStamp(param_refs(backbone))
    backbone._pack_size = int(image_size)
    return True


def _plan(backbone: ResNetStages, s: int):
    stem = _pack(backbone.conv1, (1, 3, s, s))
    s = (s + 1) // 2  # 7x7/2 conv, then 3x3/2 max-pool
    s = (s + 1) // 2
    blocks = []
    c = 64
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3):
        for m in stage:
            s2 = (s + 1) // 2 if m.conv2.stride[0] == 2 else s
            blocks.append((_pack(m.conv1, (1, c, s, s)), _pack(m.conv2, (1, m.conv1.out_channels, s, s)),
                           _pack(m.conv3, (1, m.conv2.out_channels, s2, s2)),
                           _pack(m.downsample, (1, c, s, s)) if m.downsample is not None else None))
            s, c = s2, m.conv3.out_channels
    return stem, blocks
