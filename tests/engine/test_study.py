"""The multi-seed study (#16): a tiny phantom study killed and resumed, its study.json / study.md, the
aggregates and the paired combination against hand computations, the run plan, and bad study configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from welde_det.engine import run as run_mod
from welde_det.engine import study as study_mod
from welde_det.engine.config import ConfigError, load_config
from welde_det.engine.stages import plan_stages
from welde_det.engine.study import (
    METRICS,
    aggregate,
    combine_paired,
    load_study_config,
    paired_differences,
    plan_runs,
    run_study,
)

ROOT = Path(__file__).resolve().parents[2]
PHANTOM = ROOT / "configs" / "study_phantom.yaml"


def _tiny(tmp: Path, *extra: str) -> list[str]:
    return ["seeds=2", "epochs=1", "stage1_epochs=1", "imgsz=64", "n_images=6", "batch=2", "nbs=2",
            "methods=[ce,ce_ensemble,welde]", "n_resamples=50", f"out={tmp / 'study'}",
            f"cache_dir={tmp / 'gen'}", *extra]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


class _Kill(KeyboardInterrupt):
    """Stands for a kill: raised inside the pipeline where a real kill could land."""


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Session 1 finishes stage 1, then dies while the next run (ce, seed 0) is being evaluated — trained,
    no report; session 2 continues; session 3 finds everything finished."""
    tmp = tmp_path_factory.mktemp("study")
    study = load_study_config(PHANTOM, _tiny(tmp, "end_to_end=[ce]"))
    folder = Path(study.out)
    real_finish = run_mod.finish_detection_run
    calls = {"n": 0}

    def dying_finish(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Kill("simulated kill during the second run's evaluation")
        return real_finish(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(run_mod, "finish_detection_run", dying_finish)
    first: list[str] = []
    with pytest.raises(_Kill):
        run_study(study, on_run_finished=lambda run, rec: first.append(run.key))
    mp.undo()
    state1 = json.loads((folder / "study_state.json").read_text())
    stage1_dir = folder / state1["runs"]["stage1/seed0"]["run_dir"]
    half = next((folder / "runs" / "ce" / "seed0").iterdir())
    stage_ckpt = half / json.loads((half / "stage2" / "done.json").read_text())["checkpoint"]
    before = {"stage1": _snapshot(stage1_dir), "half_stage": _snapshot(half / "stage2"),
              "half_ckpt": (stage_ckpt, stage_ckpt.stat().st_mtime_ns), "half_has_report": (half / "report.json").exists()}
    junk = folder / "runs" / "welde" / "seed1" / "yolo_welde-19700101-000000"  # killed before its config.yaml
    (junk / "data").mkdir(parents=True)
    second: list[str] = []
    run_study(study, on_run_finished=lambda run, rec: second.append(run.key))
    after_second = _snapshot(stage1_dir)
    third: list[str] = []
    run_study(study, on_run_finished=lambda run, rec: third.append(run.key))
    return {"study": study, "folder": folder, "first": first, "second": second, "third": third, "state1": state1,
            "before": before, "stage1_dir": stage1_dir, "half": half, "junk": junk, "after_second": after_second}


def test_killed_study_resumes_without_redoing_finished_runs(killed_and_resumed):
    r = killed_and_resumed
    plan = [run.key for run in plan_runs(r["study"])]
    assert plan == ["stage1/seed0", "ce/seed0", "ce_ensemble/seed0", "welde/seed0", "e2e_ce/seed0", "ce/seed1",
                    "ce_ensemble/seed1", "welde/seed1", "e2e_ce/seed1"]
    # session 1: only stage 1 finished; the second run was trained but killed before its report
    assert r["first"] == ["stage1/seed0"] and list(r["state1"]["runs"]) == ["stage1/seed0"]
    assert not r["before"]["half_has_report"]
    # session 2: every other run, stage 1 not redone (its folder byte-for-byte and mtime unchanged)
    assert r["second"] == plan[1:]
    assert r["after_second"] == r["before"]["stage1"]
    # the half-finished run was continued through the pipeline's resume: same folder, not retrained
    state = json.loads((r["folder"] / "study_state.json").read_text())
    assert r["folder"] / state["runs"]["ce/seed0"]["run_dir"] == r["half"]
    assert list((r["folder"] / "runs" / "ce" / "seed0").iterdir()) == [r["half"]]
    ckpt, mtime = r["before"]["half_ckpt"]
    assert ckpt.stat().st_mtime_ns == mtime and _snapshot(r["half"] / "stage2") == r["before"]["half_stage"]
    assert (r["half"] / "report.json").is_file()
    # a run folder without config.yaml (killed before training) was removed and the run started afresh
    assert not r["junk"].exists() and len(list((r["folder"] / "runs" / "welde" / "seed1").iterdir())) == 1
    # session 3: nothing to train; stage 1 still untouched; one run folder per planned run
    assert r["third"] == [] and _snapshot(r["stage1_dir"]) == r["before"]["stage1"]
    assert sorted(state["runs"]) == sorted(plan)
    # every frozen stage started from the one stage-1 checkpoint; the end-to-end runs from nothing
    for key in plan[1:]:
        cfg = (r["folder"] / state["runs"][key]["run_dir"] / "config.yaml").read_text()
        if key.startswith("e2e_"):
            assert "weights: null" in cfg and "stage1_epochs: 1" in cfg and "freeze_backbone: false" in cfg
        else:
            assert f"{r['stage1_dir'].name}/weights/model.pt" in cfg and "stage1_epochs: 0" in cfg


def test_tiny_study_outputs(killed_and_resumed):
    folder = killed_and_resumed["folder"]
    s = json.loads((folder / "study.json").read_text())
    assert list(s["methods"]) == ["ce", "ce_ensemble", "welde", "e2e_ce"] and s["seeds"] == [0, 1]
    assert s["stage1"] == "shared" and s["methods"]["e2e_ce"]["kind"] == "end_to_end"
    assert "frozen-stage variance" in s["variance"] and "t-interval" in s["ci95_method"]
    for method, entry in s["methods"].items():
        assert [run["seed"] for run in entry["runs"]] == [0, 1]
        for run in entry["runs"]:
            assert set(run) >= {"seed", "run_dir", "map", "map50", "map_tail", "map50_tail", "per_class"}
            assert not os.path.isabs(run["run_dir"]) and run["run_dir"].startswith(f"runs/{method}/seed{run['seed']}/")
            assert (folder / run["run_dir"] / "report.json").is_file()
            rep = json.loads((folder / run["run_dir"] / "report.json").read_text())
            assert run["map"] == rep["map"] and run["map_tail"] == rep["map_tail"]
        for metric in METRICS:
            values = [run[metric] for run in entry["runs"]]
            assert set(entry[metric]) == {"mean", "std", "ci95"}
            assert entry[metric]["mean"] == pytest.approx(np.mean(values))
            assert entry[metric]["std"] == pytest.approx(np.std(values, ddof=1))
            lo, hi = entry[metric]["ci95"]
            assert lo <= entry[metric]["mean"] <= hi
    assert set(s["paired"]) == {"welde-ce_ensemble", "welde-ce", "welde-best_single"}
    for entry in s["paired"].values():
        assert entry["a"] == "welde" and entry["seeds"] == [0, 1]
        for metric in METRICS:
            assert set(entry[metric]) >= {"value", "ci95", "per_seed"} and len(entry[metric]["per_seed"]) == 2
    assert s["paired"]["welde-best_single"]["b"] in ("ce",) and "mAP_tail" in s["paired"]["welde-best_single"][
        "chosen_by"]
    md = (folder / "study.md").read_text()
    assert "| welde | 2 |" in md and "WELDE − ce_ensemble" in md and "## Reading" in md
    assert "does not show a difference" in md or "in this study WELDE is" in md
    for png in ("per_class_ap.png", "welde_terms.png"):
        data = (folder / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXt" not in data and b"iTXt" not in data
    assert s["plots"] == {"per_class_ap": "per_class_ap.png", "welde_terms": "welde_terms.png"}


def test_resume_with_other_settings_is_refused(killed_and_resumed, tmp_path):
    folder = killed_and_resumed["folder"]
    state = (folder / "study_state.json").read_bytes()
    with pytest.raises(ConfigError, match=r"epochs: 1 -> 2.*another out=DIR"):
        run_study(load_study_config(PHANTOM, [*_tiny(folder.parent), "epochs=2"]))
    assert (folder / "study_state.json").read_bytes() == state


# ----------------------------------------------------------------------------- hand computations
def test_aggregate_against_hand_computation():
    a = aggregate([0.2, 0.4, 0.6])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t(0.975, 2) from a table; sample std = 0.2
    assert a["mean"] == pytest.approx(0.4) and a["std"] == pytest.approx(0.2) and a["n"] == 3
    assert a["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    b = aggregate([0.1, 0.3, float("nan"), None])  # a class without GT in a run is left out
    assert b["mean"] == pytest.approx(0.2) and b["std"] == pytest.approx(math.sqrt(0.02)) and b["n"] == 2
    assert b["ci95"] == pytest.approx([0.2 - 12.706204736174707 * math.sqrt(0.02) / math.sqrt(2),
                                       0.2 + 12.706204736174707 * math.sqrt(0.02) / math.sqrt(2)])
    assert aggregate([0.5]) == {"mean": 0.5, "std": None, "ci95": None, "n": 1}
    assert aggregate([None]) == {"mean": None, "std": None, "ci95": None, "n": 0}


def test_combine_paired_against_hand_computation():
    point = [0.01, 0.03]
    reps = np.array([[0.00, 0.02, 0.04, 0.01],
                     [0.02, 0.04, 0.06, 0.03]])
    draws = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    # replicates: (0+0)/2=0, (0.02+0.04)/2=0.03, (0.06+0.06)/2=0.06, (0.03+0.01)/2=0.02 -> sorted 0, .02, .03, .06
    # linear percentiles over 4 values: 2.5 % at position 0.075, 97.5 % at 2.925
    out = combine_paired(point, reps, draws)
    assert out["value"] == pytest.approx(0.02) and out["per_seed"] == [0.01, 0.03] and out["positive_seeds"] == 2
    assert out["ci95"] == pytest.approx([0.0 + 0.075 * 0.02, 0.03 + 0.925 * 0.03]) and out["undefined"] == 0.0
    # without seed draws: the per-replicate seed mean, 0.01 .02 .03 .05 -> sorted .01 .02 .03 .05
    plain = combine_paired(point, reps, None)
    assert plain["ci95"] == pytest.approx([0.01 + 0.075 * 0.01, 0.03 + 0.925 * 0.02])
    # an undefined replicate (no tail box drawn) is left out and counted
    reps_nan = reps.copy()
    reps_nan[:, 3] = np.nan
    nan = combine_paired(point, reps_nan, None)
    assert nan["undefined"] == 0.25 and nan["ci95"] == pytest.approx(np.quantile([0.01, 0.03, 0.05], [0.025, 0.975]))
    with pytest.raises(ValueError, match="seed_draws"):
        combine_paired(point, reps, draws[:, :1])


def test_paired_differences_combines_per_seed_bootstraps(tmp_path, monkeypatch):
    """A fake bootstrap with fixed numbers: per seed the same seed is asked for, and the combination
    is the hand-computed two-level one."""
    from welde_det.classes import ClassStats
    from welde_det.evaluation import intervals

    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}], "annotations": [],
          "categories": [{"id": 1, "name": "x"}]}
    runs = []
    for name in ("a0", "b0", "a1", "b1"):
        d = tmp_path / name
        d.mkdir()
        (d / "ground_truth.json").write_text(json.dumps(gt))
        (d / "detections.json").write_text("[]")
        ClassStats.from_counts(["x"], [3], floor=1).save(d / "class_stats.json")
        runs.append(d)
    fixed = {"a0": (0.01, [0.0, 0.02, 0.04]), "a1": (0.03, [0.02, 0.04, 0.06])}
    asked = []

    def fake(gt_, dets_a, dets_b, *, class_stats, n_resamples, seed, device):
        asked.append((Path(dets_a).parent.name, Path(dets_b).parent.name, n_resamples, seed))
        value, samples = fixed[Path(dets_a).parent.name]
        return {**{m: {"value": value} for m in METRICS},
                "samples": {m: np.array(samples) for m in METRICS}}

    monkeypatch.setattr(intervals, "bootstrap_difference", fake)
    out = paired_differences([(runs[0], runs[1]), (runs[2], runs[3])], n_resamples=3, seed=7)
    assert asked == [("a0", "b0", 3, 7), ("a1", "b1", 3, 7)]  # the same image resamples in every seed
    draws = np.random.default_rng(8).integers(0, 2, size=(3, 2))
    reps = np.array([[0.0, 0.02, 0.04], [0.02, 0.04, 0.06]])
    by_hand = [(reps[draws[b, 0], b] + reps[draws[b, 1], b]) / 2 for b in range(3)]
    for m in METRICS:
        assert out[m]["value"] == pytest.approx(0.02)
        assert out[m]["ci95"] == pytest.approx(np.quantile(by_hand, [0.025, 0.975]))
    (runs[3] / "ground_truth.json").write_text(json.dumps({**gt, "images": []}))
    with pytest.raises(ConfigError, match="different ground truth"):
        paired_differences([(runs[2], runs[3])], n_resamples=3, seed=7)


# ----------------------------------------------------------------------------- plan and configs
def test_plan_per_seed_with_end_to_end(tmp_path):
    study = load_study_config(PHANTOM, ["seeds=[3,5]", "stage1=per_seed", "methods=[focal,welde]",
                                        "end_to_end=[ce]", "epochs=4", "stage1_epochs=6", f"out={tmp_path / 's'}"])
    plan = plan_runs(study)
    assert [r.key for r in plan] == ["stage1/seed3", "focal/seed3", "welde/seed3", "e2e_ce/seed3",
                                     "stage1/seed5", "focal/seed5", "welde/seed5", "e2e_ce/seed5"]
    assert [r.stage1 for r in plan if r.kind == "frozen"] == ["stage1/seed3", "stage1/seed3", "stage1/seed5",
                                                             "stage1/seed5"]
    stages = {r.key: plan_stages(load_config(r.config, list(r.overrides))) for r in plan}
    assert [(s.name, s.epochs, s.frozen) for s in stages["stage1/seed5"]] == [("train", 6, False)]
    assert [(s.name, s.epochs, s.frozen, s.components) for s in stages["focal/seed5"]] == [
        ("stage2", 4, True, ("focal",))]
    assert [(s.name, s.epochs, s.frozen, s.mode) for s in stages["welde/seed5"]] == [("stage2", 4, True, "welde")]
    assert [(s.name, s.epochs, s.frozen) for s in stages["e2e_ce/seed3"]] == [("train", 10, False)]  # 6 + 4
    (tmp_path / "w.pt").write_bytes(b"weights")
    weights = load_study_config(PHANTOM, [f"stage1.model.weights={tmp_path / 'w.pt'}", "end_to_end=[ce]"])
    assert [load_config(r.config, list(r.overrides)).model.weights for r in plan_runs(weights)
            if r.kind != "frozen"] == [str(tmp_path / "w.pt")] * 3  # stage 1 and end to end may start from weights
    cfg = load_config(plan[1].config, list(plan[1].overrides))
    assert cfg.train.seed == 3 and cfg.train.cache_frozen and cfg.loss.warmup_steps == 20
    assert not load_config(plan[0].config, list(plan[0].overrides)).train.cache_frozen
    assert not (tmp_path / "s").exists()  # loading and planning write nothing


@pytest.mark.parametrize(("overrides", "message"), [
    (["methods=[ce,bogus]"], r"methods: unknown method 'bogus'"),
    (["seeds=0"], r"seeds must be a number of seeds >= 1"),
    (["seeds=[]"], r"seeds must be"),
    (["stage1=bogus"], r"stage1 must be 'shared'.*'per_seed'.*got 'bogus'"),
    (["end_to_end=[welde]"], r"end_to_end: unknown method 'welde'"),
    (["methods=[ce,ce]"], r"methods: 'ce' is listed twice"),
    (["epochs=0"], r"epochs must be an integer >= 1"),
    (["seedz=2"], r"unknown override key 'seedz'"),
    (["train.epochs=3"], r"'train.epochs' is set by the study.*study key epochs"),
    (["model.weights=x.pt"], r"overrides: 'model.weights' is set by the study"),
    (["frozen.model.weights=x.pt"], r"frozen_overrides: 'model.weights' is set by the study"),
    (["framework=bogus"], r"framework must be one of"),
    (["cache_frozen=false", "cache_views=2"], r"cache_views=2 needs cache_frozen"),
    (["frozen.train.nbs=0"], r": ce \(yolo_ce.yaml\).*train.nbs must be >= 1"),
])
def test_bad_study_configs_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(PHANTOM, [*overrides, f"out={tmp_path / 's'}"])
    assert not (tmp_path / "s").exists()


def test_bad_study_file_names_the_key(tmp_path):
    bad = tmp_path / "study_bad.yaml"
    bad.write_text("name: x\nseedz: 3\n")
    with pytest.raises(ConfigError, match=r"study_bad.yaml: unknown study key 'seedz'; did you mean 'seeds'"):
        load_study_config(bad)


def test_cli_bad_method_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--config", str(PHANTOM),
                           "methods=[ce,bogus]", f"out={tmp_path / 's'}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {PHANTOM}: methods: unknown method 'bogus'; choose from "
        "['ce', 'focal', 'cb', 'ldam', 'lmf', 'ce_ensemble', 'welde']"]
    assert not (tmp_path / "s").exists()


