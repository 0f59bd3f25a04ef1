"""The one run skeleton: stage plan, unused keys, honest selection, no import cycle, no runner copies."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from welde_det.engine.config import ConfigError, ExperimentConfig, load_config
from welde_det.engine.run import check_unused_keys, plan_stages, resolve_run_data, run_training

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "welde_det"


def _cfg(name: str, *over: str) -> ExperimentConfig:
    return load_config(ROOT / "configs" / f"{name}.yaml", list(over))


# ----------------------------------------------------------------------------- stage plan
@pytest.mark.parametrize("config", ["yolo_welde", "rcnn_welde", "cls_welde"])
def test_one_meaning_of_frozen_for_every_backend(config):
    """WELDE: stage 1 ordinary one-head ce, stage 2 frozen with the K heads — the same plan for all three."""
    plan = plan_stages(_cfg(config, "stage1_epochs=3", "epochs=2"))
    assert [(s.name, s.components, s.mode, s.epochs, s.frozen, s.epoch_offset) for s in plan] == [
        ("stage1", ("ce",), "single", 3, False, 0),
        ("stage2", ("ce", "focal", "cb", "ldam"), "welde", 2, True, 3)]
    assert [s.frozen for s in plan_stages(_cfg(config, "stage1_epochs=0", "epochs=2"))] == [True]


@pytest.mark.parametrize("framework", ["yolo_ce", "rcnn_ce", "cls_ce"])
def test_single_loss_freeze_backbone_means_the_same_everywhere(framework):
    """``freeze_backbone`` freezes the last ``epochs`` after ``stage1_epochs`` ordinary ones (it used to mean
    every epoch for YOLO and classification, only the later epochs for Faster R-CNN)."""
    plan = plan_stages(_cfg(framework, "stage1_epochs=2", "epochs=3", "freeze_backbone=true"))
    assert [(s.name, s.epochs, s.frozen) for s in plan] == [("stage1", 2, False), ("stage2", 3, True)]
    plan = plan_stages(_cfg(framework, "stage1_epochs=2", "epochs=3"))
    assert [(s.name, s.epochs, s.frozen) for s in plan] == [("train", 5, False)]


# ----------------------------------------------------------------------------- unused keys
@pytest.mark.parametrize(("config", "override", "key"), [
    ("rcnn_ce", "nbs=32", "train.nbs"),
    ("cls_ce", "nbs=32", "train.nbs"),
    ("cls_ce", "conf=0.3", "train.conf"),
    ("cls_ce", "imgsz=96", "train.imgsz"),
    ("yolo_ce", "n_images=50", "data.n_images"),  # with a non-phantom source, below
])
def test_a_key_the_backend_does_not_read_is_an_error(tmp_path, config, override, key):
    extra = [f"data.source={tmp_path}"] if key.startswith("data.n_") else []
    cfg = _cfg(config, override, *extra)
    from welde_det.engine.backends import get_backend

    backend = get_backend(cfg)
    with pytest.raises(ConfigError, match=rf"{key}=.*not used by the {backend.framework!r} backend"):
        check_unused_keys(cfg, backend.framework, backend.unused_keys(cfg))
    with pytest.raises(ConfigError, match=key):  # and through run_training, before any folder is made
        run_training(cfg, [f"output={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_keys_at_their_defaults_pass():
    from welde_det.engine.backends import get_backend

    for name in ("yolo_welde", "rcnn_welde", "cls_welde"):
        cfg = _cfg(name)
        backend = get_backend(cfg)
        check_unused_keys(cfg, backend.framework, backend.unused_keys(cfg))


def test_removed_and_conditional_keys():
    with pytest.raises(ConfigError, match="pretrained_backbone"):
        _cfg("rcnn_ce", "model.pretrained_backbone=x.pt")
    with pytest.raises(ConfigError, match=r"patience.*select"):
        _cfg("rcnn_ce", "patience=3")
    _cfg("rcnn_ce", "patience=3", "select=holdout")


# ----------------------------------------------------------------------------- honest selection
def test_the_measured_split_never_selects(tmp_path):
    cfg = _cfg("rcnn_ce", "n_images=6", f"cache_dir={tmp_path / 'gen'}", "select=val", "measure=val")
    with pytest.raises(ConfigError, match="measured on a split that chose nothing"):
        resolve_run_data(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="split trained on"):
        resolve_run_data(_cfg("rcnn_ce", "n_images=6", f"cache_dir={tmp_path / 'gen'}", "select=train"),
                         tmp_path / "run")
    data = resolve_run_data(_cfg("rcnn_ce", "n_images=6", f"cache_dir={tmp_path / 'gen'}", "select=test"),
                            tmp_path / "run")
    assert (data.select, data.measure) == ("test", "val")


def test_holdout_is_carved_from_train_and_leaves_val_alone(tmp_path):
    cfg = _cfg("rcnn_ce", "n_images=20", f"cache_dir={tmp_path / 'gen'}", "select=holdout", "select_fraction=0.25")
    data = resolve_run_data(cfg, tmp_path / "run")
    full = json.loads(Path(data.resolved.splits["train"]).read_text())
    kept = json.loads(data.splits["train"].read_text())
    hold = json.loads(data.splits["holdout"].read_text())
    kept_ids, hold_ids = {i["id"] for i in kept["images"]}, {i["id"] for i in hold["images"]}
    assert kept_ids and hold_ids and not kept_ids & hold_ids
    assert kept_ids | hold_ids == {i["id"] for i in full["images"]}
    assert data.splits["val"] == data.resolved.splits["val"] and data.measure == "val"
    assert "holdout carved from train" in data.selection


# ----------------------------------------------------------------------------- structure
def _imports(path: Path) -> set[str]:
    """Every ``welde_det`` module a file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("welde_det")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("welde_det"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        # an import of a package's submodule or of a name from it points at that module
        graph[name] = {m for m in _imports(path) if m in mods and m != name}
    return graph


def test_the_package_has_no_import_cycle():
    """Module level or deferred (inside a function): no cycle among welde_det's modules."""
    graph = _module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_layers_point_downwards():
    graph = _module_graph()
    for name, deps in graph.items():
        if name.startswith(("welde_det.losses", "welde_det.classes")):
            assert not {d for d in deps if not d.startswith(("welde_det.losses", "welde_det.utils"))}, name
        if name.startswith(("welde_det.integrations", "welde_det.evaluation", "welde_det.datasets",
                            "welde_det.io", "welde_det.welde", "welde_det.checkpoint")):
            assert not {d for d in deps if d.startswith("welde_det.engine")}, (name, deps)


def test_the_three_runner_copies_are_gone():
    engine = PKG / "engine"
    for old in ("train_yolo.py", "train_rcnn.py", "train_classify.py", "train.py"):
        assert not (engine / old).exists(), old
    # no torch.load that may unpickle arbitrary objects anywhere in the package
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                for kw in node.keywords:
                    assert not (kw.arg == "weights_only" and isinstance(kw.value, ast.Constant)
                                and kw.value.value is False), f"{path}:{node.lineno}"
