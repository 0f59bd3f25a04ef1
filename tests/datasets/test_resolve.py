"""Data resolution on slices of the real lumbar set: YOLO folder, 3-channel copy, convert output, COCO folder.

The real folder (``../shared/datasets/lumbar6``) is read only: a few slices, file names with
trailing spaces included, are copied into a temporary folder; tests needing it are skipped
with a reason when it is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from welde_det.classes import LUMBAR_CLASSES, ClassStats
from welde_det.datasets.coco import load_coco, make_categories
from welde_det.datasets.resolve import (
    DataError,
    ResolvedData,
    carve_split,
    lumbar6_patient,
    resolve_data,
    yolo_view,
)
from welde_det.engine.convert import run_convert

LUMBAR6 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "lumbar6"
needs_lumbar6 = pytest.mark.skipif(not (LUMBAR6 / "data.yaml").is_file(),
                                   reason=f"the real lumbar set is not at {LUMBAR6}")
PUBLISHED = ["Degenerative Disc Disease (DDD)", "Normal IVD", "Spinal Stenosis (SS)", "Spondylolisthesis",
             "Lumbar Disc Bulge (LDB)", "Thoracic Disc Bulge (TDB)"]


# ----------------------------------------------------------------------------- fixtures
def _pick(split: str, patients: int) -> list[Path]:
    """The first ``patients`` patients of ``split`` with a T1 slice named with a space and a T2 slice."""
    by_patient: dict[str, list[Path]] = {}
    for p in sorted((LUMBAR6 / split / "images").iterdir()):
        by_patient.setdefault(lumbar6_patient(p.name), []).append(p)
    chosen = []
    for _pid, files in sorted(by_patient.items()):
        if len(files) == 2 and any(" " in f.name for f in files) and any("_T2_" in f.name for f in files):
            chosen.extend(files)
        if len(chosen) == 2 * patients:
            break
    return chosen


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A 1-channel slice copy of lumbar6 (6 train + 4 val), its 3-channel copy, and its convert output."""
    if not (LUMBAR6 / "data.yaml").is_file():
        pytest.skip(f"the real lumbar set is not at {LUMBAR6}")
    root = tmp_path_factory.mktemp("lumbar6")
    grey, rgb = root / "grey", root / "rgb"
    for split, n in (("train", 3), ("val", 2)):
        for img in _pick(split, n):
            label = LUMBAR6 / split / "labels" / (img.name[: -len(".png")] + ".txt")
            for dst in (grey, rgb):
                (dst / split / "images").mkdir(parents=True, exist_ok=True)
                (dst / split / "labels").mkdir(parents=True, exist_ok=True)
                shutil.copy(label, dst / split / "labels" / label.name)
            shutil.copy(img, grey / split / "images" / img.name)
            arr = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
            assert arr.ndim == 2  # the shared copy is single-channel
            cv2.imwrite(str(rgb / split / "images" / img.name), cv2.merge([arr, arr, arr]))
    for dst in (grey, rgb):
        shutil.copy(LUMBAR6 / "data.yaml", dst / "data.yaml")
    converted = run_convert("yolo", grey, root / "converted", key="test-key", keep_source_splits=True,
                            patient_pattern="lumbar6").out_dir
    return {"grey": grey, "rgb": rgb, "converted": converted, "root": root}


