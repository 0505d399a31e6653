"""trainer.precision=auto (the default): bf16-mixed where the device computes bf16 natively, 32-true elsewhere,
said in one line."""

import logging

import pytest

import kd.training.precision as hardware
from kd.tasks.common import build_trainer, run_precision
from kd.training.precision import device_type_of, native_bf16, trainer_precision


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_auto_trains_the_student_in_bf16_mixed_only_where_the_cpu_has_bf16(make_cfg, monkeypatch, caplog, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type: native)
    assert make_cfg().trainer.precision == "auto"  # the default (docs/performance.md)
    cfg = make_cfg("trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="kd"):
        trainer = build_trainer(cfg, cfg.paths.output_dir)
    expected = "bf16-mixed" if native else "32-true"
    assert trainer.precision == expected
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the student trains in")]
    assert len(said) == 1 and ("bf16-mixed" in said[0] if native else "no native bf16 on this CPU" in said[0])


def test_an_explicit_precision_stays_as_set(make_cfg, monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type: True)
    assert run_precision(make_cfg("trainer.precision=32-true", "trainer.accelerator=cpu")) == "32-true"
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type: False)
    assert run_precision(make_cfg("trainer.precision=bf16-mixed", "trainer.accelerator=cpu")) == "bf16-mixed"
    assert trainer_precision("auto", "cuda") == "32-true"  # a GPU without native bf16 (pre-Ampere) too
    monkeypatch.setattr(hardware, "native_bf16", lambda device_type: device_type == "cuda")
    assert trainer_precision("auto", "cuda") == "bf16-mixed" and trainer_precision("auto", "cpu") == "32-true"


def test_a_cpu_without_the_bf16_flags_has_no_native_bf16(monkeypatch):
    assert device_type_of("cpu") == "cpu" and device_type_of("gpu") == "cuda"
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ())
    assert native_bf16("cpu") is False and trainer_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert native_bf16("cpu") is hardware.torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert native_bf16("mps") is False
