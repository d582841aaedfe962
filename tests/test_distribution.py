"""tf.distribute: strategy choice, per-worker data and outputs, two real workers on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.training import distribution

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_is_the_default_strategy_on_one_cpu_machine(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("auto picks mirrored with several GPUs")
    strategy = distribution.make_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert distribution.worker_index(strategy) == (0, 1)
    assert distribution.is_chief(strategy)


def test_bad_strategy_settings_say_what_to_do(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribution.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="choose one of"):
        distribution.make_strategy("horovod")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribution.tf_config_cluster()


def test_one_worker_reads_everything_and_writes_the_run_dir(tmp_path):
    strategy = tf.distribute.get_strategy()
    dataset = distribution.shard_for_worker(tf.data.Dataset.range(10), strategy)
    assert list(dataset.as_numpy_iterator()) == list(range(10))
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.OFF
    with distribution.output_dir(str(tmp_path / "run"), strategy) as out:
        assert out == str(tmp_path / "run")
    assert distribution.backup_dir("run", strategy) == os.path.join("run", "backup")


# Two replicas on one machine, as MirroredStrategy on 2 GPUs, with the CPU split in two.
MIRRORED = textwrap.dedent(
    """
    import json, sys, tempfile
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    from hybridnet_tf.model.hybridnet import build_model
    from hybridnet_tf.training.settings import Checkpointing, Optimization
    from hybridnet_tf.training.trainer import train
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = (rng.uniform(size=(16, 4)) < 0.4).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    with strategy.scope():
        model = build_model(4, image_size=32, max_length=4, embedding_dim=8, gru_units=16)
    history = train(model, data, data, np.arange(4), tempfile.mkdtemp(), steps_per_epoch=2,
                    epochs=2, optimization=Optimization(use_ema=True, warmup_epochs=0),
                    checkpointing=Checkpointing(verbose=0))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, **history.history}))
    """
)


@pytest.mark.slow  # a fresh TF process (logical devices are set at start-up): ~20-40 s
def test_mirrored_strategy_with_two_replicas_trains_and_validates(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert len(result["loss"]) == len(result["val_mAP"]) == 2
    assert all(np.isfinite(result["loss"] + result["val_loss"]))


# Runs in each worker process: the library pieces run_train uses, on the demo data.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    out_dir, demo_dir, run_dir = sys.argv[1:4]
    from hybridnet_tf.training import distribution
    strategy = distribution.make_strategy("multi_worker")  # before any other TF work
    import keras, numpy as np
    from hybridnet_tf.data.coco_json import load_coco_json
    from hybridnet_tf.data.pipeline import make_dataset
    from hybridnet_tf.model.hybridnet import build_model
    from hybridnet_tf.training.settings import Checkpointing, Optimization
    from hybridnet_tf.training.trainer import train

    index, count = distribution.worker_index(strategy)
    keras.utils.set_random_seed(0)
    images = load_coco_json(
        os.path.join(demo_dir, "annotations", "instances_train.json"),
        os.path.join(demo_dir, "train"),
    )
    source = distribution.shard_for_worker(images.to_dataset(), strategy)
    my_paths = sorted(p.decode() for p, _ in source.as_numpy_iterator())
    data = make_dataset(source, 32, batch_size=16, training=True, seed=0)  # global batch
    val_images = load_coco_json(
        os.path.join(demo_dir, "annotations", "instances_val.json"), os.path.join(demo_dir, "val"),
        vocabulary=images.vocabulary,
    )
    val_data = make_dataset(val_images.to_dataset(), 32, batch_size=8)
    with strategy.scope():
        model = build_model(len(images.vocabulary), image_size=32, max_length=4,
                            embedding_dim=8, gru_units=16)
    history = train(model, data, val_data, np.arange(len(images.vocabulary)), run_dir,
                    steps_per_epoch=4, epochs=3,
                    optimization=Optimization(learning_rate=5e-3, warmup_epochs=0, use_ema=True,
                                              ema_momentum=0.5),
                    checkpointing=Checkpointing(verbose=0))
    np.savez(os.path.join(out_dir, f"trainable_{index}.npz"),
             **{f"{i}_{v.path}": v.numpy() for i, v in enumerate(model.trainable_weights)})
    with open(os.path.join(out_dir, f"worker_{index}.json"), "w") as f:
        json.dump({"index": index, "count": count, "replicas": strategy.num_replicas_in_sync,
                   "paths": my_paths, "loss": history.history["loss"],
                   "val_mAP": history.history["val_mAP"]}, f)
    """
)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow  # two TF processes with gRPC collectives: ~1 min on 2 CPU cores
def test_two_workers_train_in_step_and_only_the_chief_writes(tmp_path):
    from hybridnet_tf.data.demo_scenes import write_demo_dataset

    demo_dir, run_dir = str(tmp_path / "demo"), str(tmp_path / "run")
    write_demo_dataset(demo_dir, num_train=64, num_val=16, image_size=32, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=REPO_ROOT,
            TMPDIR=str(worker_tmp),
            TF_CPP_MIN_LOG_LEVEL="2",
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        log = open(tmp_path / f"worker_{index}.log", "wb")
        workers.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), demo_dir, run_dir],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ))
    try:
        for worker in workers:
            worker.wait(timeout=600)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for index, worker in enumerate(workers):
        log = (tmp_path / f"worker_{index}.log").read_text(errors="replace")
        assert worker.returncode == 0, log[-3000:]

    reports = [json.load(open(tmp_path / f"worker_{i}.json")) for i in range(2)]
    assert [(r["index"], r["count"], r["replicas"]) for r in reports] == [(0, 2, 2), (1, 2, 2)]
    # Each worker read its own half of the files, and together all of them.
    first, second = (set(r["paths"]) for r in reports)
    assert not first & second and len(first | second) == 64 and len(first) == 32
    # Gradients are all-reduced: both workers end with the same trained weights.
    # (BatchNormalization's moving statistics are not: in Keras 3 each worker
    # averages its own batches, and the chief's are the ones saved.)
    weights = [np.load(tmp_path / f"trainable_{i}.npz") for i in range(2)]
    assert len(weights[0].files) == len(weights[1].files) > 0
    for name in weights[0].files:
        np.testing.assert_allclose(weights[0][name], weights[1][name], rtol=0, atol=1e-6)
    loss = reports[0]["loss"]
    assert len(loss) == 3 and loss[-1] < loss[0]
    # Validation and EMA run under the strategy too (the workers' val_mAP differ
    # through their BatchNormalization statistics; the chief's picks best.keras).
    for report in reports:
        assert len(report["val_mAP"]) == 3 and all(0 <= v <= 1 for v in report["val_mAP"])
    # Only the chief wrote the run directory; the other's temporary folder is gone.
    assert sorted(os.listdir(run_dir)) == sorted(
        ["best.keras", "last.keras", "history.csv", "history.json", "logs"]
    )
    assert os.listdir(worker_tmp) == []
