"""Trains each head / label order on the demo data and prints one Markdown comparison table.

Every variant uses the same config (default configs/demo.yaml: small_cnn,
64 px, 15 epochs), seed and budget, and trains through the project's own
`experiment.run_train` (so `best.keras` is picked by val mAP, as in the
CLI). Thresholds are tuned on val (`tune_thresholds`) and every number is
measured on a separate test split: the demo generator with another seed.

Columns:
- mAP, CF1 / OF1 at score 0.5, and with per-label thresholds tuned on val.
- set CF1 / OF1 / exact: the label set the model answers with (`label_ids`:
  the decoded sequence for decoder heads, score >= 0.5 for bce); exact = the
  share of images whose whole set is right.
- excl: % of test images whose answered set holds both labels of one of the
  demo's mutually exclusive pairs (ground truth: never).
- train step / inference time relative to the bce head, measured at the end
  in one process, round-robin over the variants (fastest of the rounds; the
  bce vs bce + ASL pair, identical in compute, shows the noise left).

Run (about 2.5 min per variant on 2 CPU cores):
    PYTHONPATH=. python scripts/compare_heads.py --work-dir /tmp/compare_heads
"""

import argparse
import copy
import os
import time

import numpy as np

VARIANTS = {
    # name: model-section overrides
    "bce": {"head": "bce"},
    "bce + ASL": {"head": "bce", "sigmoid_loss": "asl"},
    "rnn freq2rare": {"head": "hybrid_rnn", "label_order": "freq2rare"},
    "rnn rare2freq": {"head": "hybrid_rnn", "label_order": "rare2freq"},
    "rnn random": {"head": "hybrid_rnn", "label_order": "random"},
    "rnn orderless (PLA)": {"head": "hybrid_rnn", "label_order": "orderless"},
    "rnn orderless (PLA sorted)": {"head": "hybrid_rnn", "label_order": "orderless", "pla_rule": "sorted"},
    "rnn attention": {"head": "hybrid_rnn", "decoder": "attention"},
    "hybrid freq2rare": {"head": "hybrid", "label_order": "freq2rare"},
    "hybrid freq2rare + ASL": {"head": "hybrid", "label_order": "freq2rare", "sigmoid_loss": "asl"},
    "hybrid freq2rare, 3 decoders": {"head": "hybrid", "label_order": "freq2rare", "decoders": 3},
    "hybrid attention": {"head": "hybrid", "label_order": "freq2rare", "decoder": "attention"},
    "hybrid orderless": {"head": "hybrid", "label_order": "orderless"},
    "hybrid orderless, 3 decoders": {"head": "hybrid", "label_order": "orderless", "decoders": 3},
    "hybrid attention orderless": {"head": "hybrid", "label_order": "orderless", "decoder": "attention"},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--work-dir", default="/tmp/compare_heads", help="runs and data go here")
    parser.add_argument("--out", default=None, help="Markdown file (default WORK_DIR/compare_heads.md)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every variant, e.g. data.demo_train=300")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--timing-rounds", type=int, default=9)
    return parser.parse_args()


def exclusive_violations(sets, names):
    from hybridnet_tf.data.demo_scenes import EXCLUSIVE_PAIRS

    pairs = [(names.index(a), names.index(b)) for a, b in EXCLUSIVE_PAIRS]
    both = np.zeros(len(sets), bool)
    for a, b in pairs:
        both |= (sets[:, a] > 0) & (sets[:, b] > 0)
    return float(both.mean())


def evaluate_variant(model, val_data, test_data, names):
    from hybridnet_tf.evaluation.metrics import mean_average_precision, set_metrics, threshold_metrics
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.evaluation.thresholds import tune_thresholds

    y_val, s_val, _ = collect_predictions(model, val_data)
    y_test, s_test, answered = collect_predictions(model, test_data)
    tuned = tune_thresholds(y_val, s_val)
    at_half = threshold_metrics(y_test, s_test, 0.5)
    at_tuned = threshold_metrics(y_test, s_test, np.asarray(tuned["per_class"]))
    answered_metrics = set_metrics(y_test, answered)
    return {
        "mAP": mean_average_precision(y_test, s_test)[0],
        "CF1@.5": at_half["CF1"],
        "OF1@.5": at_half["OF1"],
        "CF1 tuned": at_tuned["CF1"],
        "OF1 tuned": at_tuned["OF1"],
        "set CF1": answered_metrics["CF1"],
        "set OF1": answered_metrics["OF1"],
        "exact": answered_metrics["exact"],
        "excl %": 100.0 * exclusive_violations(answered, names),
    }


def beam_variant(model, beam_width):
    """The same weights, decoded with another beam width (decoder heads only)."""
    import keras

    config = copy.deepcopy(model.get_config())
    for layer in config["layers"]:
        if layer["class_name"] == "LabelDecoder":
            layer["config"]["beam_width"] = beam_width
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def time_variants(models, train_batches, rounds, batch_size):
    """Seconds per train step and per inference call of each model (fastest of rounds, round-robin)."""
    import keras
    import tensorflow as tf

    from hybridnet_tf.model.hybridnet import build_training_model, training_loss

    runners = {}
    for name, model in models.items():
        training_model = build_training_model(model)
        training_model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=training_loss(model))
        inputs, targets = train_batches[name]
        predict = tf.function(lambda images, m=model: m(images, training=False))
        runners[name] = (training_model, inputs, targets, predict)
    times = {name: {"train": [], "infer": []} for name in models}

    def timed(fn, repeats):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    for name, (training_model, inputs, targets, predict) in runners.items():  # warm up / trace
        training_model.train_on_batch(inputs, targets)
        predict(inputs["image"])["scores"].numpy()
    for _ in range(rounds):
        for name, (training_model, inputs, targets, predict) in runners.items():
            times[name]["train"].append(
                timed(lambda: training_model.train_on_batch(inputs, targets), 10)
            )
            times[name]["infer"].append(
                timed(lambda: predict(inputs["image"])["scores"].numpy(), 20)
            )
    # The fastest round is the one least disturbed by other processes.
    return {name: {k: float(np.min(v)) for k, v in t.items()} for name, t in times.items()}


