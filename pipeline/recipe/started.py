"""How a run was started, as its resolved.yaml's first two lines record it: the recipe as the user typed it, and
the folder they typed it in (which that name, like the recipe's relative paths, is relative to).

One reader for every command that asks which recipe a run is: train's --retrain-finished and its refusal of a
finished run (RunLayout.finished_recipe, finished_by) and the command a message gives to train a run's adapter
again (resolve.recorded_command, through rerun.run_this). RunLayout read the first line alone, against the folder
of the command reading it: a run trained with `cd recipes && python -m pipeline train x.yaml` was not
recipes/x.yaml's to `make train` from the repository's root (and was the root's own x.yaml's, had there been one).
Both lines are comments, so a reader of the file as YAML sees neither. Files only: no YAML, no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RESOLVED_FILE = "resolved.yaml"  # in a run's output_dir: the recipe it ran, these lines first
RESULTS_FILE = "all_results.json"  # in a run's output_dir once the run finished (pipeline.runtime.log writes it)
RECIPE_LINE = "# resolved recipe: "  # resolved.yaml's first line: the recipe as the user named it
RAN_IN_LINE = "# started in: "  # its second line: the folder the run was started in


def header(recipe: object) -> list[str]:
    """resolved.yaml's first two lines for a run of `recipe` (as the user named it) started in this process's folder."""
    return [f"{RECIPE_LINE}{recipe}", f"{RAN_IN_LINE}{os.getcwd()}"]


@dataclass(frozen=True)
class Started:
    """The recipe a run names (as typed) and the folder it was typed in (None: a file written before that line)."""

    recipe: str
    folder: str | None

    def _there(self) -> Path | None:
        """The recipe under the folder it was typed in, when that folder still holds it; None for a file without
        the folder's line or a folder that holds no such recipe (a run folder copied from another machine)."""
        if self.folder is None:
            return None
        path = Path(os.path.normpath(os.path.join(self.folder, self.recipe)))
        return path if path.is_file() else None

    def path(self) -> str:
        """Where the recipe is, as a path this process can open: under the folder it was typed in (_there), else
        the name as recorded (then relative to this process's folder, as every reader took it before the line)."""
        there = self._there()
        return self.recipe if there is None else str(there)

    def named_here(self) -> str:
        """The recipe as a command typed in this process's folder names it: relative to it when inside it, else
        absolute (`cd recipes && ... x.yaml` is recipes/x.yaml from the root); as recorded where _there is None."""
        from pipeline.recipe.load import shown_here

        there = self._there()
        return self.recipe if there is None else str(shown_here(there))

    def typed_in(self) -> str | None:
        """The folder a command that runs this run again must be typed in, as a path from this process's folder,
        when it is another than this one: the recipe's relative paths (output_dir, its default saves/<name> too,
        dataset_dir, the models) are relative to it, so the recipe named from here would train another output_dir.
        None where it is this folder, or where _there is None (no record of it: the name as recorded, from here)."""
        from pipeline.recipe.load import shown_here

        if self._there() is None or os.path.realpath(str(self.folder)) == os.path.realpath(os.curdir):
            return None
        return str(shown_here(Path(str(self.folder))))

    def is_recipe(self, recipe: str | os.PathLike[str]) -> bool:
        """Whether `recipe` (a path from this process's folder) is the file this run was trained from."""
        return bool(self.recipe) and os.path.realpath(self.path()) == os.path.realpath(recipe)


def read_started(text: str) -> Started | None:
    """The Started that resolved.yaml text (its first two lines suffice) records; None when it is no resolved.yaml."""
    first, _, rest = text.partition("\n")
    if not first.startswith(RECIPE_LINE):
        return None
    second = rest.partition("\n")[0]
    folder = second.removeprefix(RAN_IN_LINE) if second.startswith(RAN_IN_LINE) else None
    return Started(first.removeprefix(RECIPE_LINE), folder or None)


def started_of(resolved: Path) -> Started | None:
    """read_started of the file at `resolved` (its first two lines only); None when it cannot be read."""
    try:
        with resolved.open(encoding="utf-8") as handle:
            head = handle.readline() + handle.readline()
    except (OSError, UnicodeDecodeError):
        return None
    return read_started(head)


def finished_start(output_dir: Path) -> Started | None:
    """How the finished run in `output_dir` (RESULTS_FILE) was started, as its resolved.yaml records it; None when no
    finished run or no record."""
    return started_of(output_dir / RESOLVED_FILE) if (output_dir / RESULTS_FILE).is_file() else None


def finished_by(output_dir: Path, recipe: str | os.PathLike[str]) -> bool:
    """Whether `output_dir` holds a finished run of `recipe` (a path from this process's folder): what train's
    --retrain-finished trains again, and so whether the command a message gives to train it carries that flag
    (pipeline.rerun.RETRAIN). A recipe that extends another inherits its output_dir, so a finished run there may be
    the other recipe's."""
    started = finished_start(output_dir)
    return started is not None and started.is_recipe(recipe)
