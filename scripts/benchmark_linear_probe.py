"""The linear probe's fit time with BLAS held to one thread against BLAS left as it is.

`linear_probe.fit_linear_probe` runs its scikit-learn fits with BLAS limited to one
thread (`blas_threads=1`, the default): scikit-learn's lbfgs loss runs its own OpenMP
threads, and OpenBLAS's threads beside them oversubscribe a small machine. This script
times both settings round-robin in one process (TensorFlow loaded, as in training) and
checks that they give the same probe.

Features: the coco128 photos' pooled EfficientNet-Lite0 features (ImageNet weights, as
the recipe caches them). The size `coco128` is the 126 photos themselves. A number N
stands in for a larger set: N rows drawn from the 126, each feature multiplied by
log-normal noise (sigma 0.3), and 2 % of the labels flipped so that copies are not
separable. These are timing inputs, not a data set to judge the probe's quality on.

    .venv/bin/python scripts/benchmark_linear_probe.py --sizes coco128,1000 --labels 16 --rounds 2
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def stand_in(features, labels, size, seed):
    """`size` jittered copies of rows of `features` with 2 % of their labels flipped."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(features), size)
    jittered = features[rows] * rng.lognormal(0.0, 0.3, (size, features.shape[1]))
    flips = rng.random((size, labels.shape[1])) < 0.02
    return jittered, np.where(flips, 1.0 - labels[rows], labels[rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco128_lite0.yaml"))
    parser.add_argument("--data", default=None, help="the coco128 folder (default: ../shared/data/coco128)")
    parser.add_argument("--sizes", default="coco128,1000", help="comma-separated: coco128 or a number of rows")
    parser.add_argument("--labels", type=int, default=80, help="fit the first this many label columns")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import real_data_check
    from threadpoolctl import threadpool_info

    from hybridnet_tf.config import load_config
    from hybridnet_tf.training.linear_probe import fit_linear_probe

    images = real_data_check.load_coco128(args.data or real_data_check.default_coco128())
    features, labels = real_data_check.backbone_features(load_config(args.config), images)
    labels = labels[:, :args.labels]
    inputs = {}
    for size in args.sizes.split(","):
        inputs[size] = (features, labels) if size == "coco128" else stand_in(features, labels, int(size), 0)
    pools = ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info())
    print(f"thread pools: {pools}; {os.cpu_count()} CPUs; {args.labels} labels; {args.rounds} rounds")

    settings = {"BLAS 1 thread (default)": 1, "BLAS as loaded": None}
    times = {(size, name): [] for size in inputs for name in settings}
    kernels = {}
    for round_index in range(args.rounds):
        # Alternate which setting goes first, so a drift in load hits both alike.
        order = list(settings.items())[:: 1 if round_index % 2 == 0 else -1]
        for size, (x, y) in inputs.items():
            for name, threads in order:
                start = time.perf_counter()
                probe = fit_linear_probe(x, y, seed=0, blas_threads=threads)
                times[(size, name)].append(time.perf_counter() - start)
                kernels[(size, name)] = probe.kernel
                print(f"round {round_index + 1}: {size} rows, {name}: {times[(size, name)][-1]:.1f} s "
                      f"(C={probe.c:g})", flush=True)

    print("\n| rows | BLAS 1 thread, s best (median) | BLAS as loaded, s best (median) | ratio, best | "
          "max kernel difference |\n|---|---:|---:|---:|---:|")
    one, loaded = settings
    for size in inputs:
        a, b = times[(size, one)], times[(size, loaded)]
        difference = float(np.max(np.abs(kernels[(size, one)] - kernels[(size, loaded)])))
        rows = len(inputs[size][0])
        print(f"| {size} ({rows}) | {min(a):.1f} ({np.median(a):.1f}) | {min(b):.1f} ({np.median(b):.1f}) | "
              f"{min(b) / min(a):.1f}x | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
