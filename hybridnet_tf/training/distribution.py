"""Spreading training over devices and machines with `tf.distribute`.

`make_strategy` picks one of TensorFlow's strategies by name; the model is
then built and compiled inside `strategy.scope()` and `model.fit` does the
rest. With several workers (`MultiWorkerMirroredStrategy`, configured by
the `TF_CONFIG` environment variable) every worker runs the same program:

- each worker reads its own part of the training files (`shard_for_worker`);
- only the chief (task `chief`, or `worker` 0 when there is none) writes the
  run directory; the others write into a temporary folder that is removed
  at the end (`output_dir`), as in the Keras multi-worker guide, so that
  every worker still runs the same saving code;
- each worker keeps its own fault-tolerance backup (`backup_dir`).
"""

import contextlib
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

STRATEGY_CHOICES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def tf_config_cluster():
    """The cluster of the `TF_CONFIG` environment variable as `{job: [addresses]}`, or None."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        cluster = json.loads(text).get("cluster")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a JSON object with a 'cluster': {error}") from None
    return cluster or None


def _training_tasks(cluster):
    return sum(len(cluster.get(job, ())) for job in ("chief", "worker"))


def make_strategy(name="auto", tpu=None):
    """Creates a `tf.distribute.Strategy` by name.

    Create it first, before other TensorFlow work: `MultiWorkerMirroredStrategy`
    configures collective ops, which TensorFlow allows only at program start.

    Args:
        name: "default" (one device), "mirrored" (all GPUs of this machine),
            "multi_worker" (several machines, from `TF_CONFIG`), "tpu"
            (a Cloud TPU) or "auto" (multi_worker when `TF_CONFIG` names
            several tasks, mirrored with 2+ GPUs, else default).
        tpu: for "tpu": the TPU name or `grpc://` address, or "local" on a
            TPU VM; None lets `TPUClusterResolver` find it (`TPU_NAME`).

    Returns:
        The strategy.
    """
    if name not in STRATEGY_CHOICES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGY_CHOICES)}")
    cluster = tf_config_cluster()
    if name == "auto":
        if cluster and _training_tasks(cluster) > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not cluster:
            raise ValueError(
                "train.strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}} (README: training at scale)'
            )
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}: create the strategy before any other TensorFlow work "
                "(make_strategy first thing in the program)"
            ) from error
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _multi_worker_resolver(strategy):
    kinds = (
        tf.distribute.MultiWorkerMirroredStrategy,
        tf.distribute.experimental.MultiWorkerMirroredStrategy,
    )
    if isinstance(strategy, kinds):
        resolver = strategy.cluster_resolver
        if resolver is not None and resolver.cluster_spec().jobs:
            return resolver
    return None


def worker_index(strategy):
    """`(index, count)` of this process among the training workers.

    The chief is 0, then the workers in order (TensorFlow's own numbering);
    `(0, 1)` for strategies that run on one machine.
    """
    resolver = _multi_worker_resolver(strategy)
    if resolver is None:
        return 0, 1
    spec = resolver.cluster_spec()
    chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
    workers = spec.num_tasks("worker") if "worker" in spec.jobs else 0
    if resolver.task_type == "chief":
        return 0, chiefs + workers
    if resolver.task_type == "worker":
        return chiefs + resolver.task_id, chiefs + workers
    raise ValueError(
        f"TF_CONFIG task type {resolver.task_type!r} does not train; "
        "run training on the 'chief' and 'worker' tasks"
    )


def is_chief(strategy):
    """True for the process that writes checkpoints and logs."""
    return worker_index(strategy)[0] == 0


def shard_for_worker(dataset, strategy):
    """Gives this worker every n-th element of a dataset of `(path, labels)`.

    File sources are `from_tensor_slices` of paths, which tf.data's FILE
    auto-sharding cannot split and its DATA fallback splits only after every
    worker has read and decoded every image. Sharding the cheap path list
    here, before decoding, makes each worker read only its own files;
    auto-sharding is then switched off so tf.distribute does not shard again.
    (TFDS sources are TFRecord files: leave those to the AUTO policy, which
    shards by file.)

    Args:
        dataset: an unbatched dataset, before shuffling and decoding.
        strategy: the strategy training will use.

    Returns:
        The worker's part of `dataset`, with auto-sharding off.
    """
    index, count = worker_index(strategy)
    if count > 1:
        dataset = dataset.shard(count, index)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def shard_evaluation_by_data(dataset):
    """Sets the DATA auto-shard policy: each worker evaluates every n-th batch.

    For validation inside `fit` (val_loss) on a file-path pipeline: FILE
    sharding does not apply to it, and saying DATA avoids tf.data's fallback warning.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextlib.contextmanager
def output_dir(run_dir, strategy):
    """The folder this process writes checkpoints and logs into.

    The chief gets `run_dir`; other workers a temporary folder, removed
    when the block ends.
    """
    index, _ = worker_index(strategy)
    if index == 0:
        os.makedirs(run_dir, exist_ok=True)
        yield run_dir
        return
    temporary = tempfile.mkdtemp(prefix=f"hybridnet-worker{index}-")
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def backup_dir(run_dir, strategy, name="backup"):
    """Where `BackupAndRestore` keeps this process's training state.

    `run_dir/<name>` (`backup` by default; a training phase with its own
    optimizer, e.g. fine-tuning, uses another name); with several workers
    `run_dir/<name>/worker-<index>`,
    one each, because Keras 3's `BackupAndRestore` has every worker save and
    restore its own copy (identical, as the weights are kept in sync). It
    stays after a crash or kill and is deleted when training finishes.
    """
    index, count = worker_index(strategy)
    path = os.path.join(run_dir, name)
    return os.path.join(path, f"worker-{index}") if count > 1 else path


def is_multi_worker(strategy):
    """True when training spans several worker processes."""
    return worker_index(strategy)[1] > 1


class MultiWorkerModel(keras.Model):
    """Wraps a model so that Keras 3 `fit` runs under `MultiWorkerMirroredStrategy`.

    Keras 3.15 `fit` fails with several workers, for any model, at two places:

    - before the first step it reduces a whole data batch with
      `strategy.reduce`, which cannot take a nested `(x, y)` batch
      (keras-team/keras#20329). Keras skips that step for a model created
      outside any strategy scope: create this wrapper outside, and compile
      and fit inside, `strategy.scope()`. It owns no variables; the wrapped
      model's were created under the strategy.
    - it averages each step's logs with `strategy.reduce("MEAN", value, axis=0)`,
      which fails on scalar logs such as the loss (tensorflow/tensorflow#72388).
      The steps here return each log as a vector of one value, which that
      reduce averages over all workers.

    Remove it when Keras fixes both.

    Args:
        model: the functional model to fit (e.g. `build_training_model(...)`).
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped = model

    def call(self, inputs, training=None):
        return self.wrapped(inputs, training=training)

    def train_step(self, data):
        return _as_vectors(super().train_step(data))

    def test_step(self, data):
        return _as_vectors(super().test_step(data))


def _as_vectors(logs):
    return {key: tf.reshape(value, [1]) for key, value in logs.items()}
