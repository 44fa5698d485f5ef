"""The `lesionseg` command: each subcommand parses its arguments and calls one typed function.

Training flags are generated from `TrainConfig`'s fields (`config.add_config_flags`); nothing here imports
PyTorch until a subcommand that needs it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lesionseg import allocator
from lesionseg.config import PRECISIONS, PRESETS, add_config_flags, config_overrides
from lesionseg.errors import Interrupted, LesionsegError
from lesionseg.files import shown

DEBUG_ENV = "LESIONSEG_DEBUG"  # set to 1 for the traceback of an unexpected error
REPRODUCE_SETS = ("out", "init", "name")  # reproduce decides these per model
TRAINING_COMMANDS = ("train", "reproduce")  # run under a caching allocator when one is installed
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TORCH_COMMANDS = ("reproduce", "train", "evaluate", "compare", "summary", "export")


def cmd_train(args: argparse.Namespace) -> None:
    from lesionseg.config import build_config
    from lesionseg.training import fit, resume_config

    if args.resume:  # the run's own config; other options would make it another run
        config = resume_config(args.resume)
    else:
        overrides = config_overrides(args) | {"out": args.out or f"runs/{args.preset}"}
        config = build_config(args.preset, **overrides)
    run_dir = fit(config, progress=not args.no_progress, resume=bool(args.resume), overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained: {shown(run_dir / 'best.pt')}")


def refinements(args: argparse.Namespace):
    from lesionseg.pipeline import Refinements

    return Refinements(
        tta=args.tta,
        rotations=getattr(args, "rotations", False),
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lesionseg.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.split,
        args.out,
        refinements(args),
        args.source_resolution,
        progress=not args.no_progress,
    )
    print(json.dumps({k: v for k, v in result.items() if k.startswith("metrics") or k == "quality"}, indent=2))


def cmd_compare(args: argparse.Namespace) -> None:
    from lesionseg.reproduce import run_compare

    report = run_compare(args.runs, args.out, progress=not args.no_progress)
    print(report["markdown"])
    print(f"report: {report['path']}")


def cmd_summary(args: argparse.Namespace) -> None:
    from lesionseg.report import model_summary

    print(model_summary(args.arch, args.image_size, args.batch_size, args.frozen))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from lesionseg.reproduce import run_reproduce

    overrides = {k: v for k, v in config_overrides(args).items() if k not in REPRODUCE_SETS}
    report = run_reproduce(args.out, progress=not args.no_progress, **overrides)
    print(report["markdown"])
    print(f"report: {report['path']}")


def cmd_predict(args: argparse.Namespace) -> int:
    from lesionseg.pipeline import Pipeline
    from lesionseg.prediction import run_predict
    from lesionseg.predictors import load_predictor

    pipeline = Pipeline(load_predictor(args.checkpoint, args.onnx, precision=args.precision), refinements(args))
    from lesionseg.outputs import Shard

    shard = Shard.parse(args.shard)
    report = run_predict(
        pipeline,
        args.inputs,
        args.out,
        args.batch_size,
        progress=not args.no_progress,
        overlays=args.overlays,
        overwrite=args.overwrite,
        shard=shard,
    )
    share = f" (shard {shard.index + 1} of {shard.count})" if shard.count > 1 else ""
    print(
        f"segmented {len(report.rows) - report.resumed} image(s) into {shown(args.out)}{share}; "
        f"{report.resumed} already done; {len(report.problems)} skipped"
    )
    return 1 if report.problems or not report.rows else 0


def cmd_merge(args: argparse.Namespace) -> None:
    from lesionseg.outputs import merge

    if not os.path.isdir(args.out):
        raise LesionsegError(f"{shown(args.out)}: predict folder not found")
    rows = merge(args.out)
    print(f"joined {len(rows)} row(s) into {shown(os.path.join(args.out, 'predictions.csv'))}")


def cmd_export(args: argparse.Namespace) -> None:
    from lesionseg.export import export_int8, export_onnx

    if args.int8:
        path = export_int8(args.checkpoint, args.onnx, args.calibration_data, args.calibration_images)
    else:
        path = export_onnx(args.checkpoint, args.onnx, fp16_weights=args.fp16_weights)
    print(f"exported: {path}")


def cmd_serve(args: argparse.Namespace) -> None:
    from lesionseg.pipeline import Pipeline
    from lesionseg.predictors import load_predictor
    from lesionseg.serve import run_serve

    if args.host not in LOOPBACK:
        print(
            f"lesionseg: WARNING: serving on {args.host}: anyone who can reach this machine can use the service "
            "(it has no authentication); put it behind a proxy that authenticates, or use --host 127.0.0.1",
            file=sys.stderr,
        )
    start = time.perf_counter()  # a checkpoint is exported for onnxruntime first: about 20 s
    predictor = load_predictor(args.checkpoint, args.onnx, backend=args.backend, precision=args.precision)
    pipeline = Pipeline(predictor, refinements(args))
    print(
        f"lesionseg: serving {predictor.name} with {type(predictor).__name__}, {pipeline.refine.name} "
        f"(ready in {time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    run_serve(pipeline, args.host, args.port, args.max_batch, args.batch_window_ms)


def cmd_download(args: argparse.Namespace) -> None:
    from lesionseg.download import run_download

    dest = run_download(args.dataset, args.dest, progress=not args.no_progress)
    print(f"ready: lesionseg reproduce --data {dest}")


def add_refinements(parser: argparse.ArgumentParser, rotations: bool = False) -> None:
    """The pipeline's options, the same for evaluate, predict and serve."""
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each answer over horizontal and vertical flips (3 model calls per image)",
    )
    if rotations:
        parser.add_argument(
            "--rotations",
            action="store_true",
            help="average over the four quarter turns too (with --tta: all eight symmetries)",
        )
    parser.add_argument("--largest-component", action="store_true", help="keep only the largest connected lesion")
    parser.add_argument("--fill-holes", action="store_true", help="fill holes inside the lesion")


