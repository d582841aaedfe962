"""What `decode_and_resize` costs per image against a plain decode + resize.

The plain path is what `decode_and_resize` did before it read the EXIF
orientation and decoded large JPEGs at reduced scale:
`tf.io.decode_image` of every pixel, then the same antialiased resize.
Two sets of real photos:
  - coco128 as it is (640 px photos: decoded whole either way, so the
    difference is the EXIF read alone);
  - the same photos upscaled to 12 megapixels (4032 px on the long side,
    JPEG quality 90), the size of a phone photo, written to a temporary
    folder. Upscaled photos are smoother than real 12 MP ones and so
    compress better; decoding real ones costs more, at either scale.
Each loader maps over the files in tf.data with AUTOTUNE parallelism, in
interleaved rounds (A, B, A, B, ...); the figures are medians over rounds,
and the ratio is taken within each round. Also prints how far the reduced
scale moves the pixels the model sees (mean absolute difference, 0..255).

Run from the repo root:
    PYTHONPATH=. python scripts/benchmark_decode.py [--image-size 224 --rounds 5 --large 32]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from hybridnet_tf.data.pipeline import AUTOTUNE, decode_and_resize, resize_image  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_COCO128 = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "coco128")


def plain_decode_and_resize(encoded, size):
    """Every pixel decoded (EXIF ignored), then the pipeline's antialiased squash."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return resize_image(image, size)


def loader(paths, decode, size):
    files = tf.data.Dataset.from_tensor_slices(paths)
    return files.map(lambda p: decode(tf.io.read_file(p), size), num_parallel_calls=AUTOTUNE).batch(32)


def time_pass(dataset):
    """(images/s, CPU ms per image) of one pass over `dataset`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    count = sum(int(batch.shape[0]) for batch in dataset)
    return count / (time.perf_counter() - start), 1000 * (time.process_time() - start_cpu) / count


def upscaled_copies(paths, folder, long_side=4032):
    out = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = long_side / max(image.size)
            big = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        target = os.path.join(folder, os.path.basename(path))
        big.save(target, "JPEG", quality=90)
        out.append(target)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco128", default=DEFAULT_COCO128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large", type=int, default=32, help="photos upscaled to 12 MP")
    args = parser.parse_args(argv)
    folder = os.path.join(args.coco128, "train2017")
    if not os.path.isdir(folder):
        print(f"coco128 not found at {args.coco128}; pass --coco128", file=sys.stderr)
        return 2
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    size = args.image_size
    with tempfile.TemporaryDirectory() as tmp:
        large = upscaled_copies(paths[: args.large], tmp)
        print(
            f"{len(paths)} coco128 photos, {len(large)} upscaled to 12 MP; {size} px; {args.rounds} rounds; "
            f"{os.cpu_count()} CPUs; tf {tf.__version__}; load average {os.getloadavg()[0]:.1f}"
        )
        for name, files in (("coco128 (640 px)", paths), ("12 MP copies", large)):
            plain, ours = loader(files, plain_decode_and_resize, size), loader(files, decode_and_resize, size)
            time_pass(plain), time_pass(ours)  # warm-up: tracing and autotuning
            figures = {"plain": [], "ours": []}
            for _ in range(args.rounds):
                figures["plain"].append(time_pass(plain))
                figures["ours"].append(time_pass(ours))
            rate = {k: np.median([r for r, _ in v]) for k, v in figures.items()}
            cpu = {k: np.median([c for _, c in v]) for k, v in figures.items()}
            speedup = np.median([o[0] / p[0] for p, o in zip(figures["plain"], figures["ours"])])
            cpu_ratio = np.median([o[1] / p[1] for p, o in zip(figures["plain"], figures["ours"])])
            moved = np.mean([
                np.abs(a - b).mean()
                for a, b in zip(plain.unbatch().as_numpy_iterator(), ours.unbatch().as_numpy_iterator())
            ])
            print(
                f"| {name} | plain {rate['plain']:.0f} img/s, {cpu['plain']:.1f} CPU ms | "
                f"decode_and_resize {rate['ours']:.0f} img/s, {cpu['ours']:.1f} CPU ms | "
                f"speed x{speedup:.2f}, CPU x{cpu_ratio:.2f} | pixels moved {moved:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
