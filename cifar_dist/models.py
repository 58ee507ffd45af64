"""The nets, chosen by name. Plain `nn.Module`s: they know nothing of devices or ranks.

A new net is one class (or function) taking `num_classes`, decorated with `@register("name")`;
`model.name=name` then selects it everywhere (config validation, training, predict, evaluate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODELS: dict[str, Callable[[int], nn.Module]] = {}  # model.name -> constructor(num_classes)


def register(name: str):
    def add(make: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        MODELS[name] = make
        return make

    return add


@register("blitz")
class BlitzNet(nn.Module):
    """The PyTorch blitz tutorial's net (seed 000), layer for layer: 62,006 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooled before the ReLU, unlike the tutorial: the same outputs and the same gradients (a max
        # commutes with a ReLU, and both orders send the gradient to the same element), with the
        # ReLU on a quarter of the elements (tests/unit/test_models.py checks both against the tutorial's).
        x = F.relu(self.pool(self.conv1(x)))
        x = F.relu(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register("medium")
class MediumNet(nn.Module):
    """The deeper CNN article's net (seed 001), layer for layer: 169,578 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(128 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 32)
        self.fc4 = nn.Linear(32, num_classes)
        self.dropout1 = nn.Dropout(p=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooled before the ReLU, as in BlitzNet: the article's function, on a quarter of the elements.
        x = self.dropout1(F.relu(self.pool(self.conv1(x))))
        x = self.dropout1(F.relu(self.pool(self.conv2(x))))
        x = self.dropout1(F.relu(self.pool(self.conv3(x))))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return self.fc4(x)


class ConvBlock(nn.Sequential):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: halves the resolution.

    As in airbench: each conv starts as the identity on its first `cin` output channels (dirac
    init, the rest PyTorch's default), and BatchNorm has fast running statistics (momentum 0.4),
    a tiny eps and a frozen scale of 1: only its bias trains (see train.bias_lr_scale).
    """

    def __init__(self, cin: int, cout: int):
        convs = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.Conv2d(cout, cout, 3, padding=1, bias=False)]
        norms = [nn.BatchNorm2d(cout, eps=1e-12, momentum=0.4) for _ in range(2)]
        for conv in convs:
            nn.init.dirac_(conv.weight.data[: conv.in_channels])
        for norm in norms:
            norm.weight.requires_grad_(False)
        super().__init__(convs[0], nn.MaxPool2d(2), norms[0], nn.GELU(), convs[1], norms[1], nn.GELU())


@register("fast")
class FastNet(nn.Module):
    """A small, fast net in the airbench / ResNet-9 family (about 1.97M parameters).

    A frozen 2x2 whitening convolution (set from the training images' patch statistics by
    `init_from_data`), three conv blocks of 64, 256 and 256 channels, global max pooling and
    a linear head whose logits are scaled down (1/9) so training starts calm at a high lr.
    """

    widths = (64, 256, 256)
    logit_scale = 1 / 9

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.whiten.bias.requires_grad_(False)
        w = self.widths
        self.layers = nn.Sequential(ConvBlock(24, w[0]), ConvBlock(w[0], w[1]), ConvBlock(w[1], w[2]))
        self.head = nn.Linear(w[2], num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the 2x2 patches of normalised images (N, 3, 32, 32)."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # (N, 3, 31, 31, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        patches = patches - patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigvec.T / (eigval + eps).sqrt().unsqueeze(1)).view(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        x = self.layers(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.logit_scale


@register("resnet18")
def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max pool."""
    import torchvision  # 2 s to import; only this net needs it

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    return MODELS[name](num_classes)


def set_dropout(net: nn.Module, p: float) -> int:
    """Set every nn.Dropout's p (model.dropout); the number of layers set. At p=0 the layer returns its input."""
    layers = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