def markdown_table(rows, columns):
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append("–")
            elif column.startswith("excl") or column.startswith("train x") or column.startswith("infer x"):
                cells.append(f"{value:.2f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    import keras

    from hybridnet_tf.config import load_config
    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.data.load_splits import load_splits
    from hybridnet_tf.experiment import as_dataset, run_train
    from hybridnet_tf.model.hybridnet import model_head, with_training_targets
    from hybridnet_tf.model.label_sequences import rank_ordering

    base = load_config(args.config, args.set)
    base["data"]["demo_dir"] = os.path.join(args.work_dir, "demo_data")
    if args.epochs is not None:
        base["train"]["epochs"] = args.epochs
    # Test split: the same generator with another seed (its "val" part).
    test_config = copy.deepcopy(base)
    test_config["data"].update(
        demo_dir=os.path.join(args.work_dir, "demo_test"), demo_seed=1, demo_train=8,
        demo_val=args.test_images,
    )
    test_split = load_splits(test_config["data"]).val
    base_splits = load_splits(base["data"])
    val_split, vocabulary = base_splits.val, base_splits.vocabulary
    if test_split.vocabulary.names != vocabulary.names:
        raise ValueError("the test split's labels differ from the training vocabulary")
    eval_batch = base["eval"]["batch_size"]
    val_data = as_dataset(val_split, base, False, batch_size=eval_batch)
    test_data = as_dataset(test_split, base, False, batch_size=eval_batch)

    rows, models, train_batches, beam_rows = {}, {}, {}, {}
    for name in args.variants:
        config = copy.deepcopy(base)
        config["model"].update(VARIANTS[name])
        run_dir = os.path.join(args.work_dir, "runs", name.replace(" ", "_").replace("(", "").replace(")", ""))
        # run_train itself says when a run is complete (and touches nothing) and
        # continues an interrupted one from its backup, so a rerun resumes.
        print(f"== training {name} -> {run_dir}", flush=True)
        start = time.perf_counter()
        run_train(config, run_dir, verbose=0)
        print(f"== {name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
        _, _, model = load_run(run_dir)
        models[name] = model
        rows[name] = evaluate_variant(model, val_data, test_data, vocabulary.names)
        if model_head(model) != "bce":
            beam_rows[name] = evaluate_variant(beam_variant(model, 5), val_data, test_data, vocabulary.names)
        label_rank = vocabulary.label_rank(rank_ordering(config["model"]["label_order"]))
        train_data = as_dataset(val_split, base, False, batch_size=base["train"]["batch_size"])
        train_batches[name] = next(iter(with_training_targets(train_data, model, label_rank, seed=0)))
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)

    times = time_variants(models, train_batches, args.timing_rounds, base["train"]["batch_size"])
    reference = times.get("bce")
    for name in rows:
        if reference:
            rows[name]["train x"] = times[name]["train"] / reference["train"]
            rows[name]["infer x"] = times[name]["infer"] / reference["infer"]
    columns = ["mAP", "CF1@.5", "OF1@.5", "CF1 tuned", "OF1 tuned", "set CF1", "set OF1", "exact",
               "excl %", "train x", "infer x"]
    beam_columns = ["set CF1", "set OF1", "exact", "excl %", "mAP"]
    text = (
        f"Demo data ({base['data']['demo_train']} train / {base['data']['demo_val']} val images, "
        f"{args.test_images} test images from another generator seed), {base['model']['backbone']}, "
        f"{base['data']['demo_image_size']} px, {base['train']['epochs']} epochs, seed {base['train']['seed']}; "
        "greedy decoding; thresholds tuned on val, numbers on test.\n\n"
        + markdown_table(rows, columns)
        + "\n\nDecoder heads decoded with beam width 5 (same weights):\n\n"
        + markdown_table(beam_rows, beam_columns)
        + "\n\nAbsolute times (s, fastest round): "
        + ", ".join(f"{n}: train {t['train']:.4f} / infer {t['infer']:.4f}" for n, t in times.items())
        + "\n"
    )
    print(text)
    out = args.out or os.path.join(args.work_dir, "compare_heads.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
