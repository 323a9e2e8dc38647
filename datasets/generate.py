"""Deterministic generator of the bundled demo data (pure Python, no downloads).

Why: `make all` must show, on a 2-core CPU in minutes, that fine-tuning teaches a small GPT something
measurable. So the instruction tasks have exactly checkable answers computed from the prompt alone
(word and number manipulations over a small fixed vocabulary written here), the held-out test holds
instances that never occur in the training files or in the corpus, and the same task family is spread
over three raw formats so that `make data` exercises every converter:

    raw/demo_alpaca.jsonl    alpaca JSONL          first word, last word, reverse
    raw/demo_sharegpt.json   sharegpt JSON, custom tags (speaker/text, human/bot)   larger, smaller
    raw/demo_tasks.csv       CSV, column mapping (question/context/answer)          count, color
    raw/demo_test.jsonl      alpaca JSONL, the held-out test of every task (as the build converts it)
    raw/demo_corpus.txt      pt corpus: short English paragraphs about the same words, colours and numbers

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
TRAIN_PER_TASK = 900
TEST_PER_TASK = 30
CORPUS_PARAGRAPHS = 1500

# Every word and colour is one GPT-2 token with and without a leading space, so an answer is one token
# and the same token as in the prompt (lists are written one item per line).
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
    prose: str  # the same fact as a plain corpus sentence (pt stage)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.instruction, self.input)


# --- tasks: each draws one instance; the answer is computed from the drawn values ----------------------


def _lines(items: list) -> str:
    return "\n".join(map(str, items))


def _odd_one(rng: random.Random, pool: list, others: list) -> tuple[list, object]:
    """2-3 items of `others` and one of `pool`, shuffled: (the list, the one)."""
    one = rng.choice(pool)
    items = rng.sample(others, rng.randint(2, 3)) + [one]
    rng.shuffle(items)
    return items, one


def first_word(rng: random.Random) -> Example:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return Example("first_word", "What is the first word?", _lines(ws), ws[0],
                   f"In the list {' '.join(ws)}, the first word is {ws[0]}.")


def last_word(rng: random.Random) -> Example:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return Example("last_word", "What is the last word?", _lines(ws), ws[-1],
                   f"In the list {' '.join(ws)}, the last word is {ws[-1]}.")


def color_word(rng: random.Random) -> Example:
    items, one = _odd_one(rng, COLORS, WORDS)
    return Example("color_word", "Which word is a color?", _lines(items), str(one),
                   f"Of {' '.join(items)}, the color is {one}.")


def animal_word(rng: random.Random) -> Example:
    items, one = _odd_one(rng, ANIMALS, THINGS)
    return Example("animal_word", "Which word is an animal?", _lines(items), str(one),
                   f"Of {' '.join(items)}, the animal is {one}.")


def number_word(rng: random.Random) -> Example:
    items, one = _odd_one(rng, list(NUMBERS), WORDS)
    return Example("number_word", "Which word is a number?", _lines(items), str(one),
                   f"Of {' '.join(map(str, items))}, the number is {one}.")


def larger(rng: random.Random) -> Example:
    a, b = rng.sample(NUMBERS, 2)
    return Example("larger", "Which number is larger?", _lines([a, b]), str(max(a, b)),
                   f"Of {a} and {b}, the larger number is {max(a, b)}.")


def count(rng: random.Random) -> Example:
    ws = rng.sample(WORDS, rng.randint(2, 6))
    return Example("count", "How many words are there?", _lines(ws), str(len(ws)),
                   f"The list {' '.join(ws)} has {len(ws)} words.")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    f.__name__: f for f in (first_word, last_word, color_word, animal_word, number_word, larger, count)
}
# Which raw file carries each task's training instances (the test file carries all tasks).
FORMAT_OF_TASK = {
    "first_word": "alpaca", "color_word": "alpaca", "animal_word": "alpaca",
    "larger": "sharegpt", "number_word": "sharegpt",
    "count": "csv", "last_word": "csv",
}


def split_instances(seed: int = SEED, train_per_task: int = TRAIN_PER_TASK,
                    test_per_task: int = TEST_PER_TASK) -> tuple[list[Example], list[Example]]:
    """Draw unique instances per task; the test ones first, then training ones that avoid every test key."""
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for name, draw in TASKS.items():
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


# --- corpus: simple English about the same vocabulary (never a test instance) ---------------------------


def corpus_paragraphs(rng: random.Random, n: int, test_keys: set[tuple[str, str, str]],
                      skill_share: float = 0.5) -> list[str]:
    """Short paragraphs of plain sentences about the same words, colours and numbers.

    About `skill_share` of the sentences state a task instance in prose ("Of 12 and 40, the larger number
    is 40."), so pre-training meets the skills but never the instruction format; an instance whose key is
    in the held-out test is never stated. The rest are filler sentences over the same vocabulary.
    """
    draws = list(TASKS.values())
    paragraphs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            if rng.random() < skill_share:
                ex = rng.choice(draws)(rng)
                if ex.key not in test_keys:
                    sentences.append(ex.prose)
            else:
                sentences.append(_filler(rng))
        paragraphs.append(" ".join(sentences))
    return paragraphs


def _filler(rng: random.Random) -> str:
    a, b, c = rng.sample(WORDS, 3)
    col = rng.choice(COLORS)
    return rng.choice([
        f"Look at the {col} {a}. The {a} is {col}.",
        f"The {a} is next to the {b}.",
        f"A {rng.choice(ANIMALS)} and a {b} went to the {c}.",
        f"There are {rng.choice(NUMBERS)} {a}s by the {b}.",
        f"My list:\n{a}\n{b}\n{c}\nThat is all.",
    ])


# --- serialisation: one deterministic byte string per file --------------------------------------------


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _json_array(rows: list[dict]) -> str:
    """A JSON array with one row per line: diff-friendly and still one json.load."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def _alpaca_row(ex: Example) -> dict:
    return {"instruction": ex.instruction, "input": ex.input, "output": ex.output}


def _sharegpt_row(ex: Example) -> dict:
    user = ex.instruction if not ex.input else f"{ex.instruction}\n{ex.input}"
    return {"conversation": [{"speaker": "human", "text": user}, {"speaker": "bot", "text": ex.output}]}


def _csv(examples: list[Example]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["question", "context", "answer", "task"])
    for ex in examples:
        writer.writerow([ex.instruction, ex.input, ex.output, ex.task])
    return buf.getvalue()


def as_test_row(ex: Example) -> dict:
    """The Alpaca row the build produces from the example's training format (sharegpt folds input in)."""
    if FORMAT_OF_TASK[ex.task] == "sharegpt":
        user = ex.instruction if not ex.input else f"{ex.instruction}\n{ex.input}"
        return {"instruction": user, "input": "", "output": ex.output}
    return _alpaca_row(ex)


def generate(seed: int = SEED) -> dict[str, str]:
    """All raw files as {relative name: text}; a pure function of the seed."""
    train, test = split_instances(seed)
    by_format: dict[str, list[Example]] = {"alpaca": [], "sharegpt": [], "csv": []}
    for ex in train:
        by_format[FORMAT_OF_TASK[ex.task]].append(ex)
    test_keys = {ex.key for ex in test}
    corpus = corpus_paragraphs(random.Random(seed + 1), CORPUS_PARAGRAPHS, test_keys)
    return {
        "demo_alpaca.jsonl": _jsonl([_alpaca_row(ex) for ex in by_format["alpaca"]]),
        "demo_sharegpt.json": _json_array([_sharegpt_row(ex) for ex in by_format["sharegpt"]]),
        "demo_tasks.csv": _csv(by_format["csv"]),
        "demo_test.jsonl": _jsonl([as_test_row(ex) for ex in test]),
        "demo_corpus.txt": "\n\n".join(corpus) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
