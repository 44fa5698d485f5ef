"""The `lesionseg` command: each subcommand parses its arguments and calls one typed function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lesionseg.config import ARCHS, ATTENTIONS, PRESETS
from lesionseg.errors import LesionsegError


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Overrides shared by `train` and `reproduce`; anything left out keeps the preset's value."""
    parser.add_argument("--data", help="dataset folder (ISIC 2016 layout or images/ + masks/); default: the embedded sample")
    parser.add_argument("--extra-data", action="append", metavar="DIR",
                        help="another folder of pairs (images/ + masks/) added to training only; repeatable")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--image-size", type=int, help="multiple of 32 (default 128)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--split-seed", type=int, help="draws the validation images (default: --seed); fix it to compare "
                        "seeds on the same validation images")
    parser.add_argument("--loss", help="e.g. 'bce', 'bce+0.1*dice', 'dice', 'focal', 'lovasz', 'tversky'")
    parser.add_argument("--arch", choices=ARCHS, help="seed: the paper's decoder; unet: ours with skips; smp-unet: smp's Unet")
    parser.add_argument("--optimizer", choices=("adam", "adamw"))
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--schedule", choices=("constant", "cosine"), help="per-step lr schedule after the warm-up")
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--monitor", choices=("val_loss", "val_iou"), help="what picks best.pt (and early stopping)")
    parser.add_argument("--patience", type=int, help="stop after N epochs without improvement (0: never)")
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--decoder-attention", choices=ATTENTIONS,
                        help="scse attention in each decoder block (arch unet; the others ignore it)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--amp", action="store_const", const=True,
                        help="mixed precision: bfloat16 on the CPU (fast only where it has AVX512-BF16 or AMX), float16 on CUDA")
    parser.add_argument("--channels-last", action="store_const", const=True, help="NHWC memory layout for training")
    parser.add_argument("--sync-bn", action="store_const", const=True, help="SyncBatchNorm across GPUs under torchrun")
    parser.add_argument("--cache-dir", help="where resized images are cached (default $LESIONSEG_CACHE or ~/.cache/lesionseg)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="encoder weights: a mobilenet_v2 state_dict FILE, or 'imagenet' (the default: "
                         "$LESIONSEG_WEIGHTS, else torchvision's cache or download), or 'auto' (the same, else from scratch)")
    weights.add_argument("--no-pretrained", action="store_true", help="encoder from scratch (no ImageNet weights)")
    parser.add_argument("--freeze-bn", action="store_const", const=True,
                        help="keep the encoder's BatchNorm statistics fixed while it fine-tunes")
    parser.add_argument("--encoder-lr-scale", type=float, help="the encoder's learning rate is --lr times this")
    parser.add_argument("--unfreeze-after", type=int, metavar="N", help="train the decoder alone for N epochs first")
    parser.add_argument("--soft-masks", action="store_const", const=True,
                        help="train on each mask's coverage at --image-size (fractions at the lesion border) instead of "
                        "thresholding it there; validation and scores use the binary masks")
    parser.add_argument("--strict", action="store_const", const=True, help="stop at the first bad image/mask pair (default: skip and list)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def training_overrides(args: argparse.Namespace) -> dict:
    from lesionseg.losses import parse_loss

    return {
        "data": args.data, "extra_data": args.extra_data, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "image_size": args.image_size, "seed": args.seed, "split_seed": args.split_seed,
        "cache_dir": args.cache_dir,
        "loss": parse_loss(args.loss) if args.loss else None,
        "weights": "none" if args.no_pretrained else args.weights,
        "arch": args.arch, "optimizer": args.optimizer, "weight_decay": args.weight_decay, "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs, "monitor": args.monitor, "patience": args.patience,
        "dropout": args.dropout, "decoder_attention": args.decoder_attention, "device": args.device, "amp": args.amp,
        "channels_last": args.channels_last,
        "sync_bn": args.sync_bn, "strict": args.strict, "soft_masks": args.soft_masks, "freeze_bn": args.freeze_bn,
        "encoder_lr_scale": args.encoder_lr_scale, "unfreeze_after": args.unfreeze_after,
    }


def cmd_train(args: argparse.Namespace) -> None:
    from lesionseg.config import build_config
    from lesionseg.training import fit, resume_config

    if args.resume:  # the run's own config; other options would make it another run
        config = resume_config(args.resume)
    else:
        config = build_config(args.preset, **training_overrides(args), init=args.init, out=args.out or f"runs/{args.preset}")
    run_dir = fit(config, progress=not args.no_progress, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained: {run_dir / 'best.pt'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lesionseg.evaluation import Refinements, evaluate_checkpoint

    refine = Refinements(tta=args.tta, rotations=args.rotations, largest_component=args.largest_component,
                         fill_holes=args.fill_holes)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.out, refine, args.source_resolution,
                                 progress=not args.no_progress)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("metrics")}, indent=2))


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

    report = run_reproduce(args.out, progress=not args.no_progress, **training_overrides(args))
    print(report["markdown"])
    print(f"report: {report['path']}")


