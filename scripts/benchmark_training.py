"""Training throughput of a HybridNet: eager-graph vs XLA, float32 vs mixed precision.

Measures images/s of the teacher-forcing training step that `train` runs
(same model, loss, AdamW and compile options), on one synthetic batch
repeated, so the figures are the model's compute and not the input pipeline.

The issue asks for EfficientNetB0 at 224 px, batch 64, on a GPU:

    python scripts/benchmark_training.py                 # on a GPU machine

On a machine without a GPU, `--cpu-smoke` runs a reduced version (the
small test CNN, 64 px, batch 8, a few steps; ~1-2 min) only to show the
script works; its figures are CPU figures and say nothing about GPU speed.

Each configuration runs in its own process, so XLA caches and Keras' global
dtype policy do not leak from one to the next.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# XLA alone takes minutes to compile EfficientNetB0 on CPU, so the smoke run uses small_cnn.
CPU_SMOKE = {
    "backbone": "small_cnn", "image_size": 64, "batch_size": 8, "steps": 5, "warmup_steps": 1,
}


def measure(backbone, image_size, batch_size, num_labels, jit, policy, steps, warmup_steps):
    """Runs one configuration in this process; returns a dict of figures."""
    import numpy as np
    import tensorflow as tf

    from hybridnet_tf.model.hybridnet import build_model
    from hybridnet_tf.training.compute import dtype_policy
    from hybridnet_tf.training.settings import Optimization
    from hybridnet_tf.training.trainer import compile_training_model, training_batches

    with dtype_policy(policy):
        model = build_model(num_labels, backbone=backbone, image_size=image_size, max_length=6)
    training_model = compile_training_model(
        model, total_steps=10_000, warmup_steps=0, optimization=Optimization(jit_compile=bool(jit))
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    labels = (rng.uniform(size=(batch_size, num_labels)) < 3 / num_labels).astype("float32")
    batch = tf.data.Dataset.from_tensors((images, labels))
    data = training_batches(batch, model, np.arange(num_labels), static_batch_size=batch_size)

    start = time.perf_counter()
    training_model.fit(data, steps_per_epoch=warmup_steps, epochs=1, verbose=0)
    first = time.perf_counter() - start  # tracing, XLA compiling and the warmup steps
    start = time.perf_counter()
    history = training_model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return {
        "jit": jit,
        "policy": policy,
        "optimizer": type(training_model.optimizer).__name__,
        "first_seconds": first,
        "step_ms": 1000 * seconds / steps,
        "images_per_second": steps * batch_size / seconds,
        "loss": float(history.history["loss"][-1]),
    }


def run_child(args, jit, policy):
    command = [
        sys.executable, os.path.abspath(__file__), "--child",
        "--backbone", args.backbone, "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--num-labels", str(args.num_labels),
        "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
        "--jit", str(int(jit)), "--policy", policy,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"jit": jit, "policy": policy, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", help="default efficientnet_b0 (small_cnn with --cpu-smoke)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-labels", type=int, default=80)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps (incl. compile)")
    parser.add_argument(
        "--mixed-policy", default="auto", choices=("auto", "mixed_float16", "mixed_bfloat16"),
        help="the mixed precision policy to compare with float32 "
        "(auto: mixed_float16 on a GPU, mixed_bfloat16 on CPU)",
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true",
        help="no GPU: run a reduced version to show the script works (not GPU figures)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(
            args.backbone, args.image_size, args.batch_size, args.num_labels,
            bool(args.jit), args.policy, args.steps, args.warmup_steps,
        )))
        return 0

    from hybridnet_tf.training.compute import describe_devices

    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if not has_gpu and not args.cpu_smoke:
        print(
            "no GPU visible to TensorFlow: the figures this benchmark is for cannot be "
            "measured here. Run it on a GPU machine, or pass --cpu-smoke for a reduced "
            "run that only shows the script works.",
            file=sys.stderr,
        )
        return 2
    if args.cpu_smoke:
        for key, value in CPU_SMOKE.items():
            if key != "backbone" or args.backbone is None:
                setattr(args, key, value)
    args.backbone = args.backbone or "efficientnet_b0"
    mixed = args.mixed_policy
    if mixed == "auto":
        mixed = "mixed_float16" if has_gpu else "mixed_bfloat16"

    banner = ""
    if args.cpu_smoke:
        banner = (
            "CPU SMOKE RUN: a reduced model and sizes on CPU. These are NOT the GPU figures "
            "the benchmark is for (EfficientNetB0, 224 px, batch 64 on a GPU); on CPU, XLA "
            "and mixed precision are expected to be slower, not faster."
        )
        print(banner)
    print(
        f"{describe_devices()}; TensorFlow {tf.__version__}; {args.backbone}, "
        f"{args.image_size} px, batch {args.batch_size}, {args.num_labels} labels, "
        f"{args.steps} timed steps after {args.warmup_steps} warmup steps"
    )
    header = "| jit_compile | dtype policy | optimizer | first fit s | ms/step | images/s |"
    print(header)
    print("|---|---|---|---|---|---|")
    for jit in (False, True):
        for policy in ("float32", mixed):
            result = run_child(args, jit, policy)
            if "error" in result:
                print(f"| {jit} | {policy} | failed: {result['error']} | | | |")
                continue
            print(
                f"| {jit} | {policy} | {result['optimizer']} | {result['first_seconds']:.1f} | "
                f"{result['step_ms']:.1f} | {result['images_per_second']:.1f} |",
                flush=True,
            )
    if banner:
        print(banner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
