"""Faults: SIGKILL while writing a checkpoint or an export, a full disk, broken files in a run dir."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tiny_demo import JOINT_FIT_ONLY, tiny_demo_train

from hybridnet_tf.cli import main
from hybridnet_tf.run_files import COMPLETE_FILE, load_run_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child process: the CLI with one writer patched to die (SIGKILL) halfway through a file.
KILLER = r"""
import os, signal, sys
import keras
target, call = os.environ["KILL_WRITING"], int(os.environ.get("KILL_AT_CALL", "1"))
calls = []

def half_then_die(path):
    with open(path, "r+b") as f:  # cut the file short, as a kill mid-write leaves it
        f.truncate(max(os.path.getsize(path) // 2, 1))
    os.kill(os.getpid(), signal.SIGKILL)

if target == "keras":
    save = keras.Model.save
    def patched(self, filepath, *args, **kwargs):
        save(self, filepath, *args, **kwargs)
        if str(filepath).endswith("last.tmp.keras"):
            calls.append(filepath)
            if len(calls) == call:
                half_then_die(str(filepath))
    keras.Model.save = patched
elif target == "saved_model":
    # ExportArchive() makes an instance of a backend class: patch that one.
    archive_class = type(keras.export.ExportArchive())
    write_out = archive_class.write_out
    def patched(self, filepath, *args, **kwargs):
        write_out(self, filepath, *args, **kwargs)
        half_then_die(os.path.join(filepath, "saved_model.pb"))
    archive_class.write_out = patched
elif target == "tflite":
    import tensorflow as tf
    from_saved_model = tf.lite.TFLiteConverter.from_saved_model
    def patched(*args, **kwargs):
        converter = from_saved_model(*args, **kwargs)  # an instance of another class
        convert = converter.convert
        def convert_then_die():
            convert()  # the conversion is done, the file not yet written
            os.kill(os.getpid(), signal.SIGKILL)
        converter.convert = convert_then_die
        return converter
    tf.lite.TFLiteConverter.from_saved_model = patched
from hybridnet_tf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, kill=None, call=1):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "hybridnet_tf.cli", *args]
    if kill:
        env.update(KILL_WRITING=kill, KILL_AT_CALL=str(call))
        command = [sys.executable, "-c", KILLER, *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def train_args(run_dir, demo_dir, epochs):
    return tiny_demo_train(run_dir, demo_dir, *JOINT_FIT_ONLY, f"train.epochs={epochs}")


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def tree_bytes(folder):
    return {os.path.relpath(os.path.join(r, n), folder): file_bytes(os.path.join(r, n))
            for r, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_dir, demo_dir = str(root / "run"), str(root / "demo")
    assert main(train_args(run_dir, demo_dir, 1)) == 0
    return run_dir, demo_dir


@pytest.mark.slow  # two training processes
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_the_rerun_completes(tmp_path):
    run_dir, demo_dir = str(tmp_path / "run"), str(tmp_path / "demo")
    # Killed halfway through writing epoch 2's last.keras.
    killed = run_cli(train_args(run_dir, demo_dir, 3), kill="keras", call=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = os.path.join(run_dir, "last.keras")
    epoch_one = file_bytes(last)
    load_run_model(run_dir, "last.keras")  # whole and loadable: epoch 1's file
    assert not os.path.exists(os.path.join(run_dir, COMPLETE_FILE))

    done = run_cli(train_args(run_dir, demo_dir, 3))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(os.path.join(run_dir, COMPLETE_FILE)))["epochs"] == 3
    assert len(json.load(open(os.path.join(run_dir, "history.json")))["loss"]) == 3
    assert file_bytes(last) != epoch_one
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]


@pytest.mark.slow  # export processes
@pytest.mark.parametrize("format", ["saved_model", "tflite"])
def test_sigkill_during_export_keeps_the_previous_export_and_the_rerun_completes(finished, tmp_path, format):
    run_dir, _ = finished
    out = str(tmp_path / ("hybridnet/1" if format == "saved_model" else "hybridnet.tflite"))
    args = ["export", "--run-dir", run_dir, "--format", format, "--out", out]
    assert run_cli(args).returncode == 0
    before = tree_bytes(out) if format == "saved_model" else file_bytes(out)

    killed = run_cli([*args, "--overwrite"], kill=format)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    after = tree_bytes(out) if format == "saved_model" else file_bytes(out)
    assert after == before  # the previous export, whole
    if format == "saved_model":
        tf.saved_model.load(out)

    again = run_cli([*args, "--overwrite"])
    assert again.returncode == 0, again.stderr[-2000:]
    from hybridnet_tf.export.artifacts import load_predictor

    images = np.zeros((1, 32, 32, 3), np.float32)
    assert load_predictor(out)(images)["scores"].shape[0] == 1


def test_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_the_last_good_one_stays(
        finished, tmp_path, monkeypatch, capsys):
    source, demo_dir = finished
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    good = {name: file_bytes(os.path.join(run_dir, name)) for name in ("best.keras", "last.keras")}
    save = keras.Model.save

    def disk_full(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 partial")  # what was written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", disk_full)
    capsys.readouterr()
    assert main(train_args(run_dir, demo_dir, 2)) == 3  # continue by one epoch: its checkpoint fails
    err = capsys.readouterr().err
    assert f"could not write {os.path.join(run_dir, 'last.keras')}: No space left on device" in err
    assert "the previous last.keras is intact" in err and "run the same command again" in err
    for name, content in good.items():
        assert file_bytes(os.path.join(run_dir, name)) == content
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]

    monkeypatch.setattr(keras.Model, "save", save)  # space freed: the same command completes
    assert main(train_args(run_dir, demo_dir, 2)) == 0
    assert json.load(open(os.path.join(run_dir, COMPLETE_FILE)))["epochs"] == 2


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("best.keras", b"PK\x03\x04 not a whole zip", "--checkpoint last.keras"),
        ("vocabulary.json", b'{"names": ["a", ', "restore it from a copy of the run"),
        ("thresholds.json", b"[1, 2", "delete it to use eval.threshold"),
    ],
)
def test_a_broken_run_file_is_named_with_what_to_do(finished, tmp_path, capsys, name, content, expected):
    source, demo_dir = finished
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    with open(os.path.join(run_dir, name), "wb") as f:
        f.write(content)
    image = os.path.join(demo_dir, "val", sorted(os.listdir(os.path.join(demo_dir, "val")))[0])
    for command in (["evaluate", "--run-dir", run_dir],
                    ["predict", "--run-dir", run_dir, image],
                    ["export", "--run-dir", run_dir, "--out", str(tmp_path / "export")]):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {os.path.join(run_dir, name)} is broken ("), err
        assert expected in err[0], err[0]
