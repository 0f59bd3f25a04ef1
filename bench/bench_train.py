"""Training and inference speed of the WELDE detection heads against the unmodified model.

Two families, each measured in one run on one random batch (1-channel input, 6 classes,
random init), so the ratios compare like with like:

YOLO rows (Ultralytics YOLOv8n, ``--imgsz``, ``--batch``):

- images/s of a stage-2 WELDE step (K = 4 heads; backbone, neck, box branch and stems
  frozen; only adapters, heads and θ in the optimiser) relative to a full training step of
  the plain Ultralytics model on the same batch (target: ≥ 1x, printed as "x faster");
- per-slice inference latency (forward + Ultralytics NMS) of the fused K = 4 model relative
  to the unmodified model (target: ≤ 1.2x).

Faster R-CNN rows (torchvision, ``--rcnn-backbone`` MobileNetV3-FPN or ResNet50-FPN,
``--rcnn-imgsz``, ``--rcnn-batch``; defaults from ``configs/rcnn_ce.yaml``):

- images/s of a full training step of the unmodified torchvision Faster R-CNN relative to a
  stage-2 step of the model the ``rcnn`` runner builds from ``configs/rcnn_welde.yaml``
  (its K heads, with :func:`~welde_det.integrations.rcnn.freeze_for_stage2`: backbone, FPN,
  RPN, box head and box regressor frozen; only adapters, classifiers and θ in the
  optimiser) (target: ≥ 1x);
- per-image inference latency (eval-mode forward including torchvision's transform and
  ``postprocess_detections``) of the fused WELDE model relative to the unmodified model
  (target: ≤ 1.2x). Both models share every weight they have in common (backbone, RPN, box
  head, regressor; the WELDE linear classifiers start as the plain classifier), have the same
  RPN/RoI settings, and the mean number of detections per image is printed next to each.

Timing: each function runs ``--warmup`` times, then the two sides of a comparison are
called alternately ``n`` times (so load changes on a shared machine hit both alike) and the
median call time is reported; inference runs under ``torch.no_grad`` in eval mode. WELDE's
θ warm-up is set to 0 steps so that every timed stage-2 step includes θ's gradient.

Usage:
    python bench/bench_train.py [--only yolo|rcnn] [--steps 10] [--threads 1]
        [--imgsz 256] [--batch 8]
        [--rcnn-backbone mobilenet_v3|resnet50] [--rcnn-imgsz 384] [--rcnn-batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RCNN_BACKBONES = {"mobilenet_v3": "fasterrcnn_mobilenet_v3_large_fpn", "resnet50": "fasterrcnn_resnet50_fpn"}
FOREGROUND_COUNTS = [1000, 500, 300, 100, 60, 30]


def _batch(b: int, imgsz: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 8 * b
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.1 + 0.05
    return {"img": torch.rand(b, 1, imgsz, imgsz, generator=g),
            "batch_idx": torch.arange(b).repeat_interleave(8).float(),
            "cls": torch.randint(0, 6, (n, 1), generator=g).float(), "bboxes": torch.cat([xy, wh], 1)}


def _rcnn_batch(b: int, imgsz: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The same random slices and boxes as :func:`_batch`, as torchvision images and xyxy pixel targets."""
    yb = _batch(b, imgsz)
    images = list(yb["img"].unbind(0))
    targets = []
    for i in range(b):
        sel = yb["batch_idx"] == i
        xy, wh = yb["bboxes"][sel, :2], yb["bboxes"][sel, 2:]
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1) * imgsz
        targets.append({"boxes": boxes, "labels": yb["cls"][sel, 0].long() + 1})  # 0 is background
    return images, targets


