"""One validation pass per epoch: val_loss computed with the metrics, the step traced once."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.hybridnet import build_model, with_training_targets
from hybridnet_tf.training.callbacks import ValidationMetrics
from hybridnet_tf.training.settings import Checkpointing
from hybridnet_tf.training.trainer import compile_training_model, train

LABEL_RANK = [0, 1, 2, 3]


def tiny_data(count=20, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(count, 32, 32, 3)).astype("float32")
    labels = (rng.uniform(size=(count, 4)) < 0.4).astype("float32")
    labels[labels.sum(axis=1) == 0, 0] = 1.0
    # 20 images in batches of 8: the last batch is smaller (a second shape).
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


@pytest.mark.parametrize("head", ["hybrid", "bce", "hybrid_rnn"])
def test_one_pass_gives_fits_val_loss_and_the_models_scores(head):
    model = build_model(4, image_size=32, max_length=4, embedding_dim=8, gru_units=16, head=head)
    training_model = compile_training_model(model, total_steps=10)
    data = tiny_data()
    expected_loss = training_model.evaluate(with_training_targets(data, model, LABEL_RANK), verbose=0)
    expected_loss = expected_loss[0] if isinstance(expected_loss, list) else expected_loss
    metrics = ValidationMetrics(model, data, label_rank=LABEL_RANK)
    metrics.set_model(training_model)
    logs = {}
    metrics.on_epoch_end(0, logs)
    assert logs["val_loss"] == pytest.approx(expected_loss, rel=1e-5)

    # The same scores as the inference model, so the same mAP as before.
    from hybridnet_tf.evaluation.metrics import mean_average_precision
    from hybridnet_tf.evaluation.predictions import collect_predictions

    y_true, scores, _ = collect_predictions(model, data)
    assert logs["val_mAP"] == pytest.approx(float(mean_average_precision(y_true, scores)[0]), abs=1e-6)
    metrics.on_epoch_end(1, {})
    assert metrics.trace_count() == 1


def test_train_reads_val_once_per_epoch_and_logs_val_loss(tmp_path):
    model = build_model(4, image_size=32, max_length=4, embedding_dim=8, gru_units=16)
    reads = []

    def count(images, labels):
        tf.py_function(lambda: reads.append(1) or 0, [], tf.int32)
        return images, labels

    val = tiny_data(seed=1).unbatch().map(count).batch(8)
    at_epoch_start = []
    mark = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: at_epoch_start.append(len(reads)))
    history = train(model, tiny_data(), val, LABEL_RANK, str(tmp_path), steps_per_epoch=2, epochs=3,
                    checkpointing=Checkpointing(verbose=0), extra_callbacks=[mark])
    # Each val image once in the second epoch: fit's own pass used to add 20 more.
    # (The first epoch also reads a few for TensorBoard's example images.)
    assert at_epoch_start[2] - at_epoch_start[1] == 20
    assert len(history.history["val_loss"]) == 3
    assert all(np.isfinite(history.history["val_loss"]))
