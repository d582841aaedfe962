"""Frozen-phase seconds per epoch: on cached backbone features vs through the backbone, one process.

Builds the coco128 Lite0 recipe's model (configs/coco128_lite0.yaml) and, in
round-robin order, times a frozen-phase epoch of the same number of
optimiser steps (one pass over the training images, batch 16) both ways,
as the median of epochs 2 and 3 of a 3-epoch fit:

- images: `trainer.train` with the backbone frozen (the backbone runs on
  every step, as before the feature cache);
- cached: the features extracted once (timed separately, with the mirror
  views), then `head_phase.train_heads_on_features` for the same steps.

    .venv/bin/python scripts/benchmark_frozen_phase.py [--rounds 3]

Prints the median and best of each and the ratio.
"""

import argparse
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco128_lite0.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np

    from hybridnet_tf.config import load_config
    from hybridnet_tf.data.load_splits import load_splits
    from hybridnet_tf.experiment import as_dataset, build_model_from_config
    from hybridnet_tf.model.label_sequences import rank_ordering
    from hybridnet_tf.training.feature_cache import extract_features
    from hybridnet_tf.training.fine_tuning import set_backbone_trainable
    from hybridnet_tf.training.head_phase import train_heads_on_features
    from hybridnet_tf.training.settings import Checkpointing, Optimization
    from hybridnet_tf.training.trainer import train

    config = load_config(args.config)
    splits = load_splits(config["data"])
    batch = config["train"]["batch_size"]
    steps = math.ceil(splits.num_train / batch)
    rank = splits.vocabulary.label_rank(rank_ordering(config["model"]["label_order"]))
    model = build_model_from_config(config, len(splits.vocabulary))
    set_backbone_trainable(model, 0)
    train_data = as_dataset(splits.train, config, training=True)
    plain = as_dataset(splits.train, config, False, batch_size=config["eval"]["batch_size"])

    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Seconds of each epoch inside one fit; epoch 1 (tracing) is left out."""

        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    epochs = 3
    quiet = Checkpointing(monitor="loss", verbose=0)

    def through_images():
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as run_dir:
            train(model, train_data, None, rank, run_dir, steps_per_epoch=steps, epochs=epochs,
                  optimization=Optimization(batch_size=batch), checkpointing=quiet, extra_callbacks=[timer])
        return float(np.median(timer.seconds[1:]))

    def cached():
        start = time.perf_counter()
        features = extract_features(model, plain, flip_views=True, progress=False)
        extracted = time.perf_counter() - start
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as run_dir:
            train_heads_on_features(model, features, None, rank, run_dir, epochs=epochs, steps_per_epoch=steps,
                                    optimization=Optimization(batch_size=batch), checkpointing=quiet,
                                    extra_callbacks=[timer])
        return extracted, float(np.median(timer.seconds[1:]))

    through_images(), cached()  # warm-up: traces, caches, file system
    images_s, extract_s, cached_s = [], [], []
    for _ in range(args.rounds):
        images_s.append(through_images())
        extracted, epoch = cached()
        extract_s.append(extracted)
        cached_s.append(epoch)
    print(f"{splits.num_train} training images, batch {batch}, {steps} steps per epoch, "
          f"{args.rounds} rounds (median / best), seconds:")
    print(f"  frozen epoch through the backbone:      {np.median(images_s):7.2f} / {min(images_s):7.2f}")
    print(f"  feature extraction, once (2 views):     {np.median(extract_s):7.2f} / {min(extract_s):7.2f}")
    print(f"  frozen epoch on cached features:        {np.median(cached_s):7.2f} / {min(cached_s):7.2f}")
    print(f"  per-epoch ratio images / cached:        {np.median(images_s) / np.median(cached_s):7.1f}x")
    print("  (an epoch: the median of epochs 2-3 of one 3-epoch fit, epoch begin to epoch end; the "
          "epoch-end checkpoint and log writes that follow the timer are not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
