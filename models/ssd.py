"""SSD300 / SSD512 on a VGG16 base, laid out like the book's ``ssd_model.py`` and ssd.pytorch.

The module names (``vgg``, ``extras``, ``L2Norm``, ``loc``, ``conf``) and their indices are the book's, so
its checkpoints and amdegroot's ``ssd300_mAP_77.43_v2.pth`` load with ``load_state_dict`` as they are.
``book_to_torchvision`` / ``torchvision_to_book`` rename the same tensors for torchvision's ``ssd300_vgg16``.

The network returns raw head outputs; default boxes live in ``models.anchors`` and decoding, NMS and
scaling to pixels in ``models.detect``.

Reference: Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016 (arXiv:1512.02325); the book is
"PyTorchによる発展ディープラーニング" ch. 2 (see shared/reference/book-ssd.md, section 2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SSD",
    "SSD300_COCO",
    "SSD300_VOC",
    "SSD512_VOC",
    "ExtraBlock",
    "L2Norm",
    "SSDConfig",
    "book_to_torchvision",
    "ssd300",
    "ssd512",
    "torchvision_to_book",
]


class ExtraBlock(NamedTuple):
    """One extra feature layer (paper Fig. 2, "conv8" onwards): a 1x1 conv down to ``mid_channels``, then a
    ``kernel_size`` conv to ``out_channels`` whose output is a detection source. ReLU follows each conv."""

    mid_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int


# The book's make_extras() (ssd_model.py:330-346): conv8_2 and conv9_2 halve the map (19 -> 10 -> 5),
# conv10_2 and conv11_2 are unpadded 3x3 (5 -> 3 -> 1).
_SSD300_EXTRAS: tuple[ExtraBlock, ...] = (
    ExtraBlock(256, 512, 3, 2, 1),
    ExtraBlock(128, 256, 3, 2, 1),
    ExtraBlock(128, 256, 3, 1, 0),
    ExtraBlock(128, 256, 3, 1, 0),
)

# The paper's Caffe SSD512: conv8_2 .. conv11_2 are 3x3 stride 2 pad 1 (32 -> 16 -> 8 -> 4 -> 2),
# conv12_2 is 4x4 pad 1 (2 -> 1).
_SSD512_EXTRAS: tuple[ExtraBlock, ...] = (
    ExtraBlock(256, 512, 3, 2, 1),
    ExtraBlock(128, 256, 3, 2, 1),
    ExtraBlock(128, 256, 3, 2, 1),
    ExtraBlock(128, 256, 3, 2, 1),
    ExtraBlock(128, 256, 4, 1, 1),
)


@dataclass(frozen=True)
class SSDConfig:
    """The paper's constants for one SSD variant (one entry per detection source).

    Sizes are in pixels of the ``input_size`` x ``input_size`` network input. Source k has a
    ``feature_maps[k]`` square map, ``2 + 2 * len(aspect_ratios[k])`` default boxes per location and a
    centre spacing of ``steps[k]`` pixels. ``clamp_centres`` selects the book's / amdegroot's clamp of all
    four (cx, cy, w, h) columns to [0, 1]; torchvision clamps only w and h.
    """

    input_size: int
    feature_maps: tuple[int, ...]
    steps: tuple[int, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    variances: tuple[float, float] = (0.1, 0.2)
    clamp_centres: bool = True
    #: layers after conv7 (fc7); sources 2.. are their outputs
    extras: tuple[ExtraBlock, ...] = _SSD300_EXTRAS

    def __post_init__(self) -> None:
        n = len(self.feature_maps)
        lengths = {
            "steps": len(self.steps),
            "min_sizes": len(self.min_sizes),
            "max_sizes": len(self.max_sizes),
            "aspect_ratios": len(self.aspect_ratios),
            "extras + 2": len(self.extras) + 2,
        }
        wrong = {name: length for name, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(f"SSDConfig has {n} feature maps but these lengths differ: {wrong}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Default boxes per map location: s, s' and a wide and a tall box per aspect ratio."""
        return tuple(2 + 2 * len(ar) for ar in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        """Total default boxes, e.g. 8,732 for SSD300."""
        return sum(f * f * n for f, n in zip(self.feature_maps, self.boxes_per_location, strict=True))


#: The book's ssd_cfg (2-8_SSD_inference.ipynb nb#5) = amdegroot's `voc` config: 8,732 boxes.
SSD300_VOC = SSDConfig(
    input_size=300,
    feature_maps=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)

#: torchvision ssd300_vgg16 (detection/ssd.py): scales [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05] x 300,
#: amdegroot's `coco` sizes; torchvision clamps only w and h. 21 / 300 == 0.07 exactly in float64.
SSD300_COCO = SSDConfig(
    input_size=300,
    feature_maps=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(21, 45, 99, 153, 207, 261),
    max_sizes=(45, 99, 153, 207, 261, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    clamp_centres=False,
)

#: The SSD paper's 512 model (its Caffe prototxt; amdegroot's 512 sizes): 24,564 boxes.
SSD512_VOC = SSDConfig(
    input_size=512,
    feature_maps=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    extras=_SSD512_EXTRAS,
)

# VGG16 conv widths with pools (book make_vgg, ssd_model.py:301-326): "M" = MaxPool2d(2, 2),
# "C" = the same with ceil_mode=True (pool3, 75 -> 38 at 300).
_VGG_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip
#: vgg[:_CONV4_3_END] ends with the ReLU after conv4_3, the first detection source
_CONV4_3_END = 23
_L2NORM_SCALE = 20.0  # book L2Norm(scale=20); paper section 3.1 ("ParseNet" rescaling)


def _channels(c: int, width: float) -> int:
    """``c`` channels scaled by ``width``, at least 1."""
    return max(1, round(c * width))


def _vgg_base(width: float) -> list[nn.Module]:
    """The book's 35-module VGG16 base: conv1_1 .. conv5_3, pool5 (3x3 stride 1), dilated conv6, conv7."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "C":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            assert isinstance(v, int)
            out_ch = _channels(v, width)
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = out_ch
    fc_ch = _channels(1024, width)
    layers += [
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5
        nn.Conv2d(in_ch, fc_ch, kernel_size=3, padding=6, dilation=6),  # conv6 (fc6, atrous)
        nn.ReLU(inplace=True),
        nn.Conv2d(fc_ch, fc_ch, kernel_size=1),  # conv7 (fc7)
        nn.ReLU(inplace=True),
    ]
    return layers


class L2Norm(nn.Module):
    """Per-location L2 normalisation of conv4_3 with a learned per-channel scale (the book's ``L2Norm``).

    x (Tensor[B, C, H, W]) -> weight[c] * x / (||x||_2 over C + 1e-10). The norm is taken in float32 so
    bf16 / fp16 inputs neither overflow nor lose precision; the output has the input's dtype.
    """

    def __init__(self, channels: int, scale: float = _L2NORM_SCALE, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        out = self.weight.float()[None, :, None, None] * (x32 / norm)
        return out.to(x.dtype)


class SSD(nn.Module):
    """SSD detector with the book's module names: ``vgg`` (ModuleList, 35 modules), ``extras`` (ModuleList of
    convs; ReLU is applied in forward), ``L2Norm`` (``.weight`` [C]), ``loc`` and ``conf`` (ModuleLists of
    3x3 head convs, one per source).

    Args:
        num_classes: classes including background at index 0 (21 for VOC, 91 for torchvision's COCO).
        config: the variant's constants (``SSD300_VOC``, ``SSD300_COCO`` or ``SSD512_VOC``).
        width: scales every channel count (at least 1 each); 1.0 is the real network, small values give
            few-channel models for tests and demos.
    """

    def __init__(self, num_classes: int, config: SSDConfig = SSD300_VOC, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and must be at least 2, got {num_classes}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.config = config
        self.num_classes = num_classes
        self.width = width

        # registration order = the book's state_dict order: vgg, extras, L2Norm, loc, conf
        self.vgg = nn.ModuleList(_vgg_base(width))
        source_channels = [_channels(512, width), _channels(1024, width)]
        extras: list[nn.Module] = []
        in_ch = source_channels[-1]
        for block in config.extras:
            mid, out = _channels(block.mid_channels, width), _channels(block.out_channels, width)
            extras.append(nn.Conv2d(in_ch, mid, kernel_size=1))
            extras.append(
                nn.Conv2d(mid, out, kernel_size=block.kernel_size, stride=block.stride, padding=block.padding)
            )
            source_channels.append(out)
            in_ch = out
        self.extras = nn.ModuleList(extras)
        self.L2Norm = L2Norm(source_channels[0])
        boxes = config.boxes_per_location
        self.loc = nn.ModuleList(
            nn.Conv2d(c, n * 4, kernel_size=3, padding=1) for c, n in zip(source_channels, boxes, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, n * num_classes, kernel_size=3, padding=1)
            for c, n in zip(source_channels, boxes, strict=True)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (FloatTensor[B, 3, S, S]), S = config.input_size, in the book's scale (RGB, 0-255 minus the
        mean) -> loc (Tensor[B, A, 4]) raw box offsets and conf (Tensor[B, A, num_classes]) raw logits.

        Anchor order is the book's: source, then row y, then column x, then box within the location.
        """
        size = self.config.input_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(f"SSD{size} expects input of shape [B, 3, {size}, {size}], got {list(x.shape)}")
        sources = feature_sources(self.vgg, self.L2Norm, self.extras, x)
        return _apply_heads(self.loc, sources, 4), _apply_heads(self.conf, sources, self.num_classes)


def feature_sources(vgg: nn.ModuleList, l2norm: nn.Module, extras: nn.ModuleList, x: Tensor) -> list[Tensor]:
    """The SSD's source feature maps: L2Norm(conv4_3), fc7, then every second extra conv (ReLU'd).

    No shape checks, so torch.fx can trace it (``models.quantize``).
    """
    sources: list[Tensor] = []
    for layer in vgg[:_CONV4_3_END]:
        x = layer(x)
    sources.append(l2norm(x))
    for layer in vgg[_CONV4_3_END:]:
        x = layer(x)
    sources.append(x)
    for k, conv in enumerate(extras):
        x = F.relu(conv(x), inplace=True)
        if k % 2 == 1:
            sources.append(x)
    return sources


def _apply_heads(heads: nn.ModuleList, sources: list[Tensor], k: int) -> Tensor:
    """Run one head per source and flatten: -> Tensor[B, A, k], anchors ordered (source, y, x, box)."""
    outputs = []
    for head, source in zip(heads, sources, strict=True):
        out = head(source)  # (B, n*k, H, W); channel = box * k + value
        # (B, n*k, H, W) -> (B, H, W, n*k) -> (B, H*W*n, k)
        outputs.append(out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, k))
    return torch.cat(outputs, dim=1)


def ssd300(num_classes: int = 21, width: float = 1.0, config: SSDConfig = SSD300_VOC) -> SSD:
    """SSD300 (the book's network; ``config=SSD300_COCO`` for torchvision's anchors)."""
    if config.input_size != 300:
        raise ValueError(f"ssd300 needs a 300-pixel config, got input_size={config.input_size}")
    return SSD(num_classes, config, width)


def ssd512(num_classes: int = 21, width: float = 1.0, config: SSDConfig = SSD512_VOC) -> SSD:
    """SSD512 with the paper's extra layers (maps 64, 32, 16, 8, 4, 2, 1)."""
    if config.input_size != 512:
        raise ValueError(f"ssd512 needs a 512-pixel config, got input_size={config.input_size}")
    return SSD(num_classes, config, width)


# --- state_dict layouts -----------------------------------------------------------------------------------
# book vgg index -> torchvision prefix (book-ssd.md section 3.2): conv1_1..conv4_3 keep their index in
# backbone.features; conv5_x move into backbone.extra.0 (index - 23); conv6 / conv7 sit in its nested fc
# Sequential backbone.extra.0.7 (index - 30).
_CONV5_1, _CONV6 = 24, 31


def _vgg_to_tv(index: int) -> str:
    if index < _CONV4_3_END:
        return f"backbone.features.{index}"
    if index < _CONV6:
        return f"backbone.extra.0.{index - _CONV4_3_END}"
    return f"backbone.extra.0.7.{index - (_CONV6 - 1)}"


_BOOK_KEY = re.compile(r"^(vgg|extras|loc|conf)\.(\d+)\.(weight|bias)$")
_TV_KEY = re.compile(
    r"^(?:backbone\.features\.(?P<feat>\d+)"
    r"|backbone\.extra\.0\.7\.(?P<fc>\d+)"
    r"|backbone\.extra\.0\.(?P<conv5>\d+)"
    r"|backbone\.extra\.(?P<block>[1-9]\d*)\.(?P<sub>\d+)"
    r"|head\.(?P<head>regression|classification)_head\.module_list\.(?P<src>\d+))"
    r"\.(?P<kind>weight|bias)$"
)


def _book_key_to_tv(key: str) -> str:
    if key == "L2Norm.weight":
        return "backbone.scale_weight"
    m = _BOOK_KEY.match(key)
    if m is None:
        raise ValueError(f"{key!r} is not a book / ssd.pytorch SSD key")
    group, index, kind = m.group(1), int(m.group(2)), m.group(3)
    if group == "vgg":
        return f"{_vgg_to_tv(index)}.{kind}"
    if group == "extras":  # extras.{2m, 2m+1} -> backbone.extra.{m+1}.{0, 2} (a ReLU sits between)
        return f"backbone.extra.{index // 2 + 1}.{(index % 2) * 2}.{kind}"
    head = "regression" if group == "loc" else "classification"
    return f"head.{head}_head.module_list.{index}.{kind}"


def _tv_key_to_book(key: str) -> str:
    if key == "backbone.scale_weight":
        return "L2Norm.weight"
    m = _TV_KEY.match(key)
    if m is None:
        raise ValueError(f"{key!r} is not a torchvision ssd300_vgg16 key")
    kind = m["kind"]
    if m["feat"] is not None:
        index = int(m["feat"])
        if index >= _CONV4_3_END:
            raise ValueError(f"{key!r}: torchvision's backbone.features stops at index {_CONV4_3_END - 1}")
    elif m["fc"] is not None:
        index = int(m["fc"]) + _CONV6 - 1
    elif m["conv5"] is not None:
        index = int(m["conv5"]) + _CONV4_3_END
    elif m["block"] is not None:
        sub = int(m["sub"])
        if sub not in (0, 2):
            raise ValueError(f"{key!r}: extra blocks hold convs at positions 0 and 2 only")
        return f"extras.{(int(m['block']) - 1) * 2 + sub // 2}.{kind}"
    else:
        group = "loc" if m["head"] == "regression" else "conf"
        return f"{group}.{m['src']}.{kind}"
    return f"vgg.{index}.{kind}"


def book_to_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a book / ssd.pytorch SSD state_dict to torchvision ``ssd300_vgg16`` keys (same tensors, input
    order kept). Exact for SSD300: all 71 tensors. Raises ValueError on a key outside the book layout."""
    return {_book_key_to_tv(k): v for k, v in state_dict.items()}


def torchvision_to_book(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``book_to_torchvision``; the round trip is the identity. Raises ValueError on a key
    that torchvision's SSD VGG16 layout does not have."""
    return {_tv_key_to_book(k): v for k, v in state_dict.items()}
