#!/usr/bin/env python3
"""Writes small PyTorch UNet++ checkpoints and their reference outputs for tests/import.rs.

The model is pytorch-nested-unet's `NestedUNet` layout (nodes `conv{i}_{j}` of VGG blocks
conv1/bn1/conv2/bn2, heads `final` or `final1..4`, bilinear up-sampling with
align_corners=True), with the filter widths as a parameter so the test files stay small.
Also writes segmentation_models.pytorch `UnetPlusPlus` checkpoints on ResNet encoders.
Run with torch installed (scripts/peer-venv, or python3 -m venv .venv && .venv/bin/pip install
torch safetensors segmentation-models-pytorch==0.6.0):

    .venv/bin/python scripts/torch_refs.py tests/data/torch
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class VGGBlock(nn.Module):
    def __init__(self, cin, cmid, cout):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cmid, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cmid)
        self.conv2 = nn.Conv2d(cmid, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class NestedUNet(nn.Module):
    """Depth 4, nodes X^{i,j} named conv{i}_{j}, as in pytorch-nested-unet."""

    def __init__(self, num_classes, input_channels, deep_supervision, nb_filter):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        f = nb_filter
        for i in range(5):
            for j in range(5 - i):
                cin = input_channels if (i, j) == (0, 0) else f[i - 1] if j == 0 else f[i] * j + f[i + 1]
                setattr(self, f"conv{i}_{j}", VGGBlock(cin, f[i], f[i]))
        if deep_supervision:
            for k in range(1, 5):
                setattr(self, f"final{k}", nn.Conv2d(f[0], num_classes, 1))
        else:
            self.final = nn.Conv2d(f[0], num_classes, 1)

    def forward(self, x):
        out = {}
        for j in range(5):
            for i in range(5 - j):
                node = getattr(self, f"conv{i}_{j}")
                if j == 0:
                    out[i, 0] = node(x if i == 0 else self.pool(out[i - 1, 0]))
                else:
                    parts = [out[i, k] for k in range(j)] + [self.up(out[i + 1, j - 1])]
                    out[i, j] = node(torch.cat(parts, 1))
        if self.deep_supervision:
            return [getattr(self, f"final{k}")(out[0, k]) for k in range(1, 5)]
        return [self.final(out[0, 4])]


CASES = [
    # name, input channels, classes, deep supervision, base width
    ("nested_c1_k1_ds", 1, 1, True, 4),
    ("nested_c3_k3_ds", 3, 3, True, 2),
    ("nested_c1_k3", 1, 3, False, 2),
    ("nested_c3_k1", 3, 1, False, 2),
]


# segmentation_models.pytorch UnetPlusPlus on ResNets (random weights). Encoder depth 2-3 keeps
# the files small; weights are stored as float16 (the reference outputs come from the same
# rounded weights), and the encoder stages smp builds but never runs at that depth are dropped.
SMP_CASES = [
    # name, encoder, encoder depth, decoder channels, input channels, classes, format
    ("smp_resnet18", "resnet18", 3, (32, 16, 8), 3, 1, "pth"),
    ("smp_resnet34", "resnet34", 3, (32, 16, 8), 3, 2, "safetensors"),
    ("smp_resnet50", "resnet50", 2, (16, 8), 1, 1, "safetensors"),
]


def randomise_bn(model):
    """Non-trivial BatchNorm statistics, so eval mode really uses them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.5)  # keep ReLUs alive at tiny widths


def smp_main(out: Path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    for name, encoder, depth, decoder, cin, k, fmt in SMP_CASES:
        model = smp.UnetPlusPlus(
            encoder, encoder_depth=depth, encoder_weights=None, decoder_channels=decoder, in_channels=cin, classes=k
        )
        randomise_bn(model)
        for stage in range(depth, 5):
            delattr(model.encoder, f"layer{stage}")
        model = model.half().float().eval()  # what the float16 file holds
        x = torch.randn(2, cin, 32, 48)
        with torch.no_grad():
            y = model(x)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
        if fmt == "pth":
            torch.save(state, out / f"{name}.pth")
        else:
            save_file(state, out / f"{name}.safetensors")
        save_file({"input": x.contiguous(), "head0": y.contiguous()}, out / f"{name}.io.safetensors")
        print(name, sum(p.numel() for p in model.parameters()), "parameters")


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, cin, k, ds, w in CASES:
        model = NestedUNet(k, cin, ds, [w * 2**i for i in range(5)])
        randomise_bn(model)
        model.eval()
        x = torch.randn(2, cin, 32, 48)
        with torch.no_grad():
            ys = model(x)
        torch.save(model.state_dict(), out / f"{name}.pth")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{name}.safetensors")
        refs = {"input": x.contiguous()}
        refs.update({f"head{i}": y.contiguous() for i, y in enumerate(ys)})
        save_file(refs, out / f"{name}.io.safetensors")
        print(name, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/torch")
    main(target)
    smp_main(target)
