"""Per-label heat maps of a trained HybridNet for image files: one PNG and one JSON per image.

Which map: the attention decoder's own attention weights at the step that
emitted a label, where the model has that decoder and the label was
emitted; Grad-CAM of the label's score on the backbone's last spatial map
otherwise (or always, with `method="grad_cam"`).
"""

import json
import os
import re

import numpy as np
import tensorflow as tf

from hybridnet_tf.data.pipeline import decode_and_resize, decode_rgb, eval_resize_policy
from hybridnet_tf.explanation.grad_cam import make_grad_cam
from hybridnet_tf.explanation.heat_maps import figure_png, overlay_figure, peak_of, shrink
from hybridnet_tf.model.hybridnet import model_decoder
from hybridnet_tf.prediction import plain_error_message

METHODS = ("auto", "grad_cam", "attention")
# The longest side of the picture drawn in the PNGs (the files stay small).
SHOWN_MAX_SIDE = 320
# (image, label) rows per Grad-CAM call.
GRAD_CAM_BATCH = 16


def parse_label_choice(text, names):
    """Parses `--labels`: "decoded", "top-K" or comma-separated label names.

    Returns:
        `("decoded", None)`, `("top", k)` or `("names", [label indices])`.

    Raises:
        ValueError: for k < 1 or an unknown name (the message lists some known ones).
    """
    text = (text or "decoded").strip()
    if text == "decoded":
        return "decoded", None
    match = re.fullmatch(r"top-(\d+)", text)
    if match:
        k = int(match.group(1))
        if not 1 <= k <= len(names):
            raise ValueError(f"--labels {text}: k must be between 1 and {len(names)}")
        return "top", k
    index = {name: i for i, name in enumerate(names)}
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in index]
    if unknown or not wanted:
        raise ValueError(
            f"--labels {text!r}: unknown label(s) {unknown}; use 'decoded', 'top-K' or names of "
            f"the model's vocabulary, e.g. {','.join(names[:3])}"
        )
    return "names", [index[name] for name in wanted]


def has_attention_decoder(model):
    """True when `model`'s label decoder attends over the feature map (`model.decoder: attention`)."""
    return model_decoder(model) == "attention"


