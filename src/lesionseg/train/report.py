"""Figures and tables: pure functions build matplotlib figures, `write_report` saves them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lesionseg.segment.pipeline import Pipeline  # noqa: E402
from lesionseg.train.checkpoint import load_checkpoint, stored_config  # noqa: E402
from lesionseg.train.data import CachedSplit, load_split  # noqa: E402
from lesionseg.train.evaluation import probabilities_of, read_per_image  # noqa: E402
from lesionseg.train.metrics import paired_difference  # noqa: E402
from lesionseg.train.models import build_model  # noqa: E402
from lesionseg.train.predictor import TorchPredictor  # noqa: E402
from lesionseg.train.rundir import RunDir  # noqa: E402

# SPEC.md "Results to reproduce" (test set, 128x128); the paper does not say per-image or pooled
PAPER = {
    "model1-frozen": {"iou": 0.6354, "dice": 0.7675, "train_loss": 0.2911, "val_loss": 0.2899},
    "model2-finetune": {"iou": 0.6819, "dice": 0.7972, "train_loss": 0.2117, "val_loss": 0.2169},
}
COLORS = {"model1-frozen": "lightblue", "model2-finetune": "lightsalmon"}  # the paper's radar colours
LABELS = {"iou": "IoU", "dice": "Dice", "train_loss": "train loss", "val_loss": "val loss"}


def model_summary(arch: str = "seed", image_size: int = 128, batch_size: int = 16, freeze_encoder: bool = False) -> str:
    """torchinfo's layer table: output shapes, parameters (non-trainable when frozen), mult-adds."""
    import torchinfo

    model = build_model(arch, freeze_encoder=freeze_encoder)
    stats = torchinfo.summary(
        model,
        input_size=(batch_size, 3, image_size, image_size),
        depth=4,
        verbose=0,
        col_names=("output_size", "num_params", "mult_adds"),
        row_settings=("var_names",),
    )
    return str(stats)


def headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """The paper's four numbers from an evaluation; IoU/Dice as mean per image (the ISIC convention)."""
    m = evaluation["metrics"]
    return {
        "iou": m["iou_per_image"],
        "dice": m["dice_per_image"],
        "train_loss": evaluation["train_loss"],
        "val_loss": evaluation["val_loss"],
    }


def fig_samples(split: CachedSplit, count: int = 4) -> Figure:
    fig, axes = plt.subplots(2, count, figsize=(2.5 * count, 5.2), squeeze=False)
    for col in range(min(count, len(split))):
        axes[0, col].imshow(split.images[col].permute(1, 2, 0).numpy())
        axes[0, col].set_title(split.ids[col], fontsize=8)
        axes[1, col].imshow(split.masks[col, 0].numpy(), cmap="gray")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Sample images (top) and lesion masks (bottom)")
    fig.tight_layout()
    return fig


def fig_text(text: str, title: str) -> Figure:
    lines = text.splitlines()
    fig = plt.figure(figsize=(0.075 * max(map(len, lines)) + 1, 0.16 * len(lines) + 1))
    fig.text(0.01, 0.99, text, family="monospace", fontsize=8, va="top")
    fig.suptitle(title, y=1.0)
    return fig