def add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a lesionseg checkpoint (.pt) or run folder (default: the released model)")
    source.add_argument("--onnx", help="a model exported with `lesionseg export` (default: the released model)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="int8: the released model's int8 file (or --onnx's file) in OpenVINO where installed; bf16: the float "
        "file in OpenVINO's bf16 (CPUs with AVX512-BF16/AMX); default float32 in onnxruntime",
    )
    add_refinements(parser)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {value}")
    return value


def window_ms(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1000 ms, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line (what is wrong and where help is), not the usage block and then the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_train_commands(sub) -> None:
    p = sub.add_parser("reproduce", help="train and evaluate the paper's two models, write the report and figures")
    p.add_argument("--out", default="runs/paper", help="report folder; each model trains in OUT/<preset>")
    add_config_flags(p, exclude=REPRODUCE_SETS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("train", help="train one model from a preset (every flag overrides one of its values)")
    p.add_argument("--preset", choices=PRESETS, default="model2-finetune")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run from its last.pt, with its own config")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    add_config_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def add_model_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a split")
    p.add_argument(
        "checkpoint", help="a .pt file, a run folder (uses its best.pt) or an exported .onnx model (needs --data)"
    )
    p.add_argument("--data", help="dataset folder (default: the one the model was trained on)")
    p.add_argument(
        "--split",
        choices=("test", "train", "val"),
        default="test",
        help="val: the run's own validation images (from its split.json), where refinements may be chosen",
    )
    p.add_argument("--out", help="folder for metrics.json and per_image.csv")
    add_refinements(p, rotations=True)
    p.add_argument(
        "--source-resolution",
        action="store_true",
        help="also score at each image's own size (prediction upsampled), as the challenge did",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="one table and one set of figures across any number of runs")
    p.add_argument("runs", nargs="+", help="run folders (evaluated on the test split if not yet)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("summary", help="print the model's layer table (shapes, parameters, mult-adds)")
    p.add_argument("--arch", default="seed")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frozen", action="store_true", help="count the encoder as non-trainable (Model 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch, normalization inside)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16-weights",
        action="store_true",
        help="store weights as float16 (half the file; still computes in float32)",
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights and activations (onnxruntime static quantization, calibrated on training images)",
    )
    p.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="training images for --int8's activation ranges (default: the data the checkpoint was trained on)",
    )
    p.add_argument("--calibration-images", type=positive_int, metavar="N", help="how many (default 128)")
    p.set_defaults(func=cmd_export)