def _grey(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    if arr.ndim == 3:
        assert all(np.array_equal(arr[..., 0], arr[..., c]) for c in (1, 2)), path
        arr = arr[..., 0]
    return arr


def _canonical(data: ResolvedData) -> dict[str, dict[str, list]]:
    """Per split: pixel hash -> sorted [(width, height, array shape, sorted (class name, bbox))].

    A list per hash, because the real set holds pixel-identical slices under two names.
    """
    out = {}
    for split, path in data.splits.items():
        coco = load_coco(path)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        boxes: dict[int, list] = {img["id"]: [] for img in coco["images"]}
        for a in coco["annotations"]:
            boxes[a["image_id"]].append((names[a["category_id"]], tuple(a["bbox"])))
        table: dict[str, list] = {}
        for img in coco["images"]:
            arr = _grey(data.image_roots[split] / img["file_name"])
            key = hashlib.sha256(arr.tobytes()).hexdigest()
            table.setdefault(key, []).append((img["width"], img["height"], arr.shape, tuple(sorted(boxes[img["id"]]))))
        out[split] = {k: sorted(v) for k, v in table.items()}
    return out


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- the three layouts
@needs_lumbar6
def test_yolo_folder_3channel_copy_and_convert_output_resolve_alike(sources, tmp_path):
    before = {k: _tree(sources[k]) for k in ("grey", "rgb", "converted")}
    grey = resolve_data(sources["grey"], tmp_path / "g")
    rgb = resolve_data(sources["rgb"], tmp_path / "r")
    conv = resolve_data(sources["converted"], tmp_path / "c")
    assert (grey.kind, rgb.kind, conv.kind) == ("yolo", "yolo", "convert")
    assert grey.names == rgb.names == conv.names == tuple(PUBLISHED)
    assert sorted(grey.splits) == sorted(conv.splits) == ["train", "val"]
    # YOLO sources: COCO GT in the work folder, file names relative to the split's own images/
    assert grey.splits["train"] == tmp_path / "g" / "gt" / "train.json"
    assert grey.image_roots["train"] == sources["grey"] / "train" / "images"
    names = [img["file_name"] for img in load_coco(grey.splits["train"])["images"]]
    assert len(names) == 6 and sum(" " in n for n in names) == 3 and all("/" not in n for n in names)
    # convert output is read where it is (splits/ + images/), for every framework
    assert conv.splits["val"] == sources["converted"] / "splits" / "val.json"
    assert conv.image_roots["val"] == sources["converted"] / "images"
    # same ground truth (boxes, categories, image sizes) on the same pixel arrays
    canon = _canonical(grey)
    assert canon == _canonical(rgb) == _canonical(conv)
    assert [sum(len(v) for v in canon[s].values()) for s in ("train", "val")] == [6, 4]
    assert all(e[:3] == (384, 384, (384, 384)) for t in canon.values() for v in t.values() for e in v)
    # nothing was written into any source folder
    assert {k: _tree(sources[k]) for k in ("grey", "rgb", "converted")} == before


@needs_lumbar6
def test_boxes_and_counts_by_hand(sources, tmp_path):
    data = resolve_data(sources["grey"], tmp_path)
    coco = load_coco(data.splits["train"])
    name = next(img["file_name"] for img in coco["images"] if img["file_name"].startswith("T1_"))
    image_id = next(img["id"] for img in coco["images"] if img["file_name"] == name)
    rows = [[float(v) for v in line.split()]
            for line in (sources["grey"] / "train" / "labels" / (name[:-4] + ".txt")).read_text().splitlines()
            if line.strip()]
    want = sorted((int(c) + 1, [round((cx - w / 2) * 384, 6), round((cy - h / 2) * 384, 6),
                                round(w * 384, 6), round(h * 384, 6)]) for c, cx, cy, w, h in rows)
    got = sorted((a["category_id"], a["bbox"]) for a in coco["annotations"] if a["image_id"] == image_id)
    assert got == want
    # class counts equal the label lines counted independently; image counts are images with >= 1 box
    lines = [int(line.split()[0]) for p in (sources["grey"] / "train" / "labels").glob("*.txt")
             for line in p.read_text().splitlines() if line.strip()]
    per_image = [{int(line.split()[0]) for line in p.read_text().splitlines() if line.strip()}
                 for p in (sources["grey"] / "train" / "labels").glob("*.txt")]
    count = Counter(lines)
    images = Counter(c for s in per_image for c in s)
    present = [c for c in range(6) if count[c]]
    stats = ClassStats.from_coco(data.splits["train"], floor=1)
    assert [stats.instance_counts[c] for c in present] == [count[c] for c in present]
    assert stats.image_counts == tuple(images[c] for c in range(6))


@needs_lumbar6
def test_class_order_is_the_published_one(tmp_path):
    data = resolve_data(LUMBAR6, tmp_path)
    assert data.names == tuple(PUBLISHED)
    # LUMBAR_CLASSES are the short names of the same classes in the same order
    assert [s.replace("_", " ") in long for s, long in zip(LUMBAR_CLASSES, data.names)] == [True] * 6
    stats = ClassStats.from_coco(data.splits["train"])  # no floor: every class has training boxes
    assert stats.instance_counts == (432, 2902, 1319, 85, 1416, 103)  # the dataset README's train row
    assert stats.tail_names == (PUBLISHED[0], PUBLISHED[3], PUBLISHED[5])
    assert len(load_coco(data.splits["val"])["images"]) == 207


@needs_lumbar6
def test_coco_folder_resolves_to_the_same_ground_truth(sources, tmp_path):
    coco_dir = tmp_path / "coco"
    (coco_dir / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(sources["converted"] / "splits" / f"{split}.json", coco_dir / "annotations" / f"{split}.json")
    shutil.copytree(sources["converted"] / "images", coco_dir / "images")
    data = resolve_data(coco_dir, tmp_path / "work")
    assert data.kind == "coco" and data.yolo_yaml is None
    assert data.splits["train"] == coco_dir / "annotations" / "train.json"
    assert _canonical(data) == _canonical(resolve_data(sources["grey"], tmp_path / "w2"))
    assert not (tmp_path / "work").exists()  # COCO sources need nothing written


@needs_lumbar6
def test_yolo_view_links_the_users_images_and_reads_alike(sources, tmp_path):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    before = {k: _tree(sources[k]) for k in ("grey", "rgb", "converted")}
    items = {}
    for kind in ("grey", "rgb", "converted"):
        data = resolve_data(sources[kind], tmp_path / kind)
        data_yaml = yolo_view(data, tmp_path / kind, channels=1)
        content = yaml.safe_load(data_yaml.read_text())
        # no absolute path in the view: no 'path' (splits relative to the YAML), relative link targets
        assert content["channels"] == 1 and "path" not in content
        assert [content["names"][i] for i in range(6)] == PUBLISHED
        links = sorted((tmp_path / kind / "yolo" / "images" / "train").rglob("*.png"))
        assert len(links) == 6 and all(p.is_symlink() for p in links)
        assert not any(os.path.isabs(os.readlink(p)) for p in links)
        assert all((p.parent / os.readlink(p)).resolve().is_relative_to(data.image_roots["train"].resolve())
                   for p in links)
        cfg = check_det_dataset(str(data_yaml))
        ds = YOLODataset(img_path=cfg["train"], data=cfg, imgsz=128, augment=False, stride=32,
                         batch_size=6, rect=False)
        labels = sorted((tuple(lab["cls"].ravel().tolist()), tuple(np.round(lab["bboxes"], 5).ravel().tolist()))
                        for lab in ds.labels)
        pixels = sorted(hashlib.sha256(ds.load_image(i)[0].tobytes()).hexdigest() for i in range(len(ds)))
        items[kind] = (labels, pixels)
        # Ultralytics' label cache is written beside the view, never beside the user's labels
        assert len(list((tmp_path / kind / "yolo" / "labels").rglob("*.cache"))) == 1
    assert items["grey"] == items["rgb"] == items["converted"]
    assert {k: _tree(sources[k]) for k in ("grey", "rgb", "converted")} == before
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        yolo_view(resolve_data(sources["grey"], tmp_path / "x"), tmp_path / "x", channels=2)


# ----------------------------------------------------------------------------- names and errors
@needs_lumbar6
def test_yolo_folder_without_names_is_an_error_unless_given(sources, tmp_path):
    src = tmp_path / "nonames"
    shutil.copytree(sources["grey"], src)
    (src / "data.yaml").write_text("path: .\ntrain: train/images\nval: val/images\n")
    with pytest.raises(DataError, match=r"does not name its classes.*names="):
        resolve_data(src, tmp_path / "w1")
    given = resolve_data(src, tmp_path / "w2", names=list(LUMBAR_CLASSES))
    assert given.names == LUMBAR_CLASSES and given.yolo_yaml is None
    assert [c["name"] for c in load_coco(given.splits["train"])["categories"]] == list(LUMBAR_CLASSES)
    # bare images/<split>/ + labels/<split>/ folders: the same rule
    bare = tmp_path / "bare"
    for split in ("train", "val"):
        shutil.copytree(sources["grey"] / split / "images", bare / "images" / split)
        shutil.copytree(sources["grey"] / split / "labels", bare / "labels" / split)
    with pytest.raises(DataError, match="does not name its classes"):
        resolve_data(bare, tmp_path / "w3")
    assert resolve_data(bare, tmp_path / "w4", names=PUBLISHED).kind == "yolo"
    # names that disagree with the dataset's are an error, for every layout
    for src_kind in ("grey", "converted"):
        with pytest.raises(DataError, match=r"names=\["):
            resolve_data(sources[src_kind], tmp_path / f"w5{src_kind}", names=list(LUMBAR_CLASSES))


def test_errors_name_the_path_and_what_to_do(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_data(tmp_path / "nowhere", tmp_path / "w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no known layout .*tools/convert.py"):
        resolve_data(tmp_path / "empty", tmp_path / "w")
    with pytest.raises(DataError, match="inside the data source"):
        resolve_data(tmp_path / "empty", tmp_path / "empty" / "run")
    (tmp_path / "conv" / "images").mkdir(parents=True)
    (tmp_path / "conv" / "annotations.json").write_text("{}")
    with pytest.raises(DataError, match=r"--no-split.*--keep-source-splits"):
        resolve_data(tmp_path / "conv", tmp_path / "w")
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "images").mkdir()
    cats = make_categories(["a", "b"])
    (coco / "annotations" / "train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.png", "width": 4, "height": 4}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1}],
        "categories": cats}))
    with pytest.raises(DataError, match=r"train.json: image 'x.png' is not under .*images"):
        resolve_data(coco, tmp_path / "w")
    with pytest.raises(DataError, match="phantom options"):
        resolve_data(coco, tmp_path / "w", phantom={"n_images": 4})
    assert issubclass(DataError, ValueError)