def cmd_predict(args: argparse.Namespace) -> int:
    from lesionseg.prediction import Segmenter, load_predictor, run_predict, with_views

    predictor = with_views(load_predictor(args.checkpoint, args.onnx), flips=args.tta)
    report = run_predict(Segmenter(predictor), args.inputs, args.out, args.batch_size,
                         progress=not args.no_progress)
    print(f"segmented {len(report.rows)} image(s) into {args.out}; {len(report.problems)} skipped")
    return 1 if report.problems or not report.rows else 0


def cmd_export(args: argparse.Namespace) -> None:
    from lesionseg.export import export_int8, export_onnx

    if args.int8:
        path = export_int8(args.checkpoint, args.onnx, args.calibration_data, args.calibration_images)
    else:
        path = export_onnx(args.checkpoint, args.onnx, fp16_weights=args.fp16_weights)
    print(f"exported: {path}")


def cmd_serve(args: argparse.Namespace) -> None:
    from lesionseg.prediction import load_predictor, with_views
    from lesionseg.serve import run_serve

    start = time.perf_counter()  # a checkpoint is exported for onnxruntime first: about 20 s
    predictor = with_views(load_predictor(args.checkpoint, args.onnx, backend=args.backend), flips=args.tta)
    backend = type(getattr(predictor, "predictor", predictor)).__name__ + (" and flip TTA" if args.tta else "")
    print(f"lesionseg: serving {predictor.name} with {backend} "
          f"(ready in {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    run_serve(predictor, args.host, args.port, args.max_batch, args.batch_window_ms)


def cmd_download(args: argparse.Namespace) -> None:
    from lesionseg.download import run_download

    dest = run_download(args.dataset, args.dest, progress=not args.no_progress)
    print(f"ready: lesionseg reproduce --data {dest}")


def add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a lesionseg checkpoint (.pt) or run folder (default: the released model)")
    source.add_argument("--onnx", help="a model exported with `lesionseg export` (default: the released model)")
    parser.add_argument("--tta", action="store_true",
                        help="average each answer over horizontal and vertical flips (3 model calls per image)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionseg", description="Skin-lesion segmentation with a MobileNetV2 encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="train and evaluate the paper's two models, write the report and figures")
    p.add_argument("--out", default="runs/paper")
    add_training_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("train", help="train one model from a preset")
    p.add_argument("--preset", choices=PRESETS, default="model2-finetune")
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run from its last.pt, with its own config")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from a trained model (.pt or run folder) of the same "
                   "--arch instead of ImageNet weights: fine-tune it on new data, at another size, with another loss")
    add_training_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a checkpoint on a split")
    p.add_argument("checkpoint", help="a .pt file, a run folder (uses its best.pt) or an exported .onnx model (needs --data)")
    p.add_argument("--data", help="dataset folder (default: the one the model was trained on)")
    p.add_argument("--split", choices=("test", "train", "val"), default="test",
                   help="val: the run's own validation images (from its split.json), where refinements may be chosen")
    p.add_argument("--out", help="folder for metrics.json and per_image.csv")
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    p.add_argument("--rotations", action="store_true",
                   help="average over the four quarter turns too (with --tta: all eight symmetries of the square)")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest connected lesion")
    p.add_argument("--fill-holes", action="store_true", help="fill holes inside the lesion")
    p.add_argument("--source-resolution", action="store_true",
                   help="also score at each image's own size (prediction upsampled), as the challenge did")
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

    p = sub.add_parser("predict", help="segment images: mask PNG, overlay PNG and a CSV/JSON row each")
    add_model_source(p)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch, normalization inside)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16-weights", action="store_true",
                           help="store weights as float16 (half the file; still computes in float32)")
    precision.add_argument("--int8", action="store_true",
                           help="int8 weights and activations (onnxruntime static quantization, calibrated on training images)")
    p.add_argument("--calibration-data", metavar="DIR",
                   help="training images for --int8's activation ranges (default: the data the checkpoint was trained on)")
    p.add_argument("--calibration-images", type=int, metavar="N", help="how many (default 128)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("download", help="fetch, verify and extract a dataset's official archives")
    p.add_argument("dataset", choices=("isic2016",))
    p.add_argument("--dest", required=True, help="folder to download and extract into")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("serve", help="web page and POST /predict API")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="how a --checkpoint runs: exported to onnxruntime (auto: when installed) or in PyTorch")
    p.add_argument("--max-batch", type=int, default=16, help="most concurrent requests run as one model batch")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long a batch waits for more requests after the first")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except LesionsegError as exc:
        from lesionseg.training import Interrupted

        print(f"lesionseg: {'' if isinstance(exc, Interrupted) else 'error: '}{exc}", file=sys.stderr)
        return 130 if isinstance(exc, Interrupted) else 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
