"""CPU cost of a training step per backbone, relative to efficientnet_b0, in one process.

Every backbone gets the same HybridNet (default `hybrid` head, 80 labels)
with random weights (`weights=None`: no download; the cost does not
depend on the weight values), 224 px, batch 8, the whole backbone
trainable. The KerasHub models are built from their constructors at the
published base sizes (ViT-B/16, SigLIP-B/16's vision tower, DINOv2-B/14 at
224 px), saved as local presets in a temporary folder and loaded through
`backbone="hub"`, as a user's preset would be.

Round-robin over the backbones so that load from other processes hits
them alike; per backbone the minimum and the median over rounds of the
mean `train_on_batch` time; ratios to efficientnet_b0 in this one run.

Run:
    PYTHONPATH=. python scripts/benchmark_backbones.py [--rounds 3] [--no-hub]
    PYTHONPATH=. python scripts/benchmark_backbones.py --only convnext_tiny "hub ViT-B/16"
"""

import argparse
import os
import tempfile
import time

import numpy as np

REFERENCE = "efficientnet_b0"
KERAS_BACKBONES = (REFERENCE, "convnext_tiny", "convnext_small", "convnext_base")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-labels", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed train steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backbone after tracing")
    parser.add_argument("--no-hub", action="store_true", help="skip the KerasHub backbones")
    parser.add_argument("--only", nargs="*", help="time only these names (efficientnet_b0 is always in)")
    return parser.parse_args()


def hub_presets(root, size, wanted=None):
    """name -> local preset directory of a base-sized, randomly initialised KerasHub model.

    Only the names in `wanted` (all when None) are built and saved.
    """
    import keras_hub

    scale = list(1.0 / (255.0 * IMAGENET_STD))
    offset = list(-IMAGENET_MEAN / IMAGENET_STD)
    base = dict(num_layers=12, num_heads=12, hidden_dim=768)
    made = {}

    def save(name, make_backbone, converter):
        if wanted is not None and name not in wanted:
            return
        backbone = make_backbone()
        directory = os.path.join(root, name.replace("/", "_").replace(" ", "_"))
        backbone.save_to_preset(directory)
        converter.save_to_preset(directory)
        made[name] = directory

    save("hub ViT-B/16",
         lambda: keras_hub.models.ViTBackbone(image_shape=(size, size, 3), patch_size=16, mlp_dim=3072, **base),
         keras_hub.layers.ViTImageConverter(image_size=(size, size), scale=scale, offset=offset))

    def siglip():
        vision = keras_hub.models.SigLIPVisionEncoder(
            patch_size=16, intermediate_dim=3072, image_shape=(size, size, 3), **base)
        # A one-layer text tower: only the vision tower is used (and timed).
        text = keras_hub.models.SigLIPTextEncoder(
            vocabulary_size=64, embedding_dim=768, hidden_dim=768, num_layers=1, num_heads=12,
            intermediate_dim=3072, max_sequence_length=16)
        return keras_hub.models.SigLIPBackbone(vision, text)

    save("hub SigLIP-B/16 vision", siglip,
         keras_hub.layers.SigLIPImageConverter(image_size=(size, size), scale=1.0 / 127.5, offset=-1.0))
    save("hub DINOv2-B/14",
         lambda: keras_hub.models.DINOV2Backbone(patch_size=14, intermediate_dim=3072, image_shape=(size, size, 3),
                                                 position_embedding_shape=(518, 518, 3), **base),
         keras_hub.layers.DINOV2ImageConverter(image_size=(size, size), scale=scale, offset=offset))
    return made


def main():
    args = parse_args()
    import keras
    import tensorflow as tf

    from hybridnet_tf.model.hybridnet import build_model, build_training_model, training_loss, with_training_targets

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
    multi_hot = (rng.random((args.batch_size, args.num_labels)) < 0.04).astype(np.float32)
    multi_hot[np.arange(args.batch_size), rng.integers(0, args.num_labels, args.batch_size)] = 1.0
    batch = tf.data.Dataset.from_tensors((images, multi_hot))

    backbones = {name: dict(backbone=name) for name in KERAS_BACKBONES}
    tmp = tempfile.TemporaryDirectory()
    if not args.no_hub:
        for name, preset in hub_presets(tmp.name, args.image_size, args.only or None).items():
            backbones[name] = dict(backbone="hub", hub_preset=preset)
    if args.only:
        backbones = {n: b for n, b in backbones.items() if n == REFERENCE or n in args.only}

    steps, sizes = {}, {}
    for name, kwargs in backbones.items():
        model = build_model(args.num_labels, image_size=args.image_size, weights=None, **kwargs)
        sizes[name] = (model.get_layer("image_encoder").get_layer("backbone").count_params(),
                       tuple(model.get_layer("image_encoder").get_layer("backbone").output.shape[1:]))
        training_model = build_training_model(model)
        training_model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=training_loss(model))
        inputs, targets = next(iter(with_training_targets(batch, model, np.arange(args.num_labels), seed=0)))
        steps[name] = lambda tm=training_model, x=inputs, y=targets: tm.train_on_batch(x, y)
        print(f"built {name}: {sizes[name][0] / 1e6:.1f} M backbone parameters, map {sizes[name][1]}", flush=True)

    def timed(fn):
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - start) / args.steps

    for name, fn in steps.items():  # trace and warm up
        start = time.perf_counter()
        for _ in range(1 + args.warmup):
            fn()
        print(f"warmed up {name} in {time.perf_counter() - start:.0f} s", flush=True)
    times = {name: [] for name in steps}
    for round_index in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)

    # The minimum over rounds is the least disturbed by other processes; the median is shown too.
    fastest = {name: float(np.min(t)) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"\ntraining step (train_on_batch, AdamW, hybrid head, everything trainable), {args.image_size} px, "
          f"batch {args.batch_size}, CPU, {args.rounds} rounds x {args.steps} steps\n")
    print(f"| backbone | parameters | map at {args.image_size} px | s/step (min) | x {REFERENCE} (min) "
          f"| x {REFERENCE} (median) |")
    print("|---|---:|---|---:|---:|---:|")
    for name in steps:
        params, shape = sizes[name]
        print(f"| {name} | {params / 1e6:.1f} M | {'x'.join(str(d) for d in shape)} | {fastest[name]:.2f} "
              f"| {fastest[name] / fastest[REFERENCE]:.1f} | {median[name] / median[REFERENCE]:.1f} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