class Explainer:
    """Scores images and makes one heat map per chosen label.

    Args:
        model: an inference model from `build_model` (or its `.keras` file).
        names: the label names, in score order.
        method: "auto" (attention maps for the labels the attention decoder
            emitted, Grad-CAM for the rest and for other heads), "grad_cam"
            (always) or "attention" (requires the attention decoder).

    Example:
        >>> explainer = Explainer(model, vocabulary.names)
        >>> explained = explainer.explain(images, labels=("top", 3))
        >>> explained[0][0]["label"], explained[0][0]["heat_map"].shape
        ('person', (7, 7))
    """

    def __init__(self, model, names, method="auto"):
        if method not in METHODS:
            raise ValueError(f"unknown explanation method {method!r}; choose one of {list(METHODS)}")
        self.model = model
        self.names = list(names)
        attention = has_attention_decoder(model)
        if method == "attention" and not attention:
            raise ValueError(
                "--method attention needs a model with the attention decoder (model.decoder: "
                "attention); this one has none: use --method grad_cam"
            )
        self.method = method
        self._attention_model = None
        if attention and method != "grad_cam":
            from hybridnet_tf.model.hybridnet import with_attention_output

            self._attention_model = with_attention_output(model)
        self._grad_cam = None
        self._predict = tf.function(self._outputs, reduce_retracing=True)

    def _outputs(self, images):
        if self._attention_model is not None:
            return self._attention_model(images, training=False)
        return self.model(images, training=False)

    def grad_cam(self, images, label_ids):
        """Grad-CAM maps [N, h, w] (0..1) and scores [N] of one label per image row."""
        if self._grad_cam is None:
            self._grad_cam = make_grad_cam(self.model)
        maps, scores = [], []
        for start in range(0, len(label_ids), GRAD_CAM_BATCH):
            part_maps, part_scores = self._grad_cam(
                tf.convert_to_tensor(images[start:start + GRAD_CAM_BATCH], tf.float32),
                tf.convert_to_tensor(label_ids[start:start + GRAD_CAM_BATCH], tf.int32),
            )
            maps.append(part_maps.numpy())
            scores.append(part_scores.numpy())
        return np.concatenate(maps), np.concatenate(scores)

    def explain(self, images, labels=("decoded", None), threshold=None):
        """Heat maps of a batch.

        Args:
            images: float32 [B, S, S, 3], 0..255, as the model takes them.
            labels: a `parse_label_choice` result.
            threshold: with `labels=("decoded", None)`: explain the labels
                scoring at least this (a float or per-label array) instead
                of the decoded set, as `predict --threshold` reports them.

        Returns:
            One list per image of dicts `label`, `index`, `score`, `method`
            ("attention" or "grad_cam"), `heat_map` ([h, w] float32, 0..1,
            its maximum 1 unless all zero), highest score first.
        """
        images = np.asarray(images, np.float32)
        outputs = self._predict(tf.convert_to_tensor(images))
        scores = outputs["scores"].numpy()
        label_ids = outputs["label_ids"].numpy()
        attention = outputs["attention"].numpy() if "attention" in outputs else None
        kind, value = labels
        chosen = []
        for row in range(len(images)):
            if kind == "top":
                indices = np.argsort(-scores[row], kind="stable")[:value].tolist()
            elif kind == "names":
                indices = list(value)
            elif threshold is not None:
                indices = np.nonzero(scores[row] >= threshold)[0].tolist()
            else:
                indices = [int(i) for i in label_ids[row] if i >= 0]
            chosen.append(sorted(indices, key=lambda i: -scores[row, i]))

        results = [[] for _ in images]
        pending = []  # (row, label) pairs for Grad-CAM
        for row, indices in enumerate(chosen):
            steps = {int(label): step for step, label in enumerate(label_ids[row]) if label >= 0}
            for index in indices:
                entry = {"label": self.names[index], "index": int(index), "score": float(scores[row, index])}
                if attention is not None and index in steps:
                    # The weights the decoder looked with when it emitted this label.
                    weights = attention[row, steps[index]].astype(np.float32)
                    entry.update(method="attention", heat_map=weights / max(weights.max(), 1e-12),
                                 step=steps[index])
                elif self.method == "attention":
                    entry.update(method="attention", heat_map=None, step=None)
                else:
                    entry["method"] = "grad_cam"
                    pending.append((row, len(results[row])))
                results[row].append(entry)
        if pending:
            rows = np.array([row for row, _ in pending])
            ids = np.array([results[row][slot]["index"] for row, slot in pending])
            maps, _ = self.grad_cam(images[rows], ids)
            for (row, slot), heat_map in zip(pending, maps):
                results[row][slot]["heat_map"] = heat_map
        return results


def _output_stem(path, used):
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    candidate, number = stem, 1
    while candidate in used:
        candidate = f"{stem}_{number}"
        number += 1
    used.add(candidate)
    return candidate


def _read_image(path, image_size, resize):
    """`(model input [S, S, 3], shown picture [H', W', 3], original (W, H))` of an image file."""
    encoded = tf.io.read_file(path)
    original = decode_rgb(encoded)
    # What the model is given, exactly as evaluation and serving decode it
    # (a large JPEG decodes at reduced scale there), not resized from `original`.
    model_input = decode_and_resize(encoded, image_size, resize).numpy()
    height, width = (int(d) for d in original.shape[:2])
    # A squashed image covers the whole photo: draw the maps over the photo itself.
    # A centre crop covers part of it: draw them over what the model saw.
    shown = original.numpy() if eval_resize_policy(resize) == "squash" else model_input
    return model_input, shrink(shown, SHOWN_MAX_SIDE), (width, height)


