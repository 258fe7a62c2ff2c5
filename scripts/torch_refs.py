#!/usr/bin/env python3
"""Writes small PyTorch UNet++ checkpoints and their reference outputs for tests/import.rs.

The model is pytorch-nested-unet's `NestedUNet` layout (nodes `conv{i}_{j}` of VGG blocks
conv1/bn1/conv2/bn2, heads `final` or `final1..4`, bilinear up-sampling with
align_corners=True), with the filter widths as a parameter so the test files stay small.
Also writes segmentation_models.pytorch `UnetPlusPlus` checkpoints on ResNet encoders.
Also writes tests/normalize.rs's fixtures (`scaling`): small image files (8-bit RGB and grey PNG,
16-bit TIFF and PNG, float32 TIFF), two width-2 NestedUNets (scaling/*_model.pth) and the
probabilities they give on those files fed the way PyTorch users feed them (see `feed`).
Run with torch installed (scripts/peer-venv, or python3 -m venv .venv && .venv/bin/pip install
torch safetensors pillow segmentation-models-pytorch==0.6.0):

    .venv/bin/python scripts/torch_refs.py tests/data/torch            # everything
    .venv/bin/python scripts/torch_refs.py tests/data/torch scaling    # only the scaling fixtures
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


# tests/normalize.rs: files fed to an imported model through `unetpp predict`, against PyTorch
# fed the same files. albumentations is not a dependency: `imagenet` below is its documented
# `Normalize()` formula, (img / max_pixel_value - mean) / std with the ImageNet mean/std and
# max_pixel_value 255 (its default) for 8-bit files, 65535 for 16-bit ones; a grey file given to an
# RGB model is first replicated to three channels (cv2.cvtColor(GRAY2RGB) / PIL convert("RGB")).
# `window` is (clip(img, LOW, HIGH) - LOW) / (HIGH - LOW) on the file's values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WINDOW = (1000.0, 40000.0)
SCALING_CASES = [
    # folder (one checkpoint each), file, dtype, channels, full scale
    ("imagenet", "rgb8.png", "uint8", 3, 255.0),
    ("imagenet", "grey8.png", "uint8", 1, 255.0),
    ("imagenet", "grey16.tif", "uint16", 1, 65535.0),
    ("window", "window16.png", "uint16", 1, None),
    ("window", "window_float32.tif", "float32", 1, None),
]


def scene(rng, h, w, lo, hi):
    """Smooth blobs on a gradient plus noise, spanning lo..hi: the model's output varies."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    v = 0.3 * xx / w + 0.2 * yy / h
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 9)
        v += rng.uniform(0.3, 0.8) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    v += rng.normal(0, 0.05, v.shape)
    v = (v - v.min()) / (v.max() - v.min())
    return lo + v * (hi - lo)


def feed(arr, folder, channels, full_scale):
    """The network input PyTorch users give: [1, C, H, W] float32."""
    import numpy as np

    x = arr.astype(np.float64)
    if folder == "imagenet":
        if x.ndim == 2:
            x = np.stack([x] * 3, -1)
        x = (x / full_scale - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        x = x.transpose(2, 0, 1)
    else:
        lo, hi = WINDOW
        x = ((np.clip(x, lo, hi) - lo) / (hi - lo))[None]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]


def scaling_model(out: Path, folder, inputs):
    """A new NestedUNet at base width 2 (`imagenet`: 3 in, 1 class; `window`: 1 in, 3 classes),
    its head scaled so each class's logits spread over about +-2 on these inputs: a random one
    at this width answers nearly the same everywhere, which a wrong input scaling would match
    too. Written to scaling/{folder}_model.pth."""
    cin, k = (3, 1) if folder == "imagenet" else (1, 3)
    torch.manual_seed(16)
    model = NestedUNet(k, cin, False, [2 * 2**i for i in range(5)])
    randomise_bn(model)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x)[0] for x in inputs]).transpose(0, 1).flatten(1)
        a = 2.0 / logits.std(1)
        model.final.weight *= a[:, None, None, None]
        model.final.bias.copy_(a * (model.final.bias - logits.mean(1)))
    torch.save(model.state_dict(), out / "scaling" / f"{folder}_model.pth")
    return model


def scaling_main(out: Path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(16)
    h, w = 32, 48
    fed = {}
    for folder, file, dtype, channels, full_scale in SCALING_CASES:
        if dtype == "uint8":
            arr = np.stack([scene(rng, h, w, 0, 255) for _ in range(channels)], -1)
            arr = arr[..., 0] if channels == 1 else arr
            arr = np.round(arr).astype(np.uint8)
        elif dtype == "uint16":
            arr = np.round(scene(rng, h, w, 300, 65000)).astype(np.uint16)
        else:
            arr = scene(rng, h, w, -3000.0, 52000.0).astype(np.float32)
        path = out / "scaling" / folder / file
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        # Fed from the file as written, the way users read it.
        back = np.array(Image.open(path))
        assert back.shape == arr.shape and np.array_equal(back.astype(arr.dtype), arr), (file, back.dtype)
        fed.setdefault(folder, []).append((file, feed(back, folder, channels, full_scale)))
    refs = {}
    for folder, inputs in fed.items():
        model = scaling_model(out, folder, [x for _, x in inputs])
        for file, x in inputs:
            with torch.no_grad():
                logits = model(x)[0]
            k = logits.shape[1]
            probs = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, 1)
            for c in range(k):
                refs[f"{Path(file).stem}_prob{c}"] = probs[0, c].contiguous()
            p = probs.numpy()
            print(folder, file, f"probabilities {p.min():.3f}..{p.max():.3f}, std {p.std():.3f}")
    save_file({n: t.half() for n, t in refs.items()}, out / "scaling" / "probabilities.safetensors")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/torch")
    only = sys.argv[2] if len(sys.argv) > 2 else None
    assert only in (None, "scaling"), f"unknown part {only}"
    if only is None:
        main(target)
        smp_main(target)
    scaling_main(target)
