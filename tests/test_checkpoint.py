"""welde_det.checkpoint: the one schema, atomic writes, and loading that never runs a file's code."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
import torch
from torch import nn

from welde_det import checkpoint as ckpt_mod
from welde_det.checkpoint import (
    SCHEMA,
    CheckpointError,
    UnsafeCheckpointError,
    class_names,
    is_welde_checkpoint,
    load_checkpoint,
    module_allow_list,
    read_metadata,
    safe_load,
    save_checkpoint,
)
from welde_det.classes import ClassStats

REPO = Path(__file__).resolve().parents[1]


def _stats() -> ClassStats:
    return ClassStats(["DDD", "Normal IVD", "SS"], [12, 40, 3], [10, 30, 3], category_ids=[1, 2, 5])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def _trained(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One SGD step with momentum, so the optimiser has per-parameter state."""
    model(torch.randn(2, 1, 8, 8))  # materialise the lazy layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    return model, opt


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None, **kw) -> Path:
    args = dict(framework="rcnn", arch="fasterrcnn_resnet50_fpn", model_state=model.state_dict(),
                class_stats=_stats(), config={"data": {"source": "lumbar6", "channels": 1},
                                              "train": {"epochs": 3, "lr": 0.01, "milestones": (2, 3)}},
                stage="stage2", welde={"components": ["ce", "focal"], "mode": "welde", "heads": ["linear", "linear"]},
                epoch=2, optimizer_state=opt.state_dict() if opt else None, extra={"best_fitness": 0.25})
    args.update(kw)
    return save_checkpoint(path, **args)


# --------------------------------------------------------------------------- round trip
def test_round_trip_keeps_tensors_metadata_and_class_stats(tmp_path):
    model, opt = _trained(_model())
    path = _save(tmp_path / "run" / "last.pt", model, opt)
    ck = load_checkpoint(path)
    assert ck.schema == SCHEMA and ck.path == path
    assert (ck.framework, ck.arch, ck.stage, ck.epoch) == ("rcnn", "fasterrcnn_resnet50_fpn", "stage2", 2)
    assert ck.class_stats == _stats()
    assert ck.class_stats.tail == _stats().tail and ck.class_stats.image_counts == (10, 30, 3)
    assert ck.config == {"data": {"source": "lumbar6", "channels": 1},
                         "train": {"epochs": 3, "lr": 0.01, "milestones": (2, 3)}}
    assert ck.welde == {"components": ["ce", "focal"], "mode": "welde", "heads": ["linear", "linear"]}
    assert ck.extra == {"best_fitness": 0.25}
    want = model.state_dict()
    assert list(ck.model_state) == list(want)
    for key, tensor in want.items():
        assert ck.model_state[key].dtype == tensor.dtype
        assert torch.equal(ck.model_state[key], tensor), key
    # the optimiser state restores into a fresh optimiser, momentum buffers included
    fresh = _model()
    fresh(torch.randn(1, 1, 8, 8))
    fresh.load_state_dict(ck.model_state)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck.optimizer_state)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_file_is_plain_for_weights_only_with_no_allow_list(tmp_path):
    path = _save(tmp_path / "last.pt", *_trained(_model()))
    # nothing beyond torch's own defaults is named anywhere in the pickle
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["schema"] == SCHEMA and set(raw) == {"schema", "meta", "model_state", "optimizer_state"}
    assert raw["meta"]["class_stats"] == _stats().to_dict()


def test_read_metadata_and_helpers(tmp_path):
    path = _save(tmp_path / "last.pt", *_trained(_model()))
    meta = read_metadata(path)
    assert meta["schema"] == SCHEMA and meta["framework"] == "rcnn" and meta["epoch"] == 2
    assert meta["class_stats"] == _stats().to_dict() and meta["has_optimizer_state"] is True
    assert meta["versions"]["torch"] == str(torch.__version__)
    assert is_welde_checkpoint(path) is True
    assert class_names(path) == ["DDD", "Normal IVD", "SS"]
    no_opt = _save(tmp_path / "best.pt", _trained(_model())[0], epoch=None)
    assert read_metadata(no_opt)["has_optimizer_state"] is False and load_checkpoint(no_opt).epoch is None


