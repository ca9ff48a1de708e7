"""VGG16 and VGG16-BN classifiers with torchvision's state_dict keys.

Same modules and names as ``torchvision.models.vgg16`` / ``vgg16_bn`` (``features.N``,
``avgpool``, ``classifier.{0,3,6}``), so torchvision's ImageNet file and the book's chapter 1
fine-tuned files (``classifier.6`` = Linear(4096, N)) load by name. Two additions:

- ``num_classes``: any number of outputs;
- ``width``: scales every conv's channels and the 4096-wide hidden layers (width=1/16 gives a
  tiny network for tests and demos). width=1 is exactly torchvision's network.

Architecture: Simonyan & Zisserman, "Very Deep Convolutional Networks", configuration D (Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Configuration D of the VGG paper (Table 1): conv output channels, "M" = 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
#: Width of the two hidden fully connected layers (fc6, fc7).
HIDDEN = 4096
#: ``AdaptiveAvgPool2d`` output side (torchvision; an identity at 224 x 224 inputs).
POOL_SIZE = 7


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width`` (at least 1)."""
    return max(1, round(channels * width))


class VGG(nn.Module):
    """VGG classifier: ``features`` -> ``avgpool`` -> flatten -> ``classifier``.

    Args:
        features: the convolutional stack (see :func:`make_features`).
        num_classes: outputs of ``classifier.6``.
        hidden: width of ``classifier.0`` and ``classifier.3`` (4096 in the paper).
        dropout: dropout probability in the classifier (inactive in eval mode).

    forward: x (FloatTensor[B, 3, H, W]) -> logits (FloatTensor[B, num_classes]).
    """

    def __init__(
        self, features: nn.Sequential, num_classes: int = 1000, hidden: int = HIDDEN, dropout: float = 0.5
    ) -> None:
        super().__init__()
        out_channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((POOL_SIZE, POOL_SIZE))
        self.classifier = nn.Sequential(
            nn.Linear(out_channels * POOL_SIZE * POOL_SIZE, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. (2015) for convs; small normal for the linears, as torchvision does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # (B, C, 7, 7) -> (B, C*49)
        logits: Tensor = self.classifier(x)
        return logits


def make_features(
    cfg: tuple[int | str, ...] = VGG16_CFG, batch_norm: bool = False, width: float = 1.0
) -> nn.Sequential:
    """The conv stack: 3x3 convs (padding 1) + [BatchNorm] + ReLU, "M" = MaxPool2d(2, 2)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = scaled(int(v), width)
        layers.append(nn.Conv2d(in_channels, out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out
    return nn.Sequential(*layers)


def vgg16(num_classes: int = 1000, width: float = 1.0) -> VGG:
    """VGG16 (configuration D) with random weights."""
    return VGG(make_features(VGG16_CFG, False, width), num_classes, scaled(HIDDEN, width))


def vgg16_bn(num_classes: int = 1000, width: float = 1.0) -> VGG:
    """VGG16 with BatchNorm after every conv, with random weights."""
    return VGG(make_features(VGG16_CFG, True, width), num_classes, scaled(HIDDEN, width))


VGG_BUILDERS = {"vgg16": vgg16, "vgg16_bn": vgg16_bn}
