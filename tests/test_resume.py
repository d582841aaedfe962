"""Fault tolerance: atomic backups, each epoch once in the history, resuming a killed run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tiny_demo import JOINT_FIT_ONLY, tiny_demo_train

from hybridnet_tf.training.callbacks import AtomicBackupAndRestore, RunHistoryLogger, read_epoch_log

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_log(path, epochs, loss_offset=0.0):
    with open(path, "w", newline="") as f:
        f.write("epoch,loss,val_mAP\n")
        for epoch in epochs:
            f.write(f"{epoch},{loss_offset + 1.0 / (epoch + 1)},{0.1 * epoch}\n")


def run_logger(tmp_path, first_epoch, last_epoch, planned_epochs):
    """Drives a RunHistoryLogger through epochs first..last as `fit` would (losses of 9.x)."""
    logger = RunHistoryLogger(str(tmp_path / "history.csv"), str(tmp_path / "history.json"))
    logger.set_params({"epochs": planned_epochs, "steps": 2})
    logger.on_train_begin()
    for epoch in range(first_epoch, last_epoch + 1):
        logger.on_epoch_begin(epoch)
        logger.on_epoch_end(epoch, {"loss": 9.0 + epoch, "val_mAP": 0.5})
    logger.on_train_end()
    return logger


def test_resumed_run_logs_each_epoch_once(tmp_path):
    # A killed process logged epochs 0-2, but its last backup was taken in epoch 2,
    # so training resumes at epoch 2: the old row of epoch 2 must go.
    write_log(tmp_path / "history.csv", [0, 1, 2])
    logger = run_logger(tmp_path, first_epoch=2, last_epoch=3, planned_epochs=4)
    header, rows = read_epoch_log(str(tmp_path / "history.csv"))
    assert header == ["epoch", "loss", "val_mAP"]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 11.0, 12.0]
    history = json.load(open(tmp_path / "history.json"))
    assert history == {"loss": [1.0, 0.5, 11.0, 12.0], "val_mAP": [0.0, 0.1, 0.5, 0.5]}
    assert logger.rows() == rows


def test_fresh_run_replaces_an_old_log(tmp_path):
    write_log(tmp_path / "history.csv", [0, 1, 2, 3])  # a finished run of 4 epochs
    run_logger(tmp_path, first_epoch=0, last_epoch=1, planned_epochs=2)
    _, rows = read_epoch_log(str(tmp_path / "history.csv"))
    assert [(r["epoch"], r["loss"]) for r in rows] == [(0, 9.0), (1, 10.0)]


def test_a_line_cut_by_a_kill_is_dropped(tmp_path):
    write_log(tmp_path / "history.csv", [0, 1])
    with open(tmp_path / "history.csv", "a") as f:
        f.write("2,0.3")  # no val_mAP, no newline
    run_logger(tmp_path, first_epoch=2, last_epoch=2, planned_epochs=3)
    with open(tmp_path / "history.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert [line[0] for line in lines] == ["epoch", "0", "1", "2"]
    assert all(len(line) == 3 for line in lines)


def test_a_fit_that_logs_other_columns_widens_the_header_and_keeps_every_value(tmp_path):
    # The probe's row holds val metrics only; the fine-tuning phase after it also logs its loss.
    with open(tmp_path / "history.csv", "w", newline="") as f:
        f.write("epoch,val_mAP,val_OF1\n0,0.7,0.4\n")
    run_logger(tmp_path, first_epoch=1, last_epoch=2, planned_epochs=3)
    header, rows = read_epoch_log(str(tmp_path / "history.csv"))
    assert header == ["epoch", "val_mAP", "val_OF1", "loss"]
    assert rows == [
        {"epoch": 0, "val_mAP": 0.7, "val_OF1": 0.4},
        {"epoch": 1, "val_mAP": 0.5, "loss": 10.0},
        {"epoch": 2, "val_mAP": 0.5, "loss": 11.0},
    ]


class StopAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_epoch:
            raise RuntimeError("interrupted")


def test_atomic_backup_restores_and_leaves_no_temporary_files(tmp_path):
    backup = str(tmp_path / "backup")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)

    def fresh_model():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse")
        return model

    model = fresh_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, epochs=4, batch_size=4, verbose=0,
                  callbacks=[AtomicBackupAndRestore(backup, save_freq=1), StopAtEpoch(2)])
    assert sorted(os.listdir(backup)) == ["latest.weights.h5", "training_metadata.json"]
    assert json.load(open(os.path.join(backup, "training_metadata.json")))["epoch"] == 2
    saved = model.get_weights()

    # A save killed halfway through writing the weights must not spoil the backup.
    def killed_while_writing(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF\r\n")  # the first bytes of an HDF5 file, then nothing
        raise SystemExit("killed")

    model.save_weights = killed_while_writing
    dying = AtomicBackupAndRestore(backup)
    dying.set_model(model)
    with pytest.raises(SystemExit):
        dying._save_model()

    restored = fresh_model()
    history = restored.fit(x, y, epochs=2, batch_size=4, verbose=0,
                           callbacks=[AtomicBackupAndRestore(backup)])
    # epochs=2 and the backup is at epoch 2: nothing left to run, weights restored.
    assert history.epoch == []
    assert all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), saved))
    assert not os.path.exists(backup)  # deleted when training finished


def cli_train(run_dir, demo_dir, epochs, log):
    # BackupAndRestore of the joint fit, without the demo's warm start and frozen phase.
    command = [sys.executable, "-m", "hybridnet_tf.cli"] + tiny_demo_train(
        run_dir, demo_dir, "data.cache=false", f"train.epochs={epochs}", "train.backup_steps=4",
        *JOINT_FIT_ONLY, train=128, batch_size=4,
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow  # two training processes: ~1-2 min on 2 CPU cores
def test_sigkill_mid_epoch_then_same_command_resumes(tmp_path):
    epochs = 4
    run_dir, demo_dir = str(tmp_path / "run"), str(tmp_path / "demo")
    metadata = os.path.join(run_dir, "backup", "training_metadata.json")
    with open(tmp_path / "first.log", "wb") as log:
        child = cli_train(run_dir, demo_dir, epochs, log)
        try:
            # Wait for a backup taken inside the second epoch (batch > 0), then kill.
            deadline = time.monotonic() + 300
            state = None
            while time.monotonic() < deadline and child.poll() is None:
                try:
                    state = json.load(open(metadata))
                except (OSError, ValueError):
                    state = None
                if state and state["epoch"] >= 1 and state["batch"] > 0:
                    os.kill(child.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if child.poll() is None and not (state and state["batch"] > 0):
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
    first_output = (tmp_path / "first.log").read_text(errors="replace")
    assert child.returncode == -signal.SIGKILL, first_output[-3000:]
    resume_epoch = json.load(open(metadata))["epoch"]
    assert 1 <= resume_epoch < epochs

    with open(tmp_path / "second.log", "wb") as log:
        again = cli_train(run_dir, demo_dir, epochs, log)
        again.wait(timeout=600)
    output = (tmp_path / "second.log").read_text(errors="replace")
    assert again.returncode == 0, output[-3000:]
    # Keras restarted at the interrupted epoch, not at the first one.
    assert f"Epoch {resume_epoch + 1}/{epochs}" in output
    assert "Epoch 1/" not in output
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(epochs))
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(history["loss"]) == len(history["val_mAP"]) == epochs
    assert not os.path.exists(os.path.join(run_dir, "backup"))
    for name in ("best.keras", "last.keras", "thresholds.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