def _time_pair(a: Callable[[], object], b: Callable[[], object], n: int, warmup: int) -> tuple[float, float]:
    """Median seconds per call of ``a`` and of ``b``, called alternately ``n`` times after ``warmup`` each."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(n):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _row(label: str, value: str, ratio: str = "", target: str = "") -> str:
    return f"  {label:<44} {value:>14}   {ratio:<14} {target}"


def _header(title: str) -> None:
    print(title)
    print(_row("", "value", "ratio", "target"))


def bench_yolo(args) -> dict[str, float]:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.nms import non_max_suppression

    from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names

    torch.manual_seed(0)
    plain = DetectionModel("yolov8n.yaml", nc=6, ch=1, verbose=False)
    welde = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=("ce", "focal", "cb", "ldam"),
                                class_counts=FOREGROUND_COUNTS, mode="welde", objective_kw={"warmup_steps": 0})
    welde.load(plain, verbose=False)
    plain.args = welde.args = get_cfg()
    freeze = [f"model.{x}." for x in stage2_freeze_names(welde)]
    for n, p in welde.named_parameters():
        p.requires_grad_(not any(f in n for f in freeze))
    batch = _batch(args.batch, args.imgsz)
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_w = torch.optim.SGD([p for p in welde.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(model, opt):
        def run():
            model.train()
            loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        return run

    t_full, t_s2 = _time_pair(step(plain, opt_p), step(welde, opt_w), args.steps, args.warmup)
    x = batch["img"][:1]

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                non_max_suppression(model(x)[0], 0.001, 0.7)
        return run

    t_ip, t_iw = _time_pair(infer(plain), infer(welde), args.steps * 3, args.warmup)
    ips_full, ips_s2 = args.batch / t_full, args.batch / t_s2
    _header(f"YOLOv8n {args.imgsz}px, train batch {args.batch}, {args.threads} thread(s), CPU, "
            f"median of {args.steps} train / {args.steps * 3} inference calls")
    print(_row("full training (plain Ultralytics)", f"{ips_full:8.1f} img/s"))
    print(_row("stage-2 WELDE (K=4, frozen)", f"{ips_s2:8.1f} img/s", f"{ips_s2 / ips_full:.2f}x faster", ">= 1x"))
    print(_row("inference plain (forward + NMS)", f"{t_ip * 1e3:8.1f} ms/img"))
    print(_row("inference WELDE fused (forward + NMS)", f"{t_iw * 1e3:8.1f} ms/img", f"{t_iw / t_ip:.2f}x", "<= 1.2x"))
    return {"train": ips_s2 / ips_full, "infer": t_iw / t_ip}


def _rcnn_settings(model) -> dict[str, object]:
    rpn, roi = model.rpn, model.roi_heads
    return {"min_size": model.transform.min_size, "max_size": model.transform.max_size,
            "rpn pre/post NMS train": (rpn._pre_nms_top_n["training"], rpn._post_nms_top_n["training"]),
            "rpn pre/post NMS test": (rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"]),
            "rpn batch/image": rpn.fg_bg_sampler.batch_size_per_image, "rpn score thresh": rpn.score_thresh,
            "roi batch/image": roi.fg_bg_sampler.batch_size_per_image,
            "roi positive fraction": roi.fg_bg_sampler.positive_fraction, "score thresh": roi.score_thresh,
            "nms thresh": roi.nms_thresh, "detections/image": roi.detections_per_img}


def bench_rcnn(args) -> dict[str, float]:
    import torchvision

    from welde_det.classes import ClassStats
    from welde_det.engine.backends.base import welde_spec
    from welde_det.engine.config import load_config
    from welde_det.integrations.rcnn import _adapt_channels, build_rcnn_model, freeze_for_stage2

    arch = RCNN_BACKBONES[args.rcnn_backbone]
    cfg = load_config(ROOT / "configs" / "rcnn_welde.yaml",
                      [f"model.arch={arch}", f"train.imgsz={args.rcnn_imgsz}", "data.channels=1",
                       "loss.warmup_steps=0"])
    stats = ClassStats.from_counts([f"c{i}" for i in range(len(FOREGROUND_COUNTS))], FOREGROUND_COUNTS)
    # the unmodified torchvision detector, made 1-channel the way build_faster_rcnn does it
    torch.manual_seed(0)
    plain = getattr(torchvision.models.detection, arch)(
        weights=None, weights_backbone=None, num_classes=stats.num_classes + 1,
        min_size=cfg.train.imgsz, max_size=cfg.train.imgsz)
    _adapt_channels(plain, cfg.data.channels)
    # the model the rcnn runner trains for this config; the same seed gives it plain's weights
    torch.manual_seed(0)
    spec = welde_spec(cfg, tuple(cfg.components), cfg.loss.mode, "softmax")
    welde = build_rcnn_model(arch, list(stats.effective_counts), spec.to_dict(), channels=cfg.data.channels,
                             imgsz=cfg.train.imgsz)
    ws = welde.state_dict()
    shared = [k for k in plain.state_dict() if k in ws]
    if not all(torch.equal(plain.state_dict()[k], ws[k]) for k in shared):
        raise RuntimeError("plain and WELDE Faster R-CNN do not share their common weights")
    if _rcnn_settings(plain) != _rcnn_settings(welde):
        raise RuntimeError("plain and WELDE Faster R-CNN differ in RPN/RoI settings")
    images, targets = _rcnn_batch(args.rcnn_batch, args.rcnn_imgsz)
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_w = torch.optim.SGD(freeze_for_stage2(welde), lr=1e-3, momentum=0.9)
    welde.roi_heads.objective.set_epoch(cfg.train.stage1_epochs)  # the first stage-2 epoch
    n_train = sum(p.numel() for p in welde.parameters() if p.requires_grad)

    def step(model, opt):
        def run():
            model.train()
            loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    t_full, t_s2 = _time_pair(step(plain, opt_p), step(welde, opt_w), args.steps, args.warmup)
    x = [images[0]]
    dets: dict[int, list[int]] = {id(plain): [], id(welde): []}

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                dets[id(model)].append(len(model(x)[0]["boxes"]))
        return run

    t_ip, t_iw = _time_pair(infer(plain), infer(welde), args.steps * 3, args.warmup)
    d_p, d_w = statistics.mean(dets[id(plain)]), statistics.mean(dets[id(welde)])
    ips_full, ips_s2 = args.rcnn_batch / t_full, args.rcnn_batch / t_s2
    k = len(cfg.components)
    s = _rcnn_settings(plain)
    _header(f"Faster R-CNN {arch} {args.rcnn_imgsz}px, train batch {args.rcnn_batch}, {args.threads} thread(s), "
            f"CPU, median of {args.steps} train / {args.steps * 3} inference calls")
    print("  settings (both models): " + ", ".join(f"{a} {b}" for a, b in s.items()))
    print(_row("full training (plain torchvision)", f"{ips_full:8.2f} img/s"))
    print(_row(f"stage-2 WELDE (K={k} {'/'.join(cfg.components)}, frozen)", f"{ips_s2:8.2f} img/s",
               f"{ips_s2 / ips_full:.2f}x faster", ">= 1x"))
    print(f"    ({n_train} trainable parameters in stage 2)")
    print(_row(f"inference plain ({d_p:.0f} dets/img)", f"{t_ip * 1e3:8.1f} ms/img"))
    print(_row(f"inference WELDE fused ({d_w:.0f} dets/img)", f"{t_iw * 1e3:8.1f} ms/img", f"{t_iw / t_ip:.2f}x",
               "<= 1.2x"))
    return {"train": ips_s2 / ips_full, "infer": t_iw / t_ip}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("yolo", "rcnn"), default=None, help="run one family (default: both)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (inference: 3x as many calls)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--imgsz", type=int, default=256, help="YOLO image size")
    ap.add_argument("--batch", type=int, default=8, help="YOLO training batch")
    ap.add_argument("--rcnn-backbone", choices=tuple(RCNN_BACKBONES), default="mobilenet_v3")
    ap.add_argument("--rcnn-imgsz", type=int, default=384, help="Faster R-CNN image size (min_size = max_size)")
    ap.add_argument("--rcnn-batch", type=int, default=4, help="Faster R-CNN training batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    if args.only in (None, "yolo"):
        results["YOLOv8n"] = bench_yolo(args)
    if args.only in (None, "rcnn"):
        results[f"Faster R-CNN {args.rcnn_backbone}"] = bench_rcnn(args)
    print("summary: " + "; ".join(
        f"{name} stage 2 {r['train']:.2f}x faster ({'ok' if r['train'] >= 1 else 'MISS'} >= 1x), "
        f"inference {r['infer']:.2f}x ({'ok' if r['infer'] <= 1.2 else 'MISS'} <= 1.2x)"
        for name, r in results.items()))


if __name__ == "__main__":
    main()
