"""The evaluation report: files, JSON content, markdown numbers and PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from hybridnet_tf.evaluation.metrics import evaluate_scores
from hybridnet_tf.evaluation.report import write_report

NAMES = ["person", "dog", "cat", "car", "kite|string"]


@pytest.fixture
def report_inputs():
    rng = np.random.default_rng(0)
    y_true = (rng.random((40, 5)) < 0.4).astype(int)
    y_true[:, 3] = 0  # "car" has no positives: AP n/a
    scores = np.clip(0.4 * y_true + 0.6 * rng.random((40, 5)), 0, 1)
    decoded = (scores > 0.55).astype(int)
    metrics = evaluate_scores(y_true, scores, 0.5, NAMES, decoded=decoded)
    return metrics, y_true, scores


def test_write_report(tmp_path, report_inputs):
    metrics, y_true, scores = report_inputs
    paths = write_report(tmp_path / "report", metrics, y_true, scores, NAMES)
    assert set(paths) == {"metrics_json", "report_md", "per_class_ap", "pr_curves", "cooccurrence"}

    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved == metrics
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "top3", "per_class", "decoded_set"):
        assert key in saved

    for name in ("per_class_ap.png", "pr_curves.png", "cooccurrence.png"):
        path = tmp_path / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 150
            # A blank image would have a single colour.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"| mAP | {100 * metrics['mAP']:.1f} |" in markdown
    assert f"| OF1 | {100 * metrics['OF1']:.1f} | {100 * metrics['top3']['OF1']:.1f} |" in markdown
    assert "](per_class_ap.png)" in markdown and "](cooccurrence.png)" in markdown
    assert "40 images; mAP over 4 of 5 classes" in markdown
    assert "kite\\|string" in markdown  # a pipe in a name does not break the table
    # Per-class rows sorted by AP descending, the class without AP last.
    table = markdown.split("## Per class")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    order = [row.split(" | ")[0].lstrip("| ") for row in rows]
    aps = {e["name"].replace("|", "\\|"): e["ap"] for e in metrics["per_class"]}
    expected = sorted((n for n in aps if aps[n] is not None), key=lambda n: -aps[n]) + ["car"]
    assert order == expected
    assert "| car | n/a |" in markdown


def test_write_report_checks_inputs(tmp_path, report_inputs):
    metrics, y_true, scores = report_inputs
    with pytest.raises(ValueError, match="evaluate_scores"):
        write_report(tmp_path, {"mAP": 0.5}, y_true, scores, NAMES)
    with pytest.raises(ValueError, match="y_pred has shape"):
        write_report(tmp_path, metrics, y_true, scores, NAMES, y_pred=np.zeros((3, 5)))