def add_use_commands(sub) -> None:
    p = sub.add_parser("predict", help="segment images: OUT/masks/<stem>.png and a CSV/JSON row each")
    add_model_source(p)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (its own layout: masks/, overlays/, predictions.*)")
    p.add_argument("--overlays", action="store_true", help="also OUT/overlays/<stem>.png: the outline on the image")
    p.add_argument("--overwrite", action="store_true", help="redo images an earlier run into OUT finished")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="segment the K-th of N shares (a stable split by file name; default: torchrun's RANK/WORLD_SIZE)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("merge", help="join the shards' rows in a predict folder into predictions.csv/.json")
    p.add_argument("out", help="the --out folder the shards wrote into")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="web page and POST /predict API")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "torch"),
        default="auto",
        help="how a --checkpoint runs: exported to onnxruntime (auto: when installed) or in PyTorch",
    )
    p.add_argument("--max-batch", type=positive_int, default=16, help="most concurrent requests run as one model batch")
    p.add_argument(
        "--batch-window-ms",
        type=window_ms,
        default=2.0,
        help="how long a batch waits for more requests after the first",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("download", help="fetch, verify and extract a dataset's official archives")
    p.add_argument("dataset", choices=("isic2016",))
    p.add_argument("--dest", required=True, help="folder to download and extract into")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lesionseg", description="Skin-lesion segmentation with a MobileNetV2 encoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    add_model_commands(sub)
    add_use_commands(sub)
    return parser


NAMED_PATHS = {  # options naming something that must exist, and what it is
    "checkpoint": "checkpoint",
    "onnx": "ONNX model",
    "resume": "run folder",
    "runs": "run folder",
    "init": "checkpoint or run folder",
    "data": "data folder",
    "extra_data": "data folder",
    "calibration_data": "data folder",
}


def check_named_paths(args: argparse.Namespace) -> None:
    """A model, run or data folder that is not there is one line before anything is imported or written (a
    missing checkpoint should not cost a PyTorch import to report)."""
    for key, what in NAMED_PATHS.items():
        if args.command == "export" and key == "onnx":  # what export writes
            continue
        value = getattr(args, key, None)
        for path in value if isinstance(value, list) else [value]:
            if path and not os.path.lexists(path):
                raise LesionsegError(f"{shown(path)}: {what} not found")


def main(argv: list[str] | None = None) -> int:
    """`argv` None: the process's own command line (the console script, `python -m lesionseg`, torchrun)."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TRAINING_COMMANDS:  # re-executes once, before PyTorch is imported
        allocator.ensure_caching_allocator()
    if args.command == "predict":  # glibc's thresholds, measured for each: benchmarks/README.md
        allocator.bound_memory_and_reuse_it()
    elif args.command == "serve":
        allocator.return_freed_memory_promptly()
    try:
        check_named_paths(args)
        if args.command in TORCH_COMMANDS:
            from lesionseg.predictors import require_torch

            require_torch(f"`lesionseg {args.command}`")
        status = args.func(args)
    except Interrupted as exc:
        print(f"lesionseg: {exc}", file=sys.stderr)
        return 130
    except LesionsegError as exc:
        print(f"lesionseg: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the last line of defence: one line, the traceback only when asked for
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"lesionseg: internal error ({exc.__class__.__name__}: {str(exc)[:300]}); this is a bug: rerun with "
            f"{DEBUG_ENV}=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 3
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
