"""The evaluation report as one self-contained HTML page: `eval/report.html`.

Metric tables, the report's PNG plots, per-label AP and a gallery of
evaluated images (the best and worst predicted by per-image F1 of the
label set the model returns, and some from the rarest labels), each with
its true and predicted labels and a heat map per predicted label. Images
are embedded as base64 `data:` URLs and the page has no script, so the
file opens anywhere, offline, and can be mailed as it is.
"""

import base64
import html
import os

import numpy as np

from hybridnet_tf.evaluation.metrics import SET_METRIC_KEYS

REPORT_HTML = "report.html"
TITLE = "HybridNet evaluation report"
NUM_BEST = 4
NUM_WORST = 4
NUM_RARE_LABELS = 4
GALLERY_MAX_SIDE = 240

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 75em; color: #222; }
h1, h2 { font-weight: 600; } table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; } .note { color: #555; max-width: 60em; }
.plots img { max-width: min(100%, 50em); margin: 0.5em 0; display: block; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; max-width: 100%; }
.gallery img { max-width: 100%; display: block; } figcaption { font-size: 0.85em; }
.miss { color: #b00; } .hit { color: #070; }
"""


def per_image_f1(y_true, predicted):
    """F1 of each image's predicted label set against its true one (1.0 when both are empty)."""
    y_true, predicted = np.asarray(y_true) > 0.5, np.asarray(predicted) > 0.5
    hits = (y_true & predicted).sum(axis=1)
    total = y_true.sum(axis=1) + predicted.sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * hits / np.maximum(total, 1))


def choose_gallery(y_true, predicted, scores, num_best=NUM_BEST, num_worst=NUM_WORST,
                   num_rare=NUM_RARE_LABELS, names=None):
    """Which images the gallery shows: `[(index, why)]`, each image once.

    Best and worst by per-image F1 (ties: the more confident first for the
    best, the less for the worst), then for each of the `num_rare` rarest
    labels present, its first image not shown yet (`names` name them in the
    reason; else their column numbers).
    """
    y_true = np.asarray(y_true) > 0.5
    f1 = per_image_f1(y_true, predicted)
    # Confidence in the truth: mean score of the true labels (0 without any).
    truth_score = (np.asarray(scores) * y_true).sum(axis=1) / np.maximum(y_true.sum(axis=1), 1)
    order = np.lexsort((-truth_score, -f1))  # best first
    chosen, seen = [], set()

    def add(index, why):
        if int(index) not in seen:
            seen.add(int(index))
            chosen.append((int(index), why))

    for index in order[:num_best]:
        add(index, f"best (F1 {f1[index]:.2f})")
    for index in np.lexsort((truth_score, f1))[:num_worst]:
        add(index, f"worst (F1 {f1[index]:.2f})")
    support = y_true.sum(axis=0)
    for label in [c for c in np.argsort(support, kind="stable") if support[c] > 0][:num_rare]:
        for index in np.nonzero(y_true[:, label])[0]:
            if int(index) not in seen:
                name = names[label] if names is not None else f"#{label}"
                add(index, f"rare label {name} ({int(support[label])} image(s))")
                break
    return chosen


def gallery_images(dataset, indices):
    """The images (and names, when the batches carry them) at `indices` of an evaluated dataset.

    One more pass over `dataset` (not shuffled in evaluation), keeping only those images.

    Returns:
        `{index: (image [S, S, 3] float32, name or None)}`.
    """
    wanted, found, offset = set(indices), {}, 0
    for images, _labels, *rest in dataset:
        count = int(images.shape[0])
        hits = [i for i in range(count) if offset + i in wanted]
        if hits:
            images = images.numpy()
            names = rest[0].numpy() if rest else None
            for i in hits:
                name = names[i].decode("utf-8", "replace") if names is not None else None
                found[offset + i] = (images[i], name)
        offset += count
        if len(found) == len(wanted):
            break
    return found


def _png_data_url(png_bytes):
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _percent(value):
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def _metric_table(metrics):
    columns = [("all labels", None), ("top-3", "top3")]
    columns += [(title, key) for key, title in (("decoded_set", "label set returned"),
                                                ("tuned_thresholds", "tuned thresholds"))
                if key in metrics]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    rows = [f"<tr><td>mAP</td><td>{_percent(metrics['mAP'])}</td>" + "<td></td>" * (len(columns) - 1)
            + "</tr>"]
    for key in SET_METRIC_KEYS:
        cells = "".join(
            f"<td>{_percent(metrics[key] if column is None else metrics[column][key])}</td>"
            for _, column in columns
        )
        rows.append(f"<tr><td>{key}</td>{cells}</tr>")
    return (f'<table id="metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _per_label_table(per_class):
    rows = []
    for entry in sorted(per_class, key=lambda e: (e["ap"] is None, -(e["ap"] or 0.0))):
        rows.append(
            f"<tr><td>{html.escape(str(entry['name']))}</td><td>{_percent(entry['ap'])}</td>"
            f"<td>{_percent(entry['precision'])}</td><td>{_percent(entry['recall'])}</td>"
            f"<td>{_percent(entry['f1'])}</td><td>{entry['support']}</td></tr>"
        )
    return ('<table id="per-label"><thead><tr><th>label</th><th>AP</th><th>precision</th>'
            f"<th>recall</th><th>F1</th><th>support</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _notes(metrics):
    parts = []
    threshold = metrics.get("threshold")
    if isinstance(threshold, (int, float)):
        parts.append(f"Labels are predicted at score &ge; {threshold:.2f}; top-3 keeps each image's "
                     "3 best labels above it.")
    in_sample = metrics.get("in_sample") or {}
    if in_sample:
        parts.append(f"<strong>In-sample on {html.escape(str(metrics.get('split')))}:</strong> "
                     + html.escape("; ".join(in_sample.values())) + ".")
    unscored = (metrics.get("unscored") or {}).get("count")
    if unscored:
        parts.append(f"<strong>{unscored} image(s) could not be scored</strong> (listed in metrics.json).")
    return "".join(f'<p class="note">{part}</p>' for part in parts)


def _gallery_item(png, why, name, true_names, predicted):
    truth = set(true_names)
    shown = ", ".join(
        f'<span class="{"hit" if label in truth else "miss"}">{html.escape(label)} {score:.2f}</span>'
        for label, score in predicted
    ) or "none"
    missed = [label for label in true_names if label not in {label for label, _ in predicted}]
    caption = (f"<strong>{html.escape(why)}</strong>{' &middot; ' + html.escape(name) if name else ''}<br>"
               f"true: {html.escape(', '.join(true_names) or 'none')}<br>predicted: {shown}")
    if missed:
        caption += f'<br>missed: <span class="miss">{html.escape(", ".join(missed))}</span>'
    return (f'<figure class="gallery-item"><img alt="{html.escape(why)}" src="{_png_data_url(png)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def gallery_html(model, dataset, y_true, scores, decoded, names):
    """The gallery's `<figure>`s: chosen images with true/predicted labels and heat maps."""
    from hybridnet_tf.explanation.explain_images import Explainer
    from hybridnet_tf.explanation.heat_maps import figure_png, overlay_figure, peak_of, shrink

    chosen = choose_gallery(y_true, decoded, scores, names=names)
    found = gallery_images(dataset, [index for index, _ in chosen])
    chosen = [(index, why) for index, why in chosen if index in found]
    if not chosen:
        return ""
    images = np.stack([found[index][0] for index, _ in chosen])
    # The label set the model returns, as in the metrics' "label set returned" column.
    explained = Explainer(model, names).explain(images)
    items = []
    for (index, why), image, maps in zip(chosen, images, explained):
        shown = shrink(image, GALLERY_MAX_SIDE)
        height, width = shown.shape[:2]
        panels = [{"title": f"{item['label']} {item['score']:.2f}", "heat_map": item["heat_map"],
                   "peak": peak_of(item["heat_map"], height, width) if item["heat_map"] is not None else None}
                  for item in maps]
        figure = overlay_figure(shown, panels, title="image", columns=min(4, 1 + len(panels)))
        png = figure_png(figure, dpi=72)
        true_names = [names[c] for c in np.nonzero(np.asarray(y_true[index]) > 0.5)[0]]
        items.append(_gallery_item(png, why, found[index][1], true_names,
                                   [(item["label"], item["score"]) for item in maps]))
    return "".join(items)


def write_report_html(out_dir, metrics, plot_paths, model=None, dataset=None, y_true=None,
                      scores=None, decoded=None, names=None):
    """Writes `out_dir/report.html`: one self-contained page of the evaluation.

    Args:
        out_dir: the evaluation folder (beside report.md).
        metrics: the dict of `evaluate_scores` (with the extras of `evaluate_model`).
        plot_paths: `write_report`'s dict of written paths (its PNG plots are embedded).
        model, dataset: the evaluated model and data set, for the gallery
            (None: no gallery).
        y_true, scores, decoded: [N, L] arrays of the evaluation, in dataset order.
        names: the label names.

    Returns:
        The path written.
    """
    plots = "".join(
        f'<img alt="{html.escape(key)}" src="{_png_data_url(open(plot_paths[key], "rb").read())}">'
        for key in ("per_class_ap", "pr_curves", "cooccurrence") if key in plot_paths
    )
    gallery = ""
    if model is not None and dataset is not None:
        gallery = gallery_html(model, dataset, y_true, scores, decoded, names)
    split = f" on {metrics['split']}" if metrics.get("split") else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{TITLE}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><h1>{TITLE}</h1>
<p>{metrics['num_images']} images{html.escape(split)}; mAP over {metrics['num_classes_counted']} of
{len(metrics['per_class'])} labels (labels without positives are left out). All numbers in %.</p>
{_notes(metrics)}
<h2>Metrics</h2>{_metric_table(metrics)}
<p class="note">CP/CR: per-label precision/recall averaged over all labels; CF1 = 2&middot;CP&middot;CR/(CP+CR).
OP/OR/OF1: over all image-label pairs. exact: images whose whole label set is right.</p>
<h2>Plots</h2><div class="plots">{plots}</div>
<h2>Gallery</h2>
<p class="note">The best and worst predicted images by F1 of the label set the model returns, and
images of the rarest labels. Each panel is a heat map of one predicted label (Grad-CAM, or the
attention decoder's weights); in the captions, green labels are right, red ones wrong or missed.</p>
<div class="gallery" id="gallery">{gallery or '<p>no images</p>'}</div>
<h2>Per label (sorted by AP)</h2>{_per_label_table(metrics['per_class'])}
</body></html>
"""
    path = os.path.join(out_dir, REPORT_HTML)
    with open(path, "w", encoding="utf-8") as file:
        file.write(page)
    return path
