#!/usr/bin/env python3
"""PyTorch reference for `unetpp experiment` (issue #4): trains the identical UNet++ (`modern`
preset, deep supervision, from bench/peer.py) with the same recipe as an experiment spec — the
same per-image percentile normalisation, patch size, foreground share, flips/rot90, batch size,
steps, Adam settings, 0.5*BCE - Dice loss averaged over the heads, validation on centred crops
with early stopping — and scores the test split like unetpp (threshold 0.5 on whole images padded
to a multiple of 2^depth). Writes RUNS/pytorch/seed-N/result.json in unetpp's format, which the
experiment's report picks up as the reference row.

    scripts/peer-venv    # torch into .venv
    .venv/bin/python bench/train_ref.py --spec experiments/nuclei.toml --runs runs/nuclei --seeds 1 2 3
"""
import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from peer import UNetPP  # noqa: E402

IMAGE_EXT = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}


def stem(p: Path) -> str:
    return p.name.split(".")[0] if p.name.endswith(".nii.gz") else p.stem


def load_split(root: Path, split: str, norm):
    d = root / split
    masks = {stem(p): p for p in (d / "masks").iterdir()}
    out = []
    for p in sorted((d / "images").iterdir()):
        if p.suffix.lower() not in IMAGE_EXT:
            continue
        img = np.asarray(Image.open(p), dtype=np.float32)
        if img.ndim == 3:
            img = img.mean(2)
        lo, hi = np.percentile(img, [norm["low"], norm["high"]], method="nearest")
        img = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
        mask = (np.asarray(Image.open(masks[stem(p)])) > 0).astype(np.float32)
        if mask.ndim == 3:
            mask = mask[..., 0]
        out.append((stem(p), img, mask))
    return out


