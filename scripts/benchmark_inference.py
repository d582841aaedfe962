"""Inference latency and throughput of every artefact of a HybridNet, on this CPU, in one run.

Runtimes: Keras `model.predict`, a direct Keras call, the exported SavedModel
(`predict_images` signature) and TFLite float32 / float16 / int8 (LiteRT
interpreter, XNNPACK, `--threads` threads, batch size 1: a batch of 32 is
32 invocations). Two models: the demo HybridNet of a run directory (trained
here for a few epochs when `--run-dir` is not given) and an EfficientNetB0
HybridNet at 224x224 with random weights (weights=None: timing only; its
scores mean nothing).

Calls are timed round-robin (one call of each runtime per round), so load
from other processes hits all runtimes alike and the ratios stay fair; the
absolute numbers still depend on the machine. For the demo run it also
checks the exports against Keras on the val split: max |score difference|,
top-label agreement and the mAP of each.

Usage:
    PYTHONPATH=. python scripts/benchmark_inference.py --run-dir runs/demo
    PYTHONPATH=. python scripts/benchmark_inference.py --skip-efficientnet   # trains a demo run
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def directory_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def train_demo_run(run_dir, epochs, demo_dir):
    from hybridnet_tf.config import load_config
    from hybridnet_tf.experiment import run_train

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(
        os.path.join(repo, "configs", "demo.yaml"),
        [f"train.epochs={epochs}", f"data.demo_dir={demo_dir}"],
    )
    run_train(config, run_dir, verbose=0)
    return run_dir


def export_all(model, vocabulary, out_dir, image_size, resize, calibration):
    """SavedModel + TFLite fp32 / fp16 / int8 into `out_dir`; returns {name: path}."""
    from hybridnet_tf.export.saved_model import export_saved_model
    from hybridnet_tf.export.tflite import export_tflite

    paths = {"saved_model": os.path.join(out_dir, "saved_model", "1")}
    start = time.perf_counter()
    export_saved_model(model, vocabulary, paths["saved_model"], image_size, resize=resize, overwrite=True)
    print(f"  SavedModel exported in {time.perf_counter() - start:.0f} s", flush=True)
    for quantize, name in (("none", "tflite_fp32"), ("float16", "tflite_fp16"), ("int8", "tflite_int8")):
        paths[name] = os.path.join(out_dir, f"hybridnet_{quantize}.tflite")
        start = time.perf_counter()
        export_tflite(
            model, paths[name], quantize=quantize, vocabulary=vocabulary, resize=resize,
            representative_images=calibration if quantize == "int8" else None, overwrite=True,
        )
        print(f"  TFLite {quantize} converted in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def runtimes(model, paths, threads):
    """{name: (callable on a float32 batch, artefact size in bytes)}."""
    import tensorflow as tf

    from hybridnet_tf.export.artifacts import load_predictor

    loaded = tf.saved_model.load(paths["saved_model"])
    signature = loaded.signatures["predict_images"]
    keras_size = paths.get("keras_size")
    result = {
        "keras predict": (lambda x: model.predict(x, batch_size=32, verbose=0)["scores"], keras_size),
        "keras call": (lambda x: model(x, training=False)["scores"].numpy(), keras_size),
        "SavedModel": (
            lambda x: signature(image=tf.constant(x))["scores"].numpy(),
            directory_size(paths["saved_model"]),
        ),
    }
    result["_loaded"] = loaded  # keep the SavedModel alive while its signature is used
    for name in ("tflite_fp32", "tflite_fp16", "tflite_int8"):
        predictor = load_predictor(paths[name], num_threads=threads)
        result[name.replace("_", " ")] = (lambda x, p=predictor: p(x)["scores"], directory_size(paths[name]))
    return result


def time_round_robin(functions, batch, rounds, warmup=3):
    """Seconds per call of each function, timed one call per function per round."""
    for _ in range(warmup):
        for function in functions.values():
            function(batch)
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function(batch)
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(values) for name, values in times.items()}


def benchmark(title, model, paths, images, threads, single_rounds, batch_rounds):
    available = runtimes(model, paths, threads)
    functions = {k: v[0] for k, v in available.items() if not k.startswith("_")}
    sizes = {k: v[1] for k, v in available.items() if not k.startswith("_")}
    single = time_round_robin(functions, images[:1], single_rounds)
    batch = images[:32]
    if len(batch) < 32:
        batch = np.concatenate([batch] * (32 // len(batch) + 1))[:32]
    batched = time_round_robin(functions, batch, batch_rounds, warmup=1)
    base = np.median(single["SavedModel"])
    base_throughput = 32 / np.median(batched["SavedModel"])
    lines = [
        f"### {title}",
        "",
        "| runtime | size | latency median (ms) | latency p90 (ms) | latency / SavedModel "
        "| batch-32 images/s | throughput / SavedModel |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in functions:
        median = np.median(single[name])
        throughput = 32 / np.median(batched[name])
        size = f"{sizes[name] / 1e6:.2f} MB" if sizes[name] else "-"
        lines.append(
            f"| {name} | {size} | {1e3 * median:.2f} | {1e3 * np.percentile(single[name], 90):.2f} "
            f"| {median / base:.2f}x | {throughput:.0f} | {throughput / base_throughput:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"TFLite fp32 / SavedModel latency: {np.median(single['tflite fp32']) / base:.2f} (target <= 0.7); "
        f"int8 / SavedModel: {np.median(single['tflite int8']) / base:.2f} (target <= 0.4). "
        f"{single_rounds} single-image rounds, {batch_rounds} batch rounds, TFLite {threads} threads."
    )
    print("\n".join(lines) + "\n", flush=True)
    return lines


def parity_on_val(run_dir, model, paths, threads):
    """Max |score diff|, top-label agreement and mAP of each export vs Keras on the val split."""
    import tensorflow as tf

    from hybridnet_tf.evaluation.metrics import mean_average_precision
    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.data.load_splits import load_splits
    from hybridnet_tf.experiment import as_dataset
    from hybridnet_tf.export.artifacts import load_predictor

    config, _, _ = load_run(run_dir)
    splits = load_splits(config["data"])
    val, from_files = splits.val, splits.from_files
    dataset = as_dataset(val, config, False, batch_size=64, from_files=from_files)
    images = np.concatenate([x.numpy() for x, _ in dataset])
    y_true = np.concatenate([y.numpy() for _, y in dataset])
    reference = model.predict(images, batch_size=64, verbose=0)
    reference_map, _ = mean_average_precision(y_true, reference["scores"])
    loaded = tf.saved_model.load(paths["saved_model"])
    outputs = {
        "SavedModel": {
            k: v.numpy() for k, v in loaded.signatures["predict_images"](image=tf.constant(images)).items()
        }
    }
    for name in ("tflite_fp32", "tflite_fp16", "tflite_int8"):
        outputs[name.replace("_", " ")] = load_predictor(paths[name], num_threads=threads)(images)
    lines = [
        f"### Parity with Keras on the demo val split ({len(images)} images; Keras mAP {100 * reference_map:.2f})",
        "",
        "| export | max abs score diff | top-label agreement | decoded label sets identical | mAP | mAP drop (points) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    top = np.argmax(reference["scores"], axis=1)
    for name, out in outputs.items():
        score_map, _ = mean_average_precision(y_true, out["scores"])
        same_sets = np.mean(np.all(out["label_ids"] == reference["label_ids"], axis=1))
        lines.append(
            f"| {name} | {np.abs(out['scores'] - reference['scores']).max():.2e} "
            f"| {100 * np.mean(np.argmax(out['scores'], 1) == top):.1f} % | {100 * same_sets:.1f} % "
            f"| {100 * score_map:.2f} | {100 * (reference_map - score_map):.2f} |"
        )
    print("\n".join(lines) + "\n", flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a trained demo run (default: train one here)")
    parser.add_argument("--train-epochs", type=int, default=4, help="epochs when training a demo run")
    parser.add_argument("--out-dir", help="where to write the exports (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=2, help="TFLite interpreter threads")
    parser.add_argument("--rounds", type=int, default=50, help="single-image timing rounds")
    parser.add_argument("--batch-rounds", type=int, default=5, help="batch-32 timing rounds")
    parser.add_argument("--calibration-images", type=int, default=100, help="int8 representative images")
    parser.add_argument("--skip-efficientnet", action="store_true")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.experiment import image_size_of
    from hybridnet_tf.export import representative_images

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="hybridnet_benchmark_")
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs; exports in {out_dir}")
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = os.path.join(out_dir, "demo_run")
        print(f"training a demo run for {args.train_epochs} epochs into {run_dir} ...", flush=True)
        train_demo_run(run_dir, args.train_epochs, os.path.join(out_dir, "demo_data"))

    report = []
    config, vocabulary, model = load_run(run_dir)
    size = image_size_of(config)
    calibration = representative_images(config, args.calibration_images)
    print(f"demo model ({size}x{size}, {len(vocabulary)} labels): exporting ...", flush=True)
    paths = export_all(model, vocabulary, os.path.join(out_dir, "demo"), size, config["data"]["resize"], calibration)
    paths["keras_size"] = directory_size(os.path.join(run_dir, "best.keras"))
    report += parity_on_val(run_dir, model, paths, args.threads)
    report += benchmark(
        f"Demo HybridNet ({config['model']['backbone']}, {size}x{size}, {len(vocabulary)} labels)",
        model, paths, calibration, args.threads, args.rounds, args.batch_rounds,
    )

    if not args.skip_efficientnet:
        from hybridnet_tf.model.hybridnet import build_model

        keras.utils.set_random_seed(0)
        names = [f"label_{i}" for i in range(80)]
        model = build_model(len(names), backbone="efficientnet_b0", image_size=224, weights=None)
        # The demo calibration images, resized: realistic pixel statistics for int8.
        images = tf.image.resize(calibration, [224, 224], antialias=True).numpy()
        print("EfficientNetB0 HybridNet (224x224, 80 labels, random weights): exporting ...", flush=True)
        directory = os.path.join(out_dir, "efficientnet_b0")
        os.makedirs(directory, exist_ok=True)
        keras_path = os.path.join(directory, "model.keras")
        model.save(keras_path)
        paths = export_all(model, names, directory, 224, "squash", images)
        paths["keras_size"] = directory_size(keras_path)
        report += benchmark(
            "EfficientNetB0 HybridNet (224x224, 80 labels, weights=None: timing only)",
            model, paths, images, args.threads, max(10, args.rounds // 2), max(2, args.batch_rounds // 2),
        )
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
