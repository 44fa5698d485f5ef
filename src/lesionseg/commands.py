"""What each `lesionseg` subcommand does once its arguments are parsed (`lesionseg.cli` builds the parser): one
typed call into the module that owns the work. Nothing here imports PyTorch until a command that needs it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lesionseg.errors import LesionsegError
from lesionseg.files import shown
from lesionseg.machine import process_rank
from lesionseg.train.config import config_overrides

REPRODUCE_SETS = ("out", "init", "name")  # reproduce decides these per model
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_train(args: argparse.Namespace) -> None:
    from lesionseg.train.config import build_config
    from lesionseg.train.training import fit, resume_config

    if args.resume:  # the run's own config; other options would make it another run
        config = resume_config(args.resume)
    else:
        overrides = config_overrides(args) | {"out": args.out or f"runs/{args.preset}"}
        config = build_config(args.preset, **overrides)
    run_dir = fit(config, progress=not args.no_progress, resume=bool(args.resume), overwrite=args.overwrite)
    if process_rank()[0] == 0:
        print(f"trained: {shown(run_dir / 'best.pt')}")


def refinements(args: argparse.Namespace):
    from lesionseg.segment.pipeline import Refinements

    return Refinements(
        tta=args.tta,
        rotations=getattr(args, "rotations", False),
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lesionseg.train.evaluation import evaluate_checkpoint

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
    from lesionseg.train.reproduce import run_compare

    report = run_compare(args.runs, args.out, progress=not args.no_progress)
    print(report["markdown"])
    print(f"report: {report['path']}")


def cmd_summary(args: argparse.Namespace) -> None:
    from lesionseg.train.report import model_summary

    print(model_summary(args.arch, args.image_size, args.batch_size, args.frozen))


def cmd_reproduce(args: argparse.Namespace) -> None:
    from lesionseg.train.reproduce import run_reproduce

    overrides = {k: v for k, v in config_overrides(args).items() if k not in REPRODUCE_SETS}
    report = run_reproduce(args.out, progress=not args.no_progress, **overrides)
    print(report["markdown"])
    print(f"report: {report['path']}")


def cmd_predict(args: argparse.Namespace) -> int:
    from lesionseg.api import load_predictor
    from lesionseg.segment.pipeline import Pipeline
    from lesionseg.segment.prediction import run_predict

    pipeline = Pipeline(load_predictor(args.checkpoint, args.onnx, precision=args.precision), refinements(args))
    from lesionseg.segment.descriptors import PixelSizes
    from lesionseg.segment.outputs import Extras, Shard

    shard = Shard.parse(args.shard)
    report = run_predict(
        pipeline,
        args.inputs,
        args.out,
        args.batch_size,
        progress=not args.no_progress,
        extras=Extras(args.overlays, args.probabilities, args.dicom_seg),
        overwrite=args.overwrite,
        shard=shard,
        pixel_sizes=PixelSizes(args.pixel_size),
    )
    share = f" (shard {shard.index + 1} of {shard.count})" if shard.count > 1 else ""
    print(
        f"segmented {len(report.rows) - report.resumed} image(s) into {shown(args.out)}{share}; "
        f"{report.resumed} already done; {len(report.problems)} skipped"
    )
    return 1 if report.problems or not report.rows else 0


def cmd_merge(args: argparse.Namespace) -> None:
    from lesionseg.segment.outputs import merge

    if not os.path.isdir(args.out):
        raise LesionsegError(f"{shown(args.out)}: predict folder not found")
    rows = merge(args.out)
    print(f"joined {len(rows)} row(s) into {shown(os.path.join(args.out, 'predictions.csv'))}")


def cmd_export(args: argparse.Namespace) -> None:
    from lesionseg.train.export import export_int8, export_onnx

    if args.int8:
        path = export_int8(args.checkpoint, args.onnx, args.calibration_data, args.calibration_images)
    else:
        path = export_onnx(args.checkpoint, args.onnx, fp16_weights=args.fp16_weights)
    print(f"exported: {path}")


def warn_if_exposed(host: str) -> None:
    if host not in LOOPBACK:
        print(
            f"lesionseg: WARNING: serving on {host}: anyone who can reach this machine can use the service "
            "(it has no authentication); put it behind a proxy that authenticates, or use --host 127.0.0.1",
            file=sys.stderr,
        )


def cmd_review(args: argparse.Namespace) -> None:
    from lesionseg.api import load_predictor
    from lesionseg.segment.pipeline import Pipeline
    from lesionseg.segment.review_app import run_review

    warn_if_exposed(args.host)
    pipeline = Pipeline(load_predictor(args.checkpoint, args.onnx, precision=args.precision), refinements(args))
    run_review(args.out, args.images, pipeline, args.host, args.port)


def cmd_serve(args: argparse.Namespace) -> None:
    from lesionseg.api import load_predictor
    from lesionseg.segment.pipeline import Pipeline
    from lesionseg.segment.serve import run_serve

    warn_if_exposed(args.host)
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
    from lesionseg.train.download import run_download

    dest = run_download(args.dataset, args.dest, progress=not args.no_progress)
    print(f"ready: lesionseg reproduce --data {dest}")


def cmd_adapt(args: argparse.Namespace) -> None:
    from lesionseg.train.adapt import run_adapt, summary_line
    from lesionseg.train.config import AdaptRecipe

    recipe = AdaptRecipe(
        steps=args.steps, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, folds=args.folds, seed=args.seed
    )
    say = None if args.no_progress else (lambda text: print(f"lesionseg adapt: {text}", file=sys.stderr))
    report = run_adapt(args.data, args.out, args.start, recipe, progress=say, overwrite=args.overwrite)
    print(summary_line(report))
    print(
        f"model: {shown(report['files']['onnx'])}"
        + (f" (int8: {shown(report['files']['int8'])})" if "int8" in report["files"] else "")
    )


def cmd_train_clicks(args: argparse.Namespace) -> None:
    from lesionseg.train.clicks import export_saved, run_train_clicks

    say = None if args.no_progress else (lambda text: print(f"lesionseg train-clicks: {text}", file=sys.stderr))
    if args.export_only:
        path = export_saved(args.out)
    elif not args.data:
        raise LesionsegError("train-clicks needs --data FOLDER [FOLDER ...] (or --export-only)")
    else:
        path = run_train_clicks(
            args.data, args.out, args.steps, args.batch_size, args.resume, cache_dir=args.cache_dir, progress=say
        )
    print(f"click model: {shown(path)}")


def cmd_describe(args: argparse.Namespace) -> int:
    from lesionseg.segment.describe import run_describe

    rows, problems = run_describe(args.images, args.masks, args.out, args.pixel_size, progress=not args.no_progress)
    print(f"described {len(rows)} lesion(s) into {shown(args.out)}; {len(problems)} skipped")
    return 1 if problems or not rows else 0
