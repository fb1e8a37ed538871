"""Source text of the helper functions and small classes a generated module may need; only those
its layers use are written into the file."""

from __future__ import annotations

HELPERS = {
    "pad_same": '''
def pad_same(x, kernel_size, stride, dilation=None, value=0.0):
    """Pad like TensorFlow's padding='same': the odd extra cell goes after (bottom/right)."""
    dilation = dilation or (1,) * len(kernel_size)
    pads = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], kernel_size, stride, dilation))):
        total = max((-(size // -s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)
''',
    "avg_pool_same": '''
def avg_pool_same(x, kernel_size, stride):
    """TensorFlow's 'same' average pooling: the padded cells are left out of each average."""
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel_size)]
    total = pool(pad_same(x, kernel_size, stride), kernel_size, stride)
    ones = torch.ones_like(x[:1, :1])
    return total / pool(pad_same(ones, kernel_size, stride), kernel_size, stride)
''',
}

CLASSES = {
    "SeparableConv2d": '''
class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: a depthwise conv, then a 1x1 pointwise conv (with the bias)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        depth_multiplier=1,
        bias=True,
    ):
        super().__init__()
        mid = in_channels * depth_multiplier
        self.depthwise = nn.Conv2d(
            in_channels,
            mid,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
        )
        self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=bias)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))
''',
    "LayerScale": '''
class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (channels last), as in ConvNeXt."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma
''',
    "Normalization": '''
class Normalization(nn.Module):
    """Keras Normalization kept in the model: (x - mean) / max(sqrt(variance), 1e-7) per channel
    (channels at dim 1). Statistics given here are constants; otherwise they are loaded."""

    def __init__(self, num_features, mean=None, variance=None):
        super().__init__()
        stored = mean is None
        mean = torch.zeros(num_features) if mean is None else torch.tensor(mean)
        variance = torch.ones(num_features) if variance is None else torch.tensor(variance)
        self.register_buffer("mean", mean, persistent=stored)
        self.register_buffer("variance", variance, persistent=stored)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        std = self.variance.sqrt().clamp(min=1e-7)
        return (x - self.mean.view(shape)) / std.view(shape)
''',
}
