"""LabelDecoder: greedy and beam decoding against step-by-step references."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.beam_search import beam_search
from hybridnet_tf.model.label_decoder import LabelDecoder

NUM_LABELS = 4
END = NUM_LABELS
START = NUM_LABELS + 1
MASKED = -1e4


def _tiny_decoder(max_length=3, seed=0, **kwargs):
    """A decoder with random, fairly peaked weights, so decodes differ per image."""
    kwargs.setdefault("label_scores", "against_end")
    decoder = LabelDecoder(NUM_LABELS, max_length, embedding_dim=6, units=8, dtype="float32", **kwargs)
    features = tf.random.stateless_normal((12, 5), seed=[seed, 1]) * 2.0
    decoder(features)
    rng = np.random.default_rng(seed)
    decoder.set_weights([rng.normal(0.0, 0.6, w.shape).astype(np.float32) for w in decoder.get_weights()])
    return decoder, features


def _next_step(decoder, image_features, prefix, log_prior=None):
    """Softmax and logits over labels + END after `prefix`, computed step by step in Python.

    Calls `decoder.gru.cell` one step at a time (eagerly) and does the joint
    embedding scoring and the no-repeat mask in NumPy. `log_prior` [L] is
    added to the label logits (the decoder's `label_prior` term).
    """
    embeddings = decoder.label_embedding.embeddings.numpy()
    joint_kernel, joint_bias = (w.numpy() for w in decoder.to_joint_space.weights)
    bias = decoder.output_bias.numpy()
    features = image_features[None, :]
    image_step = decoder.image_to_step(features).numpy()
    state = decoder.initial_state(features)
    tokens = [START] + list(prefix)
    for token in tokens:
        step_input = np.concatenate([embeddings[token][None, :], image_step], axis=-1)
        output, state = decoder.gru.cell(tf.constant(step_input), state)
    joint = np.maximum(np.concatenate([output.numpy(), image_step], -1) @ joint_kernel + joint_bias, 0)
    logits = (joint @ embeddings[: NUM_LABELS + 1].T + bias)[0].astype(np.float64)
    if decoder.image_to_labels is not None:
        logits[:NUM_LABELS] += decoder.image_to_labels(features).numpy()[0]
    if log_prior is not None:
        logits[:NUM_LABELS] += log_prior
    for label in prefix:
        logits[label] += MASKED
    shifted = logits - logits.max()
    return np.exp(shifted) / np.exp(shifted).sum(), logits


def _step_scores(decoder, probs, logits):
    """A step's label scores: p(c) / (p(c) + p(END)) (against_end), p(c) (softmax), or sigmoid(logit_c)."""
    if decoder.label_scores == "softmax":
        return probs[:NUM_LABELS]
    if decoder.label_scores == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits[:NUM_LABELS]))
    return probs[:NUM_LABELS] / (probs[:NUM_LABELS] + probs[END])


def _reference_greedy(decoder, image_features, min_label_score=0.0, log_prior=None):
    prefix, scores = [], np.zeros(NUM_LABELS)
    for step in range(decoder.max_length):
        probs, logits = _next_step(decoder, image_features, prefix, log_prior)
        scores = np.maximum(scores, _step_scores(decoder, probs, logits))
        if step == decoder.max_length - 1:
            break  # the last step can only be END
        choice = probs.copy()
        choice[:NUM_LABELS][probs[:NUM_LABELS] < min_label_score] = 0.0
        choice[prefix] = 0.0
        token = int(np.argmax(choice))
        if token == END:
            break
        prefix.append(token)
    return prefix, scores


def _padded(labels, length):
    return labels + [-1] * (length - len(labels))


