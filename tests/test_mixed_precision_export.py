"""A model trained under mixed_float16 exports as float32 (SavedModel and TFLite) with the same outputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.export.artifacts import load_predictor
from hybridnet_tf.export.precision import float32_model, uses_mixed_precision
from hybridnet_tf.export.saved_model import PREDICT_IMAGES, export_saved_model
from hybridnet_tf.export.tflite import export_tflite
from hybridnet_tf.model.hybridnet import build_model, with_training_targets
from hybridnet_tf.training.compute import dtype_policy
from hybridnet_tf.training.settings import Optimization
from hybridnet_tf.training.trainer import compile_training_model

LABELS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    """Trained one step under mixed_float16 on CPU, saved and loaded back as best.keras would be."""
    keras.utils.set_random_seed(0)
    with dtype_policy("mixed_float16"):
        model = build_model(4, image_size=32, max_length=4, embedding_dim=8, gru_units=16, dropout=0.0)
        training_model = compile_training_model(model, total_steps=1, optimization=Optimization(learning_rate=1e-2))
    assert isinstance(training_model.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = (rng.uniform(size=(8, 4)) < 0.5).astype("float32")
    batches = with_training_targets(tf.data.Dataset.from_tensor_slices((images, labels)).batch(8),
                                    model, [0, 1, 2, 3])
    before = [w.copy() for w in model.get_weights()]
    training_model.fit(batches, epochs=1, shuffle=False, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    path = str(tmp_path_factory.mktemp("mixed") / "best.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    return loaded, images, tmp_path_factory.mktemp("exports")


def test_the_saved_model_keeps_float16_layers_and_the_rebuild_has_none(mixed_model):
    model, images, _ = mixed_model
    assert uses_mixed_precision(model)
    rebuilt = float32_model(model)
    assert not uses_mixed_precision(rebuilt)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), rebuilt.get_weights()))
    ours, theirs = rebuilt(images, training=False), model(images, training=False)
    assert ours["scores"].dtype == tf.float32
    np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=2e-2)  # float16 rounding only
    assert float32_model(rebuilt) is rebuilt  # a float32 model is exported as it is


def test_saved_model_and_tflite_of_a_mixed_model_match_its_float32_rebuild(mixed_model):
    model, images, out = mixed_model
    expected = {k: v.numpy() for k, v in float32_model(model)(images, training=False).items()}
    saved_path = out / "saved" / "1"
    export_saved_model(model, LABELS, saved_path, 32)
    loaded = tf.saved_model.load(str(saved_path))
    served = loaded.signatures[PREDICT_IMAGES](image=tf.constant(images))
    np.testing.assert_allclose(served["scores"].numpy(), expected["scores"], atol=1e-5)
    np.testing.assert_array_equal(served["label_ids"].numpy(), expected["label_ids"])

    tflite_path = out / "model.tflite"
    export_tflite(model, tflite_path, vocabulary=LABELS)
    predictor = load_predictor(tflite_path, num_threads=1)
    assert not [name for name in predictor.op_names() if "FLEX" in name.upper()]
    lite = predictor(images)
    np.testing.assert_allclose(lite["scores"], expected["scores"], atol=1e-4)
    np.testing.assert_array_equal(lite["label_ids"], expected["label_ids"])
    tensor_types = {t["dtype"] for t in predictor.interpreter.get_tensor_details()}
    assert np.float16 not in tensor_types
