"""Epoch time of `hybridnet-tf train` (training steps + validation + checkpoints), per checkout.

Times each epoch of a real `train` run from its first batch to the end of
its last epoch-end callback (a Keras callback appended to `fit`'s list),
so validation, checkpoints and logs are counted; and the epoch's tail after
its last training step (fit's validation and the epoch-end callbacks),
where a change to validation shows without the noise of the training steps. Give several checkouts to
compare code versions in one session, e.g. before and after a change:

    git worktree add /tmp/before <commit>
    python scripts/benchmark_epoch_time.py --repo /tmp/before --repo . \
        --config configs/demo.yaml --set train.epochs=3

Each run is its own process; the data paths of the config are read from
the working directory (run from this repo's root for the coco128 configs).
Figures are wall-clock on whatever else the machine is doing: compare runs
of one session, and say so.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

DRIVER = r"""
import json, sys, time
repo, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, repo)
import keras

times, tails = [], []

class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.last_batch = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_batch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        times.append(now - self.start)
        # After the last training step: fit's validation, then the epoch-end callbacks.
        tails.append(now - self.last_batch)

fit = keras.Model.fit
def timed_fit(self, *a, callbacks=None, **k):
    return fit(self, *a, callbacks=[*(callbacks or []), EpochTimer()], **k)
keras.Model.fit = timed_fit

from hybridnet_tf.cli import main
code = main(args)
json.dump({"code": code, "epoch_seconds": times, "tail_seconds": tails}, open(out, "w"))
"""


def time_epochs(repo, config, sets, python=sys.executable):
    """Trains once with `repo`'s code.

    Returns:
        `(epoch_seconds, tail_seconds)` per epoch: the whole epoch, and the
        part after its last training step (validation, checkpoints, logs).
    """
    with tempfile.TemporaryDirectory(prefix="epoch-time-") as tmp:
        out = os.path.join(tmp, "times.json")
        config_path = config if os.path.isabs(config) else os.path.join(repo, config)
        args = ["train", "--config", config_path, "--run-dir", os.path.join(tmp, "run")]
        args += sum((["--set", s] for s in sets), [])
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.path.abspath(repo))
        subprocess.run([python, "-c", DRIVER, os.path.abspath(repo), out, *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as f:
            result = json.load(f)
    if result["code"] != 0:
        raise SystemExit(f"train exited with {result['code']} in {repo}")
    return result["epoch_seconds"], result["tail_seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", required=True, help="a checkout to time (repeatable)")
    parser.add_argument("--config", required=True, help="config file, relative to each --repo")
    parser.add_argument("--set", action="append", default=[], help="a train --set override (repeatable)")
    args = parser.parse_args()
    rows = []
    for repo in args.repo:
        seconds, tails = time_epochs(repo, args.config, args.set)
        # The first epoch also traces and compiles: report the rest.
        rows.append({
            "repo": repo,
            "epoch_seconds": [round(s, 2) for s in seconds],
            "tail_seconds": [round(s, 2) for s in tails],
            "median_after_first": round(statistics.median(seconds[1:] or seconds), 2),
            "tail_median_after_first": round(statistics.median(tails[1:] or tails), 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        for key in ("median_after_first", "tail_median_after_first"):
            base = rows[0][key]
            for row in rows[1:]:
                print(f"{key}: {row['repo']} {row[key] / base:.2f}x {rows[0]['repo']}")


if __name__ == "__main__":
    main()
