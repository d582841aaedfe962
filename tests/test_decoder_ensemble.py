"""DecoderEnsemble (`model.decoders: K`): joint decoding against a step-by-step reference, its loss,
training, the probe, the Keras round trip and the exports."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.decoder_ensemble import DecoderEnsemble, PerDecoderLoss, decoder_members
from hybridnet_tf.model.hybridnet import LABEL_DECODER, build_model, build_training_model, training_loss
from hybridnet_tf.model.label_sequences import ranked_labels
from hybridnet_tf.model.losses import OrderlessSequenceLoss
from test_label_decoder import END, NUM_LABELS, _next_step, _padded, _tiny_decoder


def _ensemble_of(decoders, **options):
    """A DecoderEnsemble whose members carry the weights of the given decoders."""
    first = decoders[0]
    config = {"num_labels": NUM_LABELS, "max_length": first.max_length, "embedding_dim": 6, "units": 8,
              "label_scores": first.label_scores, "dtype": "float32", **options}
    ensemble = DecoderEnsemble(len(decoders), config)
    features = tf.zeros((1, 5))
    ensemble(features)
    for member, decoder in zip(ensemble.members, decoders):
        member.set_weights(decoder.get_weights())
    return ensemble


def _reference_joint_greedy(decoders, image_features):
    """Greedy decoding of the normalised geometric mean of the decoders' step distributions (NumPy)."""
    prefix, scores = [], np.zeros(NUM_LABELS)
    max_length = decoders[0].max_length
    for step in range(max_length):
        log_probs = np.mean([np.log(_next_step(d, image_features, prefix)[0] + 1e-300) for d in decoders], axis=0)
        log_probs[prefix] = -np.inf
        probs = np.exp(log_probs - log_probs.max())
        probs /= probs.sum()
        scores = np.maximum(scores, probs[:NUM_LABELS])
        if step == max_length - 1:
            break  # the last step can only be END
        token = int(np.argmax(probs))
        if token == END:
            break
        prefix.append(token)
    return prefix, scores


def test_joint_greedy_matches_a_step_by_step_reference():
    decoders = [_tiny_decoder(max_length=4, seed=seed, label_scores="softmax")[0] for seed in (0, 1, 2)]
    _, features = _tiny_decoder(max_length=4, seed=7)
    out = _ensemble_of(decoders)(features)
    joint_sets = set()
    for row, image_features in enumerate(features.numpy()):
        labels, scores = _reference_joint_greedy(decoders, image_features)
        assert out["label_ids"][row].numpy().tolist() == _padded(labels, 4)
        np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
        joint_sets.add(tuple(labels))
    # The joint decode is not one member's: on some image it differs from each of them.
    for decoder in decoders:
        alone = decoder(features, training=False)["label_ids"].numpy()
        assert (alone != out["label_ids"].numpy()).any()
    assert len(joint_sets) >= 3


def test_sigmoid_scores_are_the_sigmoid_of_the_members_mean_logit():
    decoders = [_tiny_decoder(max_length=4, seed=seed, label_scores="sigmoid")[0] for seed in (0, 1, 2)]
    _, features = _tiny_decoder(max_length=4, seed=7)
    ensemble = _ensemble_of(decoders)
    out = ensemble(features)
    softmax_out = _ensemble_of(decoders, label_scores="softmax")(features)
    # Only the scores change with the rule; the decoded sets are the joint softmax's.
    np.testing.assert_array_equal(out["label_ids"], softmax_out["label_ids"])
    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    differs = 0
    for row, image_features in enumerate(features.numpy()):
        labels = [int(t) for t in out["label_ids"][row].numpy() if t >= 0]
        expected, mean_of_sigmoids = np.zeros(NUM_LABELS), np.zeros(NUM_LABELS)
        # The steps up to and including END (or the last step), masked repeats at sigmoid(-1e4) = 0.
        for step in range(min(len(labels) + 1, 4)):
            member_logits = [_next_step(d, image_features, labels[:step])[1][:NUM_LABELS] for d in decoders]
            expected = np.maximum(expected, sigmoid(np.mean(member_logits, axis=0)))
            mean_of_sigmoids = np.maximum(mean_of_sigmoids, np.mean([sigmoid(x) for x in member_logits], axis=0))
        np.testing.assert_allclose(out["scores"][row].numpy(), expected, atol=1e-5)
        # The sigmoid of the mean logit, not the mean of the members' sigmoids.
        differs += int(np.abs(mean_of_sigmoids - expected).max() > 1e-3)
    assert differs >= 6


@pytest.mark.parametrize("beam_width", [1, 3])
def test_one_member_or_identical_members_decode_as_the_decoder(beam_width):
    decoder, features = _tiny_decoder(max_length=4, seed=3, label_scores="against_end", beam_width=beam_width)
    alone = decoder(features)
    for copies in (1, 2):
        joint = _ensemble_of([decoder] * copies, beam_width=beam_width)(features)
        np.testing.assert_array_equal(joint["label_ids"], alone["label_ids"])
        np.testing.assert_array_equal(joint["num_labels"], alone["num_labels"])
        np.testing.assert_allclose(joint["scores"], alone["scores"], atol=1e-5)


