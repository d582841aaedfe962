"""SavedModel and TFLite exports match the Keras model; every artefact predicts through the CLI."""

import csv
import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hybridnet_tf import cli
from hybridnet_tf.config import load_config, save_config
from hybridnet_tf.data.pipeline import decode_and_resize, make_dataset
from hybridnet_tf.evaluation.thresholds import load_thresholds
from hybridnet_tf.data.load_splits import load_splits
from hybridnet_tf.export.artifacts import load_predictor, replace_atomically
from hybridnet_tf.export.saved_model import export_saved_model
from hybridnet_tf.export.tflite import export_tflite
from hybridnet_tf.model.hybridnet import (
    build_model,
    build_training_model,
    training_loss,
    with_training_targets,
)

SIZE = 32
OVERRIDES = [
    "data.demo_train=96",
    "data.demo_val=32",
    f"data.demo_image_size={SIZE}",
    f"model.image_size={SIZE}",
    "model.gru_units=32",
    "model.embedding_dim=16",
    "model.dropout=0.0",
]


def _all_layers(layer):
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from _all_layers(inner)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HybridNet fitted for 40 steps on 32x32 demo scenes, saved as a run directory.

    Random weights decode the same one or two labels for every image; a
    short fit makes the decoded label sets differ between images, so label
    parity checks mean something. BatchNorm momentum 0.5 lets the moving
    statistics follow the 40 steps (at 0.99 inference would still see the
    initial ones, and decode one label set for all images).
    """
    root = tmp_path_factory.mktemp("export")
    config = load_config(None, OVERRIDES + [f"data.demo_dir={root / 'demo'}"])
    splits = load_splits(config["data"])
    train, val, vocabulary = splits.train, splits.val, splits.vocabulary
    keras.utils.set_random_seed(0)
    model = build_model(len(vocabulary), image_size=SIZE, gru_units=32, embedding_dim=16, dropout=0.0)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    training_model = build_training_model(model)
    training_model.compile(keras.optimizers.Adam(1e-2), training_loss(model))
    batches = make_dataset(train.to_dataset(), SIZE, 32, cache=True)
    sequences = with_training_targets(batches, model, vocabulary.label_rank("freq2rare"))
    training_model.fit(sequences.repeat(), steps_per_epoch=40, epochs=1, shuffle=False, verbose=0)

    run_dir = root / "run"
    run_dir.mkdir()
    save_config(config, str(run_dir / "config.yaml"))
    vocabulary.save(str(run_dir / "vocabulary.json"))
    model.save(str(run_dir / "best.keras"))
    paths = val.paths[:16]
    images = np.stack([decode_and_resize(tf.io.read_file(p), SIZE).numpy() for p in paths])
    outputs = {k: v.numpy() for k, v in model(images, training=False).items()}
    return {
        "root": root,
        "run_dir": run_dir,
        "model": model,
        "vocabulary": vocabulary,
        "paths": paths,
        "images": images,
        "outputs": outputs,
        "thresholds": {"global": 0.4, "per_class": list(np.linspace(0.3, 0.7, len(vocabulary)))},
    }


@pytest.fixture(scope="module")
def saved_model(trained):
    path = trained["root"] / "serving" / "hybridnet" / "1"
    export_saved_model(
        trained["model"], trained["vocabulary"], path, SIZE, thresholds=trained["thresholds"]
    )
    return path, tf.saved_model.load(str(path))


_TFLITE = {}


@pytest.fixture(scope="module")
def tflite(trained):
    """`tflite(quantize)` -> a loaded `TFLitePredictor`, converted once per mode."""

    def get(quantize):
        if quantize not in _TFLITE:
            path = trained["root"] / f"hybridnet_{quantize}.tflite"
            export_tflite(
                trained["model"],
                path,
                quantize=quantize,
                representative_images=trained["images"],
                vocabulary=trained["vocabulary"],
                thresholds=trained["thresholds"],
            )
            _TFLITE[quantize] = load_predictor(path, num_threads=2)
        return _TFLITE[quantize]

    yield get
    _TFLITE.clear()


def _label_sets(label_ids):
    return [sorted(int(i) for i in row if i >= 0) for row in label_ids]


def _check_sane(outputs, num_labels):
    scores, label_ids = outputs["scores"], outputs["label_ids"]
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))
    assert label_ids.min() >= -1 and label_ids.max() < num_labels
    for row in label_ids:
        chosen = row[row >= 0]
        assert len(set(chosen.tolist())) == len(chosen), "a label was decoded twice"
        assert np.all(row[len(chosen):] == -1), "-1 must only follow the decoded labels"


def test_fixture_model_decodes_varied_label_sets(trained):
    label_sets = _label_sets(trained["outputs"]["label_ids"])
    assert len({tuple(s) for s in label_sets}) >= 4
    assert max(len(s) for s in label_sets) >= 2


def test_saved_model_matches_keras(trained, saved_model):
    _, loaded = saved_model
    expected = trained["outputs"]
    outputs = loaded.signatures["predict_images"](image=tf.constant(trained["images"]))
    assert np.abs(outputs["scores"].numpy() - expected["scores"]).max() < 1e-4
    np.testing.assert_array_equal(outputs["label_ids"].numpy(), expected["label_ids"])
    np.testing.assert_array_equal(outputs["num_labels_predicted"].numpy(), expected["num_labels"])
    names = trained["vocabulary"].names
    for row_labels, row_ids in zip(outputs["labels"].numpy(), expected["label_ids"]):
        assert [s.decode() for s in row_labels] == [names[i] if i >= 0 else "" for i in row_ids]

    as_uint8 = np.round(trained["images"]).astype(np.uint8)
    from_uint8 = loaded.signatures["predict_images_uint8"](image=tf.constant(as_uint8))
    from_float = loaded.signatures["predict_images"](image=tf.constant(as_uint8.astype(np.float32)))
    np.testing.assert_array_equal(from_uint8["scores"].numpy(), from_float["scores"].numpy())


def test_serving_default_decodes_jpeg_and_png_as_evaluation_does(trained, saved_model):
    _, loaded = saved_model
    jpegs = [tf.io.read_file(p).numpy() for p in trained["paths"][:4]]
    # A PNG of another size and shape exercises the resize.
    rng = np.random.default_rng(0)
    pngs = [tf.io.encode_png(rng.integers(0, 256, (45, 29, 3), dtype=np.uint8)).numpy()]
    pngs.append(tf.io.encode_png(np.round(trained["images"][5]).astype(np.uint8)).numpy())
    # A phone's portrait photo: stored on its side, EXIF orientation 6.
    exif = Image.Exif()
    exif[0x0112] = 6
    lying = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(lying, "JPEG", exif=exif.tobytes())
    encoded = jpegs + pngs + [lying.getvalue()]
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    decoded = np.stack([decode_and_resize(e, SIZE).numpy() for e in encoded])
    direct = loaded.signatures["predict_images"](image=tf.constant(decoded))
    for key in ("scores", "label_ids", "labels", "num_labels_predicted"):
        np.testing.assert_array_equal(served[key].numpy(), direct[key].numpy())
    assert np.abs(served["scores"].numpy()[:4] - trained["outputs"]["scores"][:4]).max() < 1e-4


def test_serving_default_rejects_bad_bytes_then_keeps_working(trained, saved_model):
    _, loaded = saved_model
    serve = loaded.signatures["serving_default"]
    good = tf.io.read_file(trained["paths"][0]).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(image_bytes=tf.constant([good, b"not an image"]))
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve(image_bytes=tf.constant([good[: len(good) // 3]]))  # truncated JPEG
    outputs = serve(image_bytes=tf.constant([good]))
    assert np.abs(outputs["scores"].numpy()[0] - trained["outputs"]["scores"][0]).max() < 1e-4


def test_saved_model_writes_labels_thresholds_and_replaces_atomically(trained, saved_model, tmp_path):
    path, _ = saved_model
    names = trained["vocabulary"].names
    assert json.loads((path / "labels.json").read_text())["names"] == names
    thresholds = load_thresholds(path / "thresholds.json", names)
    np.testing.assert_allclose(thresholds["per_class"], trained["thresholds"]["per_class"])
    assert json.loads((path / "export.json").read_text())["image_size"] == SIZE
    assert not [p for p in os.listdir(path.parent) if p.startswith(".")], "temp folders left"

    target = tmp_path / "out"
    replace_atomically(target, lambda d: open(os.path.join(d, "a"), "w").close())
    with pytest.raises(FileExistsError):
        replace_atomically(target, lambda d: None)

    def crash(directory):
        open(os.path.join(directory, "b"), "w").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(target, crash, overwrite=True)
    assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["out"]
    replace_atomically(target, lambda d: open(os.path.join(d, "b"), "w").close(), overwrite=True)
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["out"]


def test_tflite_float32_matches_keras_with_builtin_ops_only(trained, tflite):
    predictor = tflite("none")
    outputs = predictor(trained["images"])
    expected = trained["outputs"]
    assert np.abs(outputs["scores"] - expected["scores"]).max() < 1e-4
    np.testing.assert_array_equal(outputs["label_ids"], expected["label_ids"])
    ops = predictor.op_names()
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    assert predictor.batch_size == 1
    sidecar = json.loads((trained["root"] / "hybridnet_none.json").read_text())
    assert sidecar["labels"] == trained["vocabulary"].names and sidecar["image_size"] == SIZE


def test_tflite_float16_is_close(trained, tflite):
    outputs = tflite("float16")(trained["images"])
    assert np.abs(outputs["scores"] - trained["outputs"]["scores"]).max() < 1e-2
    _check_sane(outputs, len(trained["vocabulary"]))


@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_tflite_quantized_models_run_and_are_sane(trained, tflite, quantize):
    predictor = tflite(quantize)
    outputs = predictor(trained["images"])
    _check_sane(outputs, len(trained["vocabulary"]))
    assert not [op for op in predictor.op_names() if op.startswith("Flex") or op == "CUSTOM"]
    # Quantised, not broken: scores stay near the float model's.
    assert np.abs(outputs["scores"] - trained["outputs"]["scores"]).mean() < 0.05
    top = np.argmax(outputs["scores"], axis=1) == np.argmax(trained["outputs"]["scores"], axis=1)
    assert top.mean() >= 0.75


def test_tflite_from_saved_model_with_dynamic_batch(trained, saved_model):
    path, _ = saved_model
    out = trained["root"] / "from_saved_model.tflite"
    export_tflite(path, out, batch_size=None)
    predictor = load_predictor(out)
    assert predictor.batch_size is None
    assert predictor.vocabulary.names == trained["vocabulary"].names
    np.testing.assert_allclose(predictor.thresholds["per_class"], trained["thresholds"]["per_class"])
    outputs = predictor(trained["images"])  # one call with the whole batch
    assert np.abs(outputs["scores"] - trained["outputs"]["scores"]).max() < 1e-4
    np.testing.assert_array_equal(outputs["label_ids"], trained["outputs"]["label_ids"])


def test_predict_cli_on_every_artifact(trained, saved_model, tflite, tmp_path):
    run_dir = trained["run_dir"]
    tflite("none")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    images = [str(p) for p in trained["paths"][:6]] + [str(bad)]
    artifacts = {
        "run_dir": str(run_dir),
        "keras": str(run_dir / "best.keras"),
        "saved_model": str(saved_model[0]),
        "tflite": str(trained["root"] / "hybridnet_none.tflite"),
    }
    label_sets = {}
    for kind, path in artifacts.items():
        json_path, csv_path = tmp_path / f"{kind}.json", tmp_path / f"{kind}.csv"
        outputs = ["--json", str(json_path), "--csv", str(csv_path)]
        code = cli.main(["predict", "--model", path, *images, *outputs])
        assert code == 1, "an unreadable image must give exit code 1"
        results = json.loads(json_path.read_text())
        assert [r["path"] for r in results] == images
        assert "error" in results[-1] and all("labels" in r for r in results[:-1])
        label_sets[kind] = [sorted(item["label"] for item in r["labels"]) for r in results[:-1]]
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(images) and rows[-1]["error"]
    names = trained["vocabulary"].names
    expected = [sorted(names[i] for i in s) for s in _label_sets(trained["outputs"]["label_ids"][:6])]
    for kind, sets in label_sets.items():
        assert sets == expected, kind

    # --run-dir stays an alias; --threshold tuned uses the thresholds beside the model.
    assert cli.main(["predict", "--run-dir", str(run_dir), images[0]]) == 0
    json_path = tmp_path / "tuned.json"
    assert cli.main(["predict", "--model", artifacts["tflite"], images[0], "--threshold", "tuned",
                     "--json", str(json_path)]) == 0
    scores = trained["outputs"]["scores"][0]
    chosen = np.nonzero(scores >= np.asarray(trained["thresholds"]["per_class"]))[0]
    assert sorted(r["label"] for r in json.loads(json_path.read_text())[0]["labels"]) == sorted(
        names[i] for i in chosen
    )


def test_export_cli_writes_servable_artifacts(trained, tmp_path, capsys):
    run_dir = str(trained["run_dir"])
    int8 = tmp_path / "model_int8.tflite"
    command = ["export", "--run-dir", run_dir, "--format", "tflite", "--quantize", "int8", "--out", str(int8)]
    assert cli.main(command) == 0
    assert cli.main(command) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    sidecar = json.loads((tmp_path / "model_int8.json").read_text())
    assert sidecar["quantize"] == "int8"
    # No tuned thresholds in the run: the config's eval.threshold is written.
    assert sidecar["thresholds"]["global"] == 0.5
    predictor = load_predictor(int8)
    _check_sane(predictor(trained["images"]), len(trained["vocabulary"]))
    assert cli.main(["export", "--run-dir", run_dir, "--quantize", "int8"]) == 2  # tflite only


def test_load_predictor_says_what_it_accepts(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="run directory, a .keras file"):
        load_predictor(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="neither a run directory"):
        load_predictor(tmp_path)


@pytest.mark.slow
def test_int8_matches_float_on_a_trained_demo_run(tmp_path):
    """Acceptance of int8: top-label agreement >= 95 % and mAP within 2 points on demo val.

    Uses the run in HYBRIDNET_TRAINED_RUN if set, else trains the demo
    config on a short schedule and 800 of its 2000 training scenes here.
    Against all 2000, one after the other beside a yardstick run (AVX2):
    187 s against 363 s wall, 159 s against 268 s CPU; agreement 98.4 %
    against 98.0 %, mAP 0.9789 -> 0.9790 against 0.9988 -> 0.9987. The
    demo's full schedule made this one test 8 min 16 s of CI.
    """
    from hybridnet_tf.evaluation.metrics import mean_average_precision
    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.experiment import as_dataset, run_train
    from hybridnet_tf.export import representative_images

    run_dir = os.environ.get("HYBRIDNET_TRAINED_RUN")
    if not run_dir:
        run_dir = str(tmp_path / "run")
        demo = str(tmp_path / "demo")
        config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")
        # A shorter schedule than the demo's (5 warm-start epochs, 8 frozen ones of one pass
        # each): a trained model is what matters here, not the demo's best one.
        settings = ["train.warm_start_epochs=5", "train.epochs=8", "train.frozen_steps=0", "data.demo_train=800",
                    f"data.demo_dir={demo}"]
        run_train(load_config(config_path, settings), run_dir, verbose=0)
    config, vocabulary, model = load_run(run_dir)
    val = load_splits(config["data"]).val
    dataset = as_dataset(val, config, False, batch_size=64)
    images = np.concatenate([x.numpy() for x, _ in dataset])
    y_true = np.concatenate([y.numpy() for _, y in dataset])
    path = tmp_path / "int8.tflite"
    export_tflite(model, path, quantize="int8", representative_images=representative_images(config),
                  vocabulary=vocabulary)
    float_scores = model.predict(images, batch_size=64, verbose=0)["scores"]
    int8_scores = load_predictor(path, num_threads=2)(images)["scores"]
    agreement = np.mean(np.argmax(int8_scores, 1) == np.argmax(float_scores, 1))
    float_map, _ = mean_average_precision(y_true, float_scores)
    int8_map, _ = mean_average_precision(y_true, int8_scores)
    print(f"int8 vs float: top-label agreement {agreement:.4f}, mAP {float_map:.4f} -> {int8_map:.4f}")
    assert agreement >= 0.95 and float_map - int8_map <= 0.02, (agreement, float_map, int8_map)
