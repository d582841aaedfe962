"""The command line end to end on a tiny demo set: train, evaluate, predict, errors."""

import contextlib
import glob
import io
import json
import os
import re

import pytest

from tiny_demo import tiny_demo_train

from hybridnet_tf.cli import main

PHASES = [
    "train.epochs=2",
    # The demo's warm start and frozen phase are the phases' own tests' concern; three warm-start
    # epochs (not 1: Keras prints no "Epoch 1/1"; not 2: the count below tells the phases apart)
    # and one pass per frozen epoch keep the CLI's paths in less time.
    "train.warm_start_epochs=3",
    "train.frozen_steps=0",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_dir = str(root / "run")
    demo_dir = str(root / "demo")
    log = io.StringIO()  # stdout as in a log file: not a terminal
    with contextlib.redirect_stdout(log):
        code = main(tiny_demo_train(run_dir, demo_dir, *PHASES, train=96, val=32, gru_units=32, embedding_dim=16))
    assert code == 0
    (root / "train_stdout.log").write_text(log.getvalue())
    return run_dir, demo_dir


def test_train_writes_run_dir(trained_run):
    run_dir, _ = trained_run
    for name in ("config.yaml", "vocabulary.json", "best.keras", "last.keras",
                 "history.json", "thresholds.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    history = json.load(open(os.path.join(run_dir, "history.json")))
    assert len(history["loss"]) == 2
    assert len(history["val_mAP"]) == 2
    vocabulary = json.load(open(os.path.join(run_dir, "vocabulary.json")))
    assert len(vocabulary["names"]) == 14


def test_train_logs_a_line_per_epoch_when_stdout_is_not_a_terminal(trained_run):
    # Keras' "auto" redraws a live bar with backspaces in any POSIX process; in a log
    # file that is most of the bytes. Not a terminal: one progress line per epoch.
    run_dir, _ = trained_run
    with open(os.path.join(os.path.dirname(run_dir), "train_stdout.log")) as f:
        log = f.read()
    assert "\b" not in log
    assert len(re.findall(r"^Epoch \d+/2$", log, re.M)) == 2  # after the demo's BCE warm start
    epochs = len(re.findall(r"^Epoch \d+/\d+$", log, re.M))
    assert len(re.findall(r"^\d+/\d+ - \d+s - .*loss: ", log, re.M)) == epochs, log[-2000:]
    assert "\n\n" not in log  # no blank line left where a live bar would have been


def test_tensorboard_holds_val_metrics(trained_run):
    import tensorflow as tf

    run_dir, _ = trained_run
    # Keras' TensorBoard callback writes val_* logs to logs/validation without the prefix.
    events = glob.glob(os.path.join(run_dir, "logs", "validation", "events.out.tfevents.*"))
    assert events
    steps = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps.setdefault(value.tag, set()).add(event.step)
    for tag in ("epoch_mAP", "epoch_OF1", "epoch_CF1", "epoch_decoded_OF1", "epoch_decoded_exact"):
        assert steps.get(tag) == {0, 1}, (tag, sorted(steps))


def test_evaluate_writes_metrics_and_report(trained_run, capsys):
    run_dir, _ = trained_run
    assert main(["evaluate", "--run-dir", run_dir]) == 0
    assert "mAP" in capsys.readouterr().out
    metrics = json.load(open(os.path.join(run_dir, "eval", "metrics.json")))
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "top3", "per_class",
                "num_images", "num_classes_counted", "decoded_set", "tuned_thresholds"):
        assert key in metrics, key
    assert metrics["num_images"] == 32
    assert metrics["split"] == "val"
    assert 0.0 <= metrics["mAP"] <= 1.0
    for name in ("report.md", "per_class_ap.png", "pr_curves.png", "cooccurrence.png"):
        assert os.path.getsize(os.path.join(run_dir, "eval", name)) > 1000, name


def test_predict_reports_bad_files_and_predicts_the_rest(trained_run, tmp_path, capsys):
    run_dir, demo_dir = trained_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = os.path.join(demo_dir, "val", "000001.jpg")
    out_json = tmp_path / "out.json"
    code = main(["predict", "--run-dir", run_dir, good, str(bad), "--json", str(out_json)])
    assert code == 1
    captured = capsys.readouterr()
    assert good in captured.out
    assert "broken.jpg: ERROR" in captured.err
    results = json.load(open(out_json))
    assert [("error" in r) for r in results] == [False, True]


def test_config_error_exits_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epoks: 3\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.epoks" in err and str(config) in err
    assert not os.path.exists(tmp_path / "r" / "best.keras")


def test_evaluate_printout_puts_the_returned_label_sets_first_and_marks_in_sample_thresholds():
    from hybridnet_tf.cli import _format_metrics

    row = {"CP": 0.1, "CR": 0.2, "CF1": 0.3, "OP": 0.4, "OR": 0.5, "OF1": 0.6, "exact": 0.05}
    metrics = {
        "mAP": 0.5, "num_images": 10, "num_classes_counted": 3, "threshold": 0.5, "split": "val", **row,
        "decoded_set": {**row, "OF1": 0.9, "exact": 0.25}, "tuned_thresholds": {**row, "OF1": 0.7},
    }
    lines = _format_metrics(metrics).splitlines()
    assert lines[0].startswith("mAP 50.00")
    assert lines[1].startswith("label sets the model returns:") and lines[1].endswith("OF1 90.00  exact 25.00")
    assert lines[2].startswith("scores >= 0.5:") and lines[2].endswith("OF1 60.00  exact 5.00")
    assert lines[3].startswith("scores >= tuned thresholds (tuned on val: in-sample here):")
    assert "in-sample" not in _format_metrics({**metrics, "split": "train"})
