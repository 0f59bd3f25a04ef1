"""Benchmark of the phantom: does the difficulty knob work, and how fast is generation?

1. For difficulty 0, 0.5 and 1 (same seed, so the same anatomy and labels; only the
   findings' severities change) it writes the MedMNIST-style crop export, trains a small
   CNN with plain cross-entropy on the train split (CPU, a few epochs) and reports, on
   val+test, balanced accuracy, the mean recall of the tail classes (ClassStats' default
   rule: DDD, TDB, Spondylolisthesis) and of the head classes. Both accuracy and tail
   recall should fall as difficulty rises, and tail recall should sit clearly below head
   recall at the default difficulty: the gap imbalance-aware losses have to close.
2. Throughput: studies per second with every format (DICOM, NIfTI, PNG, COCO, YOLO,
   crops) on ``--workers`` processes, measured on ``--speed-studies`` studies and
   extrapolated to 1,000 studies (the target is under 10 minutes on 2 cores).

Run from the repository root::

    OMP_NUM_THREADS=1 python bench/bench_phantom.py --n-studies 400 --epochs 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from welde_det.classes import LUMBAR_CLASSES
from welde_det.datasets.phantom import make_phantom_dataset


def small_cnn(num_classes: int) -> nn.Module:
    """Strided stem, two conv blocks, global average pooling, linear classifier (~70k parameters)."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))
    stem = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    return nn.Sequential(stem, block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


def train_eval(npz: Path, epochs: int, seed: int) -> dict[str, float | np.ndarray]:
    """Train with plain CE on ``train_*``; per-class recall on ``val_*`` + ``test_*``."""
    data = np.load(npz)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_tr = torch.from_numpy(data["train_images"]).float().div_(255).unsqueeze(1)
    y_tr = torch.from_numpy(data["train_labels"][:, 0].astype(np.int64))
    x_te = torch.from_numpy(np.concatenate([data["val_images"], data["test_images"]])).float().div_(255).unsqueeze(1)
    y_te = np.concatenate([data["val_labels"][:, 0], data["test_labels"][:, 0]]).astype(np.int64)
    model = small_cnn(len(LUMBAR_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x_tr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(x_tr))
        for i in range(0, len(order), 64):
            idx = torch.from_numpy(order[i:i + 64])
            xb = x_tr[idx]
            if rng.random() < 0.5:  # mild intensity jitter
                xb = xb * float(rng.uniform(0.85, 1.15))
            loss = loss_fn(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_te[i:i + 512]).argmax(1) for i in range(0, len(x_te), 512)]).numpy()
    recall = np.array([(pred[y_te == c] == c).mean() if (y_te == c).any() else np.nan
                       for c in range(len(LUMBAR_CLASSES))])
    support = np.bincount(y_te, minlength=len(LUMBAR_CLASSES))
    return {"recall": recall, "support": support, "accuracy": float((pred == y_te).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-studies", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speed-studies", type=int, default=40)
    parser.add_argument("--cpu-studies", type=int, default=8, help="studies timed in-process (CPU time)")
    parser.add_argument("--difficulties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=None, help="keep generated data here (default: temp)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.workers))
    tmp = Path(tempfile.mkdtemp(prefix="bench_phantom_")) if args.out is None else args.out
    rows = []
    for d in args.difficulties:
        t0 = time.perf_counter()
        ds = make_phantom_dataset(tmp / f"crops_d{d:g}", args.n_studies, seed=args.seed, difficulty=d,
                                  contrast="both", formats=("crops",), workers=args.workers, progress=False)
        gen = time.perf_counter() - t0
        stats = ds.class_stats
        tail = list(stats.tail)
        head = [c for c in range(len(LUMBAR_CLASSES)) if c not in tail]
        t0 = time.perf_counter()
        res = train_eval(ds.crops, args.epochs, args.seed)
        rec = res["recall"]
        rows.append((d, np.nanmean(rec), np.nanmean(rec[tail]), np.nanmean(rec[head]), res["accuracy"], rec,
                     res["support"], gen, time.perf_counter() - t0))
    print(f"\nCrop classification, plain CE, small CNN, {args.epochs} epochs, {args.n_studies} studies "
          f"(T1+T2), evaluated on val+test; tail = {[LUMBAR_CLASSES[c] for c in tail]}")
    print(f"{'difficulty':>10} {'bal.acc':>8} {'tail rec':>8} {'head rec':>8} {'accuracy':>8}  "
          + " ".join(f"{n[:6]:>6}" for n in LUMBAR_CLASSES) + "   gen s  train s")
    for d, bacc, tr, hr, acc, rec, _sup, gen, tr_s in rows:
        print(f"{d:>10.2f} {bacc:>8.3f} {tr:>8.3f} {hr:>8.3f} {acc:>8.3f}  "
              + " ".join(f"{r:>6.2f}" for r in rec) + f"  {gen:>6.1f} {tr_s:>8.1f}")
    print("support (val+test): " + ", ".join(f"{n} {s}" for n, s in zip(LUMBAR_CLASSES, rows[0][6])))

    t0 = time.perf_counter()
    make_phantom_dataset(tmp / "speed", args.speed_studies, seed=args.seed + 1, workers=args.workers,
                         progress=False)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    make_phantom_dataset(tmp / "speed_fast", args.speed_studies, seed=args.seed + 1, workers=args.workers,
                         formats=("coco", "yolo", "crops"), progress=False)
    fast = time.perf_counter() - t0
    print(f"\nThroughput on {args.workers} worker(s), {args.speed_studies} studies, T1+T2 each:")
    print(f"  all formats (DICOM, NIfTI, PNG, COCO, YOLO, crops): {args.speed_studies / full:.2f} studies/s "
          f"-> 1,000 studies in {1000 / (args.speed_studies / full) / 60:.1f} min")
    print(f"  no volumes (PNG, COCO, YOLO, crops; mid slice only): {args.speed_studies / fast:.2f} studies/s "
          f"-> 1,000 studies in {1000 / (args.speed_studies / fast) / 60:.1f} min")
    print(f"  ratio: fast path {full / fast:.1f}x the full export")
    # CPU seconds per study in this process: independent of other users of a shared CPU
    from welde_det.datasets.phantom.dataset import FORMATS, study_seed
    from welde_det.datasets.phantom.dataset import _make_one as make_one

    cpu0 = time.process_time()
    for i in range(args.cpu_studies):
        make_one({"root": str(tmp / "cpu"), "formats": FORMATS, "seed": study_seed(args.seed + 2, i), "index": i,
                  "difficulty": 0.5, "contrast": "both", "freqs": None, "crop_size": 64, "study_id": f"cpu{i}"})
    per_study = (time.process_time() - cpu0) / args.cpu_studies
    print(f"  CPU time per study (all formats, T1+T2, one process): {per_study:.2f} s "
          f"-> 1,000 studies on 2 free cores: {1000 * per_study / 2 / 60:.1f} min")


if __name__ == "__main__":
    main()
