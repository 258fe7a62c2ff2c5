#!/usr/bin/env python3
"""The PyTorch and ONNX Runtime peers of `unetpp bench --compare`.

Builds the same UNet++ as unetpp's `modern` preset (depth 4, filters 32..512, conv+BN+ReLU
blocks, bilinear x2 up-sampling with align_corners=False, four 1x1 heads, accurate mode = mean of
the heads' sigmoids), times it like `unetpp bench` (medians after a warm-up, fixed threads) and
prints one JSON object. Needs torch (and onnxruntime + onnx for the ORT rows):

    python3 -m venv .venv && .venv/bin/pip install torch onnxruntime onnx onnxscript
    .venv/bin/python bench/peer.py --threads 2 --reps 10
"""
import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

# The timing rule and ONNX Runtime sessions of scripts/onnx_check.py (importable with numpy only).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from onnx_check import median_ms, session  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, nd):
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if nd == 2 else nn.BatchNorm3d
        self.body = nn.Sequential(conv(cin, cout, 3, padding=1), bn(cout), nn.ReLU(inplace=True),
                                  conv(cout, cout, 3, padding=1), bn(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.body(x)


class UNetPP(nn.Module):
    """X^{i,j} = H([X^{i,0..j-1}, up(X^{i+1,j-1})]); `level` evaluates only i + j <= level."""

    def __init__(self, depth=4, width=32, nd=2):
        super().__init__()
        self.depth, self.nd = depth, nd
        f = [width * 2**i for i in range(depth + 1)]
        self.nodes = nn.ModuleDict()
        for i in range(depth + 1):
            for j in range(depth + 1 - i):
                cin = 1 if (i, j) == (0, 0) else f[i - 1] if j == 0 else f[i] * j + f[i + 1]
                self.nodes[f"{i}_{j}"] = Block(cin, f[i], nd)
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.heads = nn.ModuleList([conv(f[0], 1, 1) for _ in range(depth)])
        self.pool = nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2)
        self.mode = "bilinear" if nd == 2 else "trilinear"

    def forward(self, x, level=None):
        level = level or self.depth
        out = {}
        for j in range(level + 1):
            for i in range(level + 1 - j):
                if j == 0:
                    inp = x if i == 0 else self.pool(out[i - 1, 0])
                else:
                    up = nn.functional.interpolate(out[i + 1, j - 1], scale_factor=2, mode=self.mode, align_corners=False)
                    inp = torch.cat([out[i, k] for k in range(j)] + [up], 1)
                out[i, j] = self.nodes[f"{i}_{j}"](inp)
        return [self.heads[j - 1](out[0, j]) for j in range(1, level + 1)]


class Accurate(nn.Module):
    def __init__(self, m, level=None):
        super().__init__()
        self.m, self.level = m, level

    def forward(self, x):
        heads = self.m(x, self.level)
        if self.level is not None:
            return torch.sigmoid(heads[-1])
        return torch.stack([torch.sigmoid(h) for h in heads]).mean(0)


def loss_fn(heads, y):
    total = 0
    for z in heads:
        bce = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").flatten(1).mean(1)
        p = torch.sigmoid(z).flatten(1)
        t = y.flatten(1)
        dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
        total = total + (0.5 * bce - dice).mean()
    return total / len(heads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dims", type=int, default=2)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="only training steps (for peak memory)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    nd = a.dims
    sizes = [(4, (96, 96)), (1, (96, 96)), (1, (256, 256))] if nd == 2 else [(1, (64, 64, 64))]
    model = UNetPP(nd=nd).eval()
    rows = []
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    if a.train_only:
        sizes = sizes[:1]
    for batch, shape in sizes:
        label = f"{batch}x1x" + "x".join(map(str, shape))
        x = torch.rand(batch, 1, *shape)
        for level in [] if a.train_only else [None, 4, 3, 2, 1]:
            mode = "accurate" if level is None else f"fast:{level}"
            net = Accurate(model, level)
            with torch.no_grad():
                rows.append({"case": f"forward {mode} {label}", "peer": "pytorch", "median_ms": median_ms(lambda: net(x), a.reps)})
        train = UNetPP(nd=nd).train()
        opt = torch.optim.Adam(train.parameters(), lr=3e-4)
        y = (torch.rand(batch, 1, *shape) < 0.3).float()

        def step():
            opt.zero_grad()
            loss_fn(train(x), y).backward()
            opt.step()

        rows.append({"case": f"train step {label}", "peer": "pytorch", "median_ms": median_ms(step, a.reps)})
        if not a.no_ort and not a.train_only:
            try:
                import onnxruntime as ort
                versions["onnxruntime"] = ort.__version__
                for level in [None, 4, 3, 2, 1]:
                    mode = "accurate" if level is None else f"fast:{level}"
                    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
                        torch.onnx.export(Accurate(model, level), (x,), f.name, dynamo=False, opset_version=17)
                        sess = session(f.name, a.threads)
                        feed = {sess.get_inputs()[0].name: x.numpy()}
                        rows.append({"case": f"forward {mode} {label}", "peer": "onnxruntime",
                                     "median_ms": median_ms(lambda: sess.run(None, feed), a.reps)})
            except ImportError:
                pass
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"versions": versions, "threads": a.threads, "peak_rss_mb": peak_mb, "rows": rows}))


if __name__ == "__main__":
    main()
