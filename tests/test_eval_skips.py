"""Evaluation says which images it could not score (--strict fails), accepts what TF decodes, marks in-sample numbers."""

import json
import os

import pytest
from PIL import Image

from tiny_demo import tiny_demo_train

from hybridnet_tf.cli import main

SETTINGS = [
    "data.test_fraction=0.25",
    "train.epochs=1", "train.warm_start_epochs=1", "train.frozen_steps=0",  # short phases: this file tests evaluation
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalskips")
    run_dir, demo_dir = str(root / "run"), str(root / "demo")
    assert main(tiny_demo_train(run_dir, demo_dir, *SETTINGS)) == 0
    return run_dir, demo_dir


def val_files(demo_dir):
    folder = os.path.join(demo_dir, "val")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))]


def metrics_of(run_dir):
    with open(os.path.join(run_dir, "eval", "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def test_unscored_images_are_counted_named_and_strict_fails(run, capsys):
    run_dir, demo_dir = run
    files = val_files(demo_dir)
    assert main(["evaluate", "--run-dir", run_dir, "--split", "val"]) == 0
    clean = metrics_of(run_dir)
    assert clean["unscored"] == {"count": 0, "images": []} and clean["num_images"] == 16

    long_tail, garbage, empty = files[0], files[1], files[2]
    with open(long_tail, "ab") as f:
        f.write(b"\0" * 300)  # TF decodes it: must be scored
    with open(garbage, "wb") as f:  # looks whole (FFD8FF ... FFD9) but does not decode
        f.write(b"\xff\xd8\xff\xe0" + b"garbage!" * 40 + b"\xff\xd9")
    open(empty, "wb").close()
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", run_dir, "--split", "val"]) == 0
    assert "2 image(s) could not be scored" in capsys.readouterr().err
    metrics = metrics_of(run_dir)
    assert metrics["num_images"] == 14
    unscored = {item["path"]: item["reason"] for item in metrics["unscored"]["images"]}
    assert metrics["unscored"]["count"] == 2
    assert unscored == {garbage: "TensorFlow could not decode it", empty: "empty file (0 bytes)"}
    report = open(os.path.join(run_dir, "eval", "report.md"), encoding="utf-8").read()
    assert "**2 image(s) could not be scored**" in report and os.path.basename(garbage) in report

    assert main(["evaluate", "--run-dir", run_dir, "--split", "val", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "2 of 16 images of the val split could not be scored (--strict)" in err
    assert garbage in err and empty in err


def test_val_numbers_are_marked_in_sample_and_test_is_not(run, capsys):
    run_dir, _ = run
    assert main(["evaluate", "--run-dir", run_dir, "--split", "test"]) == 0
    test = metrics_of(run_dir)
    assert test["split"] == "test" and test["in_sample"] == {}
    assert test["num_images"] == 16  # a quarter of the 64 demo train images, never trained on
    assert "In-sample" not in open(os.path.join(run_dir, "eval", "report.md"), encoding="utf-8").read()

    assert main(["evaluate", "--run-dir", run_dir, "--split", "val"]) == 0
    val = metrics_of(run_dir)
    assert set(val["in_sample"]) == {"model_selection", "tuned_thresholds"}
    report = open(os.path.join(run_dir, "eval", "report.md"), encoding="utf-8").read()
    assert "**In-sample on val:**" in report and "evaluate --split test" in report
    assert "(tuned on val: in-sample here)" in capsys.readouterr().out


def test_predict_reads_webp_and_prints_plain_errors(run, tmp_path, capsys):
    run_dir, demo_dir = run
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(val_files(demo_dir)[3]).save(folder / "photo.webp", format="WEBP")
    (folder / "broken.png").write_bytes(b"not an image at all")
    capsys.readouterr()
    assert main(["predict", "--run-dir", run_dir, str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"{folder / 'photo.webp'}: " in captured.out  # listed and predicted
    (error_line,) = [line for line in captured.err.splitlines() if "broken.png" in line]
    assert "function_node" not in error_line and "[Op:" not in error_line
    assert error_line.endswith("ERROR Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required.")