@pytest.mark.parametrize("label_scores, image_logits", [("against_end", False), ("softmax", False), ("softmax", True), ("sigmoid", True)])
@pytest.mark.parametrize("min_label_score", [0.0, 0.4])
def test_greedy_matches_a_step_by_step_reference(min_label_score, label_scores, image_logits):
    decoder, features = _tiny_decoder(
        max_length=4, min_label_score=min_label_score, label_scores=label_scores, image_logits=image_logits
    )
    out = decoder(features)
    lengths = set()
    for row in range(features.shape[0]):
        labels, scores = _reference_greedy(decoder, features[row].numpy(), min_label_score)
        lengths.add(len(labels))
        assert out["label_ids"][row].numpy().tolist() == _padded(labels, 4)
        assert int(out["num_labels"][row]) == len(labels)
        np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
    assert len(lengths) > 1  # the test data decode to sets of different sizes
    if min_label_score > 0:  # the rule changes some decodes of this data
        unrestricted, _ = _tiny_decoder(max_length=4)
        assert np.any(out["label_ids"].numpy() != unrestricted(features)["label_ids"].numpy())


def _all_sequences(max_length):
    """Every legal token sequence: up to max_length - 1 distinct labels, then END."""
    for size in range(max_length):
        for labels in itertools.permutations(range(NUM_LABELS), size):
            yield list(labels) + [END]


def _brute_force(decoder, image_features, min_label_score=0.0, log_prior=None):
    """Best sequence by total log-probability, and each label's highest step score (`_step_scores`) over open prefixes."""
    best, best_log_prob = None, -np.inf
    scores = np.zeros(NUM_LABELS)
    cache = {}
    for sequence in _all_sequences(decoder.max_length):
        log_prob, legal = 0.0, True
        for step, token in enumerate(sequence):
            prefix = tuple(sequence[:step])
            if prefix not in cache:
                cache[prefix] = _next_step(decoder, image_features, list(prefix), log_prior)
            probs = cache[prefix][0]
            if token < NUM_LABELS and probs[token] < min_label_score:
                legal = False
            log_prob += np.log(probs[token])
        if legal and log_prob > best_log_prob:
            best, best_log_prob = [t for t in sequence if t < NUM_LABELS], log_prob
    for probs, logits in cache.values():  # every open prefix is in an exhaustive beam
        scores = np.maximum(scores, _step_scores(decoder, probs, logits))
    return best, scores


@pytest.mark.parametrize("min_label_score", [0.0, 0.4])
def test_wide_beam_equals_brute_force_enumeration(min_label_score):
    # 17 legal sequences of 4 labels and length 3 fit in a beam of 48: the search is exact.
    decoder, features = _tiny_decoder(max_length=3, beam_width=48, min_label_score=min_label_score)
    out = decoder(features)
    for row in range(features.shape[0]):
        best, scores = _brute_force(decoder, features[row].numpy(), min_label_score)
        assert out["label_ids"][row].numpy().tolist() == _padded(best, 3)
        if min_label_score == 0.0:
            np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
    if min_label_score == 0.0:  # the search finds a sequence greedy misses
        assert np.any(out["label_ids"].numpy() != decoder.greedy_decode(features)["label_ids"].numpy())
    else:  # the rule changes some results on this data
        unrestricted, _ = _tiny_decoder(max_length=3, beam_width=48)
        assert np.any(out["label_ids"].numpy() != unrestricted(features)["label_ids"].numpy())


def _label_prior(seed, rows=12):
    """Per-image label probabilities in (0, 1), some near 0 and some near 1."""
    return tf.sigmoid(tf.random.stateless_normal((rows, NUM_LABELS), seed=[seed, 2]) * 3.0)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_greedy_with_a_label_prior_decodes_the_product_of_the_two(weight):
    decoder, features = _tiny_decoder(max_length=4, seed=7, prior_weight=weight)
    prior = _label_prior(7)
    out = decoder(features, label_prior=prior)
    log_prior = weight * np.log(prior.numpy().astype(np.float64))
    for row in range(features.shape[0]):
        labels, scores = _reference_greedy(decoder, features[row].numpy(), log_prior=log_prior[row])
        assert out["label_ids"][row].numpy().tolist() == _padded(labels, 4)
        np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
    # The prior changes decodes of this data; without it (or at weight 0) the decode is the plain one.
    plain = decoder(features)["label_ids"].numpy()
    assert np.any(out["label_ids"].numpy() != plain)
    off, _ = _tiny_decoder(max_length=4, seed=7, prior_weight=0.0)
    np.testing.assert_array_equal(off(features, label_prior=prior)["label_ids"], plain)


