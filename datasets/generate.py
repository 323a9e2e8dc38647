"""Deterministic generator of the bundled demo data (pure Python, no downloads).

Why: `make all` must show, on a 2-core CPU in minutes, that fine-tuning teaches a small GPT something
measurable. So the instruction tasks have exactly checkable one-word answers computed from the prompt
alone (small word and number puzzles over a vocabulary written here), the held-out test holds
instances that never occur in the training files or in the corpus, and the same task family is spread
over three raw formats so that `make data` exercises every converter:

    raw/demo_alpaca.jsonl    alpaca JSONL                                     "Which word is a color?"
    raw/demo_sharegpt.json   sharegpt JSON with custom tags (speaker/text, human/bot)  "Which word is an animal?"
    raw/demo_tasks.csv       CSV with column mapping (question/context/answer)  "How many words are there?"
    raw/demo_test.jsonl      alpaca JSONL: the held-out test of every task, as the build converts it
    raw/demo_corpus.jsonl    pt corpus: one short English document per line ({"text": ...})
    raw/demo_prefs.jsonl     alpaca ranking JSONL (dpo): chosen = the answer as a sentence, rejected = the bare
                             answer or a wrong sentence
    raw/demo_prefs_test.jsonl  the same pairs for the held-out demo_test instances

The tasks were chosen by calibration (see recipes/demo_sft.yaml): on a model pre-trained for about a
minute, LoRA learns these three within two minutes, while copying a word by its position (first/last
word) or comparing numbers needs far more steps.

Lists are written one item per line, so an answer (at the start of the response) is the very same
GPT-2 token as in the prompt; every word, colour and number below is a single token. The corpus uses
the same vocabulary and the same one-per-line lists, and each document ends with <|endoftext|> in the
pt stream, so pre-training teaches every token an answer needs (LoRA cannot train the embeddings).

Regenerate with `python datasets/generate.py` (byte-identical for the same seed; `--check` verifies the
committed files without writing).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED = 1234
TRAIN_PER_TASK = 2000
TEST_PER_TASK = 50
CORPUS_DOCUMENTS = 2000
PREF_TRAIN = 1500  # preference pairs for demo_dpo (500 per task)

ANIMALS = "cat dog fox bee ant cow hen rat bat wolf bear bird fish".split()
THINGS = ("pen box hat key map bed car bus ship coin ring bell book ball chair table house jar pot net web fan "
          "shell sun moon star tree rock lake hill road cloud rain wind rose sand stone river sea corn apple").split()
WORDS = ANIMALS + THINGS
COLORS = "red blue green yellow black white brown gray orange gold".split()
NUMBERS = range(1, 100)


@dataclass(frozen=True)
class Example:
    """One instruction instance in Alpaca terms; `key` identifies it for the train/test disjointness."""

    task: str
    instruction: str
    input: str
    output: str
    prose: str  # the same instance as corpus text (pt stage): the list, then a sentence with the answer

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.instruction, self.input)


# --- tasks: each draws one instance; the answer is computed from the drawn values ----------------------


def _lines(items: list) -> str:
    return "\n".join(map(str, items))


def _example(task: str, instruction: str, items: list, answer: object, sentence: str) -> Example:
    return Example(task, instruction, _lines(items), str(answer), f"A list:\n{_lines(items)}\n{sentence}")


def _odd_one(rng: random.Random, pool: list, others: list) -> tuple[list, object]:
    """2 or 3 items of `others` and one of `pool`, shuffled: (the list, the one)."""
    one = rng.choice(pool)
    items = rng.sample(others, rng.randint(2, 3)) + [one]
    rng.shuffle(items)
    return items, one


def color_word(rng: random.Random) -> Example:
    items, one = _odd_one(rng, COLORS, WORDS)
    return _example("color_word", "Which word is a color?", items, one, f"The color is {one}.")


def animal_word(rng: random.Random) -> Example:
    items, one = _odd_one(rng, ANIMALS, THINGS)
    return _example("animal_word", "Which word is an animal?", items, one, f"The animal is {one}.")


def count(rng: random.Random) -> Example:
    ws = rng.sample(WORDS, rng.randint(2, 6))
    return _example("count", "How many words are there?", ws, len(ws), f"There are {len(ws)} words.")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    f.__name__: f for f in (color_word, animal_word, count)
}
# Which raw file carries each task's training instances (the test file carries all tasks).
FORMAT_OF_TASK = {"color_word": "alpaca", "animal_word": "sharegpt", "count": "csv"}


def split_instances(seed: int = SEED, train_per_task: int = TRAIN_PER_TASK,
                    test_per_task: int = TEST_PER_TASK) -> tuple[list[Example], list[Example]]:
    """Draw unique instances per task; the test ones first, then training ones that avoid every test key."""
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for draw in TASKS.values():
        seen: set[tuple[str, str, str]] = set()
        for target, want in ((test, test_per_task), (train, train_per_task)):
            got = 0
            while got < want:
                ex = draw(rng)
                if ex.key not in seen:
                    seen.add(ex.key)
                    target.append(ex)
                    got += 1
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --- corpus: short documents over the same vocabulary (never a test instance) ---------------------------


def corpus_documents(rng: random.Random, n: int, test_keys: set[tuple[str, str, str]]) -> list[str]:
    """Documents of 3-6 pieces: task instances in prose (a list, then a sentence stating the answer),
    short lines that start with a word or a number, and plain sentences.

    Pre-training meets the skills but never the instruction format, never a test instance, and every
    document ends with a plain sentence (so an answer is never followed by EOS). In the short lines a
    colour is followed by a thing ("gold ring"), an animal by what it does ("fox runs") and a thing by
    where it is ("ring is here"), a number by things ("4 rings"): line-initial words then differ by kind
    from the first steps of pre-training on, which the instruction tasks build on, and every answer
    token (a word or a count, with no leading space) is a pre-training target.
    """
    draws = list(TASKS.values())
    documents = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(2, 5)):
            roll = rng.random()
            ex = rng.choice(draws)(rng) if roll < 0.5 else None
            if ex is not None and ex.key not in test_keys:
                pieces.append(ex.prose)
            elif roll < 0.8:
                pieces.append(_short_lines(rng))
            else:
                pieces.append(_sentence(rng))
        pieces.append(_sentence(rng))
        documents.append("\n".join(pieces))
    return documents


def _short_lines(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"{rng.choice(COLORS)} {rng.choice(THINGS)}")
        elif kind == 1:
            lines.append(f"{rng.choice(ANIMALS)} {rng.choice(['runs', 'sleeps', 'eats', 'sits', 'jumps'])}")
        elif kind == 2:
            lines.append(f"{rng.choice(THINGS)} is {rng.choice(['here', 'there'])}")
        else:
            lines.append(f"{rng.randint(2, 9)} {rng.choice(THINGS)}s")
    return rng.choice(["I saw:", "Today:", "Notes:"]) + "\n" + "\n".join(lines)


def _sentence(rng: random.Random) -> str:
    a, b, c = rng.sample(WORDS, 3)
    col = rng.choice(COLORS)
    return rng.choice([
        f"Look at the {col} {a}. The {a} is {col}.",
        f"The {a} is next to the {b}.",
        f"A {rng.choice(ANIMALS)} and a {b} went to the {c}.",
        f"There are {rng.choice(NUMBERS)} {a}s by the {b}.",
        f"The {rng.choice(ANIMALS)} sat on the {b}.",
    ])


# --- serialisation: one deterministic text per file ----------------------------------------------------


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _json_array(rows: list[dict]) -> str:
    """A JSON array with one row per line: diff-friendly and still one json.load."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def _user_text(ex: Example) -> str:
    return ex.instruction if not ex.input else f"{ex.instruction}\n{ex.input}"


