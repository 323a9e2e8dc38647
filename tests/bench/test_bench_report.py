"""bench/README.md's figures block: a result measured on another CPU than the header's says so."""
from __future__ import annotations

from bench import report


def result(cpu: str, flags: list[str]) -> dict:
    return {"machine": {"cpu": cpu, "cpu_flags": flags, "cores": 2, "torch_threads": 2, "memory_gib": 23.5,
                        "platform": "Linux", "versions": dict.fromkeys(
                            ("python", "torch", "transformers", "peft", "accelerate", "deepspeed", "tiktoken",
                             "numpy", "llms-from-scratch"), "1")},
            "config": {"model": "m"}, "load_before": [0.1], "load_after": [0.2], "date": "d", "table": "| t |"}


def test_a_section_from_another_machine_names_it():
    text = report.figures({"sft": result("EPYC A", ["avx512f"]), "generation": result("EPYC B", [])}, None)
    sft, generation = text.split("### generation")
    assert "another machine" not in sft
    assert "On another machine than the header's: EPYC B (no avx512)." in generation
