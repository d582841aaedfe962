"""The attention decoder and a two-decoder ensemble export like the pooled decoder: SavedModel and
builtins-only TFLite, with parity."""

import numpy as np
import pytest

from hybridnet_tf.export.artifacts import load_predictor
from hybridnet_tf.export.saved_model import export_saved_model
from hybridnet_tf.export.tflite import export_tflite
from hybridnet_tf.model.hybridnet import build_model

SIZE = 32


# The decoders under test besides test_export's one pooled decoder.
DECODERS = {
    "attention": dict(decoder="attention", attention_gate=True),
    "two_decoders": dict(decoder="pooled", decoders=2),
}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def attention_model(tmp_path_factory, request):
    """A hybrid model with `DECODERS[param]`, fitted for 40 steps on 32x32 demo scenes (as test_export's).

    Random weights decode the same set for every image; a short fit makes
    the decoded sets differ, so label parity means something.
    """
    import keras
    import tensorflow as tf

    from hybridnet_tf.config import load_config
    from hybridnet_tf.data.load_splits import load_splits
    from hybridnet_tf.data.pipeline import decode_and_resize, make_dataset
    from hybridnet_tf.model.hybridnet import build_training_model, training_loss, with_training_targets

    root = tmp_path_factory.mktemp("attention_export")
    config = load_config(None, ["data.demo_train=96", "data.demo_val=32", f"data.demo_image_size={SIZE}",
                                f"data.demo_dir={root / 'demo'}"])
    splits = load_splits(config["data"])
    vocabulary = splits.vocabulary
    keras.utils.set_random_seed(0)
    model = build_model(len(vocabulary), head="hybrid", **DECODERS[request.param],
                        image_size=SIZE, gru_units=32, embedding_dim=16, attention_units=16, dropout=0.0,
                        beam_width=2)
    for layer in model.get_layer("image_encoder").get_layer("backbone").get_layer("small_cnn").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5  # the moving statistics follow the 40 steps (see test_export)
    training_model = build_training_model(model)
    training_model.compile(keras.optimizers.Adam(1e-2), training_loss(model))
    batches = make_dataset(splits.train.to_dataset(), SIZE, 32, cache=True)
    targets = with_training_targets(batches, model, vocabulary.label_rank("freq2rare"))
    training_model.fit(targets.repeat(), steps_per_epoch=40, epochs=1, verbose=0)
    images = np.stack([decode_and_resize(tf.io.read_file(p), SIZE).numpy() for p in splits.val.paths[:16]])
    outputs = {k: v.numpy() for k, v in model(images, training=False).items()}
    return {"model": model, "images": images, "outputs": outputs, "root": root, "vocabulary": vocabulary}


def test_fixture_decodes_varied_label_sets(attention_model):
    label_sets = {tuple(sorted(i for i in row if i >= 0)) for row in attention_model["outputs"]["label_ids"]}
    assert len(label_sets) >= 3


def test_attention_saved_model_matches_keras(attention_model):
    import tensorflow as tf

    path = attention_model["root"] / "serving" / "1"
    export_saved_model(attention_model["model"], attention_model["vocabulary"], path, SIZE)
    loaded = tf.saved_model.load(str(path))
    outputs = loaded.signatures["predict_images"](image=tf.constant(attention_model["images"]))
    expected = attention_model["outputs"]
    assert np.abs(outputs["scores"].numpy() - expected["scores"]).max() < 1e-4
    np.testing.assert_array_equal(outputs["label_ids"].numpy(), expected["label_ids"])
    assert "attention" not in outputs  # the serving signatures leave the maps out


@pytest.mark.parametrize("quantize", ["none", "float16", pytest.param("dynamic", marks=pytest.mark.slow),
                                      pytest.param("int8", marks=pytest.mark.slow)])
def test_attention_tflite_is_builtins_only_and_matches(attention_model, quantize):
    path = attention_model["root"] / f"attention_{quantize}.tflite"
    export_tflite(attention_model["model"], path, quantize=quantize,
                  representative_images=attention_model["images"], vocabulary=attention_model["vocabulary"])
    predictor = load_predictor(path, num_threads=2)
    outputs = predictor(attention_model["images"])
    expected = attention_model["outputs"]
    assert not [op for op in predictor.op_names() if op.startswith("Flex") or op == "CUSTOM"]
    error = np.abs(outputs["scores"] - expected["scores"])
    if quantize == "none":
        assert error.max() < 1e-4
        np.testing.assert_array_equal(outputs["label_ids"], expected["label_ids"])
    elif quantize == "float16":
        assert error.max() < 1e-2
    else:  # quantised backbone, float decoder: close, and decoded sets stay legal
        assert error.mean() < 0.05
        for row in outputs["label_ids"]:
            chosen = row[row >= 0]
            assert len(set(chosen.tolist())) == len(chosen) and np.all(row[len(chosen):] == -1)