def test_phantom_resolves_with_the_lumbar_classes(tmp_path):
    data = resolve_data("phantom", tmp_path / "run",
                        phantom={"n_images": 12, "cache_dir": str(tmp_path / "cache"), "workers": 1})
    assert data.kind == "phantom" and data.names == LUMBAR_CLASSES
    assert sorted(data.splits) == ["test", "train", "val"]
    assert all(data.splits[s].is_relative_to(tmp_path / "cache") for s in data.splits)
    coco = load_coco(data.splits["train"])
    assert all((data.image_roots["train"] / img["file_name"]).is_file() for img in coco["images"])
    data_yaml = yolo_view(data, tmp_path / "run", channels=3)
    assert yaml.safe_load(data_yaml.read_text())["channels"] == 3
    links = sorted((tmp_path / "run" / "yolo" / "images").rglob("*.png"))
    assert links and not any(os.path.isabs(os.readlink(p)) for p in links)  # relative targets, and they resolve
    assert all((p.parent / os.readlink(p)).resolve() == (data.image_roots["train"] / p.name).resolve()
               for p in links)
    with pytest.raises(DataError, match="not known"):
        resolve_data("phantom", tmp_path / "run", phantom={"n_img": 3})


# ----------------------------------------------------------------------------- patients and carving
def test_lumbar6_patient_rule():
    assert lumbar6_patient("T1_0012_S8 .png") == "0012"
    assert lumbar6_patient("0011_T2_TSE_SAG_384_0002_0012_008_R.png") == "0012"
    assert lumbar6_patient("0398_T2_TSE_SAG_320_0002_0394_008_R.png") == "0394"
    assert lumbar6_patient("X1_0192_S8 .png") == "0192"
    assert lumbar6_patient("T1_0116_.png") == "0116"
    assert lumbar6_patient("sub/T1_0204_S8_.png") == "0204"
    assert lumbar6_patient("case_0012.png") is None


