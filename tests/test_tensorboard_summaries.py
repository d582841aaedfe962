"""TensorBoard: per-label PR curves, val images with predictions and hparams, read back from the event files."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.pr_curve import plugin_data_pb2 as pr_plugin_data

from tiny_demo import tiny_demo_train

from hybridnet_tf.training.tensorboard_summaries import (
    PR_THRESHOLDS,
    flat_hparams,
    write_hparams,
    write_pr_curves,
)

# Everything kept: the accumulator samples tensors and images by default.
EVERYTHING = {"tensors": 0, "images": 0}


def _accumulator(folder):
    accumulator = EventAccumulator(str(folder), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def test_flat_hparams_keeps_tensorboard_types():
    flat = flat_hparams({"model": {"backbone": "small_cnn", "weights": None, "dropout": 0.1},
                         "train": {"epochs": 3, "use_ema": False, "tpu": None}})
    assert flat == {"model.backbone": "small_cnn", "model.weights": "none", "model.dropout": 0.1,
                    "train.epochs": 3, "train.use_ema": False, "train.tpu": "none"}


def test_pr_curves_are_the_plugins_with_one_per_label_with_positives(tmp_path):
    y_true = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.3, 0.2], [0.1, 0.7, 0.3], [0.2, 0.6, 0.1]], np.float32)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        written = write_pr_curves(y_true, scores, ["cat", "dog", "none"], step=3)
    writer.close()
    assert written == ["cat", "dog"]  # "none" has no positive: no curve
    accumulator = _accumulator(tmp_path)
    assert sorted(accumulator.Tags()["tensors"]) == ["pr/cat/pr_curves", "pr/dog/pr_curves"]
    (event,) = accumulator.Tensors("pr/cat/pr_curves")
    assert event.step == 3
    data = tf.make_ndarray(event.tensor_proto)
    # Rows: TP, FP, TN, FN, precision, recall; one column per threshold.
    assert data.shape == (6, PR_THRESHOLDS)
    middle = PR_THRESHOLDS // 2  # threshold 0.5: cat is predicted exactly on its 2 images
    np.testing.assert_allclose(data[:, middle], [2, 0, 2, 0, 1.0, 1.0])
    content = accumulator.SummaryMetadata("pr/cat/pr_curves").plugin_data
    assert content.plugin_name == "pr_curves"
    assert pr_plugin_data.PrCurvePluginData.FromString(content.content).num_thresholds == PR_THRESHOLDS


def test_hparams_are_the_plugins_session_and_experiment(tmp_path):
    write_hparams(str(tmp_path), {"train.learning_rate": 0.003, "model.backbone": "small_cnn"},
                  trial_id="run_a")
    accumulator = _accumulator(tmp_path)
    content = accumulator.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = session.session_start_info.hparams
    assert values["train.learning_rate"].number_value == pytest.approx(0.003)
    assert values["model.backbone"].string_value == "small_cnn"
    assert session.session_start_info.group_name == "run_a"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert ("validation", "epoch_mAP") in metrics
    assert ("validation", "epoch_decoded_exact") in metrics


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from hybridnet_tf.cli import main

    root = tmp_path_factory.mktemp("tensorboard")
    run_dir = root / "run"
    code = main(tiny_demo_train(
        run_dir, root / "demo", "train.epochs=2", "train.tensorboard_images_every=1", "train.tensorboard_images=3",
        "train.warm_start_epochs=1", "train.frozen_steps=0",  # short phases: this file tests the logs
        val=24,
    ))
    assert code == 0
    return run_dir


@pytest.mark.slow
def test_training_writes_pr_curves_val_images_and_hparams(trained_run):
    import json

    logs = trained_run / "logs"
    names = json.load(open(trained_run / "vocabulary.json"))["names"]
    predictions = _accumulator(logs / "val_predictions")
    tags = predictions.Tags()
    pr_tags = [t for t in tags["tensors"] if t.startswith("pr/")]
    # One curve per label with a val positive (24 demo images hold most of the 14 labels).
    assert len(pr_tags) >= len(names) // 2
    assert set(pr_tags) <= {f"pr/{name}/pr_curves" for name in names}
    for tag in pr_tags:
        events = predictions.Tensors(tag)
        assert [e.step for e in events] == [0, 1]
        assert tf.make_ndarray(events[0].tensor_proto).shape == (6, PR_THRESHOLDS)
    # Every epoch (tensorboard_images_every=1): 3 val images. TF2's tf.summary.image
    # stores [width, height, PNG] as a tensor of the "images" plugin.
    image_tags = sorted(t for t in tags["tensors"] if t.startswith("val_examples/"))
    assert image_tags == ["val_examples/000", "val_examples/001", "val_examples/002"]
    assert predictions.SummaryMetadata(image_tags[0]).plugin_data.plugin_name == "images"
    first, second = predictions.Tensors("val_examples/000")
    assert (first.step, second.step) == (0, 1)
    width, height, png = tf.make_ndarray(first.tensor_proto)
    image = tf.io.decode_png(png)
    assert image.shape[:2] == (int(height), int(width))
    assert int(width) >= 150 and int(height) >= 150  # the image panel at least, titled
    assert float(tf.math.reduce_std(tf.cast(image, tf.float32))) > 10  # a drawing, not a blank

    root = _accumulator(logs)
    content = root.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == pytest.approx(0.003)  # configs/demo.yaml
    assert hparams["model.backbone"].string_value == "small_cnn"
    assert hparams["train.tensorboard_images_every"].number_value == 1
    # Keras' own scalars stay in their folders, one event file writer each.
    assert glob.glob(os.path.join(logs, "validation", "events.out.tfevents.*"))


def test_a_failing_image_summary_turns_images_off_but_keeps_training_and_pr_curves(tmp_path, monkeypatch, caplog):
    from hybridnet_tf.model.hybridnet import build_model
    from hybridnet_tf.training.tensorboard_summaries import TensorBoardSummaries

    model = build_model(2, image_size=32, head="bce")
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    labels = np.array([[1, 0], [0, 1]] * 3, np.float32)
    val = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    callback = TensorBoardSummaries(model, val, ["a", "b"], str(tmp_path), images_every=1)
    callback.set_model(model)

    def fail(self, step):
        raise ValueError("no spatial map")

    monkeypatch.setattr(TensorBoardSummaries, "_write_examples", fail)
    callback.on_train_begin()
    callback.on_epoch_end(0)  # no exception: training goes on
    callback.on_epoch_end(1)
    callback.on_train_end()
    assert callback.images_every == 0
    assert "TensorBoard val images turned off: no spatial map" in caplog.text
    accumulator = _accumulator(tmp_path / "val_predictions")
    assert [e.step for e in accumulator.Tensors("pr/a/pr_curves")] == [0, 1]
