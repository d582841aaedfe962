"""The evaluation report: metrics.json, report.md and PNG plots in one folder."""

import json
import os

import numpy as np

from hybridnet_tf.evaluation.metrics import (
    SET_METRIC_KEYS,
    _check_binary,
    _check_labels_and_scores,
    _check_names,
    precision_recall_curve,
)

REQUIRED_METRIC_KEYS = (
    ("mAP",) + SET_METRIC_KEYS + ("top3", "per_class", "num_images", "num_classes_counted")
)
MAX_PR_CURVES = 8


def _percent(value):
    """A 0..1 metric as "12.3", or "n/a" when undefined."""
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def _markdown_cell(text):
    """Escapes a label name for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _caveat_lines(metrics):
    """report.md lines on in-sample numbers and on images that could not be scored."""
    lines = []
    in_sample = metrics.get("in_sample") or {}
    if in_sample:
        split = metrics.get("split", "this split")
        lines += [f"**In-sample on {split}:** " + "; ".join(in_sample.values()) + ". For numbers to "
                  "report, evaluate the test split (`hybridnet-tf evaluate --split test`).", ""]
    unscored = metrics.get("unscored") or {}
    if unscored.get("count"):
        lines += [f"**{unscored['count']} image(s) could not be scored** and are not in these numbers:", ""]
        lines += [f"- {_markdown_cell(item['path'])}: {_markdown_cell(item['reason'])}"
                  for item in unscored["images"][:50]]
        if unscored["count"] > 50:
            lines.append(f"- ... {unscored['count'] - 50} more in metrics.json")
        lines.append("")
    return lines


def _summary_markdown(metrics, paths):
    """The text of report.md."""
    # Optional columns: the decoder's own label sets, and tuned thresholds.
    extra = [
        (key, title)
        for key, title in (("tuned_thresholds", "tuned thresholds"), ("decoded_set", "decoded set"))
        if key in metrics
    ]
    header = "| metric | all labels | top-3 |" + "".join(f" {title} |" for _, title in extra)
    rule = "|---|---:|---:|" + "---:|" * len(extra)
    rows = [f"| mAP | {_percent(metrics['mAP'])} | |" + " |" * len(extra)]
    for key in SET_METRIC_KEYS:
        row = f"| {key} | {_percent(metrics[key])} | {_percent(metrics['top3'][key])} |"
        row += "".join(f" {_percent(metrics[column][key])} |" for column, _ in extra)
        rows.append(row)

    threshold = metrics.get("threshold")
    if isinstance(threshold, list):
        threshold_text = f"per-class thresholds ({min(threshold):.2f} to {max(threshold):.2f})"
    elif threshold is not None:
        threshold_text = f"threshold {threshold:.2f}"
    else:
        threshold_text = "the given threshold"
    num_classes = len(metrics["per_class"])
    lines = [
        "# Evaluation report",
        "",
        f"{metrics['num_images']} images; mAP over {metrics['num_classes_counted']} of "
        f"{num_classes} classes (classes without positives are left out). "
        f"Labels are predicted at {threshold_text}; top-3 keeps each image's 3 best "
        "labels above it. All numbers in %.",
        "",
        *_caveat_lines(metrics),
        header,
        rule,
        *rows,
        "",
        "CP/CR: per-class precision/recall averaged over all classes; "
        "CF1 = 2·CP·CR/(CP+CR). OP/OR/OF1: over all image-label pairs. "
        "exact: images whose whole label set is right.",
        "",
        "## Plots",
        "",
        f"![Average precision per class]({os.path.basename(paths['per_class_ap'])})",
        "",
        f"![Precision-recall curves]({os.path.basename(paths['pr_curves'])})",
        "",
        f"![Label co-occurrence]({os.path.basename(paths['cooccurrence'])})",
        "",
        "## Per class (sorted by AP)",
        "",
        "| label | AP | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in _sorted_by_ap(metrics["per_class"]):
        lines.append(
            f"| {_markdown_cell(entry['name'])} | {_percent(entry['ap'])} | "
            f"{_percent(entry['precision'])} | {_percent(entry['recall'])} | "
            f"{_percent(entry['f1'])} | {entry['support']} |"
        )
    return "\n".join(lines) + "\n"


def _sorted_by_ap(per_class):
    """Per-class entries by AP, highest first; classes without AP last."""
    return sorted(per_class, key=lambda e: (e["ap"] is None, -(e["ap"] or 0.0)))


def _label_font_size(num_labels):
    """Tick label size that stays readable from a few labels up to ~80."""
    return float(np.clip(11 - num_labels / 10, 4.5, 9))


def _plot_per_class_ap(path, per_class, mean_ap):
    """Horizontal bars of each class's AP, highest at the top."""
    from matplotlib.figure import Figure

    entries = [e for e in _sorted_by_ap(per_class) if e["ap"] is not None]
    num_left_out = len(per_class) - len(entries)
    num = max(len(entries), 1)
    font_size = _label_font_size(num)
    figure = Figure(figsize=(7, 1.2 + 0.16 * num), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(entries))
    axes.barh(positions, [100 * e["ap"] for e in entries], color="tab:blue", height=0.8)
    axes.set_yticks(positions, [e["name"] for e in entries], fontsize=font_size)
    axes.invert_yaxis()
    axes.set_ylim(len(entries) - 0.5, -0.5)
    axes.set_xlim(0, 100)
    axes.set_xlabel("average precision (%)")
    if mean_ap is not None:
        axes.axvline(100 * mean_ap, color="tab:red", linestyle="--", linewidth=1,
                     label=f"mAP {100 * mean_ap:.1f}")
        axes.legend(loc="lower right", fontsize=8)
    title = "Average precision per class"
    if num_left_out:
        title += f" ({num_left_out} without positives left out)"
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=120)