def fig_triptychs(split: CachedSplit, masks: np.ndarray, title: str, count: int = 4) -> Figure:
    """Rows of input / ground truth / predicted mask."""
    count = min(count, len(split))
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), squeeze=False)
    for row in range(count):
        panels = (split.images[row].permute(1, 2, 0).numpy(), split.masks[row, 0].numpy(), masks[row])
        for col, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[row, col].imshow(panel, cmap=None if col == 0 else "gray")
            axes[row, col].set_title(f"{name}" + (f" {split.ids[row]}" if col == 0 else ""), fontsize=8)
            axes[row, col].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_loss_curves(history: list[dict[str, float]], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_loss"] for row in history], label="train loss")
    ax.plot(epochs, [row["val_loss"] for row in history], label="validation loss")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_model_bars(values: dict[str, float], title: str, color: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar([LABELS[k] for k in values], list(values.values()), color=color, edgecolor="gray")
    ax.bar_label(bars, fmt="%.4f")
    ax.set(ylim=(0, 1.05), title=title)
    fig.tight_layout()
    return fig


def fig_comparison_bars(models: dict[str, dict[str, float]]) -> Figure:
    """Left: IoU and Dice of every model; right: train and validation loss."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(models)
    for ax, keys, title in (
        (axes[0], ("iou", "dice"), "IoU and Dice"),
        (axes[1], ("train_loss", "val_loss"), "Losses"),
    ):
        x = np.arange(len(keys))
        for n, (name, values) in enumerate(models.items()):
            bars = ax.bar(
                x + n * width,
                [values[k] for k in keys],
                width,
                label=name,
                color=COLORS.get(name, f"C{n}"),
                edgecolor="gray",
            )
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(x + width * (len(models) - 1) / 2, [LABELS[k] for k in keys])
        ax.set(title=title, ylim=(0, 1.05))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_radar(models: dict[str, dict[str, float]]) -> Figure:
    keys = list(LABELS)
    angles = np.linspace(0, 2 * np.pi, len(keys), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), subplot_kw={"polar": True})
    for n, (name, values) in enumerate(models.items()):
        points = [values[k] for k in keys]
        color = COLORS.get(name, f"C{n}")
        ax.plot(angles + angles[:1], points + points[:1], color=color, linewidth=2, label=name)
        ax.fill(angles + angles[:1], points + points[:1], color=color, alpha=0.35)
    ax.set_xticks(angles, [LABELS[k] for k in keys])
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1), fontsize=8)
    ax.set_title("All metrics")
    fig.tight_layout()
    return fig


TABLE_ROWS = (  # (label, key in evaluation metrics or in headline numbers, key in PAPER)
    ("Jaccard (IoU), mean per image", "iou_per_image", "iou"),
    ("IoU, pooled", "iou_pooled", None),
    ("Dice, mean per image", "dice_per_image", "dice"),
    ("Dice, pooled", "dice_pooled", None),
    ("pixel accuracy, mean per image", "accuracy_per_image", None),
    ("sensitivity, mean per image", "sensitivity_per_image", None),
    ("specificity, mean per image", "specificity_per_image", None),
    ("ISIC 2018 thresholded Jaccard", "thresholded_iou_per_image", None),
    ("Jaccard of the worst decile", "iou_worst_decile", None),
    ("train loss", "train_loss", "train_loss"),
    ("validation loss", "val_loss", "val_loss"),
)


def markdown_table(evaluations: dict[str, dict[str, Any]]) -> str:
    """One column per run, and the paper's number beside each run the paper has."""
    columns = [c for name in evaluations for c in ([(name, None)] + ([(name, "paper")] if name in PAPER else []))]
    header = " | ".join(f"{name} (paper)" if kind else name for name, kind in columns)
    lines = [f"| metric | {header} |", "|---|" + "---|" * len(columns)]
    for label, key, paper_key in TABLE_ROWS:
        cells = []
        for name, kind in columns:
            if kind:
                value = PAPER[name].get(paper_key) if paper_key else None
            else:
                value = evaluations[name]["metrics"].get(key, evaluations[name].get(key))
            cells.append("–" if value is None else f"{value:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(runs: dict[str, Path]) -> dict[str, dict[str, float] | str]:
    """Each run's per-image Jaccard against the first run's on the same test images, with a bootstrap
    interval, so a table of means is not read as a ranking when the gaps are within noise."""
    per_image = {
        name: {row["id"]: row["iou"] for row in read_per_image(RunDir(Path(run)).eval)} for name, run in runs.items()
    }
    base, *others = runs
    differences: dict[str, dict[str, float] | str] = {}
    for name in others:
        try:
            differences[name] = paired_difference(per_image[name], per_image[base])
        except ValueError as error:
            differences[name] = f"not comparable with {base}: {error}"
    return differences


def paired_table(base: str, differences: dict[str, dict[str, float] | str]) -> str:
    lines = [
        f"| run | mean Jaccard − {base} | paired bootstrap 95 % interval | images better | images worse |",
        "|---|---|---|---|---|",
    ]
    for name, d in differences.items():
        if isinstance(d, str):
            lines.append(f"| {name} | – | {d} | – | – |")
        else:
            lines.append(
                f"| {name} | {d['mean']:+.4f} | {d['ci95_low']:+.4f} to {d['ci95_high']:+.4f} | "
                f"{d['ours_better']} | {d['theirs_better']} |"
            )
    return "\n".join(lines)


def encoder_weights(run_dir: Path) -> dict[str, Any]:
    """What the run's encoder started from, as its run.json recorded it (older runs did not)."""
    recorded = RunDir(run_dir).read_info().get("weights")
    return recorded or {"pretrained": None, "source": "not recorded", "sha256": None}


def weights_section(weights: dict[str, dict[str, Any]]) -> str:
    """Which weights each run started from; a loud line for any run trained from scratch."""
    lines = ["## Encoder weights", ""]
    for name, w in weights.items():
        digest = f", sha256 `{w['sha256']}`" if w.get("sha256") else ""
        lines.append(f"- {name}: `{w['source']}`{digest}")
    scratch = [name for name, w in weights.items() if w.get("pretrained") is False]
    if scratch:
        lines += [
            "",
            f"**WARNING: {', '.join(scratch)} trained the encoder FROM SCRATCH: no ImageNet weights were "
            "found (--weights FILE, $LESIONSEG_WEIGHTS, or torchvision's download). A frozen random encoder "
            "(Model 1) makes its scores meaningless.**",
        ]
    return "\n".join(lines) + "\n"


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def worst_cases(run_dir: Path, count: int = 10) -> list[str]:
    rows = sorted(read_per_image(RunDir(run_dir).eval), key=lambda row: row["iou"])
    return [row["id"] for row in rows[:count]]


def run_figures(name: str, run_dir: Path, measured: dict[str, float], figures: Path) -> Any:
    """Predictions on the first test images and on the ten worst, loss curves, the run's bars."""
    run = RunDir(run_dir)
    state = load_checkpoint(run.best)
    config = stored_config(state, run.best)
    pipeline = Pipeline(TorchPredictor(run.best, state=state))
    test = load_split(config.data, "test", config.image_size, config.cache_dir, quiet=True)
    size = (config.image_size, config.image_size)
    for label, ids in (("predictions", test.ids[:4]), ("worst", worst_cases(run_dir))):
        subset = test.subset([test.ids.index(i) for i in ids])
        masks = np.stack([pipeline.mask(p[0], size) for p in probabilities_of(pipeline, subset.images)])
        title = f"{name}: input, ground truth, prediction" + (
            " — the ten worst test images" if label == "worst" else ""
        )
        save(fig_triptychs(subset, masks, title, count=len(ids)), figures / f"{label}_{name}.png")
    save(fig_loss_curves(run.read_log(), f"{name}: loss"), figures / f"loss_{name}.png")
    save(fig_model_bars(measured, name, COLORS.get(name, "C0")), figures / f"bars_{name}.png")
    return config


def write_report(runs: dict[str, str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """metrics.json, results.md and figures/*.png for runs that each have eval/metrics.json and per_image.csv."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    evaluations, measured = {}, {}
    for name, run_dir in runs.items():
        run_dir = Path(run_dir)
        evaluations[name] = json.loads((RunDir(run_dir).eval / "metrics.json").read_text())
        measured[name] = headline(evaluations[name])
        config = run_figures(name, run_dir, measured[name], figures)
    save(
        fig_samples(load_split(config.data, "train", config.image_size, config.cache_dir, quiet=True)),
        figures / "samples.png",
    )
    summary = model_summary(config.arch, config.image_size, freeze_encoder=config.freeze_encoder)
    (out / "model_summary.txt").write_text(summary)
    save(fig_text(summary, f"Model summary, {config.name} (batch 16)"), figures / "model_summary.png")
    save(fig_comparison_bars(measured), figures / "bars_comparison.png")
    save(fig_radar(measured), figures / "radar.png")
    table = markdown_table(evaluations)
    differences = paired_differences({name: Path(run) for name, run in runs.items()})
    weights = {name: encoder_weights(Path(run)) for name, run in runs.items()}
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "measured": measured,
                "paper": PAPER,
                "evaluations": evaluations,
                "paired_differences": differences,
                "weights": weights,
            },
            indent=2,
        )
    )
    path = out / "results.md"
    text = (
        "# Results on the test split\n\nOn the binarized prediction (threshold 0.5) at the model's "
        "resolution. Per image: the mean over images (how the ISIC challenges rank); pooled: from counts "
        "summed over the split.\n\n" + table + "\n\n" + weights_section(weights)
    )
    if differences:
        first = next(iter(runs))
        text += (
            f"\n## Against {first}, image by image\n\nThe difference of per-image Jaccard on the same test "
            "images; an interval that contains 0 means the gap is within what the choice of test images "
            "alone would produce.\n\n" + paired_table(first, differences) + "\n"
        )
    path.write_text(text)
    return {"markdown": table, "path": path, "measured": measured, "paired_differences": differences}
