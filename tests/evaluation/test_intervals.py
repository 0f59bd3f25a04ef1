"""Bootstrap intervals: a resample equals pycocotools on the duplicated-image dataset; paired
differences of identical sets are exactly 0; coverage of the 95 % interval on a simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.evaluation.test_coco_exact import make_dataset, pycoco
from welde_det.evaluation import (
    bootstrap_difference,
    bootstrap_metrics,
    evaluate_coco,
    match_detections,
)
from welde_det.evaluation.intervals import (
    _class_ap,
    _ClassSequence,
    _weighted_metrics,
    resample_weights,
)


def duplicated(gt, dets, weights):
    """The dataset in which image i (in id order) appears weights[i] times, copies under adjacent new ids."""
    images = sorted(gt["images"], key=lambda im: im["id"])
    new_ids: dict[int, list[int]] = {}
    out_images, nid = [], 1
    for im, w in zip(images, weights):
        new_ids[im["id"]] = list(range(nid, nid + w))
        out_images += [{**im, "id": i} for i in new_ids[im["id"]]]
        nid += w
    anns, aid = [], 1
    for a in gt["annotations"]:
        for i in new_ids[a["image_id"]]:
            anns.append({**a, "id": aid, "image_id": i})
            aid += 1
    out_dets = [{**d, "image_id": i} for d in dets for i in new_ids[d["image_id"]]]
    return {"images": out_images, "annotations": anns, "categories": gt["categories"]}, out_dets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_resample_equals_pycocotools_on_duplicated_images(seed):
    # scores rounded to 0.1: many ties inside one image and class, where copies interleave
    gt, dets = make_dataset(seed, n_img=10, n_cat=3, crowd_p=0.15, many_dets=seed == 3)
    matching = match_detections(gt, dets, device="cpu")
    weights = resample_weights(matching.num_images, 3, seed=seed)
    weights[0, :2] = [0, 3]  # an absent image and a triplicated one, whatever the draw
    tail = [0, 1]
    ours = _weighted_metrics(matching, weights, tail, torch.device("cpu"), return_precision=True)
    for b in range(len(weights)):
        g2, d2 = duplicated(gt, dets, weights[b])
        ref = pycoco(g2, d2)
        ref_prec = ref.eval["precision"][:, :, :, 0, -1]  # T×R×K
        np.testing.assert_array_equal(ours["precision"][b].transpose(0, 2, 1), ref_prec)
        assert ours["map"][b] == pytest.approx(ref.stats[0], abs=1e-12)
        assert ours["map50"][b] == pytest.approx(ref.stats[1], abs=1e-12)
        for k in range(3):
            valid = ref_prec[:, :, k] > -1
            if valid.any():
                assert ours["per_class_ap"][b, k] == pytest.approx(ref_prec[:, :, k].mean(), abs=1e-12)
            else:
                assert np.isnan(ours["per_class_ap"][b, k])


def test_full_set_value_equals_evaluate_coco():
    gt, dets = make_dataset(5, n_img=15, n_cat=4)
    res = evaluate_coco(gt, dets, device="cpu")
    boot = bootstrap_metrics(gt, dets, n_resamples=200, seed=1, device="cpu")
    assert boot["map"]["value"] == pytest.approx(res["stats"][0], abs=1e-12)
    assert boot["map50"]["value"] == pytest.approx(res["stats"][1], abs=1e-12)
    assert boot["map_tail"]["value"] == pytest.approx(res["map_tail"], abs=1e-12)
    assert boot["tail_classes"] == res["tail_classes"]
    for k, name in enumerate(res["class_names"]):
        iv = boot["per_class"][name]
        if res["per_class_ap"][k] < 0:
            assert np.isnan(iv["value"]) and iv["undefined"] == 1.0
        else:
            assert iv["value"] == pytest.approx(res["per_class_ap"][k], abs=1e-12)
            assert iv["low"] <= iv["high"]
    assert boot["map"]["low"] <= boot["map"]["value"] <= boot["map"]["high"]
    assert len(boot["samples"]["map"]) == 200
    # seeded: the same seed gives the same interval, another seed another one
    again = bootstrap_metrics(gt, dets, n_resamples=200, seed=1, device="cpu")
    assert again["map"] == boot["map"]
    assert bootstrap_metrics(gt, dets, n_resamples=200, seed=2, device="cpu")["map"] != boot["map"]


def test_identical_sets_differ_by_exactly_zero():
    gt, dets = make_dataset(7, n_img=12, n_cat=3)
    diff = bootstrap_difference(gt, dets, list(dets), n_resamples=1000, seed=0, device="cpu")
    for key in ("map", "map50", "map_tail", "map50_tail"):
        assert diff[key]["value"] == 0.0 and diff[key]["low"] == 0.0 and diff[key]["high"] == 0.0, key
    assert np.all(diff["samples"]["map"] == 0.0)


def test_paired_difference_is_the_difference_of_the_same_resamples():
    gt, dets = make_dataset(8, n_img=12, n_cat=3)
    worse = [{**d, "score": float(np.round(1 - d["score"], 1))} for d in dets]
    diff = bootstrap_difference(gt, dets, worse, n_resamples=300, seed=4, device="cpu")
    a = bootstrap_metrics(gt, dets, n_resamples=300, seed=4, device="cpu")
    b = bootstrap_metrics(gt, worse, n_resamples=300, seed=4, device="cpu")
    np.testing.assert_allclose(diff["samples"]["map"], a["samples"]["map"] - b["samples"]["map"], rtol=0, atol=1e-15)
    assert diff["map"]["value"] == pytest.approx(a["map"]["value"] - b["map"]["value"], abs=1e-15)
    assert diff["a"]["map"] == pytest.approx(a["map"]["value"])
    ref = evaluate_coco(gt, dets, device="cpu")["stats"][0] - evaluate_coco(gt, worse, device="cpu")["stats"][0]
    assert diff["map"]["value"] == pytest.approx(ref, abs=1e-12) and abs(ref) > 1e-3
    # the paired interval is narrower than what independent resamples of the two sets give
    b_other = bootstrap_metrics(gt, worse, n_resamples=300, seed=5, device="cpu")
    unpaired = a["samples"]["map"] - b_other["samples"]["map"]
    assert np.std(diff["samples"]["map"]) < np.std(unpaired)


def test_bad_arguments():
    gt, dets = make_dataset(1, n_img=4, n_cat=2)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_metrics(gt, dets, confidence=95, device="cpu")
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_metrics(gt, dets, n_resamples=0, device="cpu")
    with pytest.raises(ValueError, match="not among"):
        bootstrap_metrics(gt, dets, tail=["nope"], device="cpu")


def _simulated_class(rng, n_images):
    """One class, one lesion per image: found (score ~ Beta(4, 2)) with probability 0.75, plus
    Poisson(1.5) false positives per image (score ~ Beta(2, 4)). Returns sequence, counts per image."""
    found = rng.random(n_images) < 0.75
    n_fp = rng.poisson(1.5, n_images)
    img = np.r_[np.nonzero(found)[0], np.repeat(np.arange(n_images), n_fp)]
    score = np.r_[rng.beta(4, 2, found.sum()), rng.beta(2, 4, n_fp.sum())]
    tp = np.r_[np.ones(found.sum(), bool), np.zeros(n_fp.sum(), bool)]
    order = np.argsort(-score, kind="mergesort")
    seq = _ClassSequence(img[order], np.full(len(order), -1), tp[order, None], ~tp[order, None])
    return seq, np.ones(n_images, np.int64)


def test_coverage_of_the_95_percent_interval():
    # "true" AP: the same statistic on 400,000 images (its sampling sd there is ~0.001,
    # against an interval half-width of ~0.07 at 150 images)
    rng = np.random.default_rng(0)
    dev = torch.device("cpu")
    big, big_gt = _simulated_class(rng, 400_000)
    truth = _class_ap(big, np.ones((1, 400_000), np.int64), np.array([big_gt.sum()]), dev)[0][0]
    trials, n_img, hits = 200, 150, 0
    for t in range(trials):
        seq, gt_count = _simulated_class(rng, n_img)
        w = resample_weights(n_img, 1000, seed=t)
        ap = _class_ap(seq, w, w @ gt_count, dev)[0]
        lo, hi = np.quantile(ap, [0.025, 0.975])
        hits += lo <= truth <= hi
    # 200 trials: binomial sd of the observed coverage is 0.015 at 0.95; we accept
    # 0.90 ... 0.99 (about -3.3 / +2.6 sd), which a percentile interval of a smooth statistic meets
    assert 0.90 <= hits / trials <= 0.99, hits / trials
