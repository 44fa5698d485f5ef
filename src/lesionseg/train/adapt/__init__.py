"""`lesionseg adapt`: follow one clinic's outline from a few of its masks, and check it on masks it held out.

A clinic's annotators stop where they stop; the model learned where ours did. The room, in reading order:

    run.py       the command end to end: read the clinic once, cross-validate, decide, write the files
    clinic.py    the clinic's pairs (and which masks a person corrected), Jaccard at each image's own size
    finetune.py  the fine-tune, gentle by construction (low rates, a fixed number of steps, BatchNorm kept)
    decide.py    cross-validation and the rule: adapt unless the fine-tune clearly loses
    calibrate.py the quality estimate shifted toward the clinic, shrunk toward the shipped one
    files.py     the starting model and the files adapt writes (ONNX, its int8 twin, a checkpoint)
    unfold.py    the shipped ONNX file rebuilt as a trainable PyTorch model
"""

from lesionseg.train.adapt.run import run_adapt, summary_line

__all__ = ["run_adapt", "summary_line"]
