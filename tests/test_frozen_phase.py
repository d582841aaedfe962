"""Pretrained BatchNorm stays put, cached features, the linear-probe head and the cached frozen phase."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.evaluation.metrics import mean_average_precision
from hybridnet_tf.model.decoder_ensemble import decoder_members
from hybridnet_tf.model.hybridnet import (
    IMAGE_ENCODER,
    LABEL_DECODER,
    SIGMOID_HEAD,
    build_head_model,
    build_model,
)
from hybridnet_tf.training.feature_cache import CachedFeatures, FeatureCacheInputs, extract_features
from hybridnet_tf.training.fine_tuning import _lengthened, train_in_phases
from hybridnet_tf.training.head_phase import train_heads_on_features
from hybridnet_tf.training.linear_probe import fit_linear_probe, set_sigmoid_head
from hybridnet_tf.training.settings import Checkpointing, Optimization, PhaseSchedule

SMALL = dict(image_size=32, gru_units=16, embedding_dim=8)
QUIET_ON_LOSS = Checkpointing(monitor="loss", verbose=0)


def images_and_labels(count=16, num_labels=4, size=32, seed=0):
    """Images whose labels show in the pixels: label k brightens channel k % 3 of quadrant k."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(count, num_labels)) < 0.5).astype(np.float32)
    labels[labels.sum(axis=1) == 0, 0] = 1.0
    images = rng.uniform(0, 60, (count, size, size, 3)).astype(np.float32)
    half = size // 2
    for i, row in enumerate(labels):
        for k in np.flatnonzero(row):
            y, x = divmod(k % 4, 2)
            images[i, y * half:(y + 1) * half, x * half:(x + 1) * half, k % 3] += 180
    return images, labels


def dataset(images, labels, batch=8):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def batch_norm_statistics(model):
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    return {
        w.path: w.numpy().copy()
        for w in backbone.weights
        if "moving_mean" in w.path or "moving_variance" in w.path
    }


@pytest.fixture
def pretrained_weights(tmp_path):
    """A small_cnn weights file whose BatchNorm statistics are not the initial ones."""
    model = build_model(4, **SMALL)
    core = model.get_layer(IMAGE_ENCODER).get_layer("backbone").get_layer("small_cnn")
    for weight in core.weights:
        if "moving_mean" in weight.path:
            weight.assign(np.full(weight.shape, 3.0, np.float32))
        if "moving_variance" in weight.path:
            weight.assign(np.full(weight.shape, 7.0, np.float32))
    path = str(tmp_path / "pretrained.weights.h5")
    core.save_weights(path)
    return path


