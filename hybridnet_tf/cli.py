"""The `hybridnet-tf` command line: demo-data, train, evaluate, predict, explain, export."""

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cmd_demo_data(args):
    from hybridnet_tf.data.demo_scenes import write_demo_dataset

    start = time.perf_counter()
    info = write_demo_dataset(
        args.out, seed=args.seed, num_train=args.train, num_val=args.val, image_size=args.size
    )
    print(
        f"wrote {info['num_train']} train + {info['num_val']} val images "
        f"({info['num_categories']} classes) to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _cmd_train(args):
    from hybridnet_tf.config import load_config
    from hybridnet_tf.experiment import run_train

    config = load_config(args.config, args.set)
    run_dir = args.run_dir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config or "default"))[0]
    )
    from hybridnet_tf.run_files import plan_training
    from hybridnet_tf.training.callbacks import CheckpointWriteError, NonFiniteLossError

    if not args.overwrite:
        plan = plan_training(run_dir, config)
        if plan.action == "complete":
            print(plan.message)  # a finished run: exit 0 with nothing touched
            return 0
    start = time.perf_counter()
    try:
        history = run_train(config, run_dir, overwrite=args.overwrite)
    except (NonFiniteLossError, CheckpointWriteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    summary = {k: round(v[-1], 4) for k, v in history.items()}
    print(f"trained in {time.perf_counter() - start:.0f} s; last epoch: {summary}")
    print(f"run directory: {run_dir}")
    return 0


def _format_metrics(metrics):
    """The evaluate printout: mAP, then the label sets the model returns first.

    Scores at a fixed threshold come second: on real photos a decoder's (or a
    probe's) scores rarely reach 0.5, so that row alone says little.
    """
    from hybridnet_tf.evaluation.metrics import SET_METRIC_KEYS

    def row(values):
        return "  ".join(f"{k} {100 * values[k]:.2f}" for k in SET_METRIC_KEYS)

    lines = [
        f"mAP {100 * metrics['mAP']:.2f}  (images {metrics['num_images']}, "
        f"classes counted {metrics['num_classes_counted']})"
    ]
    if "decoded_set" in metrics:
        lines.append("label sets the model returns: " + row(metrics["decoded_set"]))
    threshold = metrics.get("threshold", 0.5)
    threshold = f"{threshold:g}" if isinstance(threshold, float) else "per label"
    lines.append(f"scores >= {threshold}: " + row(metrics))
    if "tuned_thresholds" in metrics:
        caveat = " (tuned on val: in-sample here)" if metrics.get("split") == "val" else ""
        lines.append(f"scores >= tuned thresholds{caveat}: " + row(metrics["tuned_thresholds"]))
    return "\n".join(lines)


def _cmd_evaluate(args):
    from hybridnet_tf.experiment import run_evaluate

    metrics = run_evaluate(args.run_dir, data_config=args.data, split=args.split, threshold=args.threshold,
                           strict=args.strict)
    print(_format_metrics(metrics))
    unscored = metrics.get("unscored", {}).get("count", 0)
    if unscored:
        print(f"{unscored} image(s) could not be scored and are left out (listed in metrics.json; "
              "--strict fails instead)", file=sys.stderr)
    print(f"wrote {os.path.join(args.run_dir, 'eval', 'metrics.json')}")
    return 0


def _cmd_predict(args):
    from hybridnet_tf.export.artifacts import load_predictor
    from hybridnet_tf.prediction import expand_image_paths, predict_files, write_results_csv

    # A run dir, .keras, SavedModel or .tflite: all predict through one interface.
    predictor = load_predictor(args.model or args.run_dir, num_threads=args.threads)
    if args.explain and predictor.kind != "keras":
        raise ValueError(
            f"--explain needs the Keras model (a run directory or .keras file); "
            f"{predictor.path} is a {predictor.kind} export"
        )
    paths = expand_image_paths(args.images)
    if not paths:
        print("no image files found in " + " ".join(args.images), file=sys.stderr)
        return 2
    threshold = args.threshold
    if threshold == "tuned":
        threshold = predictor.thresholds["per_class"]
    results = predict_files(
        predictor,
        paths,
        predictor.vocabulary,
        predictor.image_size,
        resize=predictor.resize,
        threshold=threshold,
    )
    if args.csv:
        write_results_csv(results, args.csv)
    failed = 0
    for result in results:
        if "error" in result:
            failed += 1
            print(f"{result['path']}: ERROR {result['error']}", file=sys.stderr)
        else:
            labels = ", ".join(f"{item['label']} {item['score']:.2f}" for item in result["labels"])
            print(f"{result['path']}: {labels or '(no labels)'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    if args.explain:
        # Heat maps of the labels printed above, beside the usual output.
        # (Unreadable files were reported above already.)
        _explain_paths(predictor, paths, args.explain, "decoded", args.explain_method,
                       threshold=threshold, report_errors=False)
    if failed:
        print(f"{failed} of {len(results)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _explain_paths(predictor, paths, out_dir, labels, method, threshold=None, report_errors=True):
    """Writes heat-map PNGs and peak JSONs; prints one line per image; returns the failures."""
    from hybridnet_tf.explanation.explain_images import Explainer, describe, explain_files

    explainer = Explainer(predictor.model, predictor.vocabulary.names, method=method)
    results = explain_files(
        explainer, paths, out_dir, predictor.image_size, resize=predictor.resize,
        labels=labels, threshold=threshold,
    )
    failed = [result for result in results if "error" in result]
    for result in results:
        if "error" not in result:
            print(describe(result))
        elif report_errors:
            print(describe(result), file=sys.stderr)
    print(f"wrote {len(results) - len(failed)} heat-map PNG(s) and JSON(s) to {out_dir}")
    return failed


def _cmd_explain(args):
    from hybridnet_tf.prediction import expand_image_paths

    paths = expand_image_paths(args.images)
    if not paths:
        print("no image files found in " + " ".join(args.images), file=sys.stderr)
        return 2
    from hybridnet_tf.explanation.explain_images import load_keras_predictor

    failed = _explain_paths(load_keras_predictor(args.model), paths, args.out, args.labels, args.method)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _threshold_argument(text):
    if text == "tuned":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'tuned', got {text!r}") from None


def _cmd_export(args):
    from hybridnet_tf.export import export_run

    start = time.perf_counter()
    path = export_run(
        args.run_dir, args.format, out=args.out, quantize=args.quantize,
        checkpoint=args.checkpoint, overwrite=args.overwrite,
    )
    size = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    ) if os.path.isdir(path) else os.path.getsize(path)
    print(f"exported {args.format} ({args.quantize}) to {path}: {size / 1e6:.1f} MB "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


def build_parser():
    """The argument parser of `hybridnet-tf`."""
    parser = argparse.ArgumentParser(prog="hybridnet-tf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="write the synthetic COCO-format demo data set")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train", type=int, default=2000, help="number of train images")
    demo.add_argument("--val", type=int, default=500, help="number of val images")
    demo.add_argument("--size", type=int, default=96, help="image size in pixels")
    demo.set_defaults(func=_cmd_demo_data)

    train = commands.add_parser("train", help="train a HybridNet with model.fit")
    train.add_argument("--config", help="YAML experiment file (e.g. configs/demo.yaml)")
    train.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    train.add_argument("--run-dir", help="output folder (default runs/<config name>)")
    train.add_argument(
        "--overwrite", action="store_true",
        help="start over: remove what an earlier train wrote in the run dir (by default a "
        "finished run is left as it is, a longer train.epochs continues it, an interrupted "
        "run resumes)",
    )
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="mAP, CP/CR/CF1, OP/OR/OF1 of a trained run")
    evaluate.add_argument("--run-dir", required=True)
    evaluate.add_argument("--data", help="a config file whose data section to evaluate on")
    evaluate.add_argument(
        "--split", choices=("train", "val", "test"),
        help="default: the config's eval.split; report 'test' (val chose best.keras and tuned "
        "the thresholds: numbers on val are in-sample)",
    )
    evaluate.add_argument("--strict", action="store_true",
                          help="fail when an image of the split cannot be scored")
    evaluate.add_argument("--threshold", type=float, help="score threshold (default: the config's)")
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = commands.add_parser("predict", help="labels and scores for image files or folders")
    model = predict.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model", help="a run directory, .keras file, exported SavedModel folder or .tflite file"
    )
    model.add_argument("--run-dir", help="a run directory (the same as --model RUN_DIR)")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument(
        "--threshold", type=_threshold_argument,
        help="report labels scoring at least this, or 'tuned' for the per-label thresholds "
        "beside the model (default: the decoded label set)",
    )
    predict.add_argument("--json", help="also write the results to this JSON file")
    predict.add_argument("--csv", help="also write the results to this CSV file")
    predict.add_argument("--threads", type=int, help="TFLite interpreter threads")
    predict.add_argument(
        "--explain", metavar="DIR",
        help="also write a heat-map PNG and JSON per image into DIR (run dir or .keras models)",
    )
    predict.add_argument("--explain-method", choices=("auto", "grad_cam", "attention"), default="auto",
                         help="heat maps of --explain (see `explain --method`)")
    predict.set_defaults(func=_cmd_predict)

    explain = commands.add_parser(
        "explain", help="per-label heat maps (Grad-CAM or decoder attention) of image files"
    )
    explain.add_argument("--model", required=True, help="a run directory or .keras file")
    explain.add_argument("images", nargs="+", help="image files or folders")
    explain.add_argument("--out", required=True, help="output folder for the PNG and JSON files")
    explain.add_argument(
        "--labels", default="decoded",
        help="which labels get a map: 'decoded' (the label set the model returns, default), "
        "'top-K' (the K best scores) or comma-separated label names",
    )
    explain.add_argument(
        "--method", choices=("auto", "grad_cam", "attention"), default="auto",
        help="auto: the attention decoder's weights for the labels it emitted, else Grad-CAM; "
        "grad_cam: Grad-CAM for every label and head",
    )
    explain.set_defaults(func=_cmd_explain)

    export = commands.add_parser("export", help="export a run as a SavedModel or TFLite file")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--format", choices=("saved_model", "tflite"), default="saved_model")
    export.add_argument(
        "--quantize", choices=("none", "float16", "dynamic", "int8"), default="none",
        help="TFLite quantisation (int8 calibrates on 100 training images)",
    )
    export.add_argument(
        "--out", help="output path (default RUN_DIR/export/hybridnet/1 or "
        "RUN_DIR/export/hybridnet_<quantize>.tflite)",
    )
    export.add_argument("--checkpoint", default="best.keras", help="the run's model file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv=None):
    """Entry point of the `hybridnet-tf` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        # Config and data errors are the user's to fix: say what, not a traceback.
        if os.environ.get("HYBRIDNET_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