def test_a_label_the_prior_rules_out_is_never_decoded():
    decoder, features = _tiny_decoder(max_length=4, seed=8, prior_weight=1.0)
    plain = decoder(features)["label_ids"].numpy()
    label = int(np.bincount(plain[plain >= 0], minlength=NUM_LABELS).argmax())
    prior = np.full((features.shape[0], NUM_LABELS), 0.9, np.float32)
    prior[:, label] = 1e-8
    for beam_width in (1, 3):
        decoder.beam_width = beam_width
        ids = decoder(features, label_prior=tf.constant(prior))["label_ids"].numpy()
        assert label not in ids
    assert label in plain


def test_wide_beam_with_a_label_prior_equals_brute_force_enumeration():
    decoder, features = _tiny_decoder(max_length=3, seed=9, beam_width=48, prior_weight=1.0)
    prior = _label_prior(9)
    out = decoder(features, label_prior=prior)
    log_prior = np.log(prior.numpy().astype(np.float64))
    for row in range(features.shape[0]):
        best, scores = _brute_force(decoder, features[row].numpy(), log_prior=log_prior[row])
        assert out["label_ids"][row].numpy().tolist() == _padded(best, 3)
        np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
    assert np.any(out["label_ids"].numpy() != decoder(features)["label_ids"].numpy())


def _reference_beam(decoder, image_features, width):
    """Beam search by the documented rules, in plain Python."""
    beams = [([], 0.0, False)]  # (tokens, log prob, finished)
    scores = np.zeros(NUM_LABELS)
    for step in range(decoder.max_length):
        candidates = []
        for index, (tokens, log_prob, finished) in enumerate(beams):
            if finished:
                candidates.append((log_prob, index * (NUM_LABELS + 1) + END, tokens, True))
                continue
            labels = [t for t in tokens if t < NUM_LABELS]
            probs, logits = _next_step(decoder, image_features, labels)
            scores = np.maximum(scores, _step_scores(decoder, probs, logits))
            for token in range(NUM_LABELS + 1):
                if token in labels or (step == decoder.max_length - 1 and token != END):
                    continue
                candidates.append(
                    (log_prob + np.log(probs[token]), index * (NUM_LABELS + 1) + token,
                     tokens + [token], token == END)
                )
        candidates.sort(key=lambda c: (-c[0], c[1]))
        beams = [(tokens, log_prob, done) for log_prob, _, tokens, done in candidates[:width]]
    return [t for t in beams[0][0] if t < NUM_LABELS], scores


@pytest.mark.parametrize("label_scores", ["against_end", "softmax", "sigmoid"])
@pytest.mark.parametrize("width", [2, 3])
def test_narrow_beam_matches_a_python_reference(width, label_scores):
    decoder, features = _tiny_decoder(max_length=4, seed=3, beam_width=width, label_scores=label_scores)
    out = decoder(features)
    for row in range(features.shape[0]):
        labels, scores = _reference_beam(decoder, features[row].numpy(), width)
        assert out["label_ids"][row].numpy().tolist() == _padded(labels, 4)
        np.testing.assert_allclose(out["scores"][row].numpy(), scores, atol=1e-5)
        ids = [i for i in out["label_ids"][row].numpy() if i >= 0]
        assert len(set(ids)) == len(ids) == int(out["num_labels"][row])


def test_beam_width_one_is_greedy():
    decoder, features = _tiny_decoder(max_length=4, seed=4)
    greedy = decoder.greedy_decode(features)
    beam = beam_search(
        decoder._step,
        decoder.initial_state(features),
        decoder.image_to_step(features),
        num_labels=NUM_LABELS,
        max_length=4,
        beam_width=1,
        start_token=START,
        step_scores=decoder._step_scores,
    )
    np.testing.assert_array_equal(beam["label_ids"], greedy["label_ids"])
    np.testing.assert_array_equal(beam["num_labels"], greedy["num_labels"])
    np.testing.assert_allclose(beam["scores"], greedy["scores"], atol=1e-6)


