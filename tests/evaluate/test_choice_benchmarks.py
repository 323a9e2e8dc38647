"""`python -m pipeline eval` with LLaMA-Factory's eval recipe (`task: mmlu_test`): the multiple-choice benchmarks.

The golden is LLaMA-Factory 0.9.5's Evaluator computed independently of the code under test: the CSV rows as its
loading script yields them and `datasets` stores them (evaluation/mmlu/mmlu.py, git a0d44c650^), the shots drawn
by `datasets`' own seedless shuffle after transformers.set_seed, the messages from its eval template's strings, the
prompt from its qwen template's strings encoded element by element as Template._convert_elements_to_ids does, and
transformers' logits of the checkpoint (all re-typed below with file:line of llamafactory 0.9.5).
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.acceptance.harness import (make, pipeline, refused, refused_before_any_stage, scratch_repo,
                                      write_hf_checkpoint)

# hand-written questions: (question, A, B, C, D, answer); algebra's options are numbers (pandas reads a number
# column, which datasets stores as text: 4.0 -> "4"), history has an empty option cell (None, shown as "None")
SUBJECTS = {
    "algebra": ("abstract algebra", "STEM", {
        "dev": [("What is 2 + 2?", "4", "3", "5", "0.5", "A"), ("What is 3 * 3?", "6", "9", "12", "1.5", "B"),
                ("What is 10 / 4?", "2", "3", "2.5", "4", "C")],
        "test": [("What is 1 + 1?", "1", "2", "3", "4", "B"), ("What is 9 - 3?", "6", "5", "0.5", "3", "A"),
                 ("What is 2 * 5?", "7", "8", "9", "10", "D"), ("Half of 5?", "2.5", "2", "3", "5", "A"),
                 ("What is 7 + 1?", "6", "7", "8", "9", "C")]}),
    "history": ("world history", "Humanities", {
        "dev": [("Which came first?", "the wheel", "the car", "the plane", "the rocket", "A"),
                ("Who built the pyramids?", "Romans", "Egyptians", "Vikings", "Incas", "B"),
                ("Which is a river?", "Alps", "Sahara", "Nile", "Gobi", "C")],
        "test": [("Which empire had Rome?", "Roman", "Mongol", "Aztec", "", "A"),
                 ("Which is a sea?", "Andes", "Baltic", "Ural", "Atlas", "B"),
                 ("Which is oldest?", "paper", "stone tools", "radio", "steam", "B"),
                 ("Where is Kyoto?", "Peru", "Chile", "Japan", "Spain", "C")]}),
    "law": ("jurisprudence", "Humanities", {
        "dev": [("A contract needs?", "consent", "a dog", "rain", "a car", "A"),
                ("A judge works in?", "a farm", "a court", "a ship", "a mine", "B")],
        "test": [("A crime is?", "a song", "a tree", "an offence", "a cloud", "C"),
                 ("Appeals go to?", "a higher court", "a shop", "a river", "a school", "A"),
                 ("A verdict is?", "a decision", "a colour", "a fish", "a hat", "A")]}),
}
RECIPE = ("model_name_or_path: {model}\ntemplate: qwen\ntask: mmlu_test\ntask_dir: evaluation\nn_shot: 2\nlang: en\n"
          "batch_size: {batch}\nsave_dir: {save}\n")


def _csv(rows: list[tuple[str, ...]], header: list[str] | None = None, index: bool = False) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(([""] if index else []) + header)
    for i, row in enumerate(rows):
        writer.writerow(([i] if index else []) + list(row))
    return out.getvalue().encode("utf-8")


def write_mmlu(task_dir: Path, subjects: dict = SUBJECTS) -> Path:
    """task_dir/mmlu/{mapping.json, mmlu.zip} in LLaMA-Factory's MMLU layout (data/{dev,test}/<s>_<split>.csv,
    no header)."""
    folder = task_dir / "mmlu"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mapping.json").write_text(json.dumps({k: {"name": n, "category": c}
                                                     for k, (n, c, _) in subjects.items()}, indent=2))
    with zipfile.ZipFile(folder / "mmlu.zip", "w") as z:
        for key, (_, _, splits) in subjects.items():
            for split, rows in splits.items():
                z.writestr(f"data/{split}/{key}_{split}.csv", _csv(rows))
    return folder


# ------------------------------------------------------------------ the golden: LLaMA-Factory's Evaluator re-typed
def lf_rows(data: bytes) -> Any:
    """evaluation/mmlu/mmlu.py:160-164 (_generate_examples) through datasets' ArrowWriter under the script's features
    (mmlu.py:107-118), as GeneratorBasedBuilder stores them."""
    import datasets
    import pandas as pd
    from datasets.arrow_writer import ArrowWriter

    df = pd.read_csv(io.BytesIO(data), header=None)
    df.columns = ["question", "A", "B", "C", "D", "answer"]
    features = datasets.Features({k: datasets.Value("string") for k in df.columns})
    with tempfile.TemporaryDirectory() as tmp:
        with ArrowWriter(features=features, path=f"{tmp}/rows.arrow") as writer:
            for record in df.to_dict(orient="records"):
                writer.write(record)
            writer.finalize()
        return datasets.Dataset.from_file(f"{tmp}/rows.arrow", in_memory=True)


def lf_golden(folder: Path, checkpoint: Path, n_shot: int, seed: int = 42, model: Any = None,
              template: str = "qwen") -> tuple[dict, str]:
    """(results.json, the score table) of llamafactory 0.9.5's Evaluator for the qwen or fewshot template, lang en:
    transformers' model of `checkpoint` unless `model` is given (a PEFT model on it)."""
    import torch
    import transformers

    mapping = json.loads((folder / "mapping.json").read_text())
    # the class tokenizer_config.json names: transformers 5's AutoTokenizer makes a Qwen2Tokenizer of a qwen2 config,
    # whose own digit-splitting pre-tokenizer replaces the small test vocabulary's (GPT-2's); a real Qwen
    # tokenizer.json has Qwen's, and the two agree there
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    choices = ["A", "B", "C", "D"]  # extras/constants.py:35
    choice_ids = [tokenizer.encode(ch, add_special_tokens=False)[-1] for ch in choices]  # eval/evaluator.py:69
    system = "The following are multiple choice questions (with answers) about {subject}.\n\n"  # eval/template.py:68

    def enc(text: str) -> list[int]:  # data/template.py:113-119 (_convert_elements_to_ids), an element at a time
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    def parse(row: dict) -> tuple[str, str]:  # eval/template.py:27-34, choice and answer strings from :69-70
        return "".join([row["question"]] + ["\n{choice}. {content}".format(choice=ch, content=row[ch])
                                            for ch in choices if ch in row] + ["\nAnswer:"]), row["answer"]

    transformers.set_seed(seed)  # hparams/parser.py:588
    archive = zipfile.ZipFile(folder / "mmlu.zip")
    results, corrects = {}, {c: [] for c in ["Average", "STEM", "Social Sciences", "Humanities", "Other"]}
    for subject, info in mapping.items():
        dev = lf_rows(archive.read(f"data/dev/{subject}_dev.csv"))
        test = lf_rows(archive.read(f"data/test/{subject}_test.csv"))
        outputs = []
        for i in range(len(test)):
            support = dev.shuffle().select(range(min(n_shot, len(dev))))  # eval/evaluator.py:108-110
            messages = []  # eval/template.py:40-50
            for k in range(len(support)):
                q, a = parse(support[k])
                messages += [q, a]
            q, a = parse(test[i])
            messages += [q, a]
            messages[0] = system.format(subject=info["name"]) + messages[0]
            # data/template.py:1946-1955 (qwen) in _encode (:141-168): the system element, then each message's slot
            if template == "fewshot":  # data/template.py:958-963: the default user slot, "{content}\n\n" answers,
                ids = []  # no system (default_system ""), no prefix (EmptyFormatter)
                for turn, content in enumerate(messages[:-1]):
                    ids += enc(content if turn % 2 == 0 else f"{content}\n\n")
            else:
                ids = enc("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                          "<|im_end|>\n")
                for turn, content in enumerate(messages[:-1]):  # encode_oneturn: the prompt, not the last answer
                    ids += enc(f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n" if turn % 2 == 0
                               else f"{content}<|im_end|>\n")
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            outputs.append(choices[int(torch.softmax(logits[choice_ids], dim=-1).argmax())])  # evaluator.py:72-77
        labels = [test[i]["answer"] for i in range(len(test))]
        right = list(np.array(outputs) == np.array(labels))
        corrects[info["category"]] += right
        corrects["Average"] += right
        results[subject] = {str(i): outputs[i] for i in range(len(outputs))}
    table = "\n".join(f"{name:>15}: {100 * np.mean(c):.2f}" for name, c in corrects.items() if len(c))  # :140-146
    return results, table


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint (transformers' save_pretrained, a small byte-level vocabulary with Qwen's markup) whose
    weights are noisy enough that the letter picked changes with the question, and the MMLU task folder."""
    root = tmp_path_factory.mktemp("bench")
    write_hf_checkpoint(root / "qwen", "qwen2", small_vocab=True, max_position_embeddings=1024, noise=0.5)
    write_mmlu(root / "evaluation")
    return root


@pytest.fixture(scope="module")
def golden(bench) -> tuple[dict, str]:
    """LLaMA-Factory's results.json and table for the base checkpoint, 2-shot."""
    return lf_golden(bench / "evaluation" / "mmlu", bench / "qwen", n_shot=2)


def test_mmlu_recipe_as_typed_predicts_as_llama_factory(bench, golden):
    """An LLaMA-Factory eval recipe, typed as `python -m pipeline eval recipe.yaml`: results.json holds the letters
    LLaMA-Factory's Evaluator picks (same shots, prompts and argmax), the table is its table; the batch size changes
    nothing (3 against 2, and the golden's one question at a time)."""
    (bench / "lf_eval.yaml").write_text(RECIPE.format(model="qwen", batch=2, save="saves/mmlu"))
    done = pipeline("eval", "lf_eval.yaml", cwd=bench)
    golden, table = golden
    saved = bench / "saves" / "mmlu"
    assert json.loads((saved / "results.json").read_text()) == golden
    assert len(set("".join(v for s in golden.values() for v in s.values()))) > 1  # not one letter everywhere
    assert (saved / "results.log").read_text() == table
    assert table in done.stdout
    assert table.splitlines()[0].startswith("        Average: ") and "Social Sciences" not in table
    scores = json.loads((saved / "scores.json").read_text())
    assert scores["subjects"]["history"] == {"name": "world history", "category": "Humanities", "total": 4,
                                            "correct": sum(golden["history"][str(i)] == row[5]
                                                           for i, row in enumerate(SUBJECTS["history"][2]["test"]))}
    report = (saved / "report.md").read_text()
    assert "| world history (`history`) | Humanities |" in report and (saved / "accuracy.png").stat().st_size > 0
    # batches of 3 (5, 4 and 3 questions a subject: other pads, a last short batch), against 2 and the golden's 1
    pipeline("eval", "lf_eval.yaml", "batch_size=3", "save_dir=saves/b3", cwd=bench, as_typed=False)
    assert json.loads((bench / "saves" / "b3" / "results.json").read_text()) == golden


def test_make_eval_runs_a_benchmark_recipe_without_data_or_training(bench, golden, tmp_path):
    """`make eval RECIPE=` on LLaMA-Factory's eval recipe (no dataset): no build, validate, train or merge, only the
    benchmark, with LLaMA-Factory's results; a second make runs nothing (validate and plan of such a recipe:
    test_benchmark_validate_plan)."""
    repo = scratch_repo(tmp_path / "repo")
    (repo / "qwen").symlink_to(bench / "qwen")
    (repo / "evaluation").symlink_to(bench / "evaluation")
    (repo / "lf_eval.yaml").write_text(RECIPE.format(model="qwen", batch=4, save="saves/make"))
    done = make("eval", "RECIPE=lf_eval.yaml", cwd=repo)
    assert [line.split(" -m pipeline ")[1].split()[0] for line in done.stdout.splitlines()
            if " -m pipeline " in line] == ["eval"]
    assert json.loads((repo / "saves" / "make" / "results.json").read_text()) == golden[0]
    assert " -m pipeline " not in make("eval", "RECIPE=lf_eval.yaml", cwd=repo).stdout
    # deps' own mistake (two recipes write the adapter) is the one message: no validate message about the dataset
    # a benchmark recipe does without before it, as for export's merge recipes
    for name in ("a", "b"):
        (repo / f"{name}.yaml").write_text("model_name_or_path: qwen\ndataset: x\noutput_dir: saves/sft\n")
    (repo / "ambiguous.yaml").write_text(RECIPE.format(model="qwen", batch=4, save="saves/amb")
                                         + "adapter_name_or_path: saves/sft\n")
    ours = refused_before_any_stage(make("eval", "RECIPE=ambiguous.yaml", cwd=repo, expect=2))
    assert len(ours) == 1 and "adapter_name_or_path: saves/sft is written by 2 recipes" in ours[0], ours


def test_llama_factory_eval_example_with_template_fewshot(bench, tmp_path):
    """LLaMA-Factory's own eval example (examples/train_lora/llama3_lora_eval.yaml at git 95ac3f237^: template
    fewshot, task mmlu_test, lang en, n_shot 5 - 2 here, the test's dev rows - save_dir, batch_size): its letters;
    fewshot outside a benchmark is refused at the key."""
    for name in ("qwen", "evaluation"):
        (tmp_path / name).symlink_to(bench / name)
    (tmp_path / "r.yaml").write_text("model_name_or_path: qwen\ntrust_remote_code: true\nfinetuning_type: lora\n"
                                     "task: mmlu_test\ntemplate: fewshot\nlang: en\nn_shot: 2\nsave_dir: saves/fs\n"
                                     "batch_size: 4\ntask_dir: evaluation\n")
    pipeline("eval", "r.yaml", cwd=tmp_path, as_typed=False)
    golden, _ = lf_golden(bench / "evaluation" / "mmlu", bench / "qwen", n_shot=2, template="fewshot")
    assert json.loads((tmp_path / "saves" / "fs" / "results.json").read_text()) == golden
    message = refused("train", "r.yaml", "task=null", "n_shot=null", "lang=null", "save_dir=null", "batch_size=null",
                      "task_dir=null", "dataset=x", cwd=tmp_path, as_typed=False)
    assert "r.yaml:5:11: template: set to 'fewshot': LLaMA-Factory's prompt for its multiple-choice benchmarks" \
        in message


def test_a_peft_adapter_is_evaluated_on_its_base(bench, golden, tmp_path):
    """adapter_name_or_path (a PEFT LoRA adapter, as LLaMA-Factory's example names its sft run): the predictions of
    PEFT's model of the base + adapter (not the base's). validate passes the recipe, lora_rank left out as in
    LLaMA-Factory's eval recipe: it trains nothing (validate refused it, "lora_rank: 8 (the default), but ... was
    trained with r 4 ... training continues an adapter", where eval ran it); so does a merge recipe's validate say
    only that export runs it, not to set lora_rank."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(bench / "qwen", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # B random too: the adapter changes the answers
    torch.manual_seed(1)
    adapted = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    adapted.save_pretrained(tmp_path / "adapter")
    (tmp_path / "qwen").symlink_to(bench / "qwen")
    (tmp_path / "evaluation").symlink_to(bench / "evaluation")
    (tmp_path / "r.yaml").write_text(RECIPE.format(model="qwen", batch=4, save="saves/lora")
                                     + "adapter_name_or_path: adapter\nfinetuning_type: lora\n")
    assert "task: OK (evaluation/mmlu" in pipeline("validate", "r.yaml", cwd=tmp_path).stdout
    (tmp_path / "merge.yaml").write_text("model_name_or_path: qwen\nadapter_name_or_path: adapter\ntemplate: qwen\n"
                                         "finetuning_type: lora\nexport_dir: merged\n")
    err = refused("validate", "merge.yaml", cwd=tmp_path, as_typed=False)
    assert [line.split(": ")[2] for line in err.splitlines() if line.startswith("error: ")] == ["dataset"], err
    pipeline("eval", "r.yaml", cwd=tmp_path, as_typed=False)
    tuned, _ = lf_golden(bench / "evaluation" / "mmlu", bench / "qwen", n_shot=2, model=adapted)
    assert json.loads((tmp_path / "saves" / "lora" / "results.json").read_text()) == tuned != golden[0]
    assert "+ LoRA adapter adapter" in (tmp_path / "saves" / "lora" / "report.md").read_text()


def test_shot_draws_are_datasets_seedless_shuffle():
    """ShotDraws against datasets' Dataset.shuffle() after transformers.set_seed: 700 draws (past the 624-word
    refill of numpy's MT19937 state), of pools of several sizes, an empty one among them."""
    import datasets
    import transformers

    from pipeline.data.choice_tasks import ShotDraws

    sizes = [5, 3, 0, 7, 1] * 140
    pools = {n: datasets.Dataset.from_dict({"i": list(range(n))}) for n in set(sizes)}
    transformers.set_seed(11)
    theirs = [pools[n].shuffle()["i"] for n in sizes]
    draws = ShotDraws(11)
    assert [draws.permutation(n) for n in sizes] == theirs
    rows = [{"i": i} for i in range(5)]
    transformers.set_seed(3)
    assert ShotDraws(3).shots(rows, 2) == [{"i": i} for i in pools[5].shuffle().select(range(2))["i"]]


def test_cells_are_the_text_datasets_stores():
    """A CSV's numbers, booleans and empty cells become the text LLaMA-Factory's datasets gives its template."""
    import pandas as pd

    from pipeline.data.choice_tasks import _texts

    data = b"q1,4,x,,True,A\nq2,0.5,,3,False,B\n7,1e20,z,7,True,C\n"
    golden = lf_rows(data).to_list()
    frame = pd.read_csv(io.BytesIO(data), header=None)
    frame.columns = ["question", "A", "B", "C", "D", "answer"]
    ours = {c: _texts(frame[c].tolist()) for c in frame.columns}
    assert [{c: ours[c][i] for c in frame.columns} for i in range(3)] == golden
    assert golden[0]["A"] == "4" and golden[0]["C"] == "nan" and golden[1]["B"] is None and golden[0]["D"] == "true"


def test_ceval_and_cmmlu_layouts_and_the_zh_template(tmp_path):
    """C-Eval (a header with id and explanation; val/ and dev/) and CMMLU (Question/Answer, an index column, no
    val/) as their loading scripts read them, from the zip or extracted; lang zh's strings."""
    from pipeline.data.choice_tasks import EVAL_TEMPLATES, read_task

    rows = [("一加一等于几？", "1", "2", "3", "4", "B"), ("水的化学式？", "H2O", "CO2", "O2", "N2", "A")]
    ceval = tmp_path / "evaluation" / "ceval"
    ceval.mkdir(parents=True)
    (ceval / "mapping.json").write_text(json.dumps({"math": {"name": "数学", "category": "STEM"}}))
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    with zipfile.ZipFile(ceval / "ceval.zip", "w") as z:
        for split in ("dev", "val"):
            z.writestr(f"{split}/math_{split}.csv", _csv([(i, *r, "因为") for i, r in enumerate(rows)], header))
        z.writestr("test/math_test.csv", _csv([(i, *r[:5]) for i, r in enumerate(rows)], header[:6]))
    task = read_task("ceval_validation", tmp_path / "evaluation", 2)
    assert task.layout.name == "C-Eval" and task.subjects[0].rows[1] == {
        "question": "水的化学式？", "A": "H2O", "B": "CO2", "C": "O2", "D": "N2", "answer": "A"}
    cmmlu = tmp_path / "evaluation" / "cmmlu"
    for split in ("dev", "test"):  # extracted, no zip
        (cmmlu / split).mkdir(parents=True)
        (cmmlu / split / "agronomy.csv").write_bytes(_csv(rows, ["Question", "A", "B", "C", "D", "Answer"], index=True))
    (cmmlu / "mapping.json").write_text(json.dumps({"agronomy": {"name": "农学", "category": "Other"}}))
    task = read_task("cmmlu_test", tmp_path / "evaluation", 1)
    assert task.layout.name == "CMMLU" and task.subjects[0].rows == task.subjects[0].dev
    assert task.subjects[0].rows[0] == {"question": "一加一等于几？", "A": "1", "B": "2", "C": "3", "D": "4",
                                        "answer": "B"}
    turns = EVAL_TEMPLATES["zh"].messages(task.subjects[0].rows[0], task.subjects[0].dev[1:], "农学")
    # llamafactory/eval/template.py:74-79
    assert turns == [("以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n\n水的化学式？\nA. H2O\nB. CO2\nC. O2\nD. N2\n答案：", "A"),
                     ("一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：", "B")]
    with pytest.raises(Exception, match="C-Eval's test split has no answers"):
        read_task("ceval_test", tmp_path / "evaluation", 0)
    with pytest.raises(Exception, match="CMMLU has no validation split"):
        read_task("cmmlu_validation", tmp_path / "evaluation", 0)


def test_mistakes_are_one_message_each(bench, tmp_path):
    """Exit 2, one message naming the file (or recipe line), what was given and what is expected."""
    (tmp_path / "qwen").symlink_to(bench / "qwen")
    write_mmlu(tmp_path / "evaluation")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model="qwen", batch=2, save="saves/x"))

    def refusal(*overrides: str, as_typed: bool = False) -> str:
        return refused("eval", "r.yaml", *overrides, cwd=tmp_path, as_typed=as_typed)

    assert "override task=mmlu_val: task: given 'mmlu_val', expected <folder>_<split> with split one of test, " \
           "validation, train" in refusal("task=mmlu_val", as_typed=True)
    assert "lang: given 'fr', expected one of en, zh" in refusal("lang=fr")
    assert "r.yaml:5:9: n_shot: set to 2, but only eval with task reads it" in refusal("task=null")
    assert "r.yaml:3:7: task: set to 'mmlu_test': a benchmark is run by `python -m pipeline eval r.yaml dataset=x`" in refused(
        "train", "r.yaml", "dataset=x", cwd=tmp_path, as_typed=False)
    assert "r.yaml:3:7: task: mmlu_test: no folder nowhere/mmlu" in refusal("task_dir=nowhere")
    (tmp_path / "saves" / "x").mkdir(parents=True)
    assert "r.yaml:8:11: save_dir: saves/x already exists; LLaMA-Factory refuses" in refusal()
    message = refusal("save_dir=saves/y", "n_shot=3")
    assert "mmlu.zip:data/dev/law_dev.csv: n_shot is 3 but subject 'law' has 2 dev rows; LLaMA-Factory then uses " \
           "all 2" in message
    long = json.loads(json.dumps(SUBJECTS))
    long["law"][2]["test"][2][0] = "Why? " * 600  # past the checkpoint's 1,024 positions
    write_mmlu(tmp_path / "evaluation", long)
    assert "law_test.csv: row 2: its prompt is " in (message := refusal("save_dir=saves/y")) and \
        "tokens with its 2 shots, longer than the model's context of 1024; lower n_shot" in message
    broken = json.loads(json.dumps(SUBJECTS))
    broken["law"][2]["test"][1][5] = ""
    write_mmlu(tmp_path / "evaluation", broken)
    assert "mmlu.zip:data/test/law_test.csv: row 1 (line 2): no answer, expected one of A, B, C, D" in \
        refusal("save_dir=saves/y")
    with zipfile.ZipFile(tmp_path / "evaluation" / "mmlu" / "mmlu.zip", "w") as z:
        z.writestr("data/dev/algebra_dev.csv", _csv(SUBJECTS["algebra"][2]["dev"]))
    assert "mmlu.zip:data/test/algebra_test.csv: not found: mapping.json lists subject 'algebra'" in \
        refusal("save_dir=saves/y")
    (tmp_path / "evaluation" / "mmlu" / "mapping.json").unlink()
    assert "evaluation/mmlu/mapping.json: not found" in refusal("save_dir=saves/y")
    assert not (tmp_path / "saves" / "y").exists()