@needs_lumbar6
def test_lumbar6_names_pair_one_t1_with_one_t2():
    """Why the rule reads the T2 name's seventh field: it pairs T1 and T2 slices of one patient."""
    files = [p.name for s in ("train", "val") for p in (LUMBAR6 / s / "images").iterdir()]
    by_patient: dict[str, list[str]] = {}
    for name in files:
        by_patient.setdefault(lumbar6_patient(name), []).append(name)
    assert None not in by_patient and len(files) == 933
    pairs = [v for v in by_patient.values() if len(v) == 2]
    assert len(by_patient) == 511 and len(pairs) == 398
    assert all(sum("_T2_" in n for n in v) == 1 for v in pairs)


@needs_lumbar6
def test_pixel_identical_slices_share_a_patient():
    """The set holds 8 pixel-identical pairs (3 across train/val); the rule puts each pair in one patient,
    including a T1-named slice identical to a T2-named one, so carved splits keep copies together."""
    seen: dict[str, list[str]] = {}
    for split in ("train", "val"):
        for p in sorted((LUMBAR6 / split / "images").iterdir()):
            digest = hashlib.sha256(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).tobytes()).hexdigest()
            seen.setdefault(digest, []).append(f"{split}/{p.name}")
    copies = [v for v in seen.values() if len(v) > 1]
    assert len(copies) == 8 and all(len(v) == 2 for v in copies)
    assert sum(a.split("/")[0] != b.split("/")[0] for a, b in copies) == 3
    assert all(lumbar6_patient(a) == lumbar6_patient(b) for a, b in copies)
    assert ["train/T1_0116_.png", "val/0117_T2_TSE_SAG_384_0002_0116_008_R.png"] in copies


