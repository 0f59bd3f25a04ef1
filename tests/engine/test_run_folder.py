"""What a failed run leaves: nothing when training never began, everything once it has."""

from __future__ import annotations

from welde_det.engine.run import CONFIG_NAME, _discard_if_unstarted


def _folder(tmp_path, *files):
    run = tmp_path / "run"
    for rel in (CONFIG_NAME, *files):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    return run


def test_unstarted_run_folder_is_removed(tmp_path):
    run = _folder(tmp_path, "data/data.yaml", "data/gt/train.json")
    _discard_if_unstarted(run)
    assert not run.exists()


def test_run_with_a_log_or_checkpoint_is_kept(tmp_path):
    for extra in ("terms.csv", "weights/last.pt", "stage1/args.yaml"):
        run = _folder(tmp_path / extra.replace("/", "_"), "data/data.yaml", extra)
        _discard_if_unstarted(run)
        assert (run / extra).is_file() and (run / CONFIG_NAME).is_file()
