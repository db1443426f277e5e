"""Embedding networks for few-shot learning: the 4-block ConvNet and ResNet-12."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_count, check_positive_float, check_probability

Shape = Sequence[int]


def _check_images(who: str, x: Tensor, channels: int, pools: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{who}: expected input [B, {channels}, H, W], got {list(x.shape)}")
    _pooled(who, tuple(x.shape[1:]), channels, pools)  # a clear error for too small images


def _pooled(who: str, input_shape: Shape, channels: int, pools: int) -> tuple[int, int]:
    """(h, w) after ``pools`` floor-mode 2x2 max-pools; checks the input is large enough."""
    if len(input_shape) != 3 or input_shape[0] != channels:
        raise ValueError(f"{who}: input_shape must be ({channels}, H, W), got {tuple(input_shape)}")
    h, w = input_shape[1:]
    h, w = h >> pools, w >> pools
    if h < 1 or w < 1:
        raise ValueError(f"{who}: input {tuple(input_shape[1:])} is too small for {pools} "
                         f"2x2 poolings (needs at least {2 ** pools} pixels a side)")
    return h, w


class Conv4(nn.Module):
    """The 4-block ConvNet of Matching/Prototypical Networks (Vinyals et al. 2016).

    Each block is conv3x3 (padding 1) - BatchNorm - ReLU - 2x2 max-pool. On 28x28 inputs
    it gives 64 features, on 84x84 inputs 1600 (64 x 5 x 5).

    Args:
        in_channels: input image channels.
        hidden: channels of the first three blocks.
        out_channels: channels of the last block.
        flatten: return ``[B, D]`` vectors; ``False`` keeps the ``[B, C, h, w]`` feature map
            (what :class:`pymeta.learners.RelationNet` needs).
        pool_last: whether the last block max-pools.
        channels_last: keep the conv weights in channels_last memory format, which makes
            oneDNN's CPU convolutions 1.3-1.7x faster here; results are the same up to rounding.

    Example:
        >>> import torch
        >>> net = Conv4(in_channels=1, hidden=8, out_channels=16)
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 16])
        >>> net.out_features((1, 84, 84))
        400
        >>> Conv4(flatten=False).output_shape((1, 28, 28))
        (64, 1, 1)
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_channels: int = 64,
                 flatten: bool = True, pool_last: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        for name, n in (("in_channels", in_channels), ("hidden", hidden),
                        ("out_channels", out_channels)):
            check_count("Conv4", name, n)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.flatten = check_bool("Conv4", "flatten", flatten)
        self.pool_last = check_bool("Conv4", "pool_last", pool_last)
        widths = [in_channels, hidden, hidden, hidden, out_channels]
        self.blocks = nn.Sequential(*[
            _conv_block(widths[i], widths[i + 1], pool=i < 3 or pool_last) for i in range(4)])
        if check_bool("Conv4", "channels_last", channels_last):
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        _check_images("Conv4", x, self.in_channels, 4 if self.pool_last else 3)
        z = self.blocks(x)
        return z.flatten(1) if self.flatten else z

    def output_shape(self, input_shape: Shape) -> tuple[int, ...]:
        """Shape of one sample's output for one ``(C, H, W)`` input, without running it."""
        h, w = _pooled("Conv4", input_shape, self.in_channels, 4 if self.pool_last else 3)
        return (self.out_channels * h * w,) if self.flatten else (self.out_channels, h, w)

    def out_features(self, input_shape: Shape) -> int:
        """Number of output features for one ``(C, H, W)`` input."""
        return math.prod(self.output_shape(input_shape))


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    # no conv bias: the BatchNorm that follows has its own shift
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout))


class _ResidualBlock(nn.Module):
    """3 x (conv3x3-BN), LeakyReLU(0.1) between and after, 1x1 conv-BN shortcut, max-pool."""

    def __init__(self, cin: int, cout: int, drop_rate: float) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_conv_bn(cin, cout, 3), _conv_bn(cout, cout, 3),
                                    _conv_bn(cout, cout, 3)])
        self.shortcut = _conv_bn(cin, cout, 1)
        self.pool = nn.MaxPool2d(2)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, conv in enumerate(self.convs):
            out = conv(out)
            if i < 2:
                out = F.leaky_relu(out, 0.1)
        out = self.pool(F.leaky_relu(out + self.shortcut(x), 0.1))
        return F.dropout(out, self.drop_rate, self.training) if self.drop_rate else out


