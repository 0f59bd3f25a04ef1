"""Numbers like ``1e-4`` are numbers (#17 item 6), in ``key=value`` overrides and in YAML files alike.

PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as the string ``"1e-4"``; the config loader reads
it as the float a user means, in typed fields and inside mapping fields (``loss.params``), and the saved
``config.yaml`` reads back to the same values. Non-finite numbers and non-numbers stay errors naming the
file (or "overrides") and the key.
"""

from __future__ import annotations

import re

import pytest

from welde_det.engine.config import ConfigError, load_config, save_config


@pytest.mark.parametrize(("override", "key", "want"), [
    ("train.lr=1e-4", "lr", 1e-4),
    ("lr=1E-4", "lr", 1e-4),
    ("weight_decay=5e-4", "weight_decay", 5e-4),
    ("train.lr=+1.5e-3", "lr", 1.5e-3),
    ("train.lr=.5e-2", "lr", 0.5e-2),
    ("train.lr=2", "lr", 2.0),
    ("train.conf=1e-3", "conf", 1e-3),
])
def test_overrides_read_exponent_numbers(override, key, want):
    cfg = load_config(None, [override])
    value = getattr(cfg.train, key)
    assert isinstance(value, float) and value == pytest.approx(want, rel=0, abs=0)


def test_yaml_file_reads_exponent_numbers_and_round_trips(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-4\n  conf: 1.0e-3\n"
                    "loss:\n  params:\n    focal:\n      gamma: 2e0\n      alpha: [1e-1, 2.5e-1]\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.conf) == (1e-4, 5e-4, 1e-3)
    assert cfg.loss.params["focal"] == {"gamma": 2.0, "alpha": [0.1, 0.25]}
    saved = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(saved)
    assert again.train == cfg.train and again.loss.params == cfg.loss.params
    over = load_config(path, ["loss.params.focal.gamma=1e-1"])
    assert over.loss.params["focal"]["gamma"] == 0.1


@pytest.mark.parametrize(("text", "pattern"), [
    ("train:\n  lr: .inf\n", r"exp\.yaml: train\.lr must be a finite number, got inf"),
    ("train:\n  lr: nan\n", r"exp\.yaml: train\.lr must be a finite number, got nan"),
    ("train:\n  lr: 1e-4x\n", r"exp\.yaml: train\.lr must be a number \(e\.g\. 0\.01 or 1e-4\), got '1e-4x'"),
    ("train:\n  epochs: 1e3\n", r"exp\.yaml: train\.epochs must be an integer, got '1e3'"),
])
def test_yaml_file_bad_numbers_name_file_and_key(tmp_path, text, pattern):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


@pytest.mark.parametrize(("override", "pattern"), [
    ("train.lr=inf", "overrides: train.lr must be a finite number"),
    ("train.lr=-.inf", "overrides: train.lr must be a finite number"),
    ("train.lr=abc", re.escape("overrides: train.lr must be a number (e.g. 0.01 or 1e-4), got 'abc'")),
    ("train.lr=[1", re.escape("override 'train.lr=[1': the value is not valid YAML")),
    ("nosuchkey=1e-4", "unknown override key 'nosuchkey'"),
])
def test_bad_override_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])