def write_explanation(out_dir, stem, path, shown, original_size, explained, shown_what):
    """Writes `<stem>.png` (picture + one overlay panel per label) and `<stem>.json` (peaks).

    Returns:
        The JSON content (with `png` and `json` paths).
    """
    height, width = shown.shape[:2]
    entries, panels = [], []
    for item in explained:
        heat_map = item.get("heat_map")
        peak = peak_of(heat_map, height, width) if heat_map is not None else None
        if peak is not None and shown_what == "photo":
            # Squash maps the whole photo: fractions carry over to its pixels.
            peak["x_original"] = int(peak["x_fraction"] * original_size[0])
            peak["y_original"] = int(peak["y_fraction"] * original_size[1])
        entry = {k: item[k] for k in ("label", "index", "score", "method")}
        entry["score"] = round(entry["score"], 4)
        if item.get("step") is not None:
            entry["decoding_step"] = int(item["step"])
        if heat_map is not None:
            entry["map_size"] = [int(d) for d in np.shape(heat_map)]
        entry["peak"] = peak
        entries.append(entry)
        method = "attention" if item["method"] == "attention" else "Grad-CAM"
        panels.append({"title": f"{item['label']} {item['score']:.2f} ({method})",
                       "heat_map": heat_map, "peak": peak})
    title = os.path.basename(path) if explained else f"{os.path.basename(path)}: no labels"
    png_path = os.path.join(out_dir, f"{stem}.png")
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(png_path, "wb") as file:
        file.write(figure_png(overlay_figure(shown, panels, title=title)))
    content = {
        "image": path,
        "png": png_path,
        "shown": shown_what,
        "shown_size": [int(width), int(height)],
        "original_size": list(original_size),
        "labels": entries,
    }
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=1)
        file.write("\n")
    content["json"] = json_path
    return content


def explain_files(explainer, paths, out_dir, image_size, resize="squash", labels="decoded",
                  threshold=None, batch_size=8):
    """Writes a heat-map PNG and a peak JSON per image file; unreadable files are reported.

    Args:
        explainer: an `Explainer`.
        paths: image file paths.
        out_dir: the output folder (created); files are named after the
            images (`cat.jpg` -> `cat.png`, `cat.json`; repeated names get `_1`, ...).
        image_size: the model's input size.
        resize: the resize policy used in training.
        labels: "decoded", "top-K" or comma-separated names (`parse_label_choice`).
        threshold: see `Explainer.explain`.
        batch_size: images per model call.

    Returns:
        One dict per path in order: `path` and either `labels` (each with
        `label`, `score`, `method`, `peak`), `png` and `json`, or `error`.
    """
    choice = parse_label_choice(labels, explainer.names)
    os.makedirs(out_dir, exist_ok=True)
    shown_what = "photo" if eval_resize_policy(resize) == "squash" else "model_input"
    used, results, batch = set(), {}, []

    def flush():
        if not batch:
            return
        explained = explainer.explain(np.stack([item[1] for item in batch]), choice, threshold)
        for (path, _, shown, size), items in zip(batch, explained):
            content = write_explanation(out_dir, _output_stem(path, used), path, shown, size,
                                        items, shown_what)
            results[path] = {"path": path, "labels": content["labels"], "png": content["png"],
                             "json": content["json"]}
        batch.clear()

    for path in paths:
        try:
            model_input, shown, size = _read_image(path, image_size, resize)
        except (tf.errors.OpError, ValueError) as error:
            results[path] = {"path": path, "error": plain_error_message(error)}
            continue
        batch.append((path, model_input, shown, size))
        if len(batch) == batch_size:
            flush()
    flush()
    return [results[path] for path in dict.fromkeys(paths)]


def load_keras_predictor(path, checkpoint="best.keras"):
    """A run directory or `.keras` file loaded for explaining: a `KerasPredictor`.

    Its `model`, `vocabulary`, `image_size`, `resize` and `thresholds` are what
    `Explainer` and `explain_files` need.

    Raises:
        ValueError: for a SavedModel or TFLite file (heat maps need the Keras layers).
    """
    from hybridnet_tf.export.artifacts import load_predictor

    predictor = load_predictor(path, checkpoint=checkpoint)
    if predictor.kind != "keras":
        raise ValueError(
            f"{path} is a {predictor.kind} export: heat maps need the Keras model; pass the run "
            "directory or its .keras file"
        )
    return predictor


def describe(result):
    """One line for the command line: labels, scores, peaks and the PNG written."""
    if "error" in result:
        return f"{result['path']}: ERROR {result['error']}"
    parts = []
    for item in result["labels"]:
        peak = item["peak"]
        where = f"peak ({peak['x_fraction']:.2f}, {peak['y_fraction']:.2f})" if peak else "no peak"
        parts.append(f"{item['label']} {item['score']:.2f} {where}")
    return f"{result['path']}: {'; '.join(parts) or '(no labels)'} -> {result['png']}"
