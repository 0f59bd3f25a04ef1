#!/usr/bin/env python
"""Forward+backward time of every registered loss relative to the plain PyTorch peer.

Softmax family vs ``torch.nn.functional.cross_entropy``; dense (sigmoid) family vs
``torch.nn.functional.binary_cross_entropy_with_logits`` (sum / N), on (65536, 6) logits,
measured in the same run (median of repeats, interleaved). Target: no loss above 3x its
peer, except the metric losses (soft_f1, soft_mcc, ce_f1, ce_mcc), whose ratio is reported.

Usage:
    python bench/bench_losses.py [--n 65536] [--c 6] [--repeats 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from welde_det.losses import available_losses, build_loss

METRIC = {"soft_f1", "soft_mcc", "ce_f1", "ce_mcc"}
COUNTS = [633, 2033, 4131, 1921, 151, 122]


def _time(fn, z, y, repeats, device):
    samples = []
    for _ in range(repeats):
        zz = z.detach().clone().requires_grad_()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(zz, y).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--c", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    counts = (COUNTS * ((args.c + 5) // 6))[: args.c]
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(args.n, args.c, generator=g) * 3).to(args.device)
    y = torch.randint(0, args.c, (args.n,), generator=g).to(args.device)
    peers = {
        "softmax": lambda zz, yy: F.cross_entropy(zz, yy),
        "sigmoid": lambda zz, yy: F.binary_cross_entropy_with_logits(
            zz, F.one_hot(yy, args.c).float(), reduction="sum") / zz.shape[0],
    }
    print(f"device={args.device} logits=({args.n}, {args.c}) repeats={args.repeats} torch={torch.__version__}")
    worst = 0.0
    for act in ("softmax", "sigmoid"):
        rows = []
        for name in available_losses(act):
            loss = build_loss(name, class_counts=counts, activation=act).to(args.device)
            for fn in (peers[act], loss):  # warm-up
                _time(fn, z, y, 3, args.device)
            t_peer = _time(peers[act], z, y, args.repeats, args.device)
            t_loss = _time(loss, z, y, args.repeats, args.device)
            t_peer = min(t_peer, _time(peers[act], z, y, args.repeats, args.device))
            ratio = t_loss / t_peer
            rows.append((name, t_loss * 1e3, t_peer * 1e3, ratio))
            if name not in METRIC:
                worst = max(worst, ratio)
        peer = "F.cross_entropy" if act == "softmax" else "F.binary_cross_entropy_with_logits"
        print(f"\n{act} family vs {peer}")
        print(f"{'loss':<10} {'ms':>8} {'peer ms':>8} {'ratio':>6}")
        for name, tl, tp, r in rows:
            flag = " (metric loss)" if name in METRIC else (" OVER 3x" if r > 3 else "")
            print(f"{name:<10} {tl:>8.2f} {tp:>8.2f} {r:>6.2f}{flag}")
    print(f"\nworst non-metric ratio: {worst:.2f}x (target <= 3x) -> {'OK' if worst <= 3 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
