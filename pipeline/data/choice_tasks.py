"""The multiple-choice benchmarks' task folders (MMLU, C-Eval, CMMLU), read the way LLaMA-Factory 0.9.5 reads them.

LLaMA-Factory's Evaluator (llamafactory/eval/evaluator.py:83-104) resolves `task: mmlu_test` to the folder
`task_dir/mmlu`, its `mapping.json` (subject -> {"name", "category"}) and, per subject, `datasets.load_dataset` of the
folder's loading script, which reads the CSVs inside `mmlu.zip`. That script is remote code and never runs here: the
three layouts it knows are re-typed below (LLaMA-Factory's evaluation/{mmlu,ceval,cmmlu}/*.py, git a0d44c650^), and
the CSVs are read with pandas straight out of the zip (nothing is extracted) or from the same layout already
extracted into the folder. A cell becomes text as `datasets` stores it under the scripts' Value("string") features
(pyarrow's cast: 4.0 -> "4", a number column's empty cell -> "nan", a text column's -> None, which the prompt shows
as "None", as LLaMA-Factory's str.format does).

The few-shot examples are drawn as LLaMA-Factory draws them (evaluator.py:108-110): for every row of the evaluated
split, `dataset["train"].shuffle().select(range(min(n_shot, len(train))))`, each seedless shuffle seeded from numpy's
global state after `transformers.set_seed(seed)` (ShotDraws re-types datasets' Dataset.shuffle, on a private
RandomState so that nothing else's numpy draws move it).

It sits in the data layer, below the recipe layer and the stages, so that one reading serves all of them: eval
(pipeline.evaluate.choice) scores the questions, validate and plan check and describe the folder without loading a
model, and deps (pipeline.recipe.deps) names the folder's files for make through parse_task, the one rule for what a
task name means. Importing it imports neither numpy nor pandas (deps runs on every make).
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.errors import UserError

CHOICES = ("A", "B", "C", "D")  # llamafactory/extras/constants.py:35
# llamafactory/extras/constants.py:100: the score table's lines, in this order; a subject's category must be one of the
# last four (LLaMA-Factory fails with a KeyError on another)
CATEGORIES = ("Average", "STEM", "Social Sciences", "Humanities", "Other")
SPLITS = ("test", "validation", "train")  # datasets' split names, as `task: <name>_<split>` spells them
DEV = "train"  # the split the shots come from (the CSVs of the dev/ folder)


@dataclass(frozen=True)
class EvalTemplate:
    """llamafactory/eval/template.py:21-50: a question and its options as one user turn, the answer letter as the
    assistant's; the first user turn opens with the system line about the subject."""

    system: str
    choice: str
    answer: str

    def parse(self, row: Mapping[str, Any]) -> tuple[str, str]:
        candidates = [self.choice.format(choice=ch, content=row[ch]) for ch in CHOICES if ch in row]
        return "".join([row["question"], *candidates, self.answer]), row["answer"]

    def messages(self, target: Mapping[str, Any], shots: Sequence[Mapping[str, Any]],
                 subject_name: str) -> list[tuple[str, str]]:
        """(user, assistant) turns: the shots, then the target (its answer is the label, never part of the prompt)."""
        turns = [self.parse(row) for row in [*shots, target]]
        turns[0] = (self.system.format(subject=subject_name) + turns[0][0], turns[0][1])
        return turns


