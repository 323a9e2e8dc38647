"""What a command may empty or replace: never the user's inputs, never the places around the user.

Why a module of its own: two commands remove a folder as a whole. `train` with `overwrite_output_dir` empties
output_dir, and `merge` / `export` replace export_dir (an atomic swap: whatever was there is deleted). Pointed at
the wrong folder by a typo or a copied recipe, either one deleted the base model, the data, the recipe, other runs
or the project itself, and said nothing. Both now ask `refuse_to_clear` first, which raises one exit-2 message
naming what the folder holds, before anything is read or written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.errors import UserError
from pipeline.runtime.layout import RunLayout

# recipe keys that name inputs on disk (a preset or a hub id names none)
INPUT_KEYS = ("model_name_or_path", "adapter_name_or_path", "tokenizer_name_or_path", "ref_model", "ref_model_adapters",
              "reward_model", "dataset_dir")
MULTI_INPUT_KEYS = ("ref_model_adapters",)  # a comma string of folders: each is protected


def protected(inputs: Mapping[str, Any], files: Iterable[str] = ()) -> dict[str, Path]:
    """What must survive, by the name a message gives it: the inputs that exist on disk (the recipe's INPUT_KEYS
    and whatever else the command reads, by name), the recipe's files, the working and the home directory."""
    from pipeline.names import split_names

    named: dict[str, Path] = {}
    for key, value in inputs.items():
        paths = split_names(value) if key in MULTI_INPUT_KEYS else [value] if value else []
        for i, path in enumerate(paths):
            if Path(str(path)).exists():
                named[key if i == 0 else f"{key} ({path})"] = Path(str(path)).resolve()
    for file in files:
        named[f"the recipe {file}"] = Path(file).resolve()
    named["the working directory"] = Path.cwd().resolve()
    named["the home directory"] = Path.home().resolve()
    return named


def holder(target: Path, named: Mapping[str, Path]) -> str | None:
    """The first protected thing `target` is, or holds; None when clearing it touches none of them."""
    target = target.resolve()
    for name, path in named.items():
        if path == target or target in path.parents:
            return name
    if (target / ".git").exists():
        return "a git checkout"
    return None


def refuse_to_clear(target: Path, at: str, key: str, named: Mapping[str, Path], *,
                    ours: str | None = None) -> None:
    """UserError unless `target` may be emptied or replaced: it must not be a file, must not be or hold a protected
    path, and (with `ours`, the file every folder this command writes holds) must be new, empty or one of ours."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{at}: {target} is a file, not a directory; choose another {key}")
    what = holder(target, named)
    if what is not None:
        is_it = target.resolve() == named.get(what)
        raise UserError(f"{at}: {target} {'is' if is_it else 'holds'} {what}, which this command would delete "
                        f"({key} is emptied or replaced as a whole); choose a dedicated folder such as "
                        f"saves/<name>{'/merged' if ours else ''}")
    entries = sorted(target.iterdir()) if target.is_dir() else []
    runs = [p.name for p in entries if RunLayout(p).resolved_yaml.is_file()]
    if runs:
        raise UserError(f"{at}: {target} holds other training runs ({', '.join(runs[:6])}), which this command "
                        f"would delete ({key} is emptied or replaced as a whole); choose a folder of its own such as "
                        f"{target / 'new_run'}")
    names = [p.name for p in entries]
    if ours and names and ours not in names:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise UserError(f"{at}: {target} already holds other files ({shown}) and no {ours}, so it is not a "
                        f"model this pipeline exported; {key} is replaced as a whole. Choose a new or empty folder")