def _alpaca_row(ex: Example) -> dict:
    return {"instruction": ex.instruction, "input": ex.input, "output": ex.output}


def _sharegpt_row(ex: Example) -> dict:
    return {"conversation": [{"speaker": "human", "text": _user_text(ex)}, {"speaker": "bot", "text": ex.output}]}


def _csv(examples: list[Example]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["question", "context", "answer", "task"])
    for ex in examples:
        writer.writerow([ex.instruction, ex.input, ex.output, ex.task])
    return buf.getvalue()


def as_test_row(ex: Example) -> dict:
    """The Alpaca row the build makes of the example in its training format (sharegpt: one user turn)."""
    if FORMAT_OF_TASK[ex.task] == "sharegpt":
        return {"instruction": _user_text(ex), "input": "", "output": ex.output}
    return _alpaca_row(ex)


# --- preference pairs (stage dpo): the answer as a sentence is preferred ----------------------------------


def _sentence_of(ex: Example) -> str:
    """The answer as the corpus states it ("The color is red.", "There are 4 words.")."""
    return ex.prose.rsplit("\n", 1)[1]


def _wrong_sentence(ex: Example, rng: random.Random) -> str:
    """The sentence with a wrong answer: another word of the list, or another count."""
    if ex.task == "count":
        wrong = rng.choice([n for n in range(2, 7) if str(n) != ex.output])
    else:
        wrong = rng.choice([w for w in ex.input.split("\n") if w != ex.output])
    return _sentence_of(ex).replace(f" {ex.output} ", f" {wrong} ").replace(f" {ex.output}.", f" {wrong}.")


