"""Train an SSD with BatchNorm after every base and extra conv, then fold it away.

An SSD without normalisation learns slowly from random weights (DSOD, Shen et al. 2017, trains
from scratch with BatchNorm). :func:`add_batchnorm` wraps each conv in a :class:`ConvBN`;
:func:`fold_batchnorm` folds each back into one conv, giving the plain SSD (the book's keys and
shapes) that the service loads as any other, with the same outputs in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.ssd import SSD

__all__ = ["ConvBN", "add_batchnorm", "fold_batchnorm", "has_batchnorm"]


class ConvBN(nn.Module):
    """``bn(conv(x))``: a conv followed by BatchNorm2d over its output channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.bn(self.conv(x))
        return out

    def folded(self) -> nn.Conv2d:
        """One conv computing what this module computes in eval mode."""
        conv, bn = self.conv, self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (C,)
        fused = copy.deepcopy(conv)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
        with torch.no_grad():
            fused.weight.copy_(conv.weight.detach() * scale[:, None, None, None])
            if fused.bias is None:
                fused.bias = nn.Parameter(torch.empty_like(scale))
            fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
        return fused


def add_batchnorm(net: SSD) -> SSD:
    """Wrap every conv of ``net.vgg`` and ``net.extras`` in a ConvBN, in place; returns ``net``."""
    for layers in (net.vgg, net.extras):
        for index, module in enumerate(layers):
            if isinstance(module, nn.Conv2d):
                layers[index] = ConvBN(module)
    return net


def has_batchnorm(net: SSD) -> bool:
    return any(isinstance(m, ConvBN) for m in net.modules())


def fold_batchnorm(net: SSD) -> SSD:
    """A copy of ``net`` with every ConvBN folded into its conv (the plain SSD layout), in eval mode."""
    plain = copy.deepcopy(net).eval()
    for layers in (plain.vgg, plain.extras):
        for index, module in enumerate(layers):
            if isinstance(module, ConvBN):
                layers[index] = module.folded()
    return plain
