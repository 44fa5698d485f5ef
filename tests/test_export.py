import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.cli import main
from lesionseg.errors import LesionsegError
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.prediction import run_predict
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.train.data import load_split
from lesionseg.train.export import export_onnx
from lesionseg.train.predictor import TorchPredictor


@pytest.fixture(scope="module")
def onnx_model(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_matches_pytorch_on_test_images(tiny_checkpoint, onnx_model):
    config_data = torch.load(tiny_checkpoint, weights_only=True)["config"]
    test = load_split(config_data["data"], "test", 32, config_data["cache_dir"])
    torch_probs = TorchPredictor(tiny_checkpoint)(test.images)
    onnx_probs = OnnxPredictor(onnx_model)(test.images)
    assert onnx_probs.shape == torch_probs.shape == (4, 1, 32, 32)
    assert np.abs(onnx_probs - torch_probs).mean() < 1e-4


def test_onnx_batch_axis_is_dynamic(onnx_model):
    predictor = OnnxPredictor(onnx_model)
    assert predictor.image_size == 32 and predictor.threshold == 0.5
    for batch in (1, 5):
        assert predictor(torch.zeros(batch, 3, 32, 32, dtype=torch.uint8)).shape == (batch, 1, 32, 32)


def test_predict_with_onnx_gives_the_pytorch_masks(tiny_checkpoint, onnx_model, photos, tmp_path):
    by_torch = run_predict(Pipeline(TorchPredictor(tiny_checkpoint)), [photos], tmp_path / "t", progress=False)
    assert main(["predict", "--onnx", str(onnx_model), str(photos), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    for row in by_torch.rows:
        a = np.asarray(Image.open(tmp_path / "t" / row["mask"]))
        b = np.asarray(Image.open(tmp_path / "o" / row["mask"]))
        assert (a != b).mean() < 0.001  # only pixels sitting exactly on the threshold may flip


def test_export_cli_and_foreign_files(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(LesionsegError, match="junk.onnx: not a readable ONNX model"):
        OnnxPredictor(tmp_path / "junk.onnx")
    assert main(["predict", "--onnx", str(tmp_path / "nope.onnx"), "x.jpg", "--out", str(tmp_path / "o")]) == 2
    assert "nope.onnx: ONNX model not found" in capsys.readouterr().err


def test_unet_with_scse_attention_exports(tmp_path):
    """The issue-3 model (skips + scSE) goes through the same dynamo export as the paper's."""
    from lesionseg.train.checkpoint import save_checkpoint
    from lesionseg.train.config import TrainConfig
    from lesionseg.train.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", attention="scse").eval()
    config = TrainConfig(arch="unet", image_size=64, weights="none", decoder_attention="scse")
    checkpoint = tmp_path / "scse.pt"
    save_checkpoint(
        {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "best_metric": None, "history": []},
        checkpoint,
    )
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    onnx_probs = OnnxPredictor(export_onnx(checkpoint, tmp_path / "scse.onnx"))(images)
    assert np.abs(onnx_probs - TorchPredictor(checkpoint)(images)).max() < 1e-4


def test_fp16_weights_halve_the_file_and_keep_the_masks(tiny_checkpoint, onnx_model, tmp_path):
    half = export_onnx(
        tiny_checkpoint, tmp_path / "half.onnx", fp16_weights=True, metadata={"release": "test", "name": "n"}
    )
    assert half.stat().st_size < 0.55 * onnx_model.stat().st_size
    predictor = OnnxPredictor(half)
    assert predictor.metadata["weights_storage"] == "float16" and predictor.metadata["release"] == "test"
    assert predictor.name == "n"
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    full = OnnxPredictor(onnx_model)(images)
    assert np.abs(predictor(images) - full).max() < 5e-3
    assert predictor(images).dtype == np.float32


def test_evaluate_an_onnx_model_needs_data_and_matches_its_checkpoint(tiny_checkpoint, onnx_model, tmp_path, capsys):
    from lesionseg.train.evaluation import evaluate_checkpoint

    data = torch.load(tiny_checkpoint, weights_only=True)["config"]["data"]
    assert main(["evaluate", str(onnx_model), "--no-progress"]) == 2
    assert "pass --data" in capsys.readouterr().err
    by_onnx = evaluate_checkpoint(onnx_model, data, progress=False)
    by_torch = evaluate_checkpoint(tiny_checkpoint, data, progress=False)
    assert by_onnx["images"] == by_torch["images"] == 4 and by_onnx["epoch"] is None
    assert abs(by_onnx["metrics"]["iou_per_image"] - by_torch["metrics"]["iou_per_image"]) < 1e-3


def test_onnx_inference_never_imports_pytorch(onnx_model, photos, tmp_path):
    """The released model must run where PyTorch is not installed: block `import torch` and predict."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; import lesionseg; from lesionseg.cli import main; "
        f"seg = lesionseg.load({str(onnx_model)!r}).segment({str(photos / 'a.jpg')!r}); "
        "assert seg.mask.shape == (70, 70), seg.mask.shape; "
        f"sys.exit(main(['predict', '--onnx', {str(onnx_model)!r}, {str(photos)!r}, '--out', {str(tmp_path / 'o')!r}, "
        "'--no-progress']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "o" / "masks").glob("*.png"))) == 3


def test_int8_export_is_calibrated_on_training_images_and_close_to_float32(
    tiny_checkpoint, onnx_model, tmp_path, capsys, monkeypatch
):
    """`export --int8`: a quarter of the file, int8 recorded in its metadata, probabilities close to float32,
    and usable by predict and evaluate like any export. (The float32 export it starts from is the fixture's,
    already tested above, so this test does not pay for a second one.)"""
    import shutil

    from lesionseg.train import export
    from lesionseg.train.evaluation import evaluate_checkpoint

    monkeypatch.setattr(export, "export_onnx", lambda checkpoint, path, **_: shutil.copy(onnx_model, path))
    int8 = tmp_path / "int8.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--onnx", str(int8), "--int8"]) == 0
    assert int8.stat().st_size < 0.35 * onnx_model.stat().st_size
    predictor = OnnxPredictor(int8)
    assert predictor.metadata["precision"] == "int8" and "per-channel" in predictor.metadata["int8_recipe"]
    assert predictor.name.endswith("int8") and predictor.image_size == 32
    data = torch.load(tiny_checkpoint, weights_only=True)["config"]["data"]
    test = load_split(data, "test", 32).images.numpy()
    assert np.abs(predictor(test) - OnnxPredictor(onnx_model)(test)).mean() < 0.02
    assert evaluate_checkpoint(int8, data, progress=False)["images"] == 4
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tiny_checkpoint),
                "--onnx",
                str(tmp_path / "x.onnx"),
                "--int8",
                "--calibration-data",
                str(tmp_path / "empty"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty: no training images to calibrate int8 on" in err
    assert not (tmp_path / "x.onnx").exists()


def test_serving_a_checkpoint_runs_it_in_onnxruntime(tiny_checkpoint, onnx_model):
    """`serve --checkpoint` (backend auto) exports in a child process and serves the ONNX model: same name,
    same probabilities as the checkpoint; `--backend torch` keeps PyTorch."""
    from lesionseg.api import load_predictor

    served = load_predictor(tiny_checkpoint, backend="auto")
    assert isinstance(served, OnnxPredictor) and served.name == TorchPredictor(tiny_checkpoint).name
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    assert np.abs(served(images) - TorchPredictor(tiny_checkpoint)(images)).max() < 1e-4
    assert isinstance(load_predictor(tiny_checkpoint, backend="torch"), TorchPredictor)


def test_precision_runs_an_exported_file_in_openvino_and_agrees_with_onnxruntime(
    onnx_model, tiny_checkpoint, photos, tmp_path, monkeypatch, capsys
):
    """`--precision bf16` and `int8` run the exported file in OpenVINO (the CPU's bf16 / int8 instructions), with the
    same checks, name and size as onnxruntime's run; a checkpoint, or a machine without OpenVINO, is one line."""
    import importlib.util

    from lesionseg.api import load_predictor
    from lesionseg.segment import predictors
    from lesionseg.segment.predictors import OpenVinoPredictor

    images = np.random.default_rng(2).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    reference = OnnxPredictor(onnx_model)(images)
    for precision in ("bf16", "int8"):
        predictor = load_predictor(onnx=onnx_model, precision=precision)
        assert isinstance(predictor, OpenVinoPredictor) and predictor.image_size == 32
        assert np.abs(predictor(images) - reference).mean() < 0.02
    assert (
        main(
            [
                "predict",
                str(photos),
                "--onnx",
                str(onnx_model),
                "--precision",
                "bf16",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "o" / "masks").glob("*.png"))) == 3
    released = load_predictor(precision="int8")  # the released model's int8 file, shipped beside it
    assert released.metadata["precision"] == "int8" and released.quality is not None
    assert isinstance(released, OpenVinoPredictor) and released.name.endswith("int8")
    with pytest.raises(LesionsegError, match="runs exported files; `lesionseg export --int8"):
        load_predictor(tiny_checkpoint, precision="int8")
    real = importlib.util.find_spec
    monkeypatch.setattr(predictors, "find_spec", lambda name: None if name == "openvino" else real(name))
    assert isinstance(load_predictor(onnx=onnx_model, precision="int8"), OnnxPredictor)  # int8 runs in onnxruntime too
    with pytest.raises(
        LesionsegError, match=r"OpenVINO, which this installation lacks: pip install 'lesionseg\[openvino\]'"
    ):
        load_predictor(onnx=onnx_model, precision="bf16")


def test_the_quick_export_computes_what_the_dynamo_export_does(tiny_checkpoint, tmp_path):
    import onnxruntime as ort

    slow = export_onnx(tiny_checkpoint, tmp_path / "dynamo.onnx")
    quick = export_onnx(tiny_checkpoint, tmp_path / "quick.onnx", quick=True)
    size = OnnxPredictor(slow).image_size
    x = np.random.default_rng(0).random((3, 3, size, size)).astype(np.float32)
    run = lambda path: ort.InferenceSession(str(path)).run(None, {"image": x})[0]  # noqa: E731
    assert np.abs(run(slow) - run(quick)).max() < 1e-4
    assert OnnxPredictor(quick).image_size == OnnxPredictor(slow).image_size
