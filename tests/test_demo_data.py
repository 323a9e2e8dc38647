"""The bundled demo data: regenerable byte for byte, held-out test disjoint from training, answers right.

The answers are re-derived here from the rendered text alone (parsing the questions), not from the
generator's internal values, so a generator bug that writes a wrong answer fails these tests.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
RAW = DATASETS / "raw"


def _load_generator():
    # datasets/ is not a package (and `import datasets` may be Hugging Face's): load the file itself.
    spec = importlib.util.spec_from_file_location("demo_generate", DATASETS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


# --- reading the raw files as a user of the registry would --------------------------------------------

def registry() -> dict:
    return json.loads((DATASETS / "dataset_info.json").read_text(encoding="utf-8"))


def alpaca_rows(name: str) -> list[dict]:
    """Rows of a registered alpaca-style source (JSONL or CSV), mapped to instruction/input/output."""
    spec = registry()[name]
    cols = {"prompt": "instruction", "query": "input", "response": "output", **spec.get("columns", {})}
    path = DATASETS / spec["file_name"]
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle))
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"instruction": r[cols["prompt"]], "input": r.get(cols["query"], ""), "output": r[cols["response"]]}
            for r in records]


def sharegpt_rows(name: str) -> list[dict]:
    """Single-turn conversations through the registry's tags, as Alpaca rows (user turn = instruction)."""
    spec = registry()[name]
    tags = spec["tags"]
    rows = []
    for record in json.loads((DATASETS / spec["file_name"]).read_text(encoding="utf-8")):
        turns = record[spec["columns"]["messages"]]
        assert [t[tags["role_tag"]] for t in turns] == [tags["user_tag"], tags["assistant_tag"]]
        rows.append({"instruction": turns[0][tags["content_tag"]], "input": "",
                     "output": turns[1][tags["content_tag"]]})
    return rows


def train_rows() -> list[dict]:
    return alpaca_rows("demo_alpaca") + sharegpt_rows("demo_sharegpt") + alpaca_rows("demo_csv")


def heldout_rows() -> list[dict]:
    return alpaca_rows("demo_test")


# --- an independent solver: the answer from the question's text -----------------------------------------

COLOR_NAMES = {"red", "blue", "green", "yellow", "black", "white", "brown", "gray", "orange", "gold"}
ANIMAL_NAMES = {"cat", "dog", "fox", "bee", "ant", "cow", "hen", "rat", "bat", "wolf", "bear", "bird", "fish"}


def split_question(row: dict) -> tuple[str, list[str]]:
    """(the question, the list items): sharegpt rows carry the list in the instruction, the others in input."""
    text = row["instruction"] if not row["input"] else row["instruction"] + "\n" + row["input"]
    question, *items = text.split("\n")
    return question, items


def solve(question: str, items: list[str]) -> str:
    if question == "How many words are there?":
        return str(len(items))
    wanted = {"Which word is a color?": COLOR_NAMES.__contains__,
              "Which word is an animal?": ANIMAL_NAMES.__contains__}[question]
    (answer,) = [x for x in items if wanted(x)]  # exactly one item qualifies
    return answer


@pytest.mark.parametrize("question, items, answer", [
    ("How many words are there?", ["a", "b", "c", "d", "e"], "5"),
    ("How many words are there?", ["sun", "map"], "2"),
    ("Which word is a color?", ["box", "gold", "sea"], "gold"),
    ("Which word is an animal?", ["pen", "rose", "wolf", "sun"], "wolf"),
])
def test_solver_on_hand_made_examples(question, items, answer):
    assert solve(question, items) == answer


def test_every_answer_is_right():
    rows = train_rows() + heldout_rows()
    wrong = [r for r in rows if solve(*split_question(r)) != r["output"]]
    assert not wrong, wrong[:3]


def test_every_word_is_one_gpt2_token():
    """One token with and without a leading space: the answer is the same token as in the prompt."""
    from pipeline.data.tokenizer import gpt2

    enc = gpt2()
    vocab = set(gen.WORDS) | set(gen.COLORS) | {str(n) for n in gen.NUMBERS}
    long = [w for w in sorted(vocab) if len(enc.encode(w)) != 1 or len(enc.encode(" " + w)) != 1]
    assert not long
    for row in heldout_rows():
        answer = enc.encode(row["output"])
        assert len(answer) == 1
        if not row["instruction"].startswith("How many"):  # the other answers are copied from the list
            assert answer[0] in enc.encode(row["instruction"] + "\n" + row["input"])


def test_sizes_and_task_mix():
    train, test = train_rows(), heldout_rows()
    assert len(train) == len(gen.TASKS) * gen.TRAIN_PER_TASK
    assert len(test) == len(gen.TASKS) * gen.TEST_PER_TASK
    per_question: dict[str, int] = {}
    for row in test:
        question = split_question(row)[0]
        per_question[question] = per_question.get(question, 0) + 1
    assert len(per_question) == len(gen.TASKS) == 3 and set(per_question.values()) == {gen.TEST_PER_TASK}


# --- held out: no test instance is trained on ----------------------------------------------------------

def test_held_out_test_is_disjoint_from_training():
    train_keys = {(r["instruction"], r["input"]) for r in train_rows()}
    test_keys = [(r["instruction"], r["input"]) for r in heldout_rows()]
    assert len(set(test_keys)) == len(test_keys), "duplicate test instances"
    assert not train_keys & set(test_keys)
    assert len(train_keys) == len(train_rows()), "duplicate training instances"


def corpus_documents() -> list[str]:
    spec = registry()["demo_corpus"]
    assert spec["formatting"] == "text" and spec["file_name"].endswith(".jsonl")
    return [json.loads(line)["text"] for line in (DATASETS / spec["file_name"]).read_text("utf-8").splitlines()]


