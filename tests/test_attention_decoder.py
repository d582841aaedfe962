"""The attention decoder: its decoding agrees with its training steps, it learns where to look, it saves."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.attention_decoder import AttentionLabelDecoder
from hybridnet_tf.model.beam_search import beam_search
from hybridnet_tf.model.hybridnet import (
    IMAGE_ENCODER,
    build_model,
    build_training_model,
    head_input_shape,
    model_decoder,
    with_attention_output,
)
from hybridnet_tf.model.label_sequences import decoder_inputs_from_targets, make_label_sequence

NUM_LABELS = 4
END = NUM_LABELS


def _random_decoder(max_length=4, seed=0, **kwargs):
    decoder = AttentionLabelDecoder(
        NUM_LABELS, max_length, embedding_dim=6, units=8, attention_units=5, dtype="float32", **kwargs
    )
    maps = tf.random.stateless_normal((10, 3, 3, 7), seed=[seed, 2]) * 2.0
    decoder(maps)
    rng = np.random.default_rng(seed)
    decoder.set_weights([rng.normal(0.0, 0.6, w.shape).astype(np.float32) for w in decoder.get_weights()])
    return decoder, maps


@pytest.mark.parametrize("image_logits", [False, True])
def test_greedy_decode_is_the_argmax_of_its_own_teacher_forced_steps(image_logits):
    # Decoding and training run the same steps: teacher forcing on the decoded
    # sequence gives logits whose masked argmax is that sequence.
    decoder, maps = _random_decoder(seed=1, image_logits=image_logits)
    out = decoder(maps)
    label_ids = out["label_ids"].numpy()
    assert len({tuple(row) for row in label_ids}) > 1  # the data decode differently
    tokens = np.where(label_ids < 0, END, label_ids)
    inputs = decoder_inputs_from_targets(tokens, NUM_LABELS)
    logits = decoder([maps, inputs]).numpy()
    for row in range(len(maps)):
        emitted = []
        for step in range(decoder.max_length):
            step_logits = logits[row, step].copy()
            step_logits[emitted] = -np.inf
            if step == decoder.max_length - 1:
                step_logits[:NUM_LABELS] = -np.inf
            choice = int(step_logits.argmax())
            assert choice == tokens[row, step]
            if choice == END:
                break
            emitted.append(choice)


@pytest.mark.parametrize("image_logits", [False, True])
def test_beam_width_one_is_greedy_and_wide_beams_score_at_least_as_high(image_logits):
    decoder, maps = _random_decoder(seed=2, image_logits=image_logits)
    greedy = decoder.greedy_decode(maps)
    state, context = decoder._image_context(maps)
    beam = beam_search(decoder._step, state, context, num_labels=NUM_LABELS, max_length=4, beam_width=1,
                       start_token=NUM_LABELS + 1)
    np.testing.assert_array_equal(beam["label_ids"], greedy["label_ids"])
    np.testing.assert_allclose(beam["scores"], greedy["scores"], atol=1e-6)
    wide, _ = _random_decoder(seed=2, beam_width=4)
    assert wide(maps)["label_ids"].shape == (10, 4)


@pytest.mark.parametrize("image_logits", [False, True])
def test_self_fed_run_is_the_greedy_decode(image_logits):
    decoder, maps = _random_decoder(seed=3, image_logits=image_logits)
    tokens = decoder(maps, self_fed=True).numpy().argmax(-1)[:, :-1]
    greedy = decoder.greedy_decode(maps)["label_ids"].numpy()
    for row_tokens, row_greedy in zip(tokens, greedy):
        labels = []
        for token in row_tokens:
            if token == END:
                break
            labels.append(int(token))
        assert labels + [-1] * (4 - len(labels)) == row_greedy.tolist()


def _object_maps(count, rng, size=4, channels=8):
    """Feature maps with up to two objects: label k is a bump in channel k at one random position."""
    maps = rng.normal(0.0, 0.1, (count, size, size, channels)).astype(np.float32)
    labels = np.zeros((count, NUM_LABELS), np.float32)
    positions = np.full((count, NUM_LABELS), -1)
    for index in range(count):
        chosen = rng.choice(NUM_LABELS, size=rng.integers(1, 3), replace=False)
        cells = rng.choice(size * size, size=len(chosen), replace=False)
        for label, cell in zip(chosen, cells):
            maps[index, cell // size, cell % size, label] += 3.0
            # A shared "object" channel: every object looks alike there, so only
            # the label channel says which is which.
            maps[index, cell // size, cell % size, NUM_LABELS] += 3.0
            labels[index, label] = 1.0
            positions[index, label] = cell
    return maps, labels, positions


def test_attention_learns_to_look_at_the_object_it_names():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    maps, labels, positions = _object_maps(512, rng)
    decoder = AttentionLabelDecoder(NUM_LABELS, 3, embedding_dim=16, units=32, attention_units=16)
    sequences = make_label_sequence(labels, np.arange(NUM_LABELS), 3)
    inputs = decoder_inputs_from_targets(sequences, NUM_LABELS)
    map_input = keras.Input((4, 4, 8))
    token_input = keras.Input((3,), dtype="int32")
    model = keras.Model([map_input, token_input], decoder([map_input, token_input]))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    model.fit([maps, inputs], sequences, batch_size=64, epochs=30, verbose=0)

    test_maps, test_labels, test_positions = _object_maps(64, np.random.default_rng(1))
    out = decoder(test_maps)
    attention = decoder.attention_maps(test_maps, out["label_ids"]).numpy().reshape(64, 3, 16)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    hits, looks = 0, 0
    for row in range(64):
        for step, label in enumerate(out["label_ids"][row].numpy()):
            if label >= 0 and test_labels[row, label]:
                looks += 1
                hits += int(attention[row, step].argmax() == test_positions[row, label])
    assert looks >= 64  # it decodes the objects
    assert hits / looks >= 0.8, (hits, looks)  # and looks at each one as it names it (chance: 1/16)


def test_hybridnet_with_attention_round_trips_and_reports_its_maps(tmp_path):
    model = build_model(5, head="hybrid", decoder="attention", image_size=32, gru_units=16, embedding_dim=8)
    assert model_decoder(model) == "attention" and head_input_shape(model) == (4, 4, 128)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    expected = model(images, training=False)
    path = str(tmp_path / "attention.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    again = loaded(images, training=False)
    for key in ("scores", "label_ids", "num_labels"):
        np.testing.assert_allclose(expected[key], again[key], atol=1e-6)
    # Every weight comes back, also those the outputs above do not show: the
    # attention's zero-started scores leave its keys and query out of them.
    assert len(loaded.weights) == len(model.weights)
    for saved, restored in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(saved, restored)
    explained = with_attention_output(loaded)(images)
    assert explained["attention"].shape == (3, 6, 4, 4)
    np.testing.assert_array_equal(explained["label_ids"], expected["label_ids"])
    training = build_training_model(loaded)
    assert training.get_layer(IMAGE_ENCODER) is loaded.get_layer(IMAGE_ENCODER)
    with pytest.raises(ValueError, match="no attention decoder"):
        with_attention_output(build_model(5, image_size=32, gru_units=16, embedding_dim=8))