def test_training_outputs_are_the_members_own_and_the_loss_is_their_mean():
    decoders = [_tiny_decoder(max_length=4, seed=seed, label_scores="softmax")[0] for seed in (0, 1)]
    _, features = _tiny_decoder(max_length=4, seed=7)
    ensemble = _ensemble_of(decoders)
    self_fed = ensemble(features, self_fed=True)
    assert self_fed.shape == (12, 2, 4, NUM_LABELS + 1)
    for k, decoder in enumerate(decoders):
        np.testing.assert_allclose(self_fed[:, k], decoder(features, self_fed=True), atol=1e-5)
    multi_hot = np.zeros((12, NUM_LABELS), np.float32)
    multi_hot[np.arange(12), np.arange(12) % NUM_LABELS] = 1
    multi_hot[::3, 0] = 1
    ranked = tf.cast(ranked_labels(multi_hot, tf.range(NUM_LABELS)), tf.float32)
    loss = PerDecoderLoss(OrderlessSequenceLoss("paper"), 2)
    members = [float(OrderlessSequenceLoss("paper")(ranked, self_fed[:, k])) for k in range(2)]
    assert members[0] != pytest.approx(members[1])
    assert float(loss(ranked, self_fed)) == pytest.approx(np.mean(members), rel=1e-6)
    restored = PerDecoderLoss.from_config(loss.get_config())
    assert float(restored(ranked, self_fed)) == pytest.approx(np.mean(members), rel=1e-6)


def test_argument_checks_and_config_round_trip():
    config = {"num_labels": 5, "max_length": 4, "embedding_dim": 6, "units": 8}
    with pytest.raises(ValueError, match="num_decoders"):
        DecoderEnsemble(0, config)
    with pytest.raises(ValueError, match="unknown label_scores"):
        DecoderEnsemble(2, {**config, "label_scores": "logit"})
    with pytest.raises(ValueError, match="decoders must be >= 1"):
        build_model(5, image_size=32, decoders=0)
    ensemble = DecoderEnsemble(3, {**config, "beam_width": 2}, label_scores="against_end")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ensemble))
    assert clone.get_config() == ensemble.get_config()
    assert (clone.num_decoders, clone.beam_width, clone.label_scores) == (3, 2, "against_end")
    assert [m.name for m in clone.members] == ["decoder_0", "decoder_1", "decoder_2"]


@pytest.mark.parametrize("decoder", ["pooled", "attention"])
def test_model_with_two_decoders_overfits_eight_images_and_round_trips(tmp_path, decoder):
    from hybridnet_tf.evaluation.metrics import mean_average_precision

    keras.utils.set_random_seed(0)
    model = build_model(4, head="hybrid_rnn", decoders=2, decoder=decoder, image_size=32, gru_units=16,
                        embedding_dim=8, attention_units=8, dropout=0.0)
    layer = model.get_layer(LABEL_DECODER)
    assert isinstance(layer, DecoderEnsemble) and len(decoder_members(layer)) == 2
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    labels[::2, 3] = 1.0
    ranked = ranked_labels(labels, tf.range(4))
    training_model = build_training_model(model)
    training_model.compile(keras.optimizers.Adam(1e-2), training_loss(model))
    history = training_model.fit({"image": images}, {"sequence": ranked}, batch_size=8, epochs=120, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    outputs = model(images, training=False)
    decoded = np.zeros_like(labels)
    for row, ids in enumerate(outputs["label_ids"].numpy()):
        decoded[row, ids[ids >= 0]] = 1
    np.testing.assert_array_equal(decoded, labels)
    assert mean_average_precision(labels, outputs["scores"].numpy())[0] == pytest.approx(1.0)
    path = tmp_path / "two_decoders.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    again = loaded(images, training=False)
    np.testing.assert_array_equal(again["label_ids"], outputs["label_ids"])
    np.testing.assert_allclose(again["scores"], outputs["scores"], atol=1e-6)


def test_the_probe_sets_every_members_image_logits():
    from hybridnet_tf.training.linear_probe import LinearProbe, set_decoder_image_logits

    model = build_model(4, head="hybrid", decoders=3, image_size=32, gru_units=16, embedding_dim=8)
    rng = np.random.default_rng(0)
    probe = LinearProbe(rng.normal(size=(128, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32), 1.0)
    set_decoder_image_logits(model, probe)
    for member in decoder_members(model.get_layer(LABEL_DECODER)):
        np.testing.assert_array_equal(member.image_to_labels.kernel.numpy(), probe.kernel)
        np.testing.assert_array_equal(member.image_to_labels.bias.numpy(), probe.bias)


def test_attention_maps_of_an_ensemble_are_the_mean_of_its_members():
    from hybridnet_tf.model.hybridnet import IMAGE_ENCODER, with_attention_output

    model = build_model(4, head="hybrid", decoders=2, decoder="attention", image_size=32, gru_units=16,
                        embedding_dim=8, attention_units=8)
    rng = np.random.default_rng(1)
    for member in decoder_members(model.get_layer(LABEL_DECODER)):  # the attention starts uniform: stir it
        member.set_weights([rng.normal(0.0, 0.5, w.shape).astype(np.float32) for w in member.get_weights()])
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    outputs = with_attention_output(model)(images)
    feature_map = model.get_layer(IMAGE_ENCODER)(images)[1]
    members = [m.attention_maps(feature_map, outputs["label_ids"]).numpy()
               for m in decoder_members(model.get_layer(LABEL_DECODER))]
    assert np.abs(members[0] - members[1]).max() > 1e-4  # the members look at different places
    np.testing.assert_allclose(outputs["attention"].numpy(), np.mean(members, axis=0), atol=1e-6)
    np.testing.assert_allclose(outputs["attention"].numpy().sum(axis=(2, 3)), 1.0, atol=1e-5)
