"""The benchmark scripts still run against today's library (tiny sizes: numbers are not checked)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Slow: it builds and traces every head of the benchmark, 125 s beside the other worker, the
# default suite's longest test; the default run on a fresh clone had reached 15 min with set-up.
@pytest.mark.slow
def test_benchmark_heads_runs_with_the_default_decoder_and_prints_every_row():
    # It broke silently once: the default label order changed what training inputs look like.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_heads.py"), "--backbone", "small_cnn",
         "--image-size", "32", "--batch-size", "4", "--rounds", "1", "--extras"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = dict(re.findall(r"^\| (train [^|]+?|infer [^|]+?) \| ([0-9.]+) \|", result.stdout, re.M))
    assert set(rows) >= {
        "train bce", "train hybrid_rnn", "train freq2rare (teacher forcing)", "train hybrid",
        "infer bce", "infer greedy", "infer beam 5",
    }, result.stdout
    assert all(float(seconds) > 0 for seconds in rows.values())


def test_benchmark_vs_pytorch_names_the_missing_peer_package_and_the_fix(monkeypatch, script_module):
    # Without torch it used to stop on a bare ModuleNotFoundError after loading TensorFlow.
    script = script_module("benchmark_vs_pytorch")
    monkeypatch.setitem(sys.modules, "torch", None)  # find_spec answers None: as if not installed
    with pytest.raises(SystemExit, match=r"needs torch\b.*HYBRIDNET_WITH_TORCH=1 bash scripts/setup_env.sh"):
        script.main(["--rounds", "1"])


def test_benchmark_linear_probe_times_both_blas_settings_and_finds_the_same_probe(coco128_dir):
    # configs/coco128.yaml: its small CNN needs no downloaded weights, and the timing path is the same.
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_linear_probe.py"), "--config",
         os.path.join(ROOT, "configs", "coco128.yaml"), "--data", str(coco128_dir), "--sizes", "coco128,150",
         "--labels", "4", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (coco128|150) \((\d+)\) \| ([0-9.]+) .*\| ([0-9.]+e[-+]\d+) \|$", result.stdout, re.M)
    assert [(name, count) for name, count, _, _ in rows] == [("coco128", "126"), ("150", "150")], result.stdout
    assert all(float(difference) < 1e-5 for *_, difference in rows)


def test_benchmark_decode_times_both_paths_on_both_photo_sizes(coco128_dir):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark_decode.py"), "--coco128", str(coco128_dir),
         "--image-size", "32", "--rounds", "1", "--large", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (coco128 \(640 px\)|12 MP copies) \|.*speed x([0-9.]+).*moved ([0-9.]+) \|$",
                      result.stdout, re.M)
    assert [name for name, _, _ in rows] == ["coco128 (640 px)", "12 MP copies"], result.stdout
    # At 32 px both sets decode at reduced scale: the pixels move, but by little.
    assert all(float(speed) > 0 and 0 < float(moved) < 3 for _, speed, moved in rows), result.stdout
