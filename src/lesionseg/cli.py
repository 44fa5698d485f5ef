"""The `lesionseg` command: each subcommand parses its arguments and calls one typed function.

Training flags are generated from `TrainConfig`'s fields (`config.add_config_flags`); nothing here imports
PyTorch until a subcommand that needs it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from lesionseg.commands import (
    REPRODUCE_SETS,
    cmd_adapt,
    cmd_compare,
    cmd_describe,
    cmd_download,
    cmd_evaluate,
    cmd_export,
    cmd_merge,
    cmd_predict,
    cmd_reproduce,
    cmd_review,
    cmd_serve,
    cmd_summary,
    cmd_train,
    cmd_train_clicks,
)
from lesionseg.errors import Interrupted, LesionsegError
from lesionseg.files import shown
from lesionseg.segment.outputs import OVERLAY_FORMATS
from lesionseg.segment.predictors import IMAGE_SIZES, PRECISIONS
from lesionseg.train import allocator
from lesionseg.train.config import DECODERS, PRESETS, AdaptRecipe, add_config_flags

DEBUG_ENV = "LESIONSEG_DEBUG"  # set to 1 for the traceback of an unexpected error
TRAINING_COMMANDS = ("train", "reproduce")  # run under a caching allocator when one is installed
TORCH_COMMANDS = ("reproduce", "train", "evaluate", "compare", "summary", "export", "adapt", "train-clicks")


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


def image_size(text: str) -> int:
    value = int(text)
    if value not in IMAGE_SIZES:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 from 32 to 1024, got {value}")
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
    p.add_argument("--arch", default="seed", choices=tuple(DECODERS))
    p.add_argument("--image-size", type=image_size, default=128, help="a multiple of 32 from 32 to 1024")
    p.add_argument("--batch-size", type=positive_int, default=16)
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
    p.add_argument(
        "--out", required=True, help="output folder (its own layout: masks/, overlays/, probabilities/, predictions.*)"
    )
    p.add_argument(
        "--overlays",
        nargs="?",
        const="png",
        choices=OVERLAY_FORMATS,
        help="also OUT/overlays/<stem>.png (or .jpg: --overlays jpg): the outline on the image",
    )
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also OUT/probabilities/<stem>.png: the lesion probability, 8-bit grey at the image's own size",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="also OUT/dicom-seg/<stem>.dcm for each DICOM image: its mask as a DICOM Segmentation ([dicom] extra)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images an earlier run into OUT finished")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="segment the K-th of N shares (a stable split by file name; default: torchrun's RANK/WORLD_SIZE)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--no-progress", action="store_true")
    add_pixel_size(p)
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


def add_pixel_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pixel-size",
        metavar="MM_OR_CSV",
        help="millimetres per pixel, for sizes in mm: one number, or a CSV with columns image and pixel_mm",
    )


def add_clinic_commands(sub) -> None:
    """Following one clinic: adapt the model to its masks."""
    p = sub.add_parser("adapt", help="fine-tune the model to a clinic's masks, measured on masks it holds out")
    p.add_argument("--data", required=True, help="the clinic's images/ + masks/ (e.g. what `lesionseg review` saved)")
    p.add_argument("--out", required=True, help="folder for model.onnx, model-int8.onnx, model.pt and adapt.json")
    p.add_argument("--from", dest="start", help="the model to start from: .onnx, .pt or run folder (default: released)")
    recipe = AdaptRecipe()
    p.add_argument("--steps", type=positive_int, default=recipe.steps, help="fine-tuning steps (batches), any N masks")
    p.add_argument("--lr", type=float, default=recipe.lr, help="AdamW learning rate of the decoder")
    p.add_argument(
        "--encoder-lr-scale", type=float, default=recipe.encoder_lr_scale, help="the encoder's rate, as a share of --lr"
    )
    p.add_argument("--folds", type=positive_int, default=recipe.folds, help="cross-validation folds of the self-check")
    p.add_argument("--seed", type=int, default=recipe.seed, help="seeds the folds, the batches and the flips")
    p.add_argument("--overwrite", action="store_true", help="replace the adapted model already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("train-clicks", help="train the click model of the review page (resumable, for hours)")
    p.add_argument("--data", nargs="+", help="training folders (ISIC layout or images/ + masks/)")
    p.add_argument("--out", required=True, help="folder for clicks.pt (the whole state), log.jsonl and clicks.onnx")
    p.add_argument("--steps", type=positive_int, default=3000, help="training steps in all (a resumed run included)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--export-only", action="store_true", help="export --out's saved state to clicks.onnx now")
    p.add_argument("--cache-dir", help="where decoded training images are cached (default: beside each folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_train_clicks)

    p = sub.add_parser("describe", help="size, asymmetry, border and colours of masks from anywhere")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of their masks (<stem>.png or <stem>_Segmentation.png)")
    p.add_argument("--out", default="descriptors.csv", help="the table (.csv; its .json is written beside it)")
    add_pixel_size(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("review", help="a page over a predict folder: least trusted masks first, accept or correct")
    p.add_argument("out", help="the folder `lesionseg predict` wrote")
    p.add_argument("--images", help="where the input images are now, if they moved since predict")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8001)
    add_model_source(p)
    p.set_defaults(func=cmd_review)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lesionseg", description="Skin-lesion segmentation with a MobileNetV2 encoder.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    add_model_commands(sub)
    add_use_commands(sub)
    add_clinic_commands(sub)
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
    "start": "model",
    "images": "image folder",
    "masks": "mask folder",
}


def check_named_paths(args: argparse.Namespace) -> None:
    """A model, run or data folder that is not there is one line before anything is imported or written (a
    missing checkpoint should not cost a PyTorch import to report)."""
    for key, what in NAMED_PATHS.items():
        if args.command == "export" and key == "onnx":  # what export writes
            continue
        value = getattr(args, key, None)
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path and not os.path.lexists(path):  # train-clicks' --resume is a flag
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
            from lesionseg.errors import require_torch

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
