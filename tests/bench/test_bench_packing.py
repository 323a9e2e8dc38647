"""bench/packing.py's attention-kernel table runs both kernels on every length and reports their ratio."""
from __future__ import annotations

from bench import packing


def test_attention_kernel_table_times_both_kernels():
    result = packing.attention_child([8, 16], repeats=1, tokens=32)
    assert [r["length"] for r in result["rows"]] == [8, 16] and [r["sequences"] for r in result["rows"]] == [4, 2]
    assert all(r[f"{k}_ms"] > 0 and r[f"{k}_cpu_ms"] >= 0 for r in result["rows"] for k in ("ours", "sdpa"))
    text = packing.attention_text(result["rows"])
    assert text.count("\n") == 3 and "SDPA / ours" in text