@pytest.mark.parametrize("frozen_epochs", [0, 1])
def test_pretrained_batch_norm_statistics_stay_put_in_every_phase(tmp_path, pretrained_weights, frozen_epochs):
    model = build_model(4, weights=pretrained_weights, **SMALL)
    before = batch_norm_statistics(model)
    assert before and all(np.all(v == 3.0) or np.all(v == 7.0) for v in before.values())
    conv_before = model.get_layer(IMAGE_ENCODER).get_layer("backbone").get_layer("small_cnn").get_layer("conv3").kernel.numpy()
    images, labels = images_and_labels()
    train_in_phases(
        model, dataset(images, labels), None, np.arange(4), str(tmp_path / "run"), steps_per_epoch=2,
        epochs=2, optimization=Optimization(learning_rate=1e-2, batch_size=8), checkpointing=QUIET_ON_LOSS,
        schedule=PhaseSchedule(frozen_epochs=frozen_epochs),
    )
    after = batch_norm_statistics(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    conv_after = model.get_layer(IMAGE_ENCODER).get_layer("backbone").get_layer("small_cnn").get_layer("conv3").kernel.numpy()
    assert not np.array_equal(conv_before, conv_after), "the backbone itself did not train"


def test_batch_norm_of_a_backbone_from_scratch_does_learn(tmp_path):
    # The control: without pretrained weights the statistics move, so the test above can fail.
    model = build_model(4, **SMALL)
    before = batch_norm_statistics(model)
    images, labels = images_and_labels()
    train_in_phases(
        model, dataset(images, labels), None, np.arange(4), str(tmp_path), steps_per_epoch=2,
        epochs=1, optimization=Optimization(learning_rate=1e-2), checkpointing=QUIET_ON_LOSS,
    )
    after = batch_norm_statistics(model)
    assert any(not np.allclose(after[p], v) for p, v in before.items())


def test_frozen_batch_norm_survives_a_keras_round_trip(tmp_path, pretrained_weights):
    import keras

    model = build_model(4, weights=pretrained_weights, **SMALL)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    core = loaded.get_layer(IMAGE_ENCODER).get_layer("backbone").get_layer("small_cnn")
    assert [layer.trainable for layer in core.layers if "bn" in layer.name] == [False] * 4


@pytest.mark.parametrize("decoder", ["pooled", "attention"])
def test_extracted_features_are_the_backbones_outputs_and_mirror_views(decoder):
    model = build_model(4, decoder=decoder, **SMALL)
    images, labels = images_and_labels(count=10)
    cached = extract_features(model, dataset(images, labels, batch=4), flip_views=True, progress=False)
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    maps = backbone(images, training=False).numpy()
    mirrored = backbone(images[:, :, ::-1, :], training=False).numpy()
    if decoder == "pooled":  # the pooled feature; the attention decoder keeps the whole map
        maps, mirrored = maps.mean(axis=(1, 2)), mirrored.mean(axis=(1, 2))
    assert cached.features.shape == (20,) + maps.shape[1:] and cached.views == 2
    np.testing.assert_allclose(cached.features[:10], maps, atol=1e-5)
    np.testing.assert_allclose(cached.features[10:], mirrored, atol=1e-5)
    np.testing.assert_allclose(cached.pooled()[:10], backbone(images).numpy().mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(cached.labels, np.concatenate([labels, labels]))


@pytest.mark.parametrize("head, decoder", [("bce", "pooled"), ("hybrid_rnn", "pooled"), ("hybrid", "pooled"),
                                           ("hybrid_rnn", "attention"), ("hybrid", "attention")])
def test_head_model_on_features_gives_the_inference_models_outputs(head, decoder):
    model = build_model(4, head=head, decoder=decoder, **SMALL)
    images, _ = images_and_labels(count=3)
    features = model.get_layer(IMAGE_ENCODER).get_layer("backbone")(images, training=False)
    if decoder == "pooled":
        features = keras.ops.mean(features, axis=(1, 2))
    whole = model(images, training=False)
    heads = build_head_model(model)(features, training=False)
    np.testing.assert_allclose(whole["scores"], heads["scores"], atol=1e-6)
    np.testing.assert_array_equal(whole["label_ids"], heads["label_ids"])


@pytest.mark.parametrize("head", ["bce", "hybrid_rnn"])
def test_heads_trained_on_cached_features_fit_eight_examples(tmp_path, head):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 128)).astype(np.float32)  # small_cnn's feature size
    labels = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
    labels[::2, 3] = 1.0  # each even image also has label 3
    model = build_model(4, head=head, dropout=0.0, **SMALL)
    train_heads_on_features(
        model, CachedFeatures(features, labels), None, np.arange(4), str(tmp_path), epochs=10,
        steps_per_epoch=30, optimization=Optimization(learning_rate=1e-2, batch_size=8),
        checkpointing=QUIET_ON_LOSS,
    )
    outputs = build_head_model(model)(features, training=False)
    mean_ap, _ = mean_average_precision(labels, outputs["scores"].numpy())
    assert mean_ap == pytest.approx(1.0)
    assert (tmp_path / "best.keras").is_file() and (tmp_path / "last.keras").is_file()


def test_linear_probe_ranks_separable_labels_and_sets_the_sigmoid_head():
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=(60, 3)) < 0.4).astype(np.float32)
    labels[:, 2] = 0.0  # a label absent from the training images
    features = rng.normal(size=(60, 8)).astype(np.float32)
    features[:, :2] += 4.0 * labels[:, :2]  # labels 0 and 1 show in features 0 and 1
    probe = fit_linear_probe(features, labels, seed=0)
    scores = probe.scores(features)
    assert mean_average_precision(labels[:, :2], scores[:, :2])[0] == pytest.approx(1.0)
    assert scores[:, 2].max() < 1e-3
    model = build_model(3, head="bce", image_size=32)
    padded = np.pad(features, [[0, 0], [0, 120]])
    probe_padded = fit_linear_probe(padded, labels, seed=0)
    set_sigmoid_head(model, probe_padded)
    heads = build_head_model(model)(padded, training=False)
    np.testing.assert_allclose(heads["scores"].numpy(), probe_padded.scores(padded), atol=1e-5)


