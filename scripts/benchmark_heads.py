"""What the label decoder costs next to a plain sigmoid (BCE) head on the same backbone.

One process, one backbone (default efficientnet_b0 with random weights:
`weights=None`, no download; the cost does not depend on the weight
values), 224 px, batch 32. Measures, round-robin over the variants so that
load from other processes hits them alike, the minimum (and median) over
rounds of:

- a training step (`train_on_batch`, AdamW) of HybridNet (GRU decoder,
  teacher forcing; and, for information, PLA and the hybrid head) / of BCE;
- an inference call (`tf.function`) with greedy decoding / BCE;
- an inference call with beam width 5 / BCE;
- the heads alone on precomputed features (what the decoder itself costs).

Targets: train <= 1.10x, greedy <= 1.10x, beam 5 <= 1.30x for the pooled
decoder; with `--decoder attention` (the decoder attends over the
backbone's spatial map at every step): 1.15x, 1.15x, 1.35x.

Run:
    PYTHONPATH=. python scripts/benchmark_heads.py
    PYTHONPATH=. python scripts/benchmark_heads.py --backbone efficientnet_lite0 --decoder attention
    PYTHONPATH=. python scripts/benchmark_heads.py --backbone efficientnet_lite0 --decoders 3

The targets are for one decoder; `--decoders K` shows what K decoders decoded
jointly (`model.decoders`) cost against the same BCE head.
"""

import argparse
import time

import numpy as np

