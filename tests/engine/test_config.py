"""Config loading, overrides and validation."""

from __future__ import annotations

import pytest
import yaml

from welde_det.engine.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    save_config,
)


def test_defaults_and_bare_overrides():
    cfg = load_config(None, ["epochs=2", "imgsz=160", "n_images=12", "loss.mode=welde"])
    assert (cfg.train.epochs, cfg.train.imgsz, cfg.data.n_images) == (2, 160, 12)
    assert cfg.components == ("ce", "focal", "cb", "ldam")
    cfg = apply_overrides(cfg, ["loss.mode=ce_ensemble"])
    assert cfg.components == ("ce",) * 4
    cfg = apply_overrides(cfg, ["loss.mode=single", "loss.name=lmf"])
    assert cfg.components == ("lmf",)


def test_dict_params_and_lists():
    cfg = load_config(None, ["loss.params.focal.gamma=1.5", "components=[ce,lmf]", "tail=TDB,DDD"])
    assert cfg.loss.params == {"focal": {"gamma": 1.5}}
    assert cfg.loss.components == ("ce", "lmf")
    assert cfg.data.tail == ("TDB", "DDD")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("epoch=3", "did you mean 'epochs'"),
        ("seed=1", "ambiguous"),
        ("train.epochs=abc", "must be an integer"),
        ("train.amp=maybe", "true or false"),
        ("loss.mode=boost", "must be one of"),
        ("difficulty=1.5", r"\[0, 1\]"),
        ("noequals", "key=value"),
        ("task=classify", "framework 'classify'"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_yaml_base_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "b", "train": {"epochs": 7, "batch": 4}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "train": {"epochs": 3}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.epochs, cfg.train.batch) == ("b", 3, 4)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_to_dict(cfg)["train"]["epochs"] == 3


def test_unknown_file_key_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("trian: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_configs_in_repo_load():
    from pathlib import Path

    from welde_det.engine.study import StudyConfig, load_study_config

    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.yaml"))
    studies = [p for p in paths if p.name.startswith("study_")]
    assert len(studies) >= 4
    for path in paths:
        if path in studies:  # a study names run configs; it is not one
            import torch

            # the GPU profile asks for amp, which the backend refuses without CUDA
            cpu = ["amp=false"] if "gpu" in path.name and not torch.cuda.is_available() else []
            assert isinstance(load_study_config(path, cpu), StudyConfig), path
        else:
            assert isinstance(load_config(path), ExperimentConfig), path
