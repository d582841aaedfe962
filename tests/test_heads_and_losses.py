"""Heads (hybrid_rnn, bce, hybrid) and their losses: formulas, saving, XLA fits, export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.hybridnet import (
    LABEL_DECODER,
    SIGMOID_HEAD,
    build_model,
    build_training_model,
    model_head,
    training_loss,
    with_training_targets,
)
from hybridnet_tf.model.label_sequences import aligned_label_sequence, predicted_label_alignment, ranked_labels
from hybridnet_tf.model.losses import AsymmetricLoss, OrderlessSequenceLoss, sigmoid_loss
from hybridnet_tf.model.sigmoid_head import ScoresToLabels

NUM_LABELS = 4
SIZE = 32
# (head, build_model arguments): every head, each ordering family and both decoders.
VARIANTS = {
    "hybrid_rnn": ("hybrid_rnn", dict(label_order="freq2rare")),
    "hybrid_rnn_orderless_beam": ("hybrid_rnn", dict(label_order="orderless", beam_width=3)),
    "bce_asl": ("bce", dict(sigmoid_loss="asl")),
    "hybrid_random_beam": ("hybrid", dict(label_order="random", beam_width=2, score_mix=0.3)),
    "hybrid_attention_beam": ("hybrid", dict(decoder="attention", attention_gate=True, beam_width=2)),
    "hybrid_rnn_attention_orderless": ("hybrid_rnn", dict(decoder="attention", label_order="orderless")),
}


def _model(name, **extra):
    head, kwargs = VARIANTS[name]
    return build_model(NUM_LABELS, image_size=SIZE, head=head, max_length=3, embedding_dim=8,
                       gru_units=16, **kwargs, **extra)


def _images(count=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def _numpy_asl(y, logits, gamma_neg, gamma_pos, clip):
    p = 1.0 / (1.0 + np.exp(-logits))
    p_m = np.maximum(p - clip, 0.0)
    positive = y * (1 - p) ** gamma_pos * np.log(p)
    negative = (1 - y) * p_m**gamma_neg * np.log(1 - p_m)
    return np.mean(-(positive + negative).sum(axis=-1))


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(4, 0, 0.05), (2, 1, 0.1), (3, 0.5, 0.0)])
def test_asl_matches_the_formula(gamma_neg, gamma_pos, clip):
    rng = np.random.default_rng(0)
    y = (rng.random((6, 5)) < 0.4).astype(np.float32)
    logits = rng.normal(0, 2.5, (6, 5)).astype(np.float32)
    loss = AsymmetricLoss(gamma_neg, gamma_pos, clip)(y, logits)
    np.testing.assert_allclose(float(loss), _numpy_asl(y, logits.astype(np.float64), gamma_neg, gamma_pos, clip),
                               rtol=1e-5)
    # Weighted, it scales; its gradient stays finite at extreme logits.
    weighted = AsymmetricLoss(gamma_neg, gamma_pos, clip, weight=0.3)(y, logits)
    np.testing.assert_allclose(float(weighted), 0.3 * float(loss), rtol=1e-6)
    extreme = tf.constant([[40.0, -40.0, 0.0, 1e-3, -1e-3]])
    with tf.GradientTape() as tape:
        tape.watch(extreme)
        value = AsymmetricLoss(gamma_neg, gamma_pos, clip)(y[:1], extreme)
    assert np.all(np.isfinite(tape.gradient(value, extreme).numpy()))


def test_asl_without_focusing_or_clip_is_binary_cross_entropy_summed_over_labels():
    rng = np.random.default_rng(1)
    y = (rng.random((8, 6)) < 0.3).astype(np.float32)
    logits = rng.normal(0, 3, (8, 6)).astype(np.float32)
    # Summed over the 6 labels (the ASL paper's reduction), averaged over images.
    expected = 6 * keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    np.testing.assert_allclose(float(AsymmetricLoss(0, 0, 0)(y, logits)), float(expected), rtol=1e-5)
    np.testing.assert_allclose(float(sigmoid_loss("bce")(y, logits)), float(expected), rtol=1e-5)
    assert float(sigmoid_loss("asl")(y, logits)) < float(expected)  # easy negatives down-weighted
    with pytest.raises(ValueError, match="unknown sigmoid loss"):
        sigmoid_loss("focal")


def test_orderless_loss_is_cross_entropy_on_aligned_targets():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (3, 4, NUM_LABELS + 1)).astype(np.float32)
    multi_hot = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    ranked = ranked_labels(multi_hot, [3, 2, 1, 0])
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    paper = cross_entropy(predicted_label_alignment(ranked, logits), logits)
    np.testing.assert_allclose(float(OrderlessSequenceLoss()(ranked, logits)), float(paper), rtol=1e-6)
    old = cross_entropy(aligned_label_sequence(ranked, logits.argmax(-1), 4), logits)
    np.testing.assert_allclose(float(OrderlessSequenceLoss("sorted")(ranked, logits)), float(old), rtol=1e-6)


def test_scores_to_labels_lists_scores_from_half_in_descending_order():
    scores = tf.constant([[0.2, 0.9, 0.5, 0.7], [0.1, 0.2, 0.3, 0.4], [0.6, 0.6, 0.6, 0.6]])
    out = ScoresToLabels(max_length=6)(scores)
    assert out["label_ids"].numpy().tolist() == [
        [1, 3, 2, -1, -1, -1], [-1] * 6, [0, 1, 2, 3, -1, -1]
    ]
    assert out["num_labels"].numpy().tolist() == [3, 0, 4]
    assert ScoresToLabels(max_length=2)(scores)["label_ids"].numpy().tolist()[0] == [1, 3]


def test_every_head_answers_in_the_same_format_and_mixes_scores():
    images = _images()
    for name in VARIANTS:
        model = _model(name)
        out = model(images)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "scores": ((4, NUM_LABELS), tf.float32),
            "label_ids": ((4, 3), tf.int32),
            "num_labels": ((4,), tf.int32),
        }
        assert model_head(model) == VARIANTS[name][0]
    hybrid = _model("hybrid_random_beam", sigmoid_fusion=1.0)
    features = hybrid.get_layer("image_encoder")(images)
    sigmoid = tf.sigmoid(hybrid.get_layer(SIGMOID_HEAD)(features))
    # With sigmoid_fusion the hybrid decodes with its sigmoid scores as a prior.
    decoded = hybrid.get_layer(LABEL_DECODER)(features, label_prior=sigmoid)
    np.testing.assert_allclose(hybrid(images)["scores"], 0.3 * sigmoid + 0.7 * decoded["scores"], atol=1e-6)
    np.testing.assert_array_equal(hybrid(images)["label_ids"], decoded["label_ids"])
    with pytest.raises(ValueError, match="unknown head"):
        build_model(NUM_LABELS, image_size=SIZE, head="softmax")


@pytest.mark.parametrize("decoder", ["pooled", "attention"])
def test_hybrid_decodes_no_label_its_sigmoid_head_rules_out(decoder, tmp_path):
    images = _images(count=16, seed=3)
    fused = build_model(NUM_LABELS, image_size=SIZE, head="hybrid", max_length=4, embedding_dim=8,
                        gru_units=16, decoder=decoder, sigmoid_fusion=1.0)
    # END made unlikely, so the plain decoder emits 3 labels per image, every label somewhere.
    label_decoder = fused.get_layer(LABEL_DECODER)
    bias = label_decoder.output_bias.numpy()
    bias[NUM_LABELS] = -20.0
    label_decoder.output_bias.assign(bias)
    plain = build_model(NUM_LABELS, image_size=SIZE, head="hybrid", max_length=4, embedding_dim=8,
                        gru_units=16, decoder=decoder)
    plain.set_weights(fused.get_weights())
    assert label_decoder.prior_weight == 1.0 and plain.get_layer(LABEL_DECODER).prior_weight == 0.0
    head = fused.get_layer(SIGMOID_HEAD)
    kernel, _ = head.get_weights()
    # A sigmoid head sure of every label (p ~ 1, log p ~ 0) leaves the decode as it was.
    head.set_weights([np.zeros_like(kernel), np.full(NUM_LABELS, 20.0, np.float32)])
    plain.set_weights(fused.get_weights())
    np.testing.assert_array_equal(fused(images)["label_ids"], plain(images)["label_ids"].numpy())
    # Now it says label 0 is absent (p ~ 1e-9) and the others present: the fused
    # decode drops label 0 and emits the other three; the plain one still emits it.
    head.set_weights([np.zeros_like(kernel), np.array([-20.0] + [20.0] * (NUM_LABELS - 1), np.float32)])
    plain.set_weights(fused.get_weights())
    fused_ids, plain_ids = fused(images)["label_ids"].numpy(), plain(images)["label_ids"].numpy()
    assert 0 in plain_ids and 0 not in fused_ids
    assert (fused(images)["num_labels"].numpy() == 3).all()  # 1, 2, 3 in some order: END stays unlikely
    # The prior's wiring (a tensor passed by keyword) survives a safe_mode round trip.
    path = str(tmp_path / "fused.keras")
    fused.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.get_layer(LABEL_DECODER).prior_weight == 1.0
    np.testing.assert_array_equal(loaded(images)["label_ids"], fused_ids)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_keras_round_trip_with_safe_mode(name, tmp_path):
    model = _model(name)
    images = _images()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for key, value in model(images).items():
        np.testing.assert_array_equal(loaded(images)[key].numpy(), value.numpy())
    # The training setup is rebuilt from the loaded file alone.
    assert model_head(loaded) == model_head(model)
    assert sorted(training_loss(loaded)) == sorted(training_loss(model))


@pytest.mark.parametrize(
    "name",
    ["bce_asl", "hybrid_random_beam", "hybrid_rnn", "hybrid_attention_beam",
     pytest.param("hybrid_rnn_attention_orderless", marks=pytest.mark.slow),
     # XLA takes ~20 s over the unrolled self-fed loop on 2 CPU cores.
     pytest.param("hybrid_rnn_orderless_beam", marks=pytest.mark.slow)],
)
def test_jit_compiled_fit_step_of_each_head(name):
    model = _model(name, aux_loss_weight=0.5)
    training_model = build_training_model(model)
    losses = training_loss(model)
    if "labels" in losses:
        assert losses["labels"].weight == (0.5 if VARIANTS[name][0] == "hybrid" else 1.0)
    training_model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses, jit_compile=True)
    labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], np.float32)
    dataset = tf.data.Dataset.from_tensors((_images(), labels))
    data = with_training_targets(dataset, model, np.arange(NUM_LABELS)[::-1], seed=0)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = training_model.fit(data.repeat(2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    moved = [not np.allclose(a, b.numpy()) for a, b in zip(before, model.trainable_weights)]
    assert all(moved), [w.path for w, m in zip(model.trainable_weights, moved) if not m]


@pytest.mark.slow
@pytest.mark.parametrize("sigmoid_fusion", [0.0, 1.0])
def test_beam_search_model_exports_to_savedmodel_and_builtins_only_tflite(tmp_path, sigmoid_fusion):
    from ai_edge_litert.interpreter import Interpreter

    model = build_model(5, image_size=SIZE, max_length=4, embedding_dim=8, gru_units=16,
                        beam_width=3, min_label_score=0.05, sigmoid_fusion=sigmoid_fusion)
    decoder = model.get_layer(LABEL_DECODER)
    rng = np.random.default_rng(0)
    # Peaked random decoder weights, so the decoded sets are not all empty.
    decoder.set_weights([rng.normal(0, 0.6, w.shape).astype(np.float32) for w in decoder.get_weights()])
    # END (token 5) gets a neutral embedding and a low bias, so labels are decoded.
    embeddings = decoder.label_embedding.embeddings.numpy()
    embeddings[5] = 0.0
    decoder.label_embedding.embeddings.assign(embeddings)
    decoder.output_bias.assign(np.array([1.0, 0.5, 0.0, -0.5, -1.0, -2.0], np.float32))
    images = _images(6, seed=1)
    expected = {k: v.numpy() for k, v in model(images).items()}
    assert expected["num_labels"].max() > 0

    export_dir = str(tmp_path / "saved_model")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    got = served.signatures["serving_default"](image=tf.constant(images))
    np.testing.assert_array_equal(got["label_ids"].numpy(), expected["label_ids"])
    np.testing.assert_allclose(got["scores"].numpy(), expected["scores"], atol=1e-5)

    converter = tf.lite.TFLiteConverter.from_saved_model(export_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = Interpreter(model_content=converter.convert())
    lite = interpreter.get_signature_runner("serving_default")(image=images)
    np.testing.assert_array_equal(lite["label_ids"], expected["label_ids"])
    np.testing.assert_array_equal(lite["num_labels"], expected["num_labels"])
    np.testing.assert_allclose(lite["scores"], expected["scores"], atol=1e-5)


def test_config_keys_reach_build_model():
    import inspect

    from hybridnet_tf.config import CHOICES, DEFAULTS
    from hybridnet_tf.model.hybridnet import HEADS
    from hybridnet_tf.model.label_sequences import LABEL_ORDERS
    from hybridnet_tf.model.losses import SIGMOID_LOSSES

    keys = ("head", "label_order", "beam_width", "min_label_score", "score_mix", "sigmoid_fusion", "aux_loss_weight",
            "sigmoid_loss", "asl_gamma_neg", "asl_gamma_pos", "asl_clip")
    parameters = inspect.signature(build_model).parameters
    for key in keys:
        assert DEFAULTS["model"][key] == parameters[key].default, key
    assert CHOICES[("model", "head")] == HEADS
    assert CHOICES[("model", "label_order")] == LABEL_ORDERS
    assert CHOICES[("model", "sigmoid_loss")] == SIGMOID_LOSSES


def test_bce_label_sets_follow_per_label_thresholds_through_a_round_trip(tmp_path):
    from hybridnet_tf.model.hybridnet import set_label_thresholds

    # max_length 5 lists all 4 labels, so only the thresholds decide.
    model = build_model(NUM_LABELS, image_size=SIZE, head="bce", max_length=5)
    images = _images()
    scores = model(images)["scores"].numpy()
    # Per-label thresholds just below labels 0 and 2's image-0 scores, just above the others'.
    row = scores[0]
    thresholds = np.where(np.isin(np.arange(NUM_LABELS), [0, 2]), row - 1e-4, row + 1e-4)
    assert set_label_thresholds(model, thresholds)
    out = model(images)
    assert sorted(i for i in out["label_ids"].numpy()[0] if i >= 0) == [0, 2]
    expected = scores >= thresholds[None, :]
    np.testing.assert_array_equal(out["num_labels"].numpy(), expected.sum(1))
    path = str(tmp_path / "bce.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded(images)["label_ids"], out["label_ids"])
    assert not set_label_thresholds(_model("hybrid_rnn"), 0.3)  # decoders choose their own sets
