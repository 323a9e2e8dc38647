"""Hub ids (`Qwen/Qwen3-0.6B`) -> a local snapshot directory in the standard Hugging Face cache.

`resolve_model_path` is where model_name_or_path and adapter_name_or_path become directories. An
existing path is returned as it is; an `org/name` id goes through huggingface_hub's snapshot_download,
fetching only what the pipeline reads (configs, safetensors weights, tokenizer files: never pickles,
never code), into the cache every Hugging Face tool shares (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub; layout `models--Org--Name/{refs/main, snapshots/<commit>/...}`).
With HF_HUB_OFFLINE=1 only the cache is read: a cached snapshot works with no network, a missing one
is one exit-2 message that says what to run on a machine with network.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import UserError, did_you_mean
from pipeline.model.safetensors_header import INDEX, SINGLE, index_shards
from pipeline.names import ADAPTER_WEIGHTS, V_HEAD_WEIGHTS

# What a model or adapter snapshot needs, by name: configs, tokenizer files, and the safetensors weights the loaders
# read (never *.bin / *.pt pickles, never code). The weights as transformers picks them (transformers/utils/__init__.py
# SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME; PEFT's adapter_model.safetensors; LLaMA-Factory's value_head.safetensors
# beside a reward model), as safetensors_header.shard_files reads them: model.safetensors, else the shards the index
# lists, fetched by name once the index is here (index_shards). Never "*.safetensors": the hub's Mistral-7B-v0.3
# also holds consolidated.safetensors, the same 14.5 GB in Mistral's own names, which nothing here reads.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json", SINGLE, INDEX, ADAPTER_WEIGHTS, V_HEAD_WEIGHTS,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "original/tokenizer.model", "adapter_config.json",
]
# The shards' names as transformers' save_pretrained writes them (model-00001-of-00003.safetensors): what the `hf
# download` line the messages suggest takes for them, where it cannot read the index first
SHARD_PATTERN = "model-*-of-*.safetensors"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str) -> bool:
    """`org/name` that is not an existing path (a local directory always wins)."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).exists() and ".." not in name


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The hub cache, read from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The `hf download` line that fetches what the pipeline reads. One --include per pattern: `hf` takes a single
    value per --include, so `--include 'a' 'b'` made 'b' a file name, and with file names given hf ignores --include
    ('a', config.json, was never downloaded)."""
    include = " ".join(f"--include '{p}'" for p in (*ALLOW_PATTERNS, SHARD_PATTERN))
    rev = f" --revision {revision}" if revision and revision != "main" else ""
    return f"hf download {repo_id}{rev} {include}"


# First folders that name a place on this machine even before they exist: saves/, where runs write, and models/, where
# docs/training.md and the example recipes (recipes/examples/gpt2_*.yaml: models/gpt2) put downloaded checkpoints
# (and no hub namespace: huggingface.co/models is the hub's list of models)
LOCAL_FOLDERS = ("saves", "models")


def local_only(name: str) -> bool:
    """Whether a name shaped like a hub id is under one of LOCAL_FOLDERS (`saves/sft`, `models/gpt2`): a path on this
    machine and nothing else, so the hub is never asked for it (a network call, or a long wait offline, to end in a
    message that offers `hf download models/gpt2`)."""
    return name.split("/", 1)[0] in LOCAL_FOLDERS


def looks_local(name: str) -> bool:
    """Whether a name shaped like a hub id (`saves/sft`) reads as a local path: its first part is a folder here, or
    one of LOCAL_FOLDERS. Such a name that is neither here nor cached is first of all a missing folder (a run not
    trained yet, a checkpoint not downloaded yet, a typo), and only then perhaps a hub id (`Qwen/...` beside a Qwen/
    folder): the message says so in that order; under LOCAL_FOLDERS (local_only) it is a missing folder alone."""
    return local_only(name) or os.path.isdir(name.split("/", 1)[0])


def missing_here(name: str, writer: str = "") -> str:
    """`directory 'saves/sft' does not exist here` and what to do: `writer` (the recipe layer's ` (recipes/x.yaml
    writes it: ...)`), else the generic advice. How every message about a local path that is not there starts."""
    return f"directory '{name}' does not exist here{writer or '; if another recipe produces it, run that one first'}"


def resolve_model_path(name_or_path: str | Path, revision: str | None = None, key: str = "model_name_or_path",
                       download: bool = True, writer: str = "") -> Path:
    """A local directory for a path or hub id; hub ids are fetched (or, offline or with download=False,
    found) in the HF cache. A hub-id-shaped name under saves/ or models/ that is not there (local_only) is a
    missing local folder, the hub not asked; one found nowhere that otherwise looks local (looks_local), or that
    `writer` (the recipe layer's ` (recipes/x.yaml writes it ...)`) says a recipe writes, is reported as a missing
    local folder first, the hub as the second possibility."""
    name = str(name_or_path)
    if not is_hub_id(name):
        path = Path(name).expanduser()
        _refuse_cache_folder(path, key)
        return path
    if local_only(name):  # saves/sft not trained yet, models/gpt2 not downloaded yet: no hub id, the hub not asked
        raise UserError(f"{key}: {missing_here(name, writer)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = cache_dir()
    local = offline() or not download
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=where, allow_patterns=ALLOW_PATTERNS,
                                   local_files_only=local)
        shards = [] if local else _index_shards(Path(folder))
        if shards:  # the same commit as the first call (its snapshot folder's name), so a push in between is no matter
            folder = snapshot_download(name, revision=Path(folder).name, cache_dir=where, allow_patterns=shards)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise UserError(_local_first(name, key, writer, f"'{name}' is not a hub repository this machine may read "
                                     f"({type(err).__name__}); check the id, or log in with `hf auth login` for "
                                     "gated models")) from None
    except RevisionNotFoundError:
        raise UserError(f"{key}: '{name}' has no revision '{revision}'") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        state = ("HF_HUB_OFFLINE=1 and it is not" if offline() else "it is not" if not download
                 else "the hub is unreachable and it is not")
        raise UserError(_local_first(name, key, writer, f"'{name}' is neither a local directory nor a cached hub "
                                     f"snapshot ({state} in {where}){cached_suggestion(name, where)}; on a machine "
                                     f"with network run `{download_command(name, revision)}` (with HF_HOME "
                                     f"pointing at the same cache), or set {key} to a local checkpoint directory "
                                     f"[{type(err).__name__}]")) from None
    path = Path(folder)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{key}: the snapshot of '{name}' at {path} has no config.json or adapter_config.json; "
                        f"fetch it with `{download_command(name, revision)}`")
    return path


def _index_shards(snapshot: Path) -> list[str]:
    """The shard files a snapshot's model.safetensors.index.json lists, where the snapshot has no model.safetensors
    (which transformers, and shard_files, read first): what the second download fetches by name. [] when the index
    is absent or unreadable (shard_files says what is wrong with it when the weights are read)."""
    if (snapshot / SINGLE).is_file() or not (snapshot / INDEX).is_file():
        return []
    try:
        return index_shards(snapshot / INDEX)
    except UserError:
        return []


def _local_first(name: str, key: str, writer: str, hub: str) -> str:
    """`{key}: {hub}` for a hub id; for a name the user meant locally (looks_local, or a recipe writes it), the
    missing folder first and the hub's message only as the second possibility."""
    if not (writer or looks_local(name)):
        return f"{key}: {hub}"
    return f"{key}: {missing_here(name, writer)}; only if '{name}' is meant as a hub id: {hub}"


def cached_ids(where: Path) -> list[str]:
    """The model ids with a folder in the hub cache (`models--Org--Name` -> `Org/Name`)."""
    try:
        names = [p.name for p in where.iterdir() if p.name.startswith("models--")]
    except OSError:
        return []
    return sorted(_repo_id(n) for n in names)


def _repo_id(folder: str) -> str:
    """The id a cache folder is named after: `models--Org--Name` -> `Org/Name`."""
    return folder[len("models--"):].replace("--", "/", 1)


def cached_suggestion(name: str, where: Path) -> str:
    """A did-you-mean over what is cached: hub ids are case-insensitive online, but the cache is not, so
    `qwen/qwen3-0.6b` misses a cached `Qwen/Qwen3-0.6B` offline."""
    hint = did_you_mean(name, cached_ids(where))
    return hint.replace("?)", "? it is cached)") if hint else ""


def _refuse_cache_folder(path: Path, key: str) -> None:
    """A hub cache's repository folder (`.../hub/models--Org--Name`) holds snapshots, not a checkpoint:
    name the id or the snapshot to use instead of failing later on a missing config.json."""
    if not path.name.startswith("models--") or not (path / "snapshots").is_dir() or (path / "config.json").exists():
        return
    repo_id = _repo_id(path.name)
    try:
        commit = (path / "refs" / "main").read_text("utf-8").strip()
    except OSError:
        commit = ""
    snapshot = path / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
        snapshot = snapshots[-1] if len(snapshots) == 1 else None
    use = f"set it to the hub id '{repo_id}'"
    if path.parent.resolve() != cache_dir().resolve():
        use += f" with HF_HUB_CACHE={path.parent}"
    if snapshot is not None:
        use += f", or to its snapshot {snapshot}"
    raise UserError(f"{key}: {path} is a Hugging Face cache folder (it holds snapshots/, not a checkpoint); {use}")