class ResNet12(nn.Module):
    """ResNet-12 as in TADAM / MetaOptNet: four residual blocks, each halving the size.

    Args:
        in_channels: input image channels.
        channels: output channels of the four blocks.
        flatten: global-average-pool to ``[B, channels[-1]]``; ``False`` keeps the
            ``[B, C, h, w]`` feature map (5x5 on 84x84 inputs, 1x1 on 28x28).
        drop_rate: dropout probability after each block (training only).
        channels_last: keep the conv weights in channels_last memory format, which makes
            oneDNN's CPU convolutions 1.3-1.7x faster here; results are the same up to rounding.

    Example:
        >>> import torch
        >>> net = ResNet12(in_channels=1, channels=(4, 8, 8, 16))
        >>> net(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 16])
        >>> ResNet12().out_features((3, 84, 84))
        640
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 flatten: bool = True, drop_rate: float = 0.0, channels_last: bool = True) -> None:
        super().__init__()
        if isinstance(channels, (int, str)) or len(channels) != 4:
            raise ValueError(f"ResNet12: channels needs 4 entries, got {channels!r}")
        check_count("ResNet12", "in_channels", in_channels)
        for i, c in enumerate(channels):
            check_count("ResNet12", f"channels[{i}]", c)
        self.in_channels, self.channels = in_channels, tuple(channels)
        self.flatten = check_bool("ResNet12", "flatten", flatten)
        self.drop_rate = check_probability("ResNet12", "drop_rate", drop_rate)
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(*[_ResidualBlock(widths[i], widths[i + 1], drop_rate)
                                      for i in range(4)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu",
                                        a=0.1)
        if check_bool("ResNet12", "channels_last", channels_last):
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        _check_images("ResNet12", x, self.in_channels, 4)
        z = self.blocks(x)
        return z.mean((-2, -1)) if self.flatten else z

    def output_shape(self, input_shape: Shape) -> tuple[int, ...]:
        """Shape of one sample's output for one ``(C, H, W)`` input, without running it."""
        h, w = _pooled("ResNet12", input_shape, self.in_channels, 4)
        return (self.channels[-1],) if self.flatten else (self.channels[-1], h, w)

    def out_features(self, input_shape: Shape) -> int:
        """Number of output features for one ``(C, H, W)`` input."""
        return math.prod(self.output_shape(input_shape))


def mlp(in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
        activation: str = "relu", init_std: float | None = None) -> nn.Sequential:
    """A plain multi-layer perceptron, ``nn.Sequential`` of Linear and activation layers.

    The default is MAML's sinusoid regressor, 1-40-40-1 with ReLU. A plain ``nn.Sequential``
    of standard layers, so gradient learners batch it over tasks. ``init_std``: weights from
    a normal truncated at 2 standard deviations, biases zero (MAML's reference code uses
    0.01); default: PyTorch's ``nn.Linear`` initialisation.

    Example:
        >>> net = mlp()
        >>> [m.out_features for m in net if isinstance(m, nn.Linear)]
        [40, 40, 1]
        >>> net(torch.zeros(7, 1)).shape
        torch.Size([7, 1])
    """
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"mlp: activation must be one of {sorted(acts)}, got {activation!r}")
    if isinstance(hidden, (bool, int, float, str)):
        raise ValueError(f"mlp: hidden must be a list of layer widths such as [40, 40], "
                         f"got {hidden!r}")
    sizes = [in_features, *hidden, out_features]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"mlp: layer sizes must be positive ints, got {sizes}")
    if init_std is not None:
        init_std = check_positive_float("mlp", "init_std", init_std)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([acts[activation]()] if i < len(sizes) - 2 else [])
    for m in layers if init_std else []:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


BACKBONES: dict = {"conv4": Conv4, "resnet12": ResNet12, "mlp": mlp}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """A backbone by registry name (``"conv4"``, ``"resnet12"``, ``"mlp"``) and its kwargs.

    Example:
        >>> build_backbone("conv4", in_channels=3, flatten=False).output_shape((3, 84, 84))
        (64, 5, 5)
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def feature_dim(backbone: nn.Module, input_shape: Shape,
                dtype: torch.dtype | None = None) -> int:
    """Features per sample that ``backbone`` gives for one input of ``input_shape``.

    Uses the backbone's ``out_features`` when it has one; otherwise runs one zero sample
    through it in eval mode without gradients (so BatchNorm statistics are untouched).
    ``dtype``: the sample's, e.g. ``torch.int64`` for a model that embeds token ids
    (default: the backbone's floating dtype).

    Example:
        >>> feature_dim(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), (3, 2, 2))
        5
    """
    if callable(getattr(backbone, "out_features", None)):
        return int(backbone.out_features(input_shape))
    ref = next((t for t in (*backbone.parameters(), *backbone.buffers())
                if t.is_floating_point()), None)
    like = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
    if dtype is not None:
        like["dtype"] = dtype
    with evaluating(backbone), torch.no_grad():
        return backbone(torch.zeros(1, *input_shape, **like))[0].numel()


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then every submodule back in its own mode
    (``module.train(was_training)`` would also un-freeze a BatchNorm kept in eval mode).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with evaluating(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    with kept_modes(module):
        module.eval()
        yield module


@contextlib.contextmanager
def kept_modes(module: nn.Module) -> Iterator[list]:
    """Restores every submodule's own train/eval mode after the block; yields the saved
    ``(submodule, training)`` pairs for the block to set modes from."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        yield saved
    finally:
        for m, mode in saved:
            m.training = mode
