"""The deployable student: a digits student quantized to INT8 ONNX (QAD and PTQ), run by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd.data.digits import DigitsData
from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.models import Classifier, Preprocessing
from kd.models.convnet import ConvNet
from kd.students import quantize as quant
from kd.students.card import StudentCard
from kd.students.export import write_onnx
from kd.students.quantize import FakeQuantStudent, fold_batchnorm, onnx_logits, quantize_onnx
from kd.tasks.auto_weights import auto_weights
from kd.tasks.evaluate import evaluate
from kd.tasks.models import build_teacher
from kd.tasks.predict import predict
from kd.tasks.quantize import quantize
from kd.tasks.train import distill
from kd.teachers.frozen import fingerprint
from tests.conftest import FAST
from tests.students.test_use_student import digit_pngs

DIGITS = Preprocessing(mean=(0.305,), std=(0.376,), input_size=(1, 8, 8))


def compose_cfg(out: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", "logger=none", *FAST, *overrides],
            return_hydra_config=True,
        )


def trained_digits_student(steps: int = 60) -> tuple[Classifier, DigitsData]:
    """A 2 x 8 ConvNet with BatchNorm trained briefly on digits: real weights, real activation ranges."""
    torch.manual_seed(0)
    data = DigitsData(batch_size=64)
    data.setup("fit")
    student = Classifier(ConvNet(10, in_chans=1, width=8, depth=2), DIGITS)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    batches = iter(())
    for _ in range(steps):
        images, labels = next(batches, (None, None))[:2]
        if images is None:
            batches = iter(data.train_dataloader())
            images, labels = next(batches)[:2]
        loss = nn.functional.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval(), data


def test_the_int8_file_holds_int8_weights_runs_on_int8_kernels_and_agrees_with_the_fake_quantized_student(tmp_path):
    student, data = trained_digits_student()
    calibration = [batch[0] for _, batch in zip(range(4), data.train_dataloader(), strict=False)]
    twin = FakeQuantStudent(fold_batchnorm(student))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())  # folded into the convolutions
    twin.calibrate(calibration)
    card = StudentCard([str(d) for d in range(10)], DIGITS)
    fp32 = write_onnx(twin.fp32(), card, tmp_path / "folded.onnx")
    int8 = quantize_onnx(fp32, tmp_path / "student.int8.onnx", calibration)

    model = onnx.load(str(int8))
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    int8_weights = [name for name in weights if initializers[name].data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == 3  # two convolutions and the classifier
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == 2 and "Conv" not in fused  # ONNX Runtime's integer kernels run them

    images = torch.cat([batch[0] for batch in data.val_dataloader()])
    with torch.inference_mode():
        expected = twin.eval()(images).argmax(1)
        fp32_prediction = student(images).argmax(1)
    got = onnx_logits(int8, [images]).argmax(1)
    assert (got == expected).float().mean() >= 0.99
    assert not torch.equal(got, fp32_prediction)  # the rounding is real: the fp32 student differs somewhere


@pytest.mark.slow
def test_resnet18_is_folded_and_quantized_with_every_convolution_on_int8(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()
    student = Classifier(net, Preprocessing((0.5,) * 3, (0.25,) * 3, (3, 32, 32)))
    calibration = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    twin = FakeQuantStudent(fold_batchnorm(student))
    twin.calibrate(calibration)
    card = StudentCard([str(d) for d in range(10)], student.preprocessing)
    int8 = quantize_onnx(write_onnx(twin.fp32(), card, tmp_path / "f.onnx"), tmp_path / "q.onnx", calibration)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == 20 and fused.count("QLinearAdd") == 8 and "QGemm" in fused
    assert "Conv" not in fused and "Gemm" not in fused  # nothing left in fp32 but the pooling
    with torch.inference_mode():
        expected = twin.eval()(calibration[0])
    got = onnx_logits(int8, [calibration[0]])
    assert (got - expected).abs().mean() < 0.1 * expected.std()  # 20 layers of rounding, each as PyTorch's


class StandardizedConv(nn.Conv2d):  # timm's StdConv2d computes its weights in forward: not a plain convolution
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, weight, self.bias)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x.relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (nn.Sequential(StandardizedConv(1, 4, 3), nn.Flatten(), nn.LazyLinear(10)), "layers the INT8 quantizer cannot"),
        (nn.Sequential(nn.Conv1d(1, 4, 3)), r"0 \(Conv1d\)"),
        (nn.Sequential(nn.Flatten(), nn.ReLU()), "has no Conv2d or Linear layer"),
        (Branchy(), "cannot be traced by torch.fx"),
    ],
)
def test_a_student_the_quantizer_cannot_handle_is_refused_in_one_sentence(net, message):
    with pytest.raises(KdError, match=message) as refused:
        fold_batchnorm(Classifier(net, DIGITS), "odd")
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300


def test_a_cpu_without_int8_kernels_is_refused_and_told_what_runs_instead(monkeypatch):
    monkeypatch.setattr(quant.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(quant, "cpu_capability", lambda: "DEFAULT")
    with pytest.raises(KdError, match="deploy the fp32 student.onnx"):
        quant.check_int8_cpu()
    monkeypatch.setattr(quant, "cpu_capability", lambda: "AVX512")
    quant.check_int8_cpu()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("distilled")
    cfg = compose_cfg(out, cache_dir, "trainer.max_epochs=1", "sched.warmup_epochs=0")
    distill(cfg)
    (out / ".hydra").mkdir()  # what python run.py's Hydra writes: the run's config, read by quantize.run
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), out / ".hydra" / "config.yaml")
    return out


def teacher_kl(cfg: DictConfig, int8: Path) -> float:
    """Mean KL divergence from the fp32 teacher to the INT8 file on the validation images."""
    data = DigitsData(batch_size=512)
    data.setup("fit")
    images = torch.cat([batch[0] for batch in data.val_dataloader()])
    teacher = build_teacher(cfg, 10, auto_weights(cfg, data))
    with torch.inference_mode():
        target = teacher(images).log_softmax(1)
    got = onnx_logits(int8, [images]).log_softmax(1)
    return float(nn.functional.kl_div(got, target, log_target=True, reduction="batchmean"))


@pytest.mark.slow
def test_qad_distills_the_quantized_student_and_leaves_the_teacher_unchanged(distilled, cache_dir, tmp_path, caplog):
    run = f"quantize.run={distilled}"
    ptq_cfg = compose_cfg(tmp_path / "ptq", cache_dir, "task=quantize", "quantize.method=ptq", run)
    ptq = quantize(ptq_cfg)
    qad_cfg = compose_cfg(tmp_path / "qad", cache_dir, "task=quantize", "quantize.epochs=2", run)
    teacher = build_teacher(qad_cfg, 10, auto_weights(qad_cfg, DigitsData()))
    before = fingerprint(teacher.model)
    with caplog.at_level("INFO", logger="kd"):
        qad = quantize(qad_cfg)
    # trainer.precision=auto (the default) fine-tunes the fake-quantized student in float32, wherever bf16 is native.
    assert "fake-quantized student in float32 (32-true)" in caplog.text

    # The teacher stayed fp32, frozen and unchanged, and is the teacher the student was distilled from.
    assert fingerprint(build_teacher(qad_cfg, 10, auto_weights(qad_cfg, DigitsData())).model) == before
    record = qad["teacher_fingerprint"]
    distilled_from = json.loads((distilled / "student.json").read_text())["teacher_fingerprint"]
    assert record["start"] == record["end"] == distilled_from
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    # QAD fine-tunes the quantized student toward the teacher: its INT8 file is closer to it than PTQ's.
    assert teacher_kl(qad_cfg, tmp_path / "qad" / "student.int8.onnx") < 0.98 * teacher_kl(
        ptq_cfg, tmp_path / "ptq" / "student.int8.onnx"
    )
    for results, folder in ((ptq, tmp_path / "ptq"), (qad, tmp_path / "qad")):
        written = json.loads((folder / "results.json").read_text())
        assert written["task"] == "quantize" and written["quantize"]["method"] in ("ptq", "qad")
        assert set(written["metrics"]) >= {"student/top1", "student_fp32/top1", "int8_fake_quant_agreement"}
        assert written["metrics"]["int8_fake_quant_agreement"] >= 0.99
        assert written["files"]["int8_onnx_bytes"] < written["files"]["onnx_bytes"]
        card = json.loads((folder / "student.int8.json").read_text())
        assert card["quantization"]["method"] == results["quantize"]["method"] and card["class_names"][0] == "0"
    # task=eval and task=predict run the INT8 file itself, through ONNX Runtime.
    int8 = tmp_path / "qad" / "student.int8.onnx"
    measured = evaluate(compose_cfg(tmp_path / "eval", cache_dir, "task=eval", f"student.weights={int8}"))
    assert measured["metrics"]["student/top1"] == pytest.approx(qad["metrics"]["student/top1"])
    paths, images = digit_pngs(tmp_path / "digits", 6)
    cfg = compose_cfg(tmp_path / "predict", cache_dir, "task=predict", f"student.weights={int8}")
    cfg.predict.inputs = str(tmp_path / "digits")
    predict(cfg)
    rows = (tmp_path / "predict" / "predictions.csv").read_text().splitlines()[1:]
    expected = onnx_logits(int8, [images]).argmax(1).tolist()
    assert [row.split(",")[1] for row in rows] == [str(c) for c in expected]


def test_every_parameter_of_the_folded_student_trains():
    student = Classifier(ConvNet(10, in_chans=1, width=8, depth=2), DIGITS).eval()
    twin = FakeQuantStudent(fold_batchnorm(student))
    names = [name for name, p in twin.named_parameters() if p.requires_grad]
    assert len(names) == 6  # each convolution's folded weight and new bias, the classifier's weight and bias
    twin.calibrate([torch.rand(4, 1, 8, 8)])
    twin(torch.rand(4, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.parameters())
