#!/usr/bin/env python
"""Per-step overhead of WELDE vs a single CE head on the same frozen features.

A WELDE step is 4 heads (adapters + classifiers) + the objective (EMA normalisation,
weights, penalty, JS diversity) + backward + optimiser step, on (4096 x 256) frozen
features and 6 classes. Two peers, measured in the same run (median, interleaved):

- a single linear CE head (the cheapest possible head);
- a single head of WELDE's own architecture (one adapter + linear classifier) with CE,
  i.e. K = 1 — the step WELDE multiplies by K.

Target: <= 2.5x. Each adapter is a D -> h -> D bottleneck, so on a CPU, where the
matmuls dominate, 4 adapters cost at least 4x one adapter head in FLOPs.

Usage:
    python bench/bench_welde.py [--n 4096] [--d 256] [--repeats 50]
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

from welde_det.welde import build_welde

COUNTS = [633, 2033, 4131, 1921, 151, 122]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    feats = torch.randn(args.n, args.d, device=dev)  # frozen backbone output
    y = torch.randint(0, 6, (args.n,), device=dev)
    head = torch.nn.Linear(args.d, 6).to(dev)
    opt1 = torch.optim.SGD(head.parameters(), lr=0.01)
    heads, obj = build_welde(["ce", "focal", "cb", "ldam"], class_counts=COUNTS, num_classes=6, in_dim=args.d,
                             warmup_steps=0)
    head1, obj1 = build_welde(["ce"], class_counts=COUNTS, num_classes=6, in_dim=args.d, warmup_steps=0)
    head1, obj1 = head1.to(dev), obj1.to(dev)
    opt_one = torch.optim.SGD([*head1.parameters(), *obj1.parameters()], lr=0.01)
    heads, obj = heads.to(dev), obj.to(dev)
    optw = torch.optim.SGD([*heads.parameters(), *obj.parameters()], lr=0.01)

    def ce_step():
        loss = F.cross_entropy(head(feats), y)
        opt1.zero_grad(set_to_none=True)
        loss.backward()
        opt1.step()

    def one_head_step():
        loss = F.cross_entropy(head1(feats)[0], y)
        opt_one.zero_grad(set_to_none=True)
        loss.backward()
        opt_one.step()

    def welde_step():
        out = obj(heads(feats), y)
        optw.zero_grad(set_to_none=True)
        out["loss"].backward()
        optw.step()

    def timed(fn):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(5):
        ce_step()
        one_head_step()
        welde_step()
    t_ce, t_one, t_w = [], [], []
    for _ in range(args.repeats):
        t_ce.append(timed(ce_step))
        t_one.append(timed(one_head_step))
        t_w.append(timed(welde_step))
    ce_ms, one_ms, w_ms = (statistics.median(t) * 1e3 for t in (t_ce, t_one, t_w))
    print(f"device={dev} features=({args.n}, {args.d}) classes=6 repeats={args.repeats} "
          f"adapter hidden={heads.adapters[0].down.out_features}")
    print(f"linear CE head step        : {ce_ms:8.3f} ms")
    print(f"one adapter head, CE (K=1) : {one_ms:8.3f} ms")
    print(f"WELDE step (K=4)           : {w_ms:8.3f} ms")
    for peer, t in (("linear CE head", ce_ms), ("one adapter head (K=1)", one_ms)):
        r = w_ms / t
        print(f"ratio vs {peer:<24}: {r:6.2f}x (target <= 2.5x) -> {'OK' if r <= 2.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
