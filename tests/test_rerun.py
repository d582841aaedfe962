"""Rerunning `train` on a run dir: a finished run is left alone, a longer one continues, --overwrite starts over."""

import json
import os

import keras
import numpy as np
import pytest

from tiny_demo import JOINT_FIT_ONLY, tiny_demo_train

from hybridnet_tf.cli import main
from hybridnet_tf.run_files import COMPLETE_FILE


def train(run_dir, demo_dir, epochs, *extra):
    return main(tiny_demo_train(run_dir, demo_dir, *JOINT_FIT_ONLY, f"train.epochs={epochs}") + list(extra))


def snapshot(run_dir):
    """Every file of the run dir with its bytes and modification time."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, run_dir)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def weights(path):
    return keras.models.load_model(path, safe_mode=True).get_weights()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerun")
    run_dir, demo_dir = str(root / "run"), str(root / "demo")
    assert train(run_dir, demo_dir, 2) == 0
    return run_dir, demo_dir


def test_rerun_of_a_finished_run_says_so_and_touches_nothing(finished, capsys):
    run_dir, demo_dir = finished
    record = json.load(open(os.path.join(run_dir, COMPLETE_FILE)))
    assert record["epochs"] == 2
    before = snapshot(run_dir)
    capsys.readouterr()
    assert train(run_dir, demo_dir, 2) == 0
    out = capsys.readouterr().out
    assert "is complete: 2 of 2 epochs trained; nothing to do" in out
    assert snapshot(run_dir) == before


def test_another_config_in_a_finished_run_dir_is_refused(finished, capsys):
    run_dir, demo_dir = finished
    before = snapshot(run_dir)
    assert train(run_dir, demo_dir, 2, "--set", "train.learning_rate=0.01") == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.003 -> 0.01" in err and "--overwrite" in err
    assert snapshot(run_dir) == before


def test_more_epochs_continue_from_the_last_weights_then_overwrite_starts_over(tmp_path, capsys):
    run_dir, demo_dir = str(tmp_path / "run"), str(tmp_path / "demo")
    assert train(run_dir, demo_dir, 1) == 0
    first = json.load(open(os.path.join(run_dir, "history.json")))
    last_weights = weights(os.path.join(run_dir, "last.keras"))
    capsys.readouterr()

    assert train(run_dir, demo_dir, 3) == 0
    out = capsys.readouterr().out
    assert "finished 1 epochs; continuing from its last weights to epoch 3" in out
    longer = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(longer["loss"]) == 3
    assert longer["loss"][0] == first["loss"][0]  # epoch 1 kept, not retrained
    # Continued from the weights, not from scratch: its first new epoch starts
    # below the loss a fresh model has in its first epoch.
    assert longer["loss"][1] < first["loss"][0]
    assert json.load(open(os.path.join(run_dir, COMPLETE_FILE)))["epochs"] == 3
    assert not any(np.array_equal(a, b) for a, b in zip(weights(os.path.join(run_dir, "last.keras")),
                                                        last_weights) if a.size > 1)

    assert train(run_dir, demo_dir, 1, "--overwrite") == 0
    out = capsys.readouterr().out
    assert "--overwrite: removed" in out
    again = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(again["loss"]) == 1
    assert json.load(open(os.path.join(run_dir, COMPLETE_FILE)))["epochs"] == 1


def test_fewer_epochs_than_a_finished_run_is_refused(finished, capsys):
    run_dir, demo_dir = finished
    assert train(run_dir, demo_dir, 1) == 2
    assert "finished run of 2 epochs, more than train.epochs=1" in capsys.readouterr().err