def preference_pair(ex: Example, i: int, rng: random.Random) -> dict:
    """LLaMA-Factory's alpaca ranking row: chosen = the answer as a full sentence; rejected = the bare answer
    (what demo_sft taught, every other pair) or the sentence with a wrong answer (so correctness still counts)."""
    rejected = ex.output if i % 2 == 0 else _wrong_sentence(ex, rng)
    return {"instruction": _user_text(ex) if FORMAT_OF_TASK[ex.task] == "sharegpt" else ex.instruction,
            "input": "" if FORMAT_OF_TASK[ex.task] == "sharegpt" else ex.input,
            "chosen": _sentence_of(ex), "rejected": rejected}


def preference_files(seed: int, test: list[Example]) -> dict[str, str]:
    """demo_prefs.jsonl (training pairs on fresh instances, never a test instance) and demo_prefs_test.jsonl
    (the pairs of the held-out demo_test instances). A generator of its own: the other files stay byte-identical."""
    rng = random.Random(seed + 2)
    test_keys = {ex.key for ex in test}
    draws = list(TASKS.values())
    seen: set[tuple[str, str, str]] = set()
    train: list[Example] = []
    while len(train) < PREF_TRAIN:
        ex = draws[len(train) % len(draws)](rng)
        if ex.key not in test_keys and ex.key not in seen:
            seen.add(ex.key)
            train.append(ex)
    return {
        "demo_prefs.jsonl": _jsonl([preference_pair(ex, i, rng) for i, ex in enumerate(train)]),
        "demo_prefs_test.jsonl": _jsonl([preference_pair(ex, i, rng) for i, ex in enumerate(test)]),
    }


def generate(seed: int = SEED) -> dict[str, str]:
    """All raw files as {file name: text}; a pure function of the seed."""
    train, test = split_instances(seed)
    by_format: dict[str, list[Example]] = {"alpaca": [], "sharegpt": [], "csv": []}
    for ex in train:
        by_format[FORMAT_OF_TASK[ex.task]].append(ex)
    corpus = corpus_documents(random.Random(seed + 1), CORPUS_DOCUMENTS, {ex.key for ex in test})
    return {
        "demo_alpaca.jsonl": _jsonl([_alpaca_row(ex) for ex in by_format["alpaca"]]),
        "demo_sharegpt.json": _json_array([_sharegpt_row(ex) for ex in by_format["sharegpt"]]),
        "demo_tasks.csv": _csv(by_format["csv"]),
        "demo_test.jsonl": _jsonl([as_test_row(ex) for ex in test]),
        "demo_corpus.jsonl": _jsonl([{"text": doc} for doc in corpus]),
        **preference_files(seed, test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo datasets (deterministic).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "raw")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = parser.parse_args(argv)
    files = generate(args.seed)
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_bytes() != text.encode("utf-8")]
        for name in stale:
            print(f"{args.out / name}: differs from the generator's output (run python datasets/generate.py)")
        if not stale:  # README has the newcomer type this: silence looked like nothing was checked
            print(f"{args.out}: the {len(files)} files are the generator's output, byte for byte (seed {args.seed})")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = args.out / f".{name}.tmp"
        tmp.write_bytes(text.encode("utf-8"))
        tmp.replace(args.out / name)
        print(f"wrote {args.out / name} ({len(text.encode('utf-8')):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