def test_self_fed_run_without_dropout_is_the_greedy_decode():
    decoder, features = _tiny_decoder(max_length=4, seed=5)
    logits = decoder(features, self_fed=True).numpy()
    greedy = decoder.greedy_decode(features)["label_ids"].numpy()
    # Greedy's last step is forced to END; the self-fed run's is left to the loss.
    tokens = logits.argmax(-1)[:, :-1]
    for row_tokens, row_greedy in zip(tokens, greedy):
        labels = []
        for token in row_tokens:
            if token == END:
                break
            labels.append(int(token))
        assert _padded(labels, 4) == row_greedy.tolist()


def test_config_round_trip_and_argument_checks():
    decoder = LabelDecoder(5, 4, embedding_dim=6, units=8, beam_width=3, min_label_score=0.1,
                           label_order="orderless", prior_weight=0.5)
    clone = LabelDecoder.from_config(decoder.get_config())
    assert clone.get_config() == decoder.get_config()
    assert (clone.beam_width, clone.min_label_score, clone.label_order) == (3, 0.1, "orderless")
    assert clone.prior_weight == 0.5
    with pytest.raises(ValueError, match="prior_weight"):
        LabelDecoder(5, 4, prior_weight=-1.0)
    with pytest.raises(ValueError, match="beam_width"):
        LabelDecoder(5, 4, beam_width=0)
    with pytest.raises(ValueError, match="min_label_score"):
        LabelDecoder(5, 4, min_label_score=1.0)
    with pytest.raises(ValueError, match="unknown label_order"):
        LabelDecoder(5, 4, label_order="alphabetical")
    assert isinstance(keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(decoder)),
                      LabelDecoder)


def test_decoding_stops_at_max_length_minus_one_labels():
    # END made nearly impossible: greedy and beam still close every sequence
    # with END at the last step, so no decode is longer than training's.
    for beam_width in (1, 3):
        decoder, features = _tiny_decoder(max_length=4, seed=6, beam_width=beam_width)
        bias = decoder.output_bias.numpy()
        bias[END] = -50.0
        decoder.output_bias.assign(bias)
        out = decoder(features)
        assert (out["num_labels"].numpy() == 3).all()
        assert (out["label_ids"].numpy()[:, -1] == -1).all()


def _table_step(table):
    """A decoder step from a probability table [step, previous token, next token]; state counts steps."""
    log_table = tf.math.log(tf.constant(table, tf.float32))

    def step(tokens, state, context):
        index = tf.cast(state[:, 0], tf.int32)
        logits = tf.gather_nd(log_table, tf.stack([index, tokens], axis=-1))
        return logits, state + 1.0

    return step


def test_full_length_beams_pay_for_their_end_like_finished_ones():
    # Labels a, b, c (0..2), END 3, START 4, max_length 3. [a, b] is likely
    # but its END is not (1e-4): a sequence's score must include that END,
    # so [c] (0.4 * 0.9) beats [a, b] (0.5 * 0.9 * 1e-4), whereas leaving
    # the full-length beam open would have kept [a, b, c] (0.5 * 0.9 * 1.0).
    table = np.full((3, 5, 4), 1e-3)
    table[0, 4] = [0.5, 0.05, 0.4, 0.05]
    table[1, 0] = [1e-3, 0.9, 0.05, 0.05]
    table[1, 2] = [0.05, 0.05, 1e-3, 0.9]
    table[2, 1] = [0.4, 1e-3, 0.6, 1e-4]
    out = beam_search(
        _table_step(table / table.sum(-1, keepdims=True)),
        tf.zeros([1, 1]),
        tf.zeros([1, 1]),
        num_labels=3,
        max_length=3,
        beam_width=4,
        start_token=4,
    )
    assert out["label_ids"].numpy().tolist() == [[2, -1, -1]]


@pytest.mark.parametrize("beam_width", [1, 3])
def test_every_decoded_label_scores_above_one_half(beam_width):
    # A decoded label beat END at the step that emitted it, so its score
    # p(c) / (p(c) + p(END)) is above 0.5; the softmax probability of a
    # second or third label usually is not (it shares its mass with the others).
    decoder, features = _tiny_decoder(max_length=4, seed=5, beam_width=beam_width)
    out = decoder(features)
    ids, scores = out["label_ids"].numpy(), out["scores"].numpy()
    rows, steps = np.nonzero(ids >= 0)
    assert len(rows) > features.shape[0]  # several labels per image on this data
    assert np.all(scores[rows, ids[rows, steps]] > 0.5)