EVAL_TEMPLATES = {  # llamafactory/eval/template.py:66-79
    "en": EvalTemplate(system="The following are multiple choice questions (with answers) about {subject}.\n\n",
                       choice="\n{choice}. {content}", answer="\nAnswer:"),
    "zh": EvalTemplate(system="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                       choice="\n{choice}. {content}", answer="\n答案："),
}


@dataclass(frozen=True)
class Layout:
    """Where a task's loading script finds a subject's CSV of each split, and how it reads it."""

    name: str
    files: Mapping[str, str]  # split -> path inside the archive, {s} the subject
    header: bool  # a header row names the columns (else MMLU's six unnamed ones)
    question: str = "question"
    answer: str = "answer"
    index_col: bool = False  # CMMLU's first column is the row number


LAYOUTS = (  # evaluation/mmlu/mmlu.py:131-163, ceval/ceval.py, cmmlu/cmmlu.py (git a0d44c650^)
    Layout("MMLU", {"test": "data/test/{s}_test.csv", "validation": "data/val/{s}_val.csv",
                    "train": "data/dev/{s}_dev.csv"}, header=False),
    Layout("C-Eval", {"test": "test/{s}_test.csv", "validation": "val/{s}_val.csv", "train": "dev/{s}_dev.csv"},
           header=True),
    Layout("CMMLU", {"test": "test/{s}.csv", "train": "dev/{s}.csv"}, header=True, question="Question",
           answer="Answer", index_col=True),
)
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


@dataclass(frozen=True)
class Subject:
    key: str  # mapping.json's key: the files' names
    name: str  # what the system line says
    category: str
    rows: list[dict[str, Any]]  # the evaluated split
    dev: list[dict[str, Any]]  # the shots' pool
    where: str  # the evaluated split's file, for messages


@dataclass(frozen=True)
class Task:
    name: str
    split: str
    folder: Path
    layout: Layout
    subjects: list[Subject]


def parse_task(task: str) -> tuple[str, str]:
    """`mmlu_test` -> ("mmlu", "test"), LLaMA-Factory's task.split("_")[0] and [1] (evaluator.py:80-81)."""
    parts = task.split("_")
    if len(parts) != 2 or not all(parts) or parts[1] not in SPLITS:
        raise ValueError(f"given {task!r}, expected <folder>_<split> with split one of {', '.join(SPLITS)} "
                         "(mmlu_test, ceval_validation, cmmlu_test)")
    return parts[0], parts[1]


def read_task(task: str, task_dir: str | Path, n_shot: int, where: str = "task") -> Task:
    """Every subject of mapping.json with its evaluated rows and dev rows; a UserError naming the file for what is
    missing or malformed, or `where` (the recipe's task line) for a folder or split the task names but lacks."""
    name, split = parse_task(task)
    folder = Path(task_dir) / name
    if not folder.is_dir():
        raise UserError(f"{where}: {task}: no folder {folder} (task_dir {task_dir!s} + the task's name {name!r}); "
                        f"expected LLaMA-Factory's evaluation/{name}/ with mapping.json and {name}.zip, e.g. copied "
                        "from LLaMA-Factory's repository, and task_dir naming the folder that holds it")
    mapping = _read_mapping(folder / "mapping.json")
    with _Archive(folder, name) as archive:
        layout = archive.layout(next(iter(mapping)))
        if split not in layout.files:
            raise UserError(f"{where}: {task}: {layout.name} has no {split} split (LLaMA-Factory's loading script gives "
                            f"{', '.join(layout.files)}); use {name}_{next(iter(layout.files))}")
        subjects = []
        for key, info in mapping.items():
            dev = archive.rows(layout, DEV, key, need_answers=n_shot > 0)
            rows = archive.rows(layout, split, key, need_answers=True)
            if n_shot > len(dev):
                raise UserError(f"{archive.where(layout, DEV, key)}: n_shot is {n_shot} but subject {key!r} has "
                                f"{len(dev)} dev rows; LLaMA-Factory then uses all {len(dev)} without a word "
                                f"(min(n_shot, rows)). Set n_shot: {len(dev)} for the same prompts, or add dev rows")
            subjects.append(Subject(key, info["name"], info["category"], rows, dev, archive.where(layout, split, key)))
    return Task(name, split, folder, layout, subjects)


def _read_mapping(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: not found; a task folder holds mapping.json, {{subject: {{\"name\": ..., "
                        f"\"category\": ...}}}}, as LLaMA-Factory's evaluation/mmlu/mapping.json")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{path}: expected a non-empty mapping of subject -> {{\"name\", \"category\"}}")
    for key, info in mapping.items():
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise UserError(f"{path}: subject {key!r}: given {info!r}, expected {{\"name\": text, \"category\": one "
                            f"of {', '.join(CATEGORIES[1:])}}}")
        if info.get("category") not in CATEGORIES[1:]:
            raise UserError(f"{path}: subject {key!r}: category {info.get('category')!r}, expected one of "
                            f"{', '.join(CATEGORIES[1:])} (LLaMA-Factory's SUBJECTS; it fails on another)")
    return mapping


class _Archive:
    """`<name>.zip` in the task folder, read member by member (never extracted), or the same files extracted there."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.zip_path = folder / f"{name}.zip"
        self.zip: zipfile.ZipFile | None = None

    def __enter__(self) -> "_Archive":
        if self.zip_path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.zip_path)
            except zipfile.BadZipFile as err:
                raise UserError(f"{self.zip_path}: not a zip archive ({err})") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.zip is not None:
            self.zip.close()

    def _has(self, member: str) -> bool:
        if self.zip is not None:
            return member in self.zip.NameToInfo
        return (self.folder / member).is_file()

    def where(self, layout: Layout, split: str, subject: str) -> str:
        member = layout.files[split].format(s=subject)
        return f"{self.zip_path}:{member}" if self.zip is not None else str(self.folder / member)

    def layout(self, subject: str) -> Layout:
        """The layout whose dev file of the first subject is there."""
        for layout in LAYOUTS:
            if self._has(layout.files[DEV].format(s=subject)):
                return layout
        source = self.zip_path if self.zip is not None else self.folder
        expected = ", ".join(f"{x.files[DEV].format(s=subject)} ({x.name})" for x in LAYOUTS)
        raise UserError(f"{source}: no dev file of subject {subject!r} (the first of mapping.json); expected one of "
                        f"{expected}{'' if self.zip is not None else f', or {self.zip_path.name} holding it'}")

    def rows(self, layout: Layout, split: str, subject: str, need_answers: bool) -> list[dict[str, Any]]:
        where = self.where(layout, split, subject)
        member = layout.files[split].format(s=subject)
        if not self._has(member):
            raise UserError(f"{where}: not found: mapping.json lists subject {subject!r}, and {layout.name}'s "
                            f"{split} split of it is this file")
        data = self.zip.read(member) if self.zip is not None else (self.folder / member).read_bytes()
        return _table(data, layout, where, need_answers)


def _table(data: bytes, layout: Layout, where: str, need_answers: bool) -> list[dict[str, Any]]:
    """The rows as the loading script yields them: question, A-D, answer (text or None)."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.BytesIO(data), header=0 if layout.header else None, index_col=0 if layout.index_col
                            else None, encoding="utf-8")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise UserError(f"{where}: not a readable CSV ({err})") from None
    if not layout.header:
        if frame.shape[1] != len(MMLU_COLUMNS):
            raise UserError(f"{where}: {frame.shape[1]} columns, expected {len(MMLU_COLUMNS)} without a header "
                            f"({', '.join(MMLU_COLUMNS)}), MMLU's layout")
        frame.columns = MMLU_COLUMNS
    missing = [c for c in CHOICES if c not in frame.columns]
    if missing:
        raise UserError(f"{where}: no column {', '.join(missing)}; the header is {', '.join(map(str, frame.columns))}"
                        f", expected {layout.question}, A, B, C, D, {layout.answer} ({layout.name}'s layout)")
    # a missing question / answer column is "" in C-Eval's and CMMLU's scripts (C-Eval's test split has no answers)
    columns = {out: _texts(frame[col].tolist()) if col in frame.columns else [""] * len(frame)
               for out, col in (("question", layout.question), *((c, c) for c in CHOICES), ("answer", layout.answer))}
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(frame))]
    for i, row in enumerate(rows):
        line = i + 1 + layout.header  # the CSV's line (a cell with a line break makes it later)
        if row["question"] is None:
            raise UserError(f"{where}: row {i} (line {line}): the question is empty (LLaMA-Factory fails there with "
                            "a TypeError)")
        if need_answers and row["answer"] not in CHOICES:
            given = "no answer" if row["answer"] in (None, "") else f"answer {row['answer']!r}"
            hint = (" C-Eval's test split has no answers (they are withheld): evaluate ceval_validation, as "
                    "LLaMA-Factory's example does" if layout.name == "C-Eval" and row["answer"] == "" else "")
            raise UserError(f"{where}: row {i} (line {line}): {given}, expected one of {', '.join(CHOICES)} "
                            f"(LLaMA-Factory would score the row wrong whatever is predicted).{hint}")
    return rows


def _texts(values: list[Any]) -> list[str | None]:
    """One column as `datasets` stores it under a Value("string") feature: pyarrow infers the column's type, then
    casts it to text; a text column with empty cells (NaN among strings) keeps them as None."""
    import pyarrow as pa

    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        array = pa.array(values, type=pa.string(), from_pandas=True)
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    return array.to_pylist()


class ShotDraws:
    """`dataset["train"].shuffle()` without a seed, after transformers.set_seed(seed): datasets 5.2.0's
    Dataset.shuffle (arrow_dataset.py, `if generator is None: if seed is None:`) takes the seed word numpy's legacy
    MT19937 is at, `seed[pos] if pos < 624 else seed[0]`, steps the global generator once (np.random.random()), and
    permutes with np.random.default_rng(that seed). An empty split returns before drawing."""

    def __init__(self, seed: int):
        import numpy as np

        self.state = np.random.RandomState(seed)  # np.random.seed(seed), as transformers.set_seed does

    def permutation(self, n: int) -> list[int]:
        import numpy as np

        if n == 0:
            return []
        _, words, pos, *_ = self.state.get_state()
        seed = words[pos] if pos < 624 else words[0]
        self.state.random_sample()
        return np.random.default_rng(seed).permutation(n).tolist()

    def shots(self, dev: Sequence[Mapping[str, Any]], n_shot: int) -> list[Mapping[str, Any]]:
        order = self.permutation(len(dev))
        return [dev[i] for i in order[:min(n_shot, len(dev))]]
