"""The online hub path, without network: HF_ENDPOINT points at a tiny hub on 127.0.0.1 (tests/helpers/fake_hub.py)
that answers the endpoints huggingface_hub's snapshot_download calls. `python -m pipeline` then downloads a
model id and an hf_hub_url dataset as it would from huggingface.co: only the allowed files (config, safetensors
weights, tokenizer; data files and README), into the standard cache layout, and the run goes on from them."""
from __future__ import annotations

import json
from pathlib import Path

from tests.acceptance.harness import cli_env, pipeline, write_hf_checkpoint
from tests.helpers.fake_hub import COMMIT, FakeHub

# Files a hub repository may also hold that the pipeline must never fetch: pickles, code, optimizer state.
NEVER = {"pytorch_model.bin": b"\x80\x04pickle", "modeling_evil.py": b"raise SystemExit('remote code ran')\n",
         "optimizer.pt": b"\x80\x04pickle", "README.md": b"# a tiny model\n"}


def online_env(hub: FakeHub, home: Path) -> dict[str, str]:
    return cli_env(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_HOME=str(home),
                   HF_HUB_DISABLE_TELEMETRY="1")


def snapshot_files(root: Path) -> dict[str, Path]:
    """Files of a cached snapshot (relative path -> where the link points)."""
    snap = root / "snapshots" / COMMIT
    return {p.relative_to(snap).as_posix(): p for p in snap.rglob("*") if p.is_file()}


def assert_cache_layout(root: Path) -> None:
    """refs/main names the commit; every snapshot file is a link to blobs/<sha256 of its bytes>."""
    import hashlib

    assert (root / "refs" / "main").read_text() == COMMIT
    for path in snapshot_files(root).values():
        assert path.is_symlink()
        blob = path.resolve()
        assert blob.parent == (root / "blobs").resolve()
        assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_a_hub_model_id_downloads_only_what_it_needs_and_trains(tmp_path):
    import peft
    import transformers

    source = tmp_path / "src"
    write_hf_checkpoint(source)
    (source / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # current transformers' own file
    files = {p.name: p.read_bytes() for p in source.iterdir()} | NEVER
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(12)]
    (data / "raw" / "qa.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "raw/qa.json"}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: org/tiny-gpt2\ndataset: qa\ndataset_dir: data\ntemplate: alpaca\n"
                      "cutoff_len: 64\nmax_steps: 1\nlora_rank: 2\noutput_dir: out\nplot_loss: false\n")
    home = tmp_path / "hf"
    with FakeHub({("model", "org/tiny-gpt2"): files}) as hub:
        pipeline("train", recipe, "overwrite_cache=true", cwd=tmp_path, env=online_env(hub, home))  # builds too
        wanted = {"config.json", "model.safetensors", "chat_template.jinja"} | ({"generation_config.json"} & set(files))
        assert hub.downloaded("model", "org/tiny-gpt2") == wanted  # allow_patterns: no pickles, no code
    root = home / "hub" / "models--org--tiny-gpt2"
    assert set(snapshot_files(root)) == wanted
    assert_cache_layout(root)
    # the run trained from the downloaded snapshot: PEFT loads our adapter on transformers' load of it
    snapshot = root / "snapshots" / COMMIT
    tuned = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(snapshot),
                                           tmp_path / "out" / "adapter")
    assert any("lora" in name for name, _ in tuned.named_parameters())
    # LLaMA-Factory's merge_lora recipe with the adapter named by its hub id: export downloads and folds it in
    adapter = {p.name: p.read_bytes() for p in (tmp_path / "out" / "adapter").iterdir()}
    merge = tmp_path / "merge.yaml"
    merge.write_text("model_name_or_path: org/tiny-gpt2\nadapter_name_or_path: org/tiny-lora\ntemplate: alpaca\n"
                     "export_dir: exported\n")
    with FakeHub({("model", "org/tiny-gpt2"): files, ("model", "org/tiny-lora"): adapter}) as hub:
        pipeline("export", merge, cwd=tmp_path, env=online_env(hub, home))
    verification = json.loads((tmp_path / "exported" / "verification.json").read_text())
    assert verification["source"] == str(home / "hub" / "models--org--tiny-lora" / "snapshots" / COMMIT)
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_an_hf_hub_url_dataset_downloads_its_data_files_into_the_cache(tmp_path):
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four", "five")]
    files = {"data/train-00000-of-00001.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
             "README.md": b"---\nlicense: mit\n---\n# qa\n", "qa.py": b"raise SystemExit('loading script ran')\n",
             "weights.bin": b"\x80\x04pickle"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"qa": {"hf_hub_url": "org/qa"}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: tiny\ndataset: qa\ndataset_dir: data\nval_size: 0.2\n")
    home = tmp_path / "hf"
    with FakeHub({("dataset", "org/qa"): files}) as hub:
        done = pipeline("build", recipe, cwd=tmp_path, env=online_env(hub, home))
        assert hub.downloaded("dataset", "org/qa") == {"data/train-00000-of-00001.jsonl", "README.md"}
    assert "qa: built data/build/qa" in done.stdout
    built = [r for s in ("train", "val") for r in json.loads((data / "build" / "qa" / f"{s}.json").read_text())]
    assert sorted(r["output"] for r in built) == sorted(r["output"] for r in rows)
    root = home / "hub" / "datasets--org--qa"
    assert set(snapshot_files(root)) == {"data/train-00000-of-00001.jsonl", "README.md"}
    assert_cache_layout(root)


def test_a_mistral_layout_downloads_the_shards_the_index_lists_and_no_decoy(tmp_path):
    """The hub's Mistral-7B-v0.3 holds its weights twice: transformers' shards + index, and consolidated.safetensors
    (Mistral's own names, 14.5 GB more) with params.json and tokenizer.model.v3 for mistral-inference. A hub id
    downloads what transformers loads (model.safetensors, else the shards the index lists: SAFE_WEIGHTS_NAME /
    SAFE_WEIGHTS_INDEX_NAME) and the tokenizer files: never the decoys (nor pickles), and `generate` runs on it."""
    from tests.acceptance.harness import write_hf_checkpoint
    from tests.helpers.hub_layout import MISTRAL_DECOYS, add_mistral_decoys, save_sharded

    source = tmp_path / "src"
    model = write_hf_checkpoint(source, "mistral", small_vocab=True, sliding_window=None)  # v0.3: none
    shards = save_sharded(model, source)
    add_mistral_decoys(source, model.config)
    files = {p.name: p.read_bytes() for p in source.iterdir()} | NEVER
    assert set(MISTRAL_DECOYS) <= set(files)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: mistralai/Mistral-7B-v0.3\ntemplate: mistral\ncutoff_len: 64\nmax_new_tokens: 2\n")
    home = tmp_path / "hf"
    with FakeHub({("model", "mistralai/Mistral-7B-v0.3"): files}) as hub:
        pipeline("generate", recipe, "--prompt", "Hi", "--model", "base", cwd=tmp_path, env=online_env(hub, home))
        got = hub.downloaded("model", "mistralai/Mistral-7B-v0.3")
    wanted = {"config.json", "generation_config.json", "model.safetensors.index.json", *shards, "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"} & set(files)
    assert got == wanted and {"model.safetensors.index.json", *shards} <= got, sorted(got)
    root = home / "hub" / "models--mistralai--Mistral-7B-v0.3"
    assert set(snapshot_files(root)) == wanted
    assert_cache_layout(root)
