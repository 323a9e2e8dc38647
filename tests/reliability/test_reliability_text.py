"""Pathological text through the user's commands: an empty raw prompt, non-ASCII text (CJK, emoji with a
zero-width joiner, right-to-left scripts, combining marks) through build, validate, train, eval, its report and
generate, and CRLF line breaks inside quoted CSV cells. Each through `python -m pipeline` in a subprocess."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from tests.reliability.rel_helpers import BASE, assert_user_error, jsonl, make_project, run_cli, write

# CJK, an emoji ZWJ sequence and a flag, Hebrew and Arabic (right-to-left), a combining accent, a NUL-free BiDi mark
TEXTS = ["日本語のテキスト", "👩‍👩‍👧 family 🇯🇵", "שלום עולם", "مرحبا بالعالم", "Cafe\u0301 \u200fmark"]


def unicode_rows(n: int = 20) -> list[dict[str, str]]:
    return [{"instruction": f"{TEXTS[i % 5]} #{i}", "input": "", "output": f"{TEXTS[(i + 2) % 5]} {i}"}
            for i in range(n)]


def test_an_empty_raw_prompt_is_a_clear_error(tmp_path: Path):
    root = make_project(tmp_path / "proj")
    result = run_cli(["generate", "r.yaml", "--prompt", "", "--raw"], root)
    assert_user_error(result, "--prompt is empty and --raw sends it as is")


@pytest.mark.slow  # four commands in fresh interpreters (about a minute)
def test_non_ascii_text_goes_through_every_stage_and_the_outputs(tmp_path: Path):
    recipe = BASE.replace("cutoff_len: 64", "cutoff_len: 128") + \
        "max_new_tokens: 4\nmax_eval_samples: 4\nplot_loss: false\n"
    root = make_project(tmp_path / "proj", recipe)
    write(root, "data/raw/a.jsonl", jsonl(unicode_rows()))
    for argv in (["build", "r.yaml"], ["validate", "r.yaml"], ["train", "r.yaml"], ["eval", "r.yaml"]):
        result = run_cli(argv, root, LC_ALL="C", LANG="C")  # a bare locale must not matter either
        assert result.code == 0, (argv, result.err[-3000:])
        assert "Traceback" not in result.err
    built = json.loads((root / "data/build/a/train.json").read_text(encoding="utf-8")) + \
        json.loads((root / "data/build/a/val.json").read_text(encoding="utf-8"))
    nfc = [{k: unicodedata.normalize("NFC", v) for k, v in row.items()} for row in unicode_rows()]
    assert sorted(map(json.dumps, built)) == sorted(map(json.dumps, nfc))  # every character kept (build: NFC)
    predictions = [json.loads(line) for line in (root / "out/eval/predictions.jsonl").read_text("utf-8").splitlines()]
    assert predictions and all(any(t in json.dumps(p, ensure_ascii=False) for t in TEXTS) for p in predictions)
    report = (root / "out/eval/report.md").read_text(encoding="utf-8")
    assert any(t in report for t in TEXTS), report[:2000]
    prompt = "日本語 👩‍👩‍👧 שלום"
    for extra in ([], ["--raw"]):
        result = run_cli(["generate", "r.yaml", "--prompt", prompt, *extra], root, LC_ALL="C", LANG="C")
        assert result.code == 0 and "Traceback" not in result.err, result.err[-3000:]
        result.out.encode("utf-8")  # printable text (a cut multi-byte token is replaced, never a crash)


def test_crlf_inside_quoted_csv_cells_keeps_the_line_break_and_lines_stay_physical(tmp_path: Path):
    root = make_project(tmp_path / "proj")
    body = "".join(f'"Line one {i}\r\nline two",answer {i}\r\n' for i in range(20))
    write(root, "data/raw/a.csv", "question,answer\r\n" + body)
    write(root, "data/dataset_info.json", {"a": {"file_name": "raw/a.csv",
                                                "columns": {"prompt": "question", "response": "answer"}}})
    assert run_cli(["build", "r.yaml"], root).code == 0
    built = json.loads((root / "data/build/a/train.json").read_text(encoding="utf-8")) + \
        json.loads((root / "data/build/a/val.json").read_text(encoding="utf-8"))
    # the line break is kept, as LF (the build normalises CRLF, so de-duplication compares like with like)
    assert sorted(r["instruction"] for r in built) == sorted(f"Line one {i}\nline two" for i in range(20))
    # a broken row after the multi-line cells: its physical line (each cell spans two) is named
    write(root, "data/raw/a.csv", "question,answer\r\n" + body + "too,many,fields\r\n")
    assert_user_error(run_cli(["build", "r.yaml"], root), "data/raw/a.csv:42: 3 fields, but the header has 2")
