"""Heat maps: Grad-CAM on the backbone's spatial map, the PNG/JSON files, `explain` and `predict --explain`."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.explanation.explain_images import (
    Explainer,
    explain_files,
    has_attention_decoder,
    parse_label_choice,
)
from hybridnet_tf.explanation.grad_cam import SpatialSplit, make_grad_cam
from hybridnet_tf.explanation.heat_maps import peak_of
from hybridnet_tf.model.hybridnet import build_model, build_training_model, training_loss
from hybridnet_tf.model.hybridnet import with_training_targets

SIZE = 32
NAMES = ["red", "green"]
COLOURS = ((255.0, 0.0, 0.0), (0.0, 255.0, 0.0))


def _paint(image, label, x, y):
    image[y:y + 6, x:x + 6] = COLOURS[label]


def _square_images(count, seed):
    """Dark noise with 6x6 squares anywhere: label 0 a red one, label 1 a green one."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 40, (count, SIZE, SIZE, 3)).astype(np.float32)
    labels = (rng.random((count, 2)) < 0.5).astype(np.float32)
    for i in range(count):
        # One square in each half, so that two squares never overlap.
        sides = rng.permutation(2)
        for label, side in zip((0, 1), sides):
            if labels[i, label]:
                _paint(images[i], label, rng.integers(1, SIZE // 2 - 7) + side * SIZE // 2,
                       rng.integers(1, SIZE - 7))
    return images, labels


def _image_with(**positions):
    """A grey image with squares, e.g. `_image_with(red="left", green="right")`."""
    image = np.full((SIZE, SIZE, 3), 20.0, np.float32)
    for name, side in positions.items():
        _paint(image, NAMES.index(name), 5 if side == "left" else 5 + SIZE // 2, 13)
    return image


@pytest.fixture(scope="module")
def colour_model():
    """A bce HybridNet trained to tell a red square (label 0) from a green one (label 1)."""
    keras.utils.set_random_seed(0)
    # BatchNorm frozen: 128 steps leave moving statistics far from the batch ones.
    model = build_model(2, image_size=SIZE, head="bce", dropout=0.0, freeze_batch_norm=True)
    images, labels = _square_images(512, seed=0)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(512, seed=0).batch(32)
    training_model = build_training_model(model)
    training_model.compile(keras.optimizers.Adam(3e-3), loss=training_loss(model))
    training_model.fit(with_training_targets(data, model, np.arange(2)), epochs=8, verbose=0)
    scores = model(np.stack([_image_with(red="left"), _image_with(green="right")]))["scores"].numpy()
    assert scores[0, 0] > 0.8 > scores[0, 1] and scores[1, 1] > 0.8 > scores[1, 0], scores
    return model


def _halves(maps):
    width = maps.shape[2]
    return maps[:, :, : width // 2].sum(axis=(1, 2)), maps[:, :, width // 2:].sum(axis=(1, 2))


def test_grad_cam_peaks_where_the_label_is_in_the_image(colour_model):
    grad_cam = make_grad_cam(colour_model)
    one, other = _image_with(red="left", green="right"), _image_with(red="right", green="left")
    images = np.stack([one, one, other, other])
    maps, scores = grad_cam(tf.constant(images), tf.constant([0, 1, 0, 1]))
    maps = maps.numpy()
    left, right = _halves(maps)
    # red in the left half of `one`, green in its right half; the other way round in `other`
    assert left[0] > 2 * right[0] and right[1] > 2 * left[1], maps[:2]
    assert right[2] > 2 * left[2] and left[3] > 2 * right[3], maps[2:]
    assert maps.max(axis=(1, 2)).tolist() == [1.0] * 4
    expected = colour_model(images)["scores"].numpy()
    np.testing.assert_allclose(scores.numpy(), expected[[0, 1, 2, 3], [0, 1, 0, 1]], atol=1e-5)
    assert peak_of(maps[0], SIZE, SIZE)["x_fraction"] < 0.5 < peak_of(maps[1], SIZE, SIZE)["x_fraction"]


@pytest.mark.parametrize("head", ["hybrid", "bce", "hybrid_rnn"])
def test_spatial_split_reproduces_the_scores_of_every_head(head):
    model = build_model(3, image_size=SIZE, head=head, gru_units=16, embedding_dim=8)
    split = SpatialSplit(model)  # raises if the cut changes the scores
    assert split.map_shape == (SIZE // 8, SIZE // 8, 128)
    maps, _ = make_grad_cam(model)(tf.random.uniform((2, SIZE, SIZE, 3), 0, 255), tf.constant([0, 2]))
    assert maps.shape == (2, SIZE // 8, SIZE // 8)
    assert np.all(np.isfinite(maps.numpy()))


def test_parse_label_choice():
    names = ["cat", "dog", "car"]
    assert parse_label_choice("decoded", names) == ("decoded", None)
    assert parse_label_choice("top-2", names) == ("top", 2)
    assert parse_label_choice("car,cat", names) == ("names", [2, 0])
    with pytest.raises(ValueError, match="unknown label.*'bus'"):
        parse_label_choice("bus", names)
    with pytest.raises(ValueError, match="between 1 and 3"):
        parse_label_choice("top-9", names)


def _write_run(model, root):
    """A minimal run directory (config, vocabulary, best.keras) for the command line."""
    from hybridnet_tf.config import load_config, save_config
    from hybridnet_tf.vocabulary import LabelVocabulary

    run_dir = root / "run"
    run_dir.mkdir()
    config = load_config(None, ["data.demo_image_size=32", "model.head=bce"])
    save_config(config, str(run_dir / "config.yaml"))
    LabelVocabulary(NAMES).save(str(run_dir / "vocabulary.json"))
    model.save(str(run_dir / "best.keras"))
    return run_dir


def _write_images(folder):
    folder.mkdir()
    for name, image in (("red.png", _image_with(red="left")), ("green.png", _image_with(green="right"))):
        tf.io.write_file(str(folder / name), tf.io.encode_png(image.astype(np.uint8)))
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def test_explain_files_writes_png_and_peaks_and_reports_unreadable_files(colour_model, tmp_path):
    images = _write_images(tmp_path / "images")
    paths = [str(images / n) for n in ("red.png", "broken.jpg", "green.png")]
    explainer = Explainer(colour_model, NAMES)
    results = explain_files(explainer, paths, str(tmp_path / "out"), SIZE, labels="decoded")
    assert [r["path"] for r in results] == paths
    assert "error" in results[1] and "png" not in results[1]
    red, green = results[0], results[2]
    assert [item["label"] for item in red["labels"]] == ["red"]
    assert [item["label"] for item in green["labels"]] == ["green"]
    assert red["labels"][0]["method"] == "grad_cam"
    # red.png has its square on the left, green.png on the right
    assert red["labels"][0]["peak"]["x_fraction"] < 0.5 < green["labels"][0]["peak"]["x_fraction"]
    saved = json.load(open(red["json"]))
    assert saved["labels"][0]["peak"] == red["labels"][0]["peak"]
    assert saved["shown_size"] == [SIZE, SIZE] and saved["image"] == paths[0]
    png = tf.io.decode_png(tf.io.read_file(red["png"]))
    # The picture plus one panel side by side: wider than tall.
    assert png.shape[1] > 1.5 * png.shape[0]

    # Named labels: a map for each on one image, each peaking on its own square.
    both = tmp_path / "both.png"
    tf.io.write_file(str(both), tf.io.encode_png(_image_with(red="right", green="left").astype(np.uint8)))
    (result,) = explain_files(explainer, [str(both)], str(tmp_path / "out2"), SIZE, labels="red,green")
    peaks = {item["label"]: item["peak"]["x_fraction"] for item in result["labels"]}
    assert peaks["green"] < 0.5 < peaks["red"]


def test_explain_and_predict_explain_commands(colour_model, tmp_path, capsys):
    from hybridnet_tf.cli import main

    run_dir = _write_run(colour_model, tmp_path)
    images = _write_images(tmp_path / "images")
    out = tmp_path / "maps"
    code = main(["explain", "--model", str(run_dir), str(images), "--out", str(out), "--labels", "top-2"])
    assert code == 1  # broken.jpg
    captured = capsys.readouterr()
    assert "broken.jpg: ERROR" in captured.err
    assert "1 of 3 images could not be read" in captured.err
    assert sorted(os.listdir(out)) == ["green.json", "green.png", "red.json", "red.png"]
    assert [item["label"] for item in json.load(open(out / "red.json"))["labels"]] == ["red", "green"]

    predicted = tmp_path / "predicted"
    code = main(["predict", "--model", str(run_dir / "best.keras"), str(images / "green.png"),
                 "--explain", str(predicted)])
    assert code == 0
    saved = json.load(open(predicted / "green.json"))
    assert [item["label"] for item in saved["labels"]] == ["green"]
    assert saved["labels"][0]["peak"]["x_fraction"] > 0.5

    code = main(["explain", "--model", str(run_dir), str(images), "--out", str(out), "--labels", "cat"])
    assert code == 2
    assert "unknown label(s) ['cat']" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["hybrid", "hybrid_rnn"])
def test_attention_decoder_maps_come_from_its_own_weights(head):
    try:
        from hybridnet_tf.model.hybridnet import with_attention_output
    except ImportError:
        pytest.skip("the attention decoder (hybridnet.with_attention_output) is not in this tree yet")
    model = build_model(3, image_size=SIZE, head=head, decoder="attention", gru_units=16, embedding_dim=8)
    assert has_attention_decoder(model)
    images = tf.random.uniform((4, SIZE, SIZE, 3), 0, 255, seed=3).numpy()
    explained = Explainer(model, ["a", "b", "c"]).explain(images, ("top", 3))
    attention = with_attention_output(model)(images)
    methods = []
    for row, items in enumerate(explained):
        ids = attention["label_ids"].numpy()[row].tolist()
        for item in items:
            methods.append(item["method"])
            if item["index"] in ids:
                weights = attention["attention"].numpy()[row, ids.index(item["index"])]
                assert item["method"] == "attention"
                np.testing.assert_allclose(item["heat_map"], weights / weights.max(), atol=1e-6)
            else:  # not emitted by the decoder: no attention step to show, Grad-CAM instead
                assert item["method"] == "grad_cam"
    assert "attention" in methods
    # Grad-CAM also works through the attention decoder (the heads read the map there).
    split = SpatialSplit(model)
    assert split.map_shape == (SIZE // 8, SIZE // 8, 128)
    grad_cam_only = Explainer(model, ["a", "b", "c"], method="grad_cam").explain(images, ("top", 2))
    assert {item["method"] for items in grad_cam_only for item in items} == {"grad_cam"}
