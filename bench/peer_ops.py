#!/usr/bin/env python3
"""PyTorch per-op peer of `unetpp bench --kernels`: the same 3x3 convolutions (batch 4, the
UNet++ L4 `modern` layer shapes) and 2x bilinear up-sampling, forward and forward+backward,
medians of 7 after a warm-up, 2 threads.

    .venv/bin/python bench/peer_ops.py
"""
import torch

from peer import median_ms

torch.set_num_threads(2)


def med(f):
    return median_ms(f, 7)


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
for ci, co, s in [(96, 32, 96), (192, 32, 96), (32, 32, 96), (320, 64, 48), (512, 128, 24), (256, 512, 6)]:
    conv = torch.nn.Conv2d(ci, co, 3, padding=1)
    x = torch.randn(4, ci, s, s, requires_grad=True)
    with torch.no_grad():
        f = med(lambda: conv(x))
    fb = med(lambda: conv(x).sum().backward())
    print(f"| conv3x3 {ci}->{co} @ 4x{s}x{s} | forward {f:.1f} ms | fwd+bwd {fb:.1f} ms |")
x = torch.randn(4, 64, 48, 48, requires_grad=True)
up = med(lambda: torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).sum().backward())
print(f"| upsample2x 4x64x48x48 | fwd+bwd {up:.1f} ms |")