def test_linear_probe_scores_far_logits_without_overflow_and_keep_their_order():
    # A large C gave logits below -88, and 1 / (1 + exp(-x)) warned of overflow in float32.
    from hybridnet_tf.training.linear_probe import LinearProbe

    probe = LinearProbe(np.array([[1.0]], np.float32), np.zeros(1, np.float32), c=10.0)
    logits = np.array([[-200.0], [-30.0], [0.0], [30.0], [200.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = probe.scores(logits)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores[:, 0]) >= 0)
    assert scores[2, 0] == pytest.approx(0.5) and scores[1, 0] == pytest.approx(9.4e-14, rel=1e-2)


def test_linear_probe_fits_with_blas_held_to_one_thread_and_the_same_kernel(monkeypatch):
    # OpenBLAS threads beside scikit-learn's OpenMP loss made 1000-photo probes 17x slower.
    from threadpoolctl import threadpool_info

    from hybridnet_tf.training import linear_probe

    blas_threads = []
    real_fit = linear_probe._fit

    def recording_fit(*args):
        blas_threads.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return real_fit(*args)

    monkeypatch.setattr(linear_probe, "_fit", recording_fit)
    rng = np.random.default_rng(0)
    labels = (rng.uniform(size=(60, 3)) < 0.4).astype(np.float32)
    features = rng.normal(size=(60, 8)) + 2.0 * labels[:, [0, 1, 2, 0, 1, 2, 0, 1]]
    limited = fit_linear_probe(features, labels, seed=0)
    assert len(blas_threads) == 16 and all(threads == {1} for threads in blas_threads)  # 5 C x 3 folds + final
    loaded = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
    blas_threads.clear()
    as_loaded = fit_linear_probe(features, labels, seed=0, blas_threads=None)
    assert all(threads == loaded for threads in blas_threads)
    assert as_loaded.c == limited.c
    np.testing.assert_allclose(as_loaded.kernel, limited.kernel, atol=1e-6)


def _recorded_probes(monkeypatch, setter):
    """The probes passed to `linear_probe.<setter>` during the test (the setter still runs)."""
    from hybridnet_tf.training import linear_probe

    probes = []
    real_set = getattr(linear_probe, setter)
    monkeypatch.setattr(linear_probe, setter, lambda m, p: (probes.append(p), real_set(m, p)))
    return probes


def _cached_frozen_run(model, run_dir, epochs, frozen_steps):
    """`train_in_phases` of 24 images (8 for val), every epoch frozen and on cached features."""
    images, labels = images_and_labels(count=24)
    train_data = dataset(images, labels)
    train_in_phases(
        model, train_data, dataset(images[:8], labels[:8]), np.arange(4), str(run_dir), steps_per_epoch=3,
        epochs=epochs, optimization=Optimization(learning_rate=1e-2, batch_size=8),
        checkpointing=Checkpointing(monitor="val_mAP", verbose=0),
        schedule=PhaseSchedule(frozen_epochs=epochs, frozen_steps=frozen_steps,
                               feature_cache=FeatureCacheInputs(train_data, flip_views=True, seed=0)),
    )


def test_cached_frozen_phase_keeps_the_probe_head_and_trains_the_decoder(tmp_path, capsys, monkeypatch):
    probes = _recorded_probes(monkeypatch, "set_sigmoid_head")
    model = build_model(4, head="hybrid", **SMALL)
    decoder_before = [w.numpy().copy() for w in model.get_layer(LABEL_DECODER).weights]
    _cached_frozen_run(model, tmp_path, epochs=2, frozen_steps=20)
    out = capsys.readouterr().out
    assert "cached 48 feature views" in out
    assert "2 epoch(s) of 10 steps" in out  # 20 frozen_steps over 2 epochs
    assert "best epoch by val_decoded_OF1" in out  # the scores are the fixed probe's
    (probe,) = probes
    dense = model.get_layer(SIGMOID_HEAD).dense
    np.testing.assert_array_equal(dense.kernel.numpy(), probe.kernel)  # untouched by the decoder's training
    np.testing.assert_array_equal(dense.bias.numpy(), probe.bias)
    assert model.get_layer(SIGMOID_HEAD).trainable  # trainable again for a later phase
    changed = [not np.allclose(b, a.numpy()) for b, a in zip(decoder_before, model.get_layer(LABEL_DECODER).weights)]
    assert any(changed)
    assert (tmp_path / "best.keras").is_file()
    # TensorBoard: the cached phase writes per-label PR curves of val each epoch (no images of features).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "val_predictions"), size_guidance={"tensors": 0})
    events.Reload()
    pr_tags = [t for t in events.Tags()["tensors"] if t.startswith("pr/")]
    assert pr_tags and [e.step for e in events.Tensors(pr_tags[0])] == [0, 1]
    assert not [t for t in events.Tags()["tensors"] if t.startswith("val_examples/")]


@pytest.mark.parametrize("head, decoders", [("hybrid_rnn", 1), ("hybrid", 1), ("hybrid", 2)])
def test_cached_frozen_phase_sets_the_decoders_image_logits_from_the_probe(tmp_path, capsys, monkeypatch, head,
                                                                           decoders):
    probes = _recorded_probes(monkeypatch, "set_decoder_image_logits")
    model = build_model(4, head=head, image_logits=True, decoders=decoders, **SMALL)
    members_before = [[w.numpy().copy() for w in m.gru.weights] for m in decoder_members(model.get_layer(LABEL_DECODER))]
    _cached_frozen_run(model, tmp_path, epochs=1, frozen_steps=10)
    out = capsys.readouterr().out
    assert "decoder's image logits set by a linear probe" in out
    assert ("sigmoid head and decoder's" in out) == (head == "hybrid")
    (probe,) = probes
    assert np.abs(probe.kernel).max() > 0  # a real fit, not the zero start
    best = keras.models.load_model(tmp_path / "best.keras", safe_mode=True)
    members = decoder_members(model.get_layer(LABEL_DECODER))
    assert len(members) == decoders
    for member, best_member, before in zip(members, decoder_members(best.get_layer(LABEL_DECODER)), members_before):
        image_path = member.image_to_labels
        np.testing.assert_array_equal(image_path.kernel.numpy(), probe.kernel)  # fixed while the decoder trained
        np.testing.assert_array_equal(image_path.bias.numpy(), probe.bias)
        assert image_path.trainable  # trainable again for a later phase
        np.testing.assert_array_equal(best_member.image_to_labels.kernel.numpy(), probe.kernel)
        assert not np.allclose(before[0], member.gru.weights[0].numpy())  # every member trained


def test_phases_are_lengthened_to_their_minimum_steps():
    assert _lengthened(6, 10, 0) == 6
    assert _lengthened(6, 10, 1000) == 100
    assert _lengthened(200, 10, 1000) == 200


def test_the_bce_probe_is_logged_and_a_worse_fine_tuned_epoch_does_not_replace_it(tmp_path, monkeypatch):
    # The bce head has nothing to train on cached features: the probe is the frozen phase's model.
    # Its val metrics are the epoch log's row, so the fine-tuning phase's best.keras must beat them.
    from hybridnet_tf.training.callbacks import read_epoch_log

    probes = _recorded_probes(monkeypatch, "set_sigmoid_head")
    model = build_model(4, head="bce", **SMALL)
    images, labels = images_and_labels(count=24)
    train_data, val_data = dataset(images, labels), dataset(images[:8], labels[:8])
    train_in_phases(
        model, train_data, val_data, np.arange(4), str(tmp_path), steps_per_epoch=3, epochs=3,
        # A learning rate that wrecks the heads in the fine-tuning phase.
        optimization=Optimization(learning_rate=3.0, batch_size=8),
        checkpointing=Checkpointing(monitor="val_mAP", verbose=0),
        schedule=PhaseSchedule(frozen_epochs=1, learning_rate_factor=1.0,
                               feature_cache=FeatureCacheInputs(train_data, seed=0)),
    )
    (probe,) = probes
    header, rows = read_epoch_log(tmp_path / "history.csv")
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert "loss" not in rows[0] and "loss" in rows[1] and "loss" in header  # the column came with phase 2
    best = keras.models.load_model(tmp_path / "best.keras", safe_mode=True)
    val_scores = best.predict(images[:8], verbose=0)["scores"]
    assert np.isclose(rows[0]["val_mAP"], mean_average_precision(labels[:8], val_scores)[0])
    assert max(row["val_mAP"] for row in rows[1:]) < rows[0]["val_mAP"]  # the fine-tuned epochs are worse ...
    np.testing.assert_array_equal(best.get_layer(SIGMOID_HEAD).dense.kernel.numpy(), probe.kernel)  # ... and lost
    # TensorBoard has the probe's val mAP at its epoch, beside the fine-tuned epochs'.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "validation"), size_guidance={"tensors": 0})
    events.Reload()
    logged = {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in events.Tensors("epoch_mAP")}
    assert sorted(logged) == [0, 1, 2]
    assert np.isclose(logged[0], rows[0]["val_mAP"]) and np.isclose(logged[2], rows[2]["val_mAP"])