def crop(img, mask, oy, ox, size):
    """Zero-padded crop at (oy, ox), which may reach outside the image."""
    h, w = img.shape
    ci, cm = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + size, h), min(ox + size, w)
    if y1 > y0 and x1 > x0:
        ci[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = img[y0:y1, x0:x1]
        cm[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = mask[y0:y1, x0:x1]
    return ci, cm


def sample(rng, img, mask, size, fg):
    h, w = img.shape
    fgs = np.flatnonzero(mask) if rng.random() < fg else np.array([])
    if len(fgs):
        i = fgs[rng.integers(len(fgs))]
        cy, cx = divmod(int(i), w)
        j = size // 4
        oy = int(np.clip(cy - size // 2 + rng.integers(-j, j + 1), min(h - size, 0), max(h - size, 0)))
        ox = int(np.clip(cx - size // 2 + rng.integers(-j, j + 1), min(w - size, 0), max(w - size, 0)))
    else:
        oy = (h - size) // 2 if h <= size else int(rng.integers(0, h - size + 1))
        ox = (w - size) // 2 if w <= size else int(rng.integers(0, w - size + 1))
    ci, cm = crop(img, mask, oy, ox, size)
    if rng.random() < 0.5:
        ci, cm = ci[::-1], cm[::-1]
    if rng.random() < 0.5:
        ci, cm = ci[:, ::-1], cm[:, ::-1]
    k = int(rng.integers(4))
    return np.rot90(ci, k).copy(), np.rot90(cm, k).copy()


def centre_crop(img, mask, size):
    h, w = img.shape
    sh, sw = min(size, h), min(size, w)
    ys, xs = np.nonzero(mask)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (h // 2, w // 2)
    oy, ox = min(max(cy - sh // 2, 0), h - sh), min(max(cx - sw // 2, 0), w - sw)
    return img[oy:oy + sh, ox:ox + sw], mask[oy:oy + sh, ox:ox + sw]


def loss_fn(heads, y):
    total = 0
    for z in heads:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").flatten(1).mean(1)
        p = torch.sigmoid(z).flatten(1)
        t = y.flatten(1)
        dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
        total = total + (0.5 * bce - dice).mean()
    return total / len(heads)


@torch.no_grad()
def predict(model, img, multiple, modes):
    h, w = img.shape
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    x = torch.zeros(1, 1, ph, pw)
    x[0, 0, :h, :w] = torch.from_numpy(img)
    probs = [torch.sigmoid(z)[0, 0, :h, :w].numpy() for z in model(x)]
    out = {}
    for m in modes:
        out[m] = np.mean(probs, 0) if m == "accurate" else probs[int(m.split(":")[1]) - 1]
    return out


def overlap(pred, truth):
    inter, p, t = (pred & truth).sum(), pred.sum(), truth.sum()
    if p + t == 0:
        return 1.0, 1.0
    return inter / (p + t - inter), 2 * inter / (p + t)


def score(model, samples, multiple, modes):
    per = {m: [] for m in modes}
    for _, img, mask in samples:
        probs = predict(model, img, multiple, modes)
        for m in modes:
            per[m].append(overlap(probs[m] > 0.5, mask > 0))
    return per


def summary(mode, scores, seconds):
    iou, dice = np.array([s[0] for s in scores]), np.array([s[1] for s in scores])
    return {"mode": mode, "images": len(scores), "mean_dice": float(dice.mean()), "std_dice": float(dice.std()),
            "mean_iou": float(iou.mean()), "std_iou": float(iou.std()), "seconds": seconds}


def run(spec, seed, out: Path, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t, m = spec["train"], spec["train"]["model"]
    data, norm = Path(t["data"]), t["input"]["normalize"]
    train, val, test = (load_split(data, s, norm) for s in ("train", "val", "test"))
    val = [(n, *centre_crop(i, k, t["val_crop"][1])) for n, i, k in val]
    model = UNetPP(depth=m["depth"], width=m["width"], nd=2)
    opt = torch.optim.Adam(model.parameters(), lr=t["lr"], eps=1e-8)
    multiple, size = 2 ** m["depth"], t["patch"][1]
    best, best_epoch, epochs_run, seconds = -1.0, 0, 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, t["epochs"] + 1):
        start = time.time()
        model.train()
        for _ in range(t["steps_per_epoch"]):
            batch = [sample(rng, *train[rng.integers(len(train))][1:], size, t["foreground"]) for _ in range(t["batch_size"])]
            x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None]
            y = torch.from_numpy(np.stack([b[1] for b in batch]))[:, None]
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        v = np.mean([s[0] for s in score(model, val, multiple, ["accurate"])["accurate"]])
        seconds += time.time() - start
        epochs_run = epoch
        print(f"seed {seed} epoch {epoch}: loss {loss.item():.4f} val IoU {v:.4f} ({seconds:.0f}s)", flush=True)
        if v > best:
            best, best_epoch = v, epoch
            torch.save(model.state_dict(), out / "best.pth")
        if epoch - best_epoch >= t["patience"]:
            break
    model.load_state_dict(torch.load(out / "best.pth"))
    model.eval()
    modes = ["accurate"] + [f"fast:{j}" for j in range(1, m["depth"] + 1)]
    start = time.time()
    per = score(model, test, multiple, modes)
    eval_seconds = time.time() - start
    result = {
        "model": "UNet++ (deep supervision)", "seed": seed, "fold": None, "train_seconds": seconds,
        "epochs": epochs_run, "best_epoch": best_epoch, "eval_seconds": eval_seconds,
        "modes": [summary(mo, per[mo], eval_seconds) for mo in modes],
        "images": [[n, float(s[0])] for (n, _, _), s in zip(test, per["accurate"])],
        "torch": torch.__version__,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["modes"][0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True, help="the experiment's --out directory")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    spec = tomllib.loads(a.spec.read_text())
    for seed in a.seeds or spec["seeds"]:
        out = a.runs / "pytorch" / f"seed-{seed}"
        if (out / "result.json").exists():
            continue
        run(spec, seed, out, a.threads)


if __name__ == "__main__":
    main()