def test_image_logits_are_added_to_every_step_in_training_and_decoding():
    plain, features = _tiny_decoder(max_length=4, label_scores="softmax")
    decoder = LabelDecoder(NUM_LABELS, 4, embedding_dim=6, units=8, dtype="float32", label_scores="softmax",
                           image_logits=True)
    decoder(features)
    # The same weights but the image path, which starts at zero: it decodes as without it.
    own = {w.path.split("/", 1)[1]: w for w in decoder.weights}
    for weight in plain.weights:
        own[weight.path.split("/", 1)[1]].assign(weight)
    kernel, bias = decoder.image_to_labels.weights
    np.testing.assert_array_equal(decoder(features)["label_ids"], plain(features)["label_ids"])
    # A large image logit for label 2 makes it every image's first label.
    bias.assign(np.array([0.0, 0.0, 30.0, 0.0], np.float32))
    assert np.all(decoder(features)["label_ids"].numpy()[:, 0] == 2)
    assert not np.all(plain(features)["label_ids"].numpy()[:, 0] == 2)
    # Teacher forcing on the decoded tokens gives the self-fed run's logits
    # (where the no-repeat mask leaves them alone): both paths add the term.
    rng = np.random.default_rng(3)
    kernel.assign(rng.normal(0.0, 1.0, kernel.shape).astype(np.float32))
    self_fed = decoder(features, self_fed=True).numpy()
    tokens = np.argmax(self_fed, axis=-1)
    inputs = np.concatenate([np.full((len(tokens), 1), START), tokens[:, :-1]], axis=1)
    forced = decoder([features, tf.constant(inputs, tf.int32)]).numpy()
    unmasked = self_fed > MASKED / 2
    np.testing.assert_allclose(forced[unmasked], self_fed[unmasked], atol=1e-4)
    assert np.abs(forced - plain([features, tf.constant(inputs, tf.int32)]).numpy())[unmasked].max() > 0.1


def test_label_scores_default_to_softmax_and_reject_unknown_names():
    assert LabelDecoder(4, 3).label_scores == "softmax"
    with pytest.raises(ValueError, match="label_scores"):
        LabelDecoder(4, 3, label_scores="max")


def test_against_end_scores_survive_keras_round_trip_and_builtins_only_tflite(tmp_path):
    from hybridnet_tf.export.artifacts import load_predictor
    from hybridnet_tf.export.tflite import export_tflite
    from hybridnet_tf.model.hybridnet import LABEL_DECODER, build_model

    model = build_model(5, image_size=32, head="hybrid_rnn", label_scores="against_end",
                        gru_units=16, embedding_dim=8, max_length=4)
    images = tf.random.stateless_uniform((4, 32, 32, 3), seed=[3, 1], maxval=255.0)
    expected = model(images)
    softmax_model = build_model(5, image_size=32, head="hybrid_rnn", gru_units=16, embedding_dim=8, max_length=4)
    softmax_model.set_weights(model.get_weights())
    # Same weights, same label sets, other scores: the rule is what changed.
    np.testing.assert_array_equal(softmax_model(images)["label_ids"], expected["label_ids"])
    assert np.abs(softmax_model(images)["scores"].numpy() - expected["scores"].numpy()).max() > 1e-3

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.get_layer(LABEL_DECODER).label_scores == "against_end"
    np.testing.assert_allclose(loaded(images)["scores"], expected["scores"], atol=1e-6)

    export_tflite(model, tmp_path / "model.tflite", vocabulary=[f"l{i}" for i in range(5)])
    predictor = load_predictor(tmp_path / "model.tflite", num_threads=1)
    outputs = predictor(images.numpy())
    assert np.abs(outputs["scores"] - expected["scores"].numpy()).max() < 1e-4
    assert not [op for op in predictor.op_names() if op.startswith("Flex") or op == "CUSTOM"]
