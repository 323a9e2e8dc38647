"""Registry entries with `hf_hub_url`: the dataset repository's data files, through the Hugging Face cache.

The files are fetched with huggingface_hub into the standard cache (HF_HOME / HF_HUB_CACHE), exactly
where `hf download --repo-type dataset` puts them, and then read like local files (so every
problem still names a file and line). With HF_HUB_OFFLINE=1 only the cache is used. Which files belong
to the entry's `subset`, `split` and `folder` follows the hub's conventions: the `configs:` of the
repository's README.md front matter when it has them, else split names in file and folder names
(train-00000-of-00001.parquet, data/validation.jsonl, en/test.json) - files that name no split are train.
No dataset script is ever run.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Callable

from pipeline.data.args import DataArgs, rebuild

DATA_EXTS = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
# The hub's split keywords (as in the datasets library's data-files conventions).
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_files(entry: dict[str, Any], add: Callable[[tuple, str], None],
              data: DataArgs | None = None) -> tuple[list[Path], list[str]]:
    """(files, how each is shown) of a hub entry, downloading into the cache unless offline; problems via `add`,
    an offline one naming the build of `data`'s recipe with the download allowed (None: no recipe at hand)."""
    repo = entry["hf_hub_url"]
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        add(("hf_hub_url",), "reading hub datasets needs huggingface_hub (pip install -r requirements.txt)")
        return [], []
    snapshot = _snapshot(repo, entry, add, data)
    if snapshot is None:
        return [], []
    relative = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                      if p.is_file() and p.suffix.lower() in DATA_EXTS)
    chosen = select(relative, read_configs(snapshot), entry)
    if not chosen:
        what = ", ".join(f"{k} {entry[k]!r}" for k in ("subset", "split", "folder") if k in entry) or "split 'train'"
        add(("hf_hub_url",), f"the cached copy of dataset '{repo}' ({snapshot}) has no data files for {what}"
                             f"{'' if not relative else '; it has: ' + ', '.join(relative[:8])}")
        return [], []
    files = [snapshot / c for c in chosen]
    return files, [os.path.normpath(str(f)) for f in files]


def _snapshot(repo: str, entry: dict[str, Any], add: Callable[[tuple, str], None],
              data: DataArgs | None) -> Path | None:
    """The local snapshot folder of the repository, downloaded when online; None (and a problem) otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [f"*{ext}" for ext in DATA_EXTS] + ["README.md"]
    if entry.get("folder"):
        patterns = [f"{entry['folder'].strip('/')}/*{ext}" for ext in DATA_EXTS] + \
                   [f"{entry['folder'].strip('/')}/**/*{ext}" for ext in DATA_EXTS] + ["README.md"]
    get = f"{rebuild(data, env=('HF_HUB_OFFLINE=0',))} (or: hf download --repo-type dataset {repo})"
    try:
        path = snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns,
                                 local_files_only=offline())
    except (LocalEntryNotFoundError, FileNotFoundError):
        if offline():
            add(("hf_hub_url",), f"dataset '{repo}' is not in the Hugging Face cache ({cache_dir()}) and "
                                 f"HF_HUB_OFFLINE=1 forbids downloading it; on a machine with network run: {get}")
        else:
            add(("hf_hub_url",), f"dataset '{repo}' could not be downloaded (no connection to the hub?) and is "
                                 f"not in the cache ({cache_dir()}); run again with network (or: hf "
                                 f"download --repo-type dataset {repo}), or set file_name to a local copy")
        return None
    except RepositoryNotFoundError:
        add(("hf_hub_url",), f"no dataset repository '{repo}' on the Hugging Face hub (or it is private: log in "
                             "with `hf auth login`)")
        return None
    except (HfHubHTTPError, OSError) as err:
        add(("hf_hub_url",), f"downloading dataset '{repo}' failed: {err}")
        return None
    return Path(path)


def read_configs(snapshot: Path) -> list[dict[str, Any]]:
    """The `configs:` list of the repository's README.md YAML front matter ([] when absent or unreadable)."""
    readme = snapshot / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return []
    import yaml

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _patterns(data_files: Any, split: str) -> list[str] | None:
    """The path patterns of `split` in a config's data_files (None when the config does not list that split)."""
    if isinstance(data_files, str):
        return [data_files] if split == "train" else None
    if isinstance(data_files, list):
        if all(isinstance(d, str) for d in data_files):
            return list(data_files) if split == "train" else None
        for item in data_files:
            if isinstance(item, dict) and item.get("split") == split:
                path = item.get("path")
                return [path] if isinstance(path, str) else [p for p in path or [] if isinstance(p, str)]
    if isinstance(data_files, dict) and split in data_files:
        value = data_files[split]
        return [value] if isinstance(value, str) else list(value)
    return None


def _split_of(path: str) -> str | None:
    """The split a file's path names (by the hub's keywords), or None."""
    pieces = [p for p in re.split(r"[/_.\-]", path.lower()) if p]
    for split, words in SPLIT_WORDS.items():
        if any(word in pieces for word in words):
            return split
    return None


def select(paths: list[str], configs: list[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """The data files (relative paths in the repository) of the entry's subset, split and folder."""
    subset, split, folder = entry.get("subset"), entry.get("split", "train"), entry.get("folder")
    if folder:
        prefix = folder.strip("/") + "/"
        paths = [p for p in paths if p.startswith(prefix)]
    if configs and not folder:
        wanted = subset or next((c.get("config_name") for c in configs if c.get("default")), None) \
            or configs[0].get("config_name")
        config = next((c for c in configs if c.get("config_name") == wanted), None)
        if config is not None:
            patterns = _patterns(config.get("data_files"), split)
            if patterns is None:
                return []
            return [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    if subset:
        paths = [p for p in paths if subset in p.split("/")[:-1]]
    named = {p: _split_of(p) for p in paths}
    if any(named.values()):
        return [p for p in paths if named[p] == split]
    return paths if split == "train" else []
