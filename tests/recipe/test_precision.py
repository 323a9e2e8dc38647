"""bf16 on a CPU that would emulate it: detection from the CPU flags and the notice's wording."""
from __future__ import annotations

import pytest

from pipeline.recipe import precision

X86_OLD = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2\n"
X86_BF16 = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu sse avx2 amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    def play(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text, encoding="utf-8")
        monkeypatch.setenv("PIPELINE_CPUINFO", str(path))
    return play


@pytest.mark.parametrize("text, native", [(X86_OLD, False), (X86_BF16, True), (X86_AMX, True), (ARM_BF16, True),
                                          ("model name : something\n", None)])
def test_native_bf16_from_the_flags(cpu, text, native):
    cpu(text)
    assert precision.cpu_bf16()[0] is native


def test_no_cpuinfo_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CPUINFO", str(tmp_path / "absent"))
    assert precision.cpu_bf16()[0] is None
    assert precision.bf16_notice({"bf16": True}, cuda=False) is None  # no guess, no notice


def test_notice_only_for_bf16_on_an_emulating_cpu_without_cuda(cpu):
    cpu(X86_OLD)
    notice = precision.bf16_notice({"bf16": True}, cuda=False)
    assert notice.startswith("notice: bf16 is true") and "lacks avx512_bf16 and amx_bf16" in notice
    assert "bf16: false" in notice and "bf16=false" in notice and "49 s in bf16 against 0.9 s in fp32" in notice
    assert precision.bf16_notice({"bf16": False}, cuda=False) is None
    assert precision.bf16_notice({"bf16": True}, cuda=True) is None
    cpu(X86_BF16)
    assert precision.bf16_notice({"bf16": True}, cuda=False) is None


def test_measured_slowdown_is_a_sentence():
    text = precision.measured_slowdown(size=32, repeats=1)
    assert text.startswith("measured here just now: a 32x32 matmul takes") and text.endswith("x")