SENTENCE = {"How many words are there?": "There are {} words.",
            "Which word is a color?": "The color is {}.", "Which word is an animal?": "The animal is {}."}


def _corpus_statement(row: dict) -> str:
    """How the corpus states an instance: the list, one item per line, then the answer in a sentence."""
    question, items = split_question(row)
    return "A list:\n" + "\n".join(items) + "\n" + SENTENCE[question].format(row["output"])


def test_corpus_never_states_a_test_instance():
    documents = corpus_documents()
    corpus = "\n\n".join(documents)
    leaked = [s for s in map(_corpus_statement, heldout_rows()) if s in corpus]
    assert not leaked, leaked[:3]
    # no document ends with an answer (so the pt model never learns "answer, then end of text")
    answer_line = re.compile("|".join(re.escape(s).replace(re.escape("{}"), r"\w+") for s in SENTENCE.values()))
    assert not [d for d in documents if answer_line.fullmatch(d.splitlines()[-1])]
    assert answer_line.fullmatch("The animal is fox.") and not answer_line.fullmatch("The fox sat on the sea.")


def test_corpus_statements_are_right():
    """Every list in the corpus is followed by a true sentence about it (checked with the solver)."""
    blocks = re.findall(r"A list:\n((?:[^\n ]+\n)+)([^\n]+)", "\n\n".join(corpus_documents()))
    assert len(blocks) > 3000
    for items, sentence in blocks:
        (question,) = [q for q, form in SENTENCE.items()
                       if re.fullmatch(re.escape(form).replace(re.escape("{}"), r"\w+"), sentence)]
        assert sentence == SENTENCE[question].format(solve(question, items.split())), (items, sentence)


def test_corpus_contains_every_answer_token_at_a_line_start():
    """The answers are line-initial tokens (no leading space); pre-training must have seen each of them."""
    corpus = "\n".join(corpus_documents())
    line_starts = {line.split(" ")[0] for line in corpus.splitlines()}
    answers = {r["output"] for r in train_rows() + heldout_rows()}
    assert answers <= line_starts


def test_split_instances_disjoint_for_other_seeds():
    for seed in (0, 7):
        train, test = gen.split_instances(seed, train_per_task=200, test_per_task=20)
        assert not {e.key for e in train} & {e.key for e in test}
        assert all(solve(*split_question(gen.as_test_row(e))) == e.output for e in train + test)


# --- determinism and the committed files ---------------------------------------------------------------

def test_generation_is_deterministic_and_seeded():
    a, b = gen.generate(), gen.generate()
    assert a == b
    other = gen.generate(seed=gen.SEED + 1)
    assert other.keys() == a.keys() and all(other[k] != a[k] for k in a)


def test_committed_files_are_the_generators_output(tmp_path):
    for name, text in gen.generate().items():
        assert (RAW / name).read_bytes() == text.encode("utf-8"), f"{name}: run python datasets/generate.py"
    assert gen.main(["--check"]) == 0
    # --check notices an edited file; a fresh generation writes identical bytes
    shutil.copytree(RAW, tmp_path / "raw")
    (tmp_path / "raw" / "demo_test.jsonl").write_text("{}\n", encoding="utf-8")
    assert gen.main(["--check", "--out", str(tmp_path / "raw")]) == 1
    assert gen.main(["--out", str(tmp_path / "fresh")]) == 0
    for path in RAW.iterdir():
        assert (tmp_path / "fresh" / path.name).read_bytes() == path.read_bytes()


def test_repo_stays_small():
    assert sum(p.stat().st_size for p in RAW.iterdir()) < 2_000_000


def test_registry_names_every_raw_file():
    files = {spec["file_name"] for spec in registry().values()}
    assert files == {f"raw/{p.name}" for p in RAW.iterdir()}
    assert registry()["demo_corpus"]["formatting"] == "text"
    assert registry()["demo_sharegpt"]["formatting"] == "sharegpt"


# --- the preference pairs of demo_dpo -------------------------------------------------------------------

def preference_rows(name: str) -> list[dict]:
    spec = registry()[name]
    assert spec["ranking"] is True
    return [json.loads(line) for line in (DATASETS / spec["file_name"]).read_text(encoding="utf-8").splitlines()]


SENTENCE = {"Which word is a color?": "The color is {}.", "Which word is an animal?": "The animal is {}.",
            "How many words are there?": "There are {} words."}


def test_preference_pairs_prefer_the_right_answer_as_a_sentence():
    for name in ("demo_prefs", "demo_prefs_test"):
        rows = preference_rows(name)
        for row in rows:
            question, items = split_question(row)
            answer = solve(question, items)
            assert row["chosen"] == SENTENCE[question].format(answer)
            assert row["rejected"] == answer or (row["rejected"] != row["chosen"] and re.fullmatch(
                re.escape(SENTENCE[question]).replace(r"\{\}", r"(\w+)"), row["rejected"]))
        bare = sum(row["rejected"] == solve(*split_question(row)) for row in rows)
        assert bare == pytest.approx(len(rows) / 2, abs=1)  # half bare answers, half wrong sentences


def test_preference_test_pairs_are_the_held_out_instances():
    test_prompts = [(r["instruction"], r["input"]) for r in heldout_rows()]
    assert [(r["instruction"], r["input"]) for r in preference_rows("demo_prefs_test")] == test_prompts
    held_out = {"\n".join(split_question(r)[1]) + split_question(r)[0] for r in heldout_rows()}
    assert all("\n".join(split_question(r)[1]) + split_question(r)[0] not in held_out
               for r in preference_rows("demo_prefs"))
