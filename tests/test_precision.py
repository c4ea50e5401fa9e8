"""``train.precision``: ``auto`` is bf16 on CUDA and fp32 on CPUs (reproducible); on a CPU that computes bf16
natively (Intel AMX) the trainer says that ``bf16`` would be faster. PyTorch's ``get_cpu_capability()`` says
"AVX512" on AMX parts, so the detection asks for the tiles (PyTorch's probe, else /proc/cpuinfo): both sources must
agree on this machine, whatever CPU it is."""

import sys

import pytest
import torch

from selfsup.runtime import autocast_dtype, bf16_hint, cpu_flags, cpu_has_native_bf16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_amx_detection_agrees_with_the_cpu_flags():
    flags = cpu_flags()
    assert flags, "no CPU flags read from /proc/cpuinfo"
    assert cpu_has_native_bf16() == ("amx_bf16" in flags)


def test_cpus_train_in_fp32_unless_asked_and_amx_cpus_are_told_bf16_is_faster():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # reproducible: see autocast_dtype's docstring
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    hint = bf16_hint("auto", cpu)
    assert (hint is not None) == cpu_has_native_bf16()
    assert bf16_hint("fp32", cpu) is None and bf16_hint("bf16", cpu) is None


def test_without_pytorchs_probe_the_flags_decide(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr("selfsup.runtime.cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert cpu_has_native_bf16() and "train.precision=bf16" in bf16_hint("auto", torch.device("cpu"))
    monkeypatch.setattr("selfsup.runtime.cpu_flags", lambda: {"avx2", "fma"})
    assert not cpu_has_native_bf16() and bf16_hint("auto", torch.device("cpu")) is None