def _toy(patients: int, per_patient: int = 2, *, field: bool = True) -> dict:
    images, anns = [], []
    for p in range(patients):
        for k in range(per_patient):
            iid = p * per_patient + k + 1
            img = {"id": iid, "file_name": f"p{p}_{k}.png", "width": 8, "height": 8}
            if field:
                img["patient_id"] = f"P{p}"
            images.append(img)
            anns.append({"id": iid, "image_id": iid, "category_id": 1 + (p % 3 == 0), "bbox": [0, 0, 2, 2],
                         "area": 4.0})
    return {"images": images, "annotations": anns, "categories": make_categories(["common", "rare"])}


def test_carve_split_keeps_patients_together_and_is_deterministic():
    coco = _toy(30)
    kept, carved = carve_split(coco, 0.2, seed=3)
    ids = sorted(i["id"] for i in kept["images"] + carved["images"])
    assert ids == list(range(1, 61)) and not {i["id"] for i in kept["images"]} & {i["id"] for i in carved["images"]}
    kp = {i["patient_id"] for i in kept["images"]}
    cp = {i["patient_id"] for i in carved["images"]}
    assert not kp & cp
    assert len(carved["images"]) == 12  # 0.2 of 60 images, whole two-image patients
    rare = [a for a in carved["annotations"] if a["category_id"] == 2]
    assert len(rare) == 4  # 0.2 of the 20 boxes of the rare class (patients 0, 3, ..., 27)
    assert all(a["image_id"] in {i["id"] for i in carved["images"]} for a in carved["annotations"])
    assert carve_split(coco, 0.2, seed=3) == (kept, carved)
    assert any(carve_split(coco, 0.2, seed=s)[1] != carved for s in (4, 5, 6))
    assert kept["categories"] == carved["categories"] == coco["categories"]


def test_carve_split_needs_a_way_to_tell_patients_apart():
    coco = _toy(10, field=False)
    with pytest.raises(DataError, match=r"cannot tell patients apart.*group='image'"):
        carve_split(coco, 0.2, seed=0)
    kept, carved = carve_split(coco, 0.2, seed=0, group="image")
    assert len(carved["images"]) == 4 and len(kept["images"]) == 16
    kept, carved = carve_split(coco, 0.2, seed=0, group=lambda img: img["file_name"].split("_")[0])
    assert {i["file_name"].split("_")[0] for i in kept["images"]}.isdisjoint(
        {i["file_name"].split("_")[0] for i in carved["images"]})
    with pytest.raises(DataError, match="lumbar6 naming"):
        carve_split(coco, 0.2, seed=0, group="lumbar6")
    with pytest.raises(DataError, match="fraction must lie in"):
        carve_split(coco, 1.0, seed=0, group="image")
    with pytest.raises(DataError, match="at least two"):
        carve_split(_toy(1), 0.5, seed=0)


@needs_lumbar6
def test_carve_split_on_the_real_training_split(tmp_path):
    data = resolve_data(LUMBAR6, tmp_path)
    kept, carved = carve_split(data.splits["train"], 0.15, seed=0)
    kp = {lumbar6_patient(i["file_name"]) for i in kept["images"]}
    cp = {lumbar6_patient(i["file_name"]) for i in carved["images"]}
    assert not kp & cp  # patients (T1 + T2 slices) never straddle
    assert len(kept["images"]) + len(carved["images"]) == 726
    assert 0.12 <= len(carved["images"]) / 726 <= 0.20
    # every class is in the selection split, in roughly its training share (within 5 points)
    full = ClassStats.from_coco(data.splits["train"])
    sel = ClassStats.from_coco(carved)
    share = [s / f for s, f in zip(sel.instance_counts, full.instance_counts)]
    assert all(0.10 <= x <= 0.20 for x in share), share
    assert carve_split(data.splits["train"], 0.15, seed=0) == (kept, carved)