def test_save_refuses_non_plain_values_naming_where(tmp_path):
    model = _trained(_model())[0]
    with pytest.raises(TypeError, match=r"meta\['config'\]\['data'\]\['root'\]: pathlib\.PosixPath"):
        _save(tmp_path / "a.pt", model, config={"data": {"root": Path("/x")}})
    with pytest.raises(TypeError, match=r"numpy\.float64"):
        _save(tmp_path / "a.pt", model, extra={"fitness": np.float64(0.5)})
    with pytest.raises(ValueError, match="epoch must be an int"):
        _save(tmp_path / "a.pt", model, epoch=True)
    assert not (tmp_path / "a.pt").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = _trained(_model())[0]
    path = _save(tmp_path / "last.pt", model)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(path, model, epoch=3)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path / "new.pt", model)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary or partial file


# --------------------------------------------------------------------------- not ours
def test_files_that_are_not_welde_checkpoints(tmp_path):
    model = _trained(_model())[0]
    plain = tmp_path / "weights.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a welde_det checkpoint.*plain state dict.*"
                                              r"a welde_det checkpoint is"):
        load_checkpoint(plain)
    assert read_metadata(plain) is None and class_names(plain) is None and is_welde_checkpoint(plain) is False

    legacy = tmp_path / "legacy.pt"
    torch.save({"framework": "rcnn", "model": model.state_dict()}, legacy)
    with pytest.raises(CheckpointError, match="older welde_det layout"):
        load_checkpoint(legacy)

    other = tmp_path / "other.pt"
    torch.save({"schema": "welde_det.checkpoint/0", "meta": {}}, other)
    with pytest.raises(CheckpointError, match=r"schema 'welde_det.checkpoint/0' is not 'welde_det.checkpoint/1'"):
        load_checkpoint(other)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable torch checkpoint"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match=r"notes\.pt"):
        read_metadata(text)

    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(_save(tmp_path / "full.pt", model).read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        load_checkpoint(truncated)

    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_torchvision_state_dict_loads_with_safe_load(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=6)
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    state = safe_load(path)
    want = model.state_dict()
    assert list(state) == list(want)
    assert all(torch.equal(state[k], want[k]) for k in want)
    again = torchvision.models.resnet18(weights=None, num_classes=6)
    again.load_state_dict(state)
    assert torch.equal(again.fc.weight, model.fc.weight)
    # the same state dict in the pre-1.6 (non-zip) format, which cannot be pre-scanned
    legacy = tmp_path / "resnet18_legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load(legacy)["fc.bias"], model.fc.bias)


# --------------------------------------------------------------------------- planted code
class _WritesMarker:
    """A pickle payload: unpickling it calls ``fn(*args)``, which creates the marker file."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, _WritesMarker]:
    return {
        "os.system": _WritesMarker(os.system, f"touch '{marker}'"),
        "exec": _WritesMarker(exec, f"open({str(marker)!r}, 'w').write('pwned')"),
        "subprocess": _WritesMarker(subprocess.call, ["touch", str(marker)]),
    }


def _plant(tmp_path: Path, marker: Path) -> list[Path]:
    files = []
    for name, payload in _payloads(marker).items():
        # disguised as a welde_det checkpoint, payload in the metadata
        fake = {"schema": SCHEMA, "meta": {"framework": "yolo", "extra": {"x": payload}},
                "model_state": {"w": torch.zeros(2)}, "optimizer_state": None}
        for fmt, zip_fmt in (("zip", True), ("legacy", False)):
            path = tmp_path / f"evil_{name}_{fmt}.pt"
            torch.save(fake, path, _use_new_zipfile_serialization=zip_fmt)
            files.append(path)
        # an Ultralytics-looking file: a real pickled module plus the payload
        path = tmp_path / f"evil_{name}_ultralytics.pt"
        torch.save({"model": nn.Conv2d(1, 1, 1), "train_args": {"x": payload}}, path)
        files.append(path)
    return files


def test_planted_payload_is_live_when_unpickled_unsafely(tmp_path):
    """Control: the planted files do run their code under weights_only=False (so the refusals mean something)."""
    marker = tmp_path / "PWNED"
    files = _plant(tmp_path, marker)
    assert len(files) == 9
    for path in files:
        marker.unlink(missing_ok=True)
        torch.load(path, map_location="cpu", weights_only=False)
        assert marker.exists(), path.name


@pytest.mark.parametrize("loader", ["load_checkpoint", "read_metadata", "is_welde_checkpoint", "class_names",
                                    "safe_load", "safe_load_modules"])
def test_planted_payload_is_refused_and_never_runs(tmp_path, loader):
    marker = tmp_path / "PWNED"
    for path in _plant(tmp_path, marker):
        if loader == "is_welde_checkpoint":
            assert is_welde_checkpoint(path) is False
            continue
        call = {"load_checkpoint": load_checkpoint, "read_metadata": read_metadata, "class_names": class_names,
                "safe_load": safe_load,
                "safe_load_modules": lambda p: safe_load(p, allow_modules=True)}[loader]
        with pytest.raises(UnsafeCheckpointError) as info:
            call(path)
        msg = str(info.value)
        assert str(path) in msg and "Nothing from the file was run" in msg
        assert "weights_only=False" in msg and "state_dict" in msg  # says what to do if the file is trusted
        assert info.value.refused, msg
        bad = {"posix.system", "builtins.exec", "commands.call"}  # protocol 2 names subprocess "commands"
        assert bad & set(info.value.refused), info.value.refused
        assert any(b in msg for b in bad)
        assert not marker.exists(), f"{loader} ran the code planted in {path.name}"


def test_refused_global_is_parsed_from_torchs_message(tmp_path):
    """Legacy (non-zip) files cannot be pre-scanned: the name comes from torch's UnpicklingError."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_legacy.pt"
    torch.save({"x": _payloads(marker)["exec"]}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(path, allow_modules=True)
    assert info.value.refused == ("builtins.exec",)
    torch.save({"x": _payloads(marker)["os.system"]}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert info.value.refused == ("posix.system",)
    assert not marker.exists()


class _CallsClass:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_admitted_module_classes_may_be_rebuilt_but_not_called(tmp_path):
    """A genuine module pickle rebuilds objects; calling an admitted class would run its constructor."""
    path = tmp_path / "calls_linear.pt"
    torch.save({"m": _CallsClass(nn.Linear, 2, 3)}, path)
    assert isinstance(torch.load(path, weights_only=False)["m"], nn.Linear)  # control: a real call
    with pytest.raises(UnsafeCheckpointError, match=r"calls torch\.nn\.modules\.linear\.Linear\(\.\.\.\)"):
        safe_load(path, allow_modules=True)
    path = tmp_path / "getattr.pt"
    torch.save({"f": _CallsClass(getattr, nn.Linear, "__init__")}, path)
    assert torch.load(path, weights_only=False)["f"] is nn.Linear.__init__  # control
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\(type, '__init__'\) is not admitted"):
        safe_load(path, allow_modules=True)
    # a pickled module (NEWOBJ + state) is admitted and comes back equal
    conv = nn.Conv2d(2, 3, 3)
    path = tmp_path / "module.pt"
    torch.save({"m": conv}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.conv\.Conv2d"):
        safe_load(path)
    back = safe_load(path, allow_modules=True)["m"]
    assert type(back) is nn.Conv2d and torch.equal(back.weight, conv.weight)


# --------------------------------------------------------------------------- Ultralytics-native files
@pytest.fixture(scope="module")
def ultralytics_files(tmp_path_factory):
    """A tiny real Ultralytics run (plain DetectionTrainer, and one with welde_det's WELDE model).

    Returns the mid-run ``last.pt`` (model=None, ema, optimizer: what resume reads), the final
    stripped ``last.pt`` of each, and a ``YOLO("yolov8n.yaml").save()`` file like a user's yolov8n.pt.
    """
    pytest.importorskip("ultralytics")
    from PIL import Image
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    from welde_det.integrations.yolo import WELDEDetectionModel

    root = tmp_path_factory.mktemp("ultralytics")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n1 0.3 0.3 0.2 0.2\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")

    class WELDETrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            return WELDEDetectionModel(cfg, ch=3, nc=self.data["nc"], components=("ce", "focal"),
                                       class_counts=[2, 2], mode="welde")

    files = {}
    for name, trainer_cls in (("native", DetectionTrainer), ("welde", WELDETrainer)):
        trainer = trainer_cls(overrides=dict(model="yolov8n.yaml", data=str(root / "data.yaml"), epochs=1,
                                             imgsz=64, batch=2, workers=0, device="cpu", plots=False, amp=False,
                                             val=False, project=str(root / "runs"), name=name, exist_ok=True,
                                             verbose=False))
        trainer.add_callback("on_model_save", lambda t, n=name: shutil.copyfile(t.last, root / f"{n}_resume.pt"))
        trainer.train()
        files[f"{name}_resume"] = root / f"{name}_resume.pt"
        files[f"{name}_final"] = root / "runs" / name / "weights" / "last.pt"
    YOLO("yolov8n.yaml").save(root / "yolov8n.pt")
    files["yolov8n"] = root / "yolov8n.pt"
    return files


def _same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a.float().eval()(x), b.float().eval()(x)
    ya, yb = (ya[0], yb[0]) if isinstance(ya, (list, tuple)) else (ya, yb)
    if isinstance(ya, dict):
        ya, yb = ya["scores"], yb["scores"]
    assert torch.equal(ya, yb)


def test_ultralytics_native_files_load_with_allow_modules(ultralytics_files):
    from ultralytics.nn.tasks import DetectionModel

    from welde_det.integrations.yolo import WELDEDetectionModel

    before = sorted(map(repr, torch.serialization.get_safe_globals()))
    expect = {"native_resume": ("ema", DetectionModel), "welde_resume": ("ema", WELDEDetectionModel),
              "native_final": ("model", DetectionModel), "welde_final": ("model", WELDEDetectionModel),
              "yolov8n": ("model", DetectionModel)}
    for name, path in ultralytics_files.items():
        key, cls = expect[name]
        got = safe_load(path, allow_modules=True)
        ref = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted reference
        assert type(got[key]) is cls, name
        _same_model(got[key], ref[key])
        if name.endswith("resume"):
            assert got["epoch"] == 0 and got["model"] is None
            assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
            assert got["train_args"] == ref["train_args"]
            assert got[key].args == ref[key].args  # IterableSimpleNamespace
    assert sorted(map(repr, torch.serialization.get_safe_globals())) == before  # nothing registered for good


def test_ultralytics_native_files_are_refused_without_allow_modules(ultralytics_files):
    for name, path in ultralytics_files.items():
        with pytest.raises(UnsafeCheckpointError) as info:
            safe_load(path)
        msg = str(info.value)
        assert "ultralytics.nn.modules.conv.Conv" in info.value.refused, name
        assert "safe_load(path, allow_modules=True) may rebuild" in msg and "Ultralytics-native" in msg
        with pytest.raises(UnsafeCheckpointError, match="It is not a welde_det checkpoint"):
            load_checkpoint(path)
        assert read_metadata(path) is None and class_names(path) is None
        assert is_welde_checkpoint(path) is False
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(ultralytics_files["welde_resume"])
    assert {"welde_det.integrations.yolo.WELDEDetectionModel", "welde_det.welde.heads.WELDEHeads"} <= set(
        info.value.refused)


def test_allow_list_is_module_classes_and_a_few_plain_types():
    names = module_allow_list()
    from ultralytics.nn.autobackend import AutoBackend

    import welde_det.integrations.yolo as wy

    assert names["ultralytics.nn.tasks.DetectionModel"].__name__ == "DetectionModel"
    assert names["torch.nn.modules.conv.Conv2d"] is nn.Conv2d
    assert names["welde_det.integrations.yolo.WELDEDetectionModel"] is wy.WELDEDetectionModel
    # a module whose constructor loads (and may download) weights is not on the list
    assert AutoBackend not in names.values()
    # no trainer, dataset or other non-module class of the walked packages
    assert wy.WELDEDetectionTrainer not in names.values()
    others = {n for n, obj in names.items() if not (isinstance(obj, type) and issubclass(obj, nn.Module))}
    assert others == set(ckpt_mod._PLAIN_TYPES)


def test_importing_and_loading_change_nothing_global(tmp_path):
    path = _save(tmp_path / "last.pt", _trained(_model())[0])
    code = f"""
import sys, torch
before = sorted(map(repr, torch.serialization.get_safe_globals()))
import welde_det, welde_det.checkpoint as c
c.load_checkpoint({str(path)!r}); c.read_metadata({str(path)!r}); c.safe_load({str(path)!r})
c.safe_load({str(path)!r}, allow_modules=True)
assert sorted(map(repr, torch.serialization.get_safe_globals())) == before
assert "ultralytics" not in sys.modules, "ultralytics imported for a plain file"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_pickle_scan_names_every_global(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"m": nn.Sequential(nn.Linear(1, 1)), "p": copy.deepcopy(pickle.HIGHEST_PROTOCOL)}, path)
    found = ckpt_mod._scan(path)
    assert {"torch.nn.modules.container.Sequential", "torch.nn.modules.linear.Linear",
            "collections.OrderedDict", "torch._utils._rebuild_tensor_v2"} <= found
    assert ckpt_mod._not_default(found) == {"torch.nn.modules.container.Sequential",
                                            "torch.nn.modules.linear.Linear"}


def test_functions_and_non_module_classes_of_admitted_packages_are_refused(tmp_path):
    """Only model classes are admitted from ultralytics.nn.tasks: not its loader functions."""
    from ultralytics.nn import tasks

    marker = tmp_path / "PWNED"
    inner = tmp_path / "inner.pt"
    torch.save({"x": _payloads(marker)["os.system"]}, inner)
    outer = tmp_path / "outer.pt"
    torch.save({"m": _CallsClass(tasks.torch_safe_load, str(inner))}, outer)
    torch.load(outer, weights_only=False)  # control: loading the outer file unpickles the inner one unsafely
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(outer, allow_modules=True)
    assert info.value.refused == ("ultralytics.nn.tasks.torch_safe_load",)
    assert not marker.exists()
    from welde_det.integrations.yolo import WELDEDetectionTrainer

    path = tmp_path / "trainer.pt"
    torch.save({"t": _CallsClass(WELDEDetectionTrainer)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(path, allow_modules=True)
    assert info.value.refused == ("welde_det.integrations.yolo.WELDEDetectionTrainer",)


def _rename_globals(src: Path, dst: Path, renames: dict[bytes, bytes]) -> None:
    """Copy a torch.save zip archive, renaming pickled globals (protocol 2: ``c module\\n name\\n``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                for old, new in renames.items():
                    assert old in data, old
                    data = data.replace(old, new)
            zout.writestr(item.filename, data)


def test_ultralytics_8_0_module_names_are_admitted(ultralytics_files, tmp_path):
    """Ultralytics 8.0 kept its layers in one module: old files name ultralytics.nn.modules.Conv."""
    ref = torch.load(ultralytics_files["yolov8n"], map_location="cpu", weights_only=False)
    path = tmp_path / "old_layout.pt"
    _rename_globals(ultralytics_files["yolov8n"], path,
                    {b"cultralytics.nn.modules.conv\nConv\n": b"cultralytics.nn.modules\nConv\n"})
    assert "ultralytics.nn.modules.Conv" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    got = safe_load(path, allow_modules=True)
    _same_model(got["model"], ref["model"])


def test_legacy_aliases_and_plain_helper_types(tmp_path):
    new = tmp_path / "identity.pt"
    torch.save({"m": nn.Sequential(nn.Identity())}, new)
    path = tmp_path / "silence.pt"  # YOLOv9e pickles ultralytics.nn.modules.block.Silence, now nn.Identity
    _rename_globals(new, path, {b"ctorch.nn.modules.linear\nIdentity\n": b"cultralytics.nn.modules.block\nSilence\n"})
    assert type(safe_load(path, allow_modules=True)["m"][0]) is nn.Identity
    plain = {"save_dir": Path("/runs/a"), "win": PureWindowsPath("C:/runs"), "fitness": np.float64(0.25),
             "dtype": np.dtype("float32")}
    path = tmp_path / "plain.pt"
    torch.save(plain, path)
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        safe_load(path)
    assert safe_load(path, allow_modules=True) == plain


def test_registrations_made_by_others_survive(tmp_path):
    """Ultralytics' own restricted loader registers globals for good; a safe_load must not remove them."""
    from ultralytics.utils import IterableSimpleNamespace

    theirs = (IterableSimpleNamespace, "ultralytics.yolo.utils.IterableSimpleNamespace")
    new = tmp_path / "ns.pt"
    torch.save({"args": IterableSimpleNamespace(a=1)}, new)
    path = tmp_path / "old_ns.pt"
    _rename_globals(new, path, {b"cultralytics.utils\nIterableSimpleNamespace\n":
                                b"cultralytics.yolo.utils\nIterableSimpleNamespace\n"})
    with torch.serialization.safe_globals([theirs]):  # someone else's registration, still in force
        assert safe_load(path, allow_modules=True)["args"].a == 1
        assert theirs in torch.serialization.get_safe_globals()
        # and what they registered does not widen what load_checkpoint admits
        with pytest.raises(UnsafeCheckpointError, match=r"ultralytics\.yolo\.utils\.IterableSimpleNamespace"):
            load_checkpoint(path)
