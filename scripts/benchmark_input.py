"""Input pipeline throughput on coco128: the project's tf.data pipeline against two baselines.

Measures images/s, in one run, of:
  a) the training pipeline with augmentation (squash + random flip, the
     default config), and a heavy variant (random resized crop + flip +
     RandAugment + MixUp/CutMix);
  b) the training pipeline without augmentation (read, check, decode,
     resize, shuffle, batch);
  c) a bare `tf.io.decode_jpeg` + the same resize in tf.data with the same
     parallelism: the decode bound;
  d) a plain PIL/NumPy loader (a Python generator reading and resizing with
     PIL, one thread), as simple seed projects do;
  e) the default training pipeline with `cache="memory"`: uint8 images
     cached after the resize, so the timed epochs (after the untimed first
     one that fills the cache) only shuffle, cast, flip and batch.
No caching except in e). Each loader is warmed up (one epoch on a fresh iterator, as
`fit` repeats the data), then timed in many short interleaved rounds; the best round counts (the median is shown too), so load from other
processes on a shared machine hits all loaders alike and the quiet moments
show the real speed. Compare ratios, not absolute figures. CPU ms per
image (all threads, median) is the work done, which load does not change
much: on an idle machine, images/s ~ cores * 1000 / CPU ms for the
parallel loaders.

Run from the repo root:
    PYTHONPATH=. python scripts/benchmark_input.py [--image-size 224 --epochs 2 --rounds 8]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from hybridnet_tf.data.augment import build_augmentation  # noqa: E402
from hybridnet_tf.data.coco_json import load_coco_json  # noqa: E402
from hybridnet_tf.data.pipeline import AUTOTUNE, make_dataset  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_COCO128 = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "coco128")


def training_pipeline(images, size, batch, **options):
    """The project's training pipeline, repeated as `fit` repeats it."""
    dataset = make_dataset(images.to_dataset(), size, batch, training=True, seed=0, **options)
    return lambda: iter(dataset.repeat())


def decode_bound(images, size, batch):
    """Read + decode_jpeg + the pipeline's resize (antialiased bilinear), nothing else."""

    def load(path, labels):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)
        return image, labels

    dataset = images.to_dataset().map(load, num_parallel_calls=AUTOTUNE)
    dataset = dataset.batch(batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
    return lambda: iter(dataset.repeat())


def pil_loader(images, size, batch):
    """A Python generator of batches read and resized with PIL (bilinear, antialiased)."""

    def generate():
        while True:
            for start in range(0, len(images), batch):
                pixels = []
                for path in images.paths[start : start + batch]:
                    with Image.open(path) as image:
                        image = image.convert("RGB").resize((size, size), Image.BILINEAR)
                        pixels.append(np.asarray(image, np.float32))
                yield np.stack(pixels), images.labels[start : start + batch]

    return generate


def count_images(iterator, num_batches):
    return sum(int(next(iterator)[0].shape[0]) for _ in range(num_batches))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coco128", default=DEFAULT_COCO128, help="the coco128 fixture folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timed rounds")
    args = parser.parse_args(argv)

    annotations = os.path.join(args.coco128, "annotations", "instances_train2017.json")
    if not os.path.isfile(annotations):
        print(f"coco128 not found at {args.coco128}; pass --coco128", file=sys.stderr)
        return 2
    images = load_coco_json(annotations, os.path.join(args.coco128, "train2017"), keep_empty=True)
    size, batch, epochs = args.image_size, args.batch_size, args.epochs
    heavy = dict(flip=True, rand_augment=True, mixup_alpha=0.2, cutmix_alpha=1.0, seed=0)
    loaders = {
        "a) pipeline + flip (default)": training_pipeline(
            images, size, batch, augment=build_augmentation(flip=True, seed=0)
        ),
        "a') pipeline + RRC, flip, RandAugment, MixUp/CutMix": training_pipeline(
            images, size, batch, resize="random_resized_crop", augment=build_augmentation(**heavy)
        ),
        "b) pipeline, no augmentation": training_pipeline(images, size, batch),
        "c) bare decode_jpeg + resize (decode bound)": decode_bound(images, size, batch),
        "d) PIL generator, 1 thread": pil_loader(images, size, batch),
        "e) pipeline + flip, cache memory (uint8), epochs after the first": training_pipeline(
            images, size, batch, augment=build_augmentation(flip=True, seed=0), cache="memory"
        ),
    }
    print(
        f"coco128: {len(images)} images, {size} px, batch {batch}, {epochs} epochs x {args.rounds} "
        f"rounds, {os.cpu_count()} CPUs, tf {tf.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    batches_per_epoch = -(-len(images) // batch)
    rates = {name: [] for name in loaders}
    cpu_ms = {name: [] for name in loaders}
    for round_index in range(args.rounds):
        for name, make_iterator in loaders.items():
            # A fresh iterator per round, so no loader prefetches while another is timed;
            # one untimed epoch lets tf.data's autotuning settle, as in the first epoch of `fit`.
            iterator = make_iterator()
            count_images(iterator, batches_per_epoch)
            start, start_cpu = time.perf_counter(), time.process_time()
            count = count_images(iterator, epochs * batches_per_epoch)
            rates[name].append(count / (time.perf_counter() - start))
            cpu_ms[name].append(1000 * (time.process_time() - start_cpu) / count)
            del iterator
        print(f"round {round_index + 1}: " + ", ".join(f"{rates[n][-1]:.0f}" for n in loaders))

    best = {name: max(values) for name, values in rates.items()}
    bound = best["c) bare decode_jpeg + resize (decode bound)"]
    pil = best["d) PIL generator, 1 thread"]
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine)")
    print("| loader | images/s (best) | median | x decode bound | x PIL loader | CPU ms / image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rate in best.items():
        median = float(np.median(rates[name]))
        cpu = float(np.median(cpu_ms[name]))
        print(f"| {name} | {rate:.0f} | {median:.0f} | {rate / bound:.2f} | {rate / pil:.2f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
