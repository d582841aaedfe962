"""The folded decoding step computes the decoder's Keras step, for both decoders."""

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.attention_decoder import AttentionLabelDecoder
from hybridnet_tf.model.label_decoder import LabelDecoder

NUM_LABELS = 5


def _random_decoder(decoder_kind, seed, **kwargs):
    common = dict(embedding_dim=6, units=8, dtype="float32", **kwargs)
    if decoder_kind == "attention":
        decoder = AttentionLabelDecoder(NUM_LABELS, 4, attention_units=5, **common)
        features = tf.random.stateless_normal((6, 3, 3, 7), seed=[seed, 1]) * 2.0
    else:
        decoder = LabelDecoder(NUM_LABELS, 4, **common)
        features = tf.random.stateless_normal((6, 7), seed=[seed, 1]) * 2.0
    decoder(features)
    rng = np.random.default_rng(seed)
    # Every weight random and away from zero, so that no term of the step
    # (attention scores, image logits, biases) can vanish unnoticed.
    decoder.set_weights([rng.normal(0.0, 0.6, w.shape).astype(np.float32) for w in decoder.get_weights()])
    return decoder, features


@pytest.mark.parametrize(
    "decoder_kind,options",
    [
        ("pooled", {}),
        ("pooled", {"image_logits": True}),
        ("attention", {"image_logits": True}),
        ("attention", {"attention_gate": True}),
    ],
)
def test_folded_step_matches_the_keras_step(decoder_kind, options):
    decoder, features = _random_decoder(decoder_kind, seed=3, **options)
    state, step, context = decoder._decoding_setup(features, None)
    keras_state, keras_context = decoder._image_context(features)
    np.testing.assert_allclose(state.numpy(), keras_state.numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(4):
        # Any token, START included; different tokens per row.
        token = tf.constant(rng.integers(0, NUM_LABELS + 2, size=len(features)), tf.int32)
        logits, state = step(token, state, context)
        keras_logits, keras_state = decoder._step(token, keras_state, keras_context)
        np.testing.assert_allclose(logits.numpy(), keras_logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.numpy(), keras_state.numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(logits.numpy(), axis=0).max() > 0.1  # the rows differ: a real comparison


@pytest.mark.parametrize("decoder_kind", ["pooled", "attention"])
def test_folded_step_adds_the_prior_to_labels_only(decoder_kind):
    decoder, features = _random_decoder(decoder_kind, seed=4, image_logits=True, prior_weight=0.7)
    prior = tf.random.stateless_uniform((len(features), NUM_LABELS), seed=[5, 6], minval=0.01, maxval=1.0)
    state, step, context = decoder._decoding_setup(features, prior)
    keras_state, keras_context = decoder._image_context(features)
    token = tf.fill([len(features)], NUM_LABELS + 1)
    logits, _ = step(token, state, context)
    keras_logits, _ = decoder._step(token, keras_state, keras_context)
    expected = keras_logits.numpy()
    expected[:, :NUM_LABELS] += 0.7 * np.log(prior.numpy())
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-4)
