"""LLaMA-Factory's function-calling data as users bring it (a sharegpt entry with a `tools` column and
function_call / observation turns, tests/compat/lf_data/glaive_toolcall_en_demo.json): build -> validate ->
a tiny sft run through the CLI, and one exit-2 message for a template that cannot render tools."""
from __future__ import annotations

import json

from tests.acceptance.harness import pipeline
from tests.compat.test_lf_registry import built, recipe


def test_toolcall_data_builds_validates_and_trains(lf_workdir):
    r = recipe(lf_workdir, dataset="glaive_toolcall_en_demo", template="default", context_length=256, cutoff_len=256,
               per_device_train_batch_size=1, val_size=0.25, output_dir="out", plot_loss=False, lora_rank=2)
    pipeline("build", r, cwd=lf_workdir)
    rows = built(lf_workdir, "glaive_toolcall_en_demo")
    assert len(rows) == 4 and all(row["roles"] == ["user", "function", "observation", "assistant"] for row in rows)
    assert all(json.loads(row["tools"])[0]["name"] == "get_time" for row in rows)
    checked = pipeline("validate", r, cwd=lf_workdir)
    assert "data: OK" in checked.stdout
    shown = pipeline("inspect", r, "--num", "1", cwd=lf_workdir)
    assert "Action: get_time\nAction Input: {\"city\": " in shown.stdout  # the call as the default format writes it
    assert "> Tool Name: get_time" in shown.stdout
    pipeline("train", r, cwd=lf_workdir)
    assert (lf_workdir / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_template_without_tools_is_one_message(lf_workdir):
    failed = pipeline("build", recipe(lf_workdir, dataset="glaive_toolcall_en_demo", template="alpaca"),
                      cwd=lf_workdir, expect=2)
    (line,) = [m for m in failed.stderr.splitlines() if m.startswith("error:")]
    assert '"glaive_toolcall_en_demo".columns.tools: function-calling data' in line
    assert "template 'alpaca' does not; use one that does (chatml, qwen, qwen3, qwen3_nothink, llama3, deepseekr1, llama2, " \
           "mistral, default, empty, phi4_mini, gemma, gemma3, gemma2, glm4, glmz1, glm4_moe, gpt_oss, qwen2_vl, qwen3_vl, " \
           "qwen3_vl_nothink, mistral_small, deepseek3, moonlight)" in line
    assert "Traceback" not in failed.stderr and not (lf_workdir / "data" / "build").exists()
