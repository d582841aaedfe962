"""eval/report.html: one self-contained page, checked in a real headless browser where one is installed."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.evaluation.metrics import evaluate_scores
from hybridnet_tf.evaluation.predictions import collect_predictions
from hybridnet_tf.evaluation.report import write_report
from hybridnet_tf.evaluation.report_html import TITLE, choose_gallery, per_image_f1, write_report_html
from hybridnet_tf.model.hybridnet import build_model

NAMES = ["cat", "dog", "car", "bus"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def test_per_image_f1_and_gallery_choice():
    y_true = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]])
    predicted = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_allclose(per_image_f1(y_true, predicted), [1.0, 0.0, 1.0, 2 / 3, 2 / 3])
    scores = np.full(y_true.shape, 0.5)
    scores[0] = [0.9, 0.9, 0.1, 0.1]  # image 0 is the more confident perfect one
    chosen = choose_gallery(y_true, predicted, scores, num_best=1, num_worst=1, num_rare=1, names=NAMES)
    # best: image 0; worst: image 1; the rarest label with a positive is "car" (1 image) or "bus":
    # stable order picks "car" (index 2), whose only image is 3.
    assert chosen == [(0, "best (F1 1.00)"), (1, "worst (F1 0.00)"), (3, "rare label car (1 image(s))")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report.html of a small untrained model on 12 synthetic images."""
    out_dir = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)
    labels = (rng.random((12, 4)) < 0.4).astype(np.float32)
    labels[0] = [1, 0, 0, 0]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
    model = build_model(len(NAMES), image_size=32, head="bce")
    y_true, scores, decoded = collect_predictions(model, dataset)
    metrics = evaluate_scores(y_true, scores, names=NAMES, decoded=decoded)
    metrics["split"] = "val"
    paths = write_report(str(out_dir), metrics, y_true, scores, NAMES)
    path = write_report_html(str(out_dir), metrics, paths, model, dataset, y_true, scores, decoded, NAMES)
    return path, metrics


def test_report_html_is_self_contained_with_tables_plots_and_gallery(report):
    path, metrics = report
    page = open(path, encoding="utf-8").read()
    assert f"<title>{TITLE}</title>" in page
    assert '<table id="metrics">' in page and '<table id="per-label">' in page
    assert f"<td>mAP</td><td>{100 * metrics['mAP']:.1f}</td>" in page
    # Nothing is loaded from outside the file: every image is a data: URL, no script.
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert page.count('class="gallery-item"') >= 4
    assert len(sources) == 3 + page.count('class="gallery-item"')  # 3 plots, one image per item
    for name in NAMES:
        assert f"<td>{name}</td>" in page


def _browser():
    override = os.environ.get("HYBRIDNET_BROWSER")
    if override:
        return override
    return next((found for found in map(shutil.which, BROWSERS) if found), None)


# Appended to a copy of the page only: the report itself has no script. It writes into the
# DOM whether every image decoded, which --dump-dom then shows.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !img.complete || img.naturalWidth === 0).length;
  const gallery = document.querySelectorAll("#gallery img").length;
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = `images=${images.length} broken=${broken} gallery=${gallery}`;
  document.body.appendChild(out);
});
</script>"""


def _run_browser(browser, url, *flags):
    command = [browser, "--headless", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
               "--v=0", "--virtual-time-budget=10000", *flags, url]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _console_messages(stderr):
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(f"no browser found (looked for {', '.join(BROWSERS)}; set HYBRIDNET_BROWSER); "
                    ".ci/run installs Debian's chromium")
    path, _ = report
    screenshot = tmp_path / "report.png"
    shot = _run_browser(browser, f"file://{path}", f"--screenshot={screenshot}", "--window-size=1280,2400")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert _console_messages(shot.stderr) == []
    image = tf.io.decode_png(tf.io.read_file(str(screenshot)), channels=3).numpy()
    assert image.shape[:2] == (2400, 1280)
    # Rendered, not blank: the page's plots and heat maps put colour on a white page.
    saturation = image.max(axis=-1).astype(int) - image.min(axis=-1)
    assert (saturation > 100).mean() > 0.02

    dom = _run_browser(browser, f"file://{path}", "--dump-dom")
    assert f"<title>{TITLE}</title>" in dom.stdout
    assert '<table id="metrics">' in dom.stdout and 'id="gallery"' in dom.stdout

    checked = tmp_path / "checked.html"
    checked.write_text(open(path, encoding="utf-8").read().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = _run_browser(browser, f"file://{checked}", "--dump-dom")
    match = re.search(r"images=(\d+) broken=(\d+) gallery=(\d+)", dom.stdout)
    assert match, dom.stdout[-1000:]
    total, broken, gallery = map(int, match.groups())
    assert broken == 0 and gallery >= 4 and total == gallery + 3


@pytest.mark.slow
def test_browser_check_sees_console_errors(tmp_path):
    """The console check above is real: a page that logs an error is caught."""
    browser = _browser()
    if browser is None:
        pytest.skip("no browser found; .ci/run installs Debian's chromium")
    page = tmp_path / "error.html"
    page.write_text('<!DOCTYPE html><title>x</title><script>console.error("boom")</script>')
    result = _run_browser(browser, f"file://{page}", "--dump-dom")
    assert any('"boom"' in line for line in _console_messages(result.stderr))