def test_resume_refuses_an_edited_method_config_but_takes_a_new_method(tmp_path):
    import shutil

    from welde_det.utils.fileio import atomic_write_json

    for f in ("study_phantom.yaml", "yolo_ce.yaml", "yolo_welde.yaml", "yolo_focal.yaml"):
        shutil.copy(ROOT / "configs" / f, tmp_path / f)
    args = ["methods=[ce,welde]", f"out={tmp_path / 's'}"]
    study = load_study_config(tmp_path / "study_phantom.yaml", args)
    (tmp_path / "s").mkdir()
    atomic_write_json(tmp_path / "s" / "study_state.json",
                      {"version": 1, "name": study.name, "settings": study.fingerprint(), "runs": {}})
    # a method added on resume is fine, and its config is then fixed too
    grown = load_study_config(tmp_path / "study_phantom.yaml", [*args, "methods=[ce,focal,welde]"])
    state = study_mod._load_state(grown, tmp_path / "s")
    assert set(state["settings"]["run_configs"]) == {"ce", "focal", "welde"}
    # editing a per-method config under finished runs is refused, naming it
    text = (tmp_path / "yolo_welde.yaml").read_text().replace("warmup_steps: 50", "warmup_steps: 60")
    (tmp_path / "yolo_welde.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"run config of welde \(yolo_welde.yaml\) was edited"):
        study_mod._load_state(load_study_config(tmp_path / "study_phantom.yaml", args), tmp_path / "s")


def test_a_second_process_on_the_same_study_is_refused(tmp_path):
    from welde_det.utils.locking import OutputLockedError, output_lock

    study = load_study_config(PHANTOM, [f"out={tmp_path / 's'}"])
    with output_lock(tmp_path / "s", what="study"), pytest.raises(OutputLockedError, match="another process"):
        run_study(study)
    assert not (tmp_path / "s").exists()


def test_cli_prints_one_line_per_run_and_the_study_folder_last(tmp_path):
    out = tmp_path / "s"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "study.py"), "--config", str(PHANTOM), "seeds=1",
                           "epochs=1", "stage1_epochs=1", "imgsz=64", "n_images=6", "methods=[welde]", f"out={out}",
                           f"cache_dir={tmp_path / 'gen'}", "n_resamples=20"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 2
    assert progress[0].startswith("[1/2] stage1 seed 0: mAP ") and " runs/stage1/seed0/yolo_stage1_ce-" in progress[0]
    assert progress[1].startswith("[2/2] welde seed 0: mAP ") and " mAP_tail " in progress[1]
    assert " runs/welde/seed0/yolo_welde-" in progress[1] and progress[1].endswith(" s")
    assert json.loads((out / "study.json").read_text())["methods"]["welde"]["n_seeds"] == 1