def _plot_pr_curves(path, y_true, scores, names, per_class):
    """Precision-recall curves of the most frequent classes."""
    from matplotlib.figure import Figure

    support = y_true.sum(axis=0)
    # Stable sort: among equally frequent classes the lower index comes first.
    frequent = [c for c in np.argsort(-support, kind="stable") if support[c] > 0][:MAX_PR_CURVES]
    figure = Figure(figsize=(6.5, 5), layout="constrained")
    axes = figure.add_subplot()
    for c in frequent:
        precision, recall, _ = precision_recall_curve(y_true[:, c], scores[:, c])
        # Precision P_k holds on the recall step (R_{k-1}, R_k] ("steps-pre"), so the
        # area under the drawn curve is the AP; (0, 1) is scikit-learn's first point.
        axes.plot(np.r_[0.0, recall], np.r_[1.0, precision], drawstyle="steps-pre",
                  label=f"{names[c]} (AP {_percent(per_class[c]['ap'])}, n={int(support[c])})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(f"Precision-recall of the {len(frequent)} most frequent classes", fontsize=10)
    axes.grid(alpha=0.3)
    if frequent:
        axes.legend(loc="lower left", fontsize=7)
    figure.savefig(path, dpi=120)


def _conditional_cooccurrence(labels):
    """P(label j | label i) for each pair: row i, column j; NaN rows for unseen labels.

    The diagonal (always 1) is blanked, so the colour scale shows the pairs.
    """
    counts = labels.T @ labels
    per_label = np.diag(counts).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = counts / per_label[:, None]
    conditional[per_label == 0] = np.nan
    np.fill_diagonal(conditional, np.nan)
    return conditional


def _plot_cooccurrence(path, y_true, y_pred, names):
    """Side-by-side heatmaps of label co-occurrence: ground truth vs predictions."""
    from matplotlib.figure import Figure

    num = len(names)
    font_size = _label_font_size(num)
    panel = float(np.clip(2.5 + 0.11 * num, 4.5, 11))
    # Room (inches) for the longest tick label, so names are never cut off.
    label_room = max(len(name) for name in names) * font_size * 0.65 / 72 + 0.2
    figure = Figure(figsize=(2 * (panel + label_room) + 1.2, panel + label_room + 0.5),
                    layout="constrained")
    axes_pair = figure.subplots(1, 2)
    image = None
    for axes, labels, title in (
        (axes_pair[0], y_true, "ground truth"),
        (axes_pair[1], y_pred, "predictions"),
    ):
        image = axes.imshow(_conditional_cooccurrence(labels), cmap="viridis", vmin=0, vmax=1,
                            interpolation="nearest")
        axes.set_facecolor("0.85")  # blanks (diagonal, unseen labels) show as grey
        axes.set_xticks(np.arange(num), names, rotation=90, fontsize=font_size)
        axes.set_yticks(np.arange(num), names, fontsize=font_size)
        axes.set_title(f"{title}: P(column label | row label)", fontsize=10)
    figure.colorbar(image, ax=list(axes_pair), shrink=0.6, label="conditional frequency")
    figure.savefig(path, dpi=120)


def write_report(out_dir, metrics, y_true, scores, names, y_pred=None):
    """Writes metrics.json, report.md and three PNG plots into `out_dir`.

    Plots are drawn on `matplotlib.figure.Figure` objects, which render with
    Agg without pyplot: no display is needed and the caller's matplotlib
    backend (e.g. a notebook's) is left alone.

    Args:
        out_dir: folder to write into; created if missing.
        metrics: the dict from `evaluate_scores` for the same data.
        y_true: [N, C] 0/1 ground truth.
        scores: [N, C] scores in [0, 1].
        names: C label names.
        y_pred: [N, C] 0/1 predictions for the co-occurrence plot; when None,
            `scores >= metrics["threshold"]` (0.5 if metrics has no threshold).

    Returns:
        dict of written paths: "metrics_json", "report_md", "per_class_ap",
        "pr_curves", "cooccurrence".
    """
    y_true, scores = _check_labels_and_scores(y_true, scores)
    names = _check_names(names, y_true.shape[1])
    missing = [key for key in REQUIRED_METRIC_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics lacks keys {missing}; pass the dict returned by evaluate_scores")
    if len(metrics["per_class"]) != len(names):
        raise ValueError(
            f"metrics has {len(metrics['per_class'])} classes but {len(names)} names were given"
        )
    if y_pred is None:
        threshold = np.asarray(metrics.get("threshold", 0.5), dtype=np.float64)
        y_pred = (scores >= threshold).astype(np.float64)
    else:
        y_pred = _check_binary(y_pred, "y_pred")
        if y_pred.shape != y_true.shape:
            raise ValueError(f"y_pred has shape {y_pred.shape} but y_true has shape {y_true.shape}")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "metrics_json": os.path.join(out_dir, "metrics.json"),
        "report_md": os.path.join(out_dir, "report.md"),
        "per_class_ap": os.path.join(out_dir, "per_class_ap.png"),
        "pr_curves": os.path.join(out_dir, "pr_curves.png"),
        "cooccurrence": os.path.join(out_dir, "cooccurrence.png"),
    }
    with open(paths["metrics_json"], "w", encoding="utf-8") as file:
        # allow_nan=False: fail here rather than write non-standard JSON.
        json.dump(metrics, file, indent=2, allow_nan=False)
        file.write("\n")
    _plot_per_class_ap(paths["per_class_ap"], metrics["per_class"], metrics["mAP"])
    _plot_pr_curves(paths["pr_curves"], y_true, scores, names, metrics["per_class"])
    _plot_cooccurrence(paths["cooccurrence"], y_true, y_pred, names)
    with open(paths["report_md"], "w", encoding="utf-8") as file:
        file.write(_summary_markdown(metrics, paths))
    return paths
