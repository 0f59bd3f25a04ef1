"""Training and inference speed of the WELDE detection heads against the unmodified model.

YOLO rows (Ultralytics YOLOv8n, random init, 1-channel input, 6 classes):

- images/s of a stage-2 WELDE step (K = 4 heads; backbone, neck, box branch and stems
  frozen; only adapters, heads and θ in the optimiser) relative to a full training step of
  the plain Ultralytics model on the same batch (targets: ratio ≥ 1);
- per-slice inference latency (forward + Ultralytics NMS) of the fused K = 4 model relative
  to the unmodified model (target: ≤ 1.2x).

Both are measured in one run on the same random batch, so the ratios compare like with like.

Usage:
    python bench/bench_train.py [--imgsz 256] [--batch 8] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def _batch(b: int, imgsz: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 8 * b
    xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.1 + 0.05
    return {"img": torch.rand(b, 1, imgsz, imgsz, generator=g),
            "batch_idx": torch.arange(b).repeat_interleave(8).float(),
            "cls": torch.randint(0, 6, (n, 1), generator=g).float(), "bboxes": torch.cat([xy, wh], 1)}


def _time(fn, steps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.nms import non_max_suppression

    from welde_det.integrations.yolo import WELDEDetectionModel, stage2_freeze_names

    torch.manual_seed(0)
    plain = DetectionModel("yolov8n.yaml", nc=6, ch=1, verbose=False)
    welde = WELDEDetectionModel("yolov8n.yaml", ch=1, nc=6, components=("ce", "focal", "cb", "ldam"),
                                class_counts=[1000, 500, 300, 100, 60, 30], mode="welde",
                                objective_kw={"warmup_steps": 0})
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

    t_full = _time(step(plain, opt_p), args.steps)
    t_s2 = _time(step(welde, opt_w), args.steps)
    x = batch["img"][:1]

    def infer(model):
        def run():
            model.eval()
            with torch.no_grad():
                non_max_suppression(model(x)[0], 0.001, 0.7)
        return run

    t_ip = _time(infer(plain), args.steps * 3)
    t_iw = _time(infer(welde), args.steps * 3)
    ips_full, ips_s2 = args.batch / t_full, args.batch / t_s2
    print(f"YOLOv8n {args.imgsz}px batch {args.batch}, {args.threads} thread(s), CPU")
    print(f"  full training (plain Ultralytics)  {ips_full:8.1f} img/s")
    print(f"  stage-2 WELDE (K=4, frozen)        {ips_s2:8.1f} img/s   ratio {ips_s2 / ips_full:.2f}x (target >= 1)")
    print(f"  inference plain                    {t_ip * 1e3:8.1f} ms/slice")
    print(f"  inference WELDE fused              {t_iw * 1e3:8.1f} ms/slice   ratio {t_iw / t_ip:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