TARGETS = {
    "pooled": {"train hybrid_rnn": 1.10, "infer greedy": 1.10, "infer beam 5": 1.30},
    "attention": {"train hybrid_rnn": 1.15, "infer greedy": 1.15, "infer beam 5": 1.35},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-labels", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=2, help="timed train steps per round")
    parser.add_argument("--infer-calls", type=int, default=4, help="timed inference calls per round")
    parser.add_argument("--decoder", default="pooled", choices=sorted(TARGETS))
    parser.add_argument("--decoders", type=int, default=1,
                        help="model.decoders of the decoder models (K decoders decoded jointly)")
    parser.add_argument("--extras", action="store_true", help="also time a teacher-forced (freq2rare) and a hybrid training step")
    return parser.parse_args()


def main():
    args = parse_args()
    import keras
    import tensorflow as tf

    from hybridnet_tf.model.hybridnet import (
        IMAGE_ENCODER,
        LABEL_DECODER,
        SIGMOID_HEAD,
        build_model,
        build_training_model,
        training_loss,
        with_training_targets,
    )

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
    multi_hot = (rng.random((args.batch_size, args.num_labels)) < 0.04).astype(np.float32)
    multi_hot[np.arange(args.batch_size), rng.integers(0, args.num_labels, args.batch_size)] = 1.0
    label_rank = np.arange(args.num_labels)
    common = dict(backbone=args.backbone, image_size=args.image_size, weights=None,
                  max_length=args.max_length)

    decoding = dict(common, decoder=args.decoder, decoders=args.decoders)
    models = {
        "bce": build_model(args.num_labels, head="bce", **common),
        "hybrid_rnn": build_model(args.num_labels, head="hybrid_rnn", **decoding),
    }
    beam = build_model(args.num_labels, head="hybrid_rnn", beam_width=5, **decoding)
    beam.set_weights(models["hybrid_rnn"].get_weights())
    if args.extras:
        # The default (orderless, PLA) trains self-fed; a fixed order trains by teacher forcing.
        models["freq2rare (teacher forcing)"] = build_model(
            args.num_labels, head="hybrid_rnn", label_order="freq2rare", **decoding
        )
        models["hybrid"] = build_model(args.num_labels, head="hybrid", **decoding)

    batch = tf.data.Dataset.from_tensors((images, multi_hot))
    train_steps = {}
    for name, model in models.items():
        training_model = build_training_model(model)
        training_model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=training_loss(model))
        inputs, targets = next(iter(with_training_targets(batch, model, label_rank, seed=0)))
        train_steps[f"train {name}"] = (
            lambda tm=training_model, x=inputs, y=targets: tm.train_on_batch(x, y)
        )
    inference = {
        "infer bce": models["bce"],
        "infer greedy": models["hybrid_rnn"],
        "infer beam 5": beam,
    }
    infer_calls = {}
    for name, model in inference.items():
        predict = tf.function(lambda x, m=model: m(x, training=False))
        infer_calls[name] = lambda p=predict: p(images)["scores"].numpy()

    # The heads alone, on precomputed image features: what the decoder itself costs.
    encoded = models["hybrid_rnn"].get_layer(IMAGE_ENCODER)(images, training=False)
    # The sigmoid head reads the pooled feature; the attention decoder the map.
    features, decoder_input = encoded if args.decoder == "attention" else (encoded, encoded)
    sigmoid_head = models["bce"].get_layer(SIGMOID_HEAD)
    to_labels = models["bce"].get_layer("labels_above_half")
    head_calls = {
        "head bce": tf.function(lambda f: to_labels(tf.sigmoid(sigmoid_head(f)))["label_ids"]),
        "head greedy": tf.function(lambda f: models["hybrid_rnn"].get_layer(LABEL_DECODER)(f)["label_ids"]),
        "head beam 5": tf.function(lambda f: beam.get_layer(LABEL_DECODER)(f)["label_ids"]),
    }
    for name, fn in head_calls.items():
        infer_calls[name] = lambda fn=fn, x=(features if name == "head bce" else decoder_input): fn(x).numpy()
    # Forward + backward of each head alone (gradients of its own weights).
    decoder = models["hybrid_rnn"].get_layer(LABEL_DECODER)
    sequence_inputs, sequence_targets = next(iter(with_training_targets(batch, models["hybrid_rnn"], label_rank)))
    losses = {"bce": training_loss(models["bce"])["labels"],
              "hybrid_rnn": training_loss(models["hybrid_rnn"])["sequence"]}

    def head_gradients(call, layer, loss, targets):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                value = loss(targets, call())
            return tape.gradient(value, layer.trainable_weights)

        return lambda: [g.numpy() for g in step()]

    head_calls["head train bce"] = None
    head_calls["head train decoder"] = None
    infer_calls["head train bce"] = head_gradients(
        lambda: sigmoid_head(features), sigmoid_head, losses["bce"], multi_hot
    )
    if decoder.label_order == "orderless":  # the default: the decoder feeds back its own predictions
        decoder_call = lambda: decoder(decoder_input, self_fed=True, training=True)  # noqa: E731
    else:
        decoder_call = lambda: decoder(  # noqa: E731
            [decoder_input, sequence_inputs["decoder_inputs"]], training=True
        )
    infer_calls["head train decoder"] = head_gradients(
        decoder_call, decoder, losses["hybrid_rnn"], sequence_targets["sequence"],
    )

    def timed(fn, repeats):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    for fn in list(train_steps.values()) + list(infer_calls.values()):  # trace and warm up
        fn()
        fn()
    times = {name: [] for name in list(train_steps) + list(infer_calls)}
    for round_index in range(args.rounds):
        for name, fn in train_steps.items():
            times[name].append(timed(fn, args.train_steps))
        for name, fn in infer_calls.items():
            times[name].append(timed(fn, args.infer_calls))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)

    # The minimum over rounds is the least disturbed by other processes; the median is shown too.
    fastest = {name: float(np.min(t)) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(
        f"\n{args.backbone} (weights=None), {args.image_size} px, batch {args.batch_size}, "
        f"{args.num_labels} labels, max_length {args.max_length}, {args.decoder} decoder x {args.decoders}, CPU, "
        f"{args.rounds} rounds\n"
    )
    print("| measurement | s (min) | ratio to BCE (min) | ratio to BCE (median) | target |")
    print("|---|---:|---:|---:|---|")
    for name, seconds in fastest.items():
        if name.startswith("head"):
            continue
        reference = "train bce" if name.startswith("train") else "infer bce"
        ratio = seconds / fastest[reference]
        median_ratio = median[name] / median[reference]
        target = TARGETS[args.decoder].get(name)
        verdict = "" if target is None else (
            f"<= {target:.2f} ({'met' if max(ratio, median_ratio) <= target else 'MISSED'})"
        )
        print(f"| {name} | {seconds:.3f} | {ratio:.3f} | {median_ratio:.3f} | {verdict} |")

    print("\nThe heads alone on precomputed image features (same batch):\n")
    print("| head | ms (min) | % of the BCE model's step (inference or train) |")
    print("|---|---:|---:|")
    for name in head_calls:
        reference = fastest["train bce"] if "train" in name else fastest["infer bce"]
        print(f"| {name[5:]} | {1000 * fastest[name]:.2f} | {100 * fastest[name] / reference:.1f} |")


if __name__ == "__main__":
    main()
