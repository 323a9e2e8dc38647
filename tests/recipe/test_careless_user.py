"""Mistakes a careless user makes, through the CLI as they type it: one exit-2 message each, no traceback,
nothing written (found by a bug hunt; each test names what used to happen instead).

Each command (and argparse's refusal) runs as typed at least once here; its further cases run main(argv) in this
process (as_typed=False: the same code and messages, without an interpreter start each)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.acceptance.harness import cli_env, pipeline, refused, write_data, write_hf_checkpoint, write_recipe


def test_a_model_folders_own_tokenizer_larger_than_its_embedding_table(tmp_path):
    """The tokenizer files of a Llama folder (384 ids) beside weights of 256 rows, as when tokenizer files come
    from another download: refused before training (it was an IndexError traceback mid-run, leaving
    ds_config.json and resolved.yaml in output_dir, which then blocked the rerun as "not empty")."""
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True, vocab_size=256)
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="llama", dataset_dir="data", template="llama3",
                          output_dir="saves/r")
    for command in ("validate", "train"):
        err = refused(command, recipe, cwd=tmp_path)
        assert "model_name_or_path: its tokenizer files have 384 token ids, more than the 256 rows" in err, err
        assert "tokenizer_name_or_path" in err
    assert not (tmp_path / "saves").exists()


def test_a_model_folder_without_config_json_gets_the_model_message_only(tmp_path):
    """An empty folder, or the hub cache's models--Org--Name folder (snapshots inside, no config.json): the model's
    own message was joined by a wrong one, "template: 'qwen3_nothink' needs the special tokens ... which the
    tokenizer gpt2 does not have", because a folder without config.json was read as a GPT-2 checkpoint."""
    write_data(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "hub" / "models--Org--Tiny"
    (cache / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("a" * 40)
    for model, words in (("empty", "empty: no config.json in this directory"),
                         (str(cache), "is a Hugging Face cache folder (it holds snapshots/, not a checkpoint);"
                                      " set it to the hub id 'Org/Tiny'")):
        recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=model, dataset_dir="data",
                              template="qwen3_nothink", output_dir="saves/r")
        for command in ("validate", "train"):
            err = refused(command, recipe, cwd=tmp_path, as_typed=model == "empty")
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and words in errors[0], err
    assert not (tmp_path / "saves").exists()


def test_a_file_where_an_output_directory_must_go(tmp_path):
    """output_dir / export_dir under a file, a dataset_dir whose build/ is a file, a link to nothing: one message
    naming what is in the way (each was a FileExistsError / NotADirectoryError traceback, exit 1)."""
    write_data(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    for command, key, value in (("train", "output_dir", "notes.txt/run"), ("merge", "export_dir", "notes.txt/a/b"),
                                ("train", "output_dir", "gone/run")):
        err = refused(command, recipe, f"{key}={value}", cwd=tmp_path, as_typed=value != "gone/run")
        blocker = "gone is a symbolic link to nothing" if value.startswith("gone") else "notes.txt is a file"
        assert f"{key}: {value} cannot be created: {blocker}, not a directory; move it away" in err, err
    (tmp_path / "data" / "build").write_text("")
    err = refused("build", recipe, cwd=tmp_path, as_typed=False)
    assert "data/build/tiny_sft cannot be created: data/build is a file, not a directory" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and not (tmp_path / "saves").exists()



def test_an_output_directory_this_user_cannot_create(tmp_path):
    """output_dir where this user may not write (a folder without write permission: as root, which writes
    everywhere, /proc stands in for it): one message naming the folder and the fix, before the model loads (it was
    a PermissionError / FileNotFoundError traceback, exit 1, from the lock file or from the first mkdir)."""
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    targets = ["/proc/no-such-run"] if Path("/proc/self").is_dir() else []
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        targets.append("locked/run")
    assert targets
    for i, value in enumerate(targets):
        err = refused("train", recipe, f"output_dir={value}", cwd=tmp_path, as_typed=i == 0)
        assert f"output_dir: {value} cannot be created: " in err, err
        assert "choose a directory this user may write, or make that one writable" in err, err
    assert not (tmp_path / "saves").exists()


def test_an_existing_output_directory_this_user_cannot_write(tmp_path, monkeypatch):
    """output_dir already there but taking no new file (a read-only mount, a folder without write permission) passed
    the lock, and train went on to load the model and stop at 'resolved.yaml: cannot be written here'. Now the lock
    refuses it as it refuses a folder it cannot create, and nothing is written. As another user, 0555 folders as
    typed; as root, who writes anywhere and whom os.access answers yes on a read-only mount, a folder that refuses
    new files (EROFS, as such a mount does) in this process."""
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)  # so that train, before, reached the model
    for name in ("ro", "locked/run"):
        (tmp_path / name).mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if os.geteuid() != 0:
        (tmp_path / "locked").chmod(0o555)
        (tmp_path / "ro").chmod(0o555)
        cases = [("ro", True), ("locked/run", False)]
    else:
        import errno
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):  # what a read-only mount answers root too
            if Path(path).parent in (tmp_path / "ro", tmp_path / "locked" / "run") and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only)
        cases = [("ro", False), ("locked/run", False)]
    for value, as_typed in cases:
        err = refused("train", recipe, f"output_dir={value}", cwd=tmp_path, as_typed=as_typed)
        assert err.startswith(f"error: command line override output_dir={value}: output_dir: {value} cannot be "
                              f"written: "), err
        assert f"({value}); choose a directory this user may write, or make that one writable" in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    (tmp_path / "locked").chmod(0o755)


def test_a_llamafactory_merge_recipe_given_to_train_names_export(tmp_path):
    """LLaMA-Factory's merge_lora recipe (export_dir, adapter_name_or_path, no dataset) run with `make train` or
    `build`: "dataset: missing" alone sent the user to add a dataset; the message now names the verb that runs it."""
    recipe = write_recipe(tmp_path / "merge.yaml", {}, model_name_or_path="tiny", adapter_name_or_path="saves/sft",
                          template="alpaca", export_dir="saves/merged")
    for command in ("build", "train"):  # with the override typed, which the export it names carries (failed
        # before: "`python -m pipeline export merge.yaml` (make export RECIPE=merge.yaml)", written by hand)
        err = refused(command, "merge.yaml", "export_size=2", cwd=tmp_path, as_typed=command == "build")
        assert err.splitlines()[0] == ("error: merge.yaml: dataset: missing, expected a non-empty string or a non-empty list of "
                       "non-empty strings (set it in the recipe, a file it extends, or on the command line as "
                       "dataset=...); a recipe with export_dir and no dataset, as LLaMA-Factory's merge_lora ones, "
                       "is run by `python -m pipeline export merge.yaml export_size=2`"), err
    # LLaMA-Factory's eval recipe (task, no dataset) the same way
    write_recipe(tmp_path / "bench.yaml", {}, model_name_or_path="tiny", template="alpaca", task="mmlu_test")
    err = refused("build", "bench.yaml", "n_shot=2", cwd=tmp_path, as_typed=False)
    assert err.splitlines()[0].endswith("it is run by `python -m pipeline eval bench.yaml n_shot=2`"), err
    # LLaMA-Factory's inference recipe (examples/inference: infer_backend, no dataset) given to validate: the
    # message sent the user to add a dataset, which makes it a training recipe; chat runs it as it is
    write_recipe(tmp_path / "infer.yaml", {}, model_name_or_path="tiny", adapter_name_or_path="saves/sft",
                 template="alpaca", infer_backend="huggingface")
    err = refused("validate", "infer.yaml", cwd=tmp_path)
    assert err.splitlines() == [
        "error: infer.yaml: dataset: missing, expected a non-empty string or a non-empty list of non-empty strings (set "
        "it in the recipe, a file it extends, or on the command line as dataset=...); a recipe with infer_backend and "
        "no dataset, as LLaMA-Factory's inference ones, is run by `python -m pipeline generate infer.yaml`, with "
        "--prompt TEXT for one answer"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml", "infer.yaml", recipe.name]

def test_a_slip_in_a_run_folder_name_is_not_the_runs_and_gets_its_name(tmp_path):
    """saves/up/modle, one slip from the folder the recipe up.yaml's full run writes (saves/up/model), counted as
    produced by that run because it lies in its output_dir: validate said nothing, make would have trained up.yaml
    for it, and train then refused the path. A run writes adapter/, model/, merged/, eval/ and checkpoint-<step>/
    there (pipeline.runtime.layout); any other name is nobody's, and the note names the close one before the run has
    written it (pipeline.validate.near_run_folder)."""
    from pipeline.names import RUN_FOLDERS
    from pipeline.recipe.siblings import producer
    from pipeline.runtime.layout import RunLayout

    layout = RunLayout.of("o")
    assert {p.name for p in (layout.adapter, layout.model, layout.merged, layout.eval)} == set(RUN_FOLDERS)
    write_data(tmp_path / "data")
    up = write_recipe(tmp_path / "up.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/up",
                      finetuning_type="full")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="saves/up/model", dataset_dir="data",
                          output_dir="saves/r")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for path, made in (("saves/up/model", True), ("saves/up", True), ("saves/up/checkpoint-2/model", True),
                           ("saves/up/merged", True), ("saves/up/modle", False), ("saves/up/notes/model", False)):
            found = producer(recipe, path)
            assert (found[0].name if found else None) == (up.name if made else None), path
    finally:
        os.chdir(cwd)
    pipeline("build", recipe, cwd=tmp_path)
    assert "does not exist" not in pipeline("validate", recipe, cwd=tmp_path).stdout
    out = pipeline("validate", recipe, "model_name_or_path=saves/up/modle", cwd=tmp_path).stdout
    assert ("note: model_name_or_path: directory 'saves/up/modle' does not exist (did you mean 'saves/up/model'?), "
            "and no recipe in its folder or under the working directory produces it") in out, out


def test_validate_does_not_call_a_missing_local_path_a_hub_id(tmp_path):
    """A misspelled model folder passed validate with a note calling it a hub id that train downloads; train then
    refused it. A path (/, ./, ../, ~, or more than org/name) that is not there, and that no recipe next to this
    one produces, gets a note saying train will refuse it, with the close name; `org/name` stays a hub id. The close
    name is a checkpoint folder (a config.json) or nothing: any folder there was suggested (models/tmp for
    models/tmq: under /tmp, 'did you mean /tmp/.../tmp'). A name shaped like org/name whose first folder is here
    (models/gpt) is a local path too (pipeline.model.hub.looks_local). The slip may be in a folder above the model's
    (modles/gpt2): the name there is compared, the path suggested (pipeline.validate.near_model)."""
    write_data(tmp_path / "data")
    (tmp_path / "Qwen").mkdir()  # a folder of that first name: Qwen/... may still be a hub id
    (tmp_path / "models" / "gpt2").mkdir(parents=True)
    (tmp_path / "models" / "gpt2" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "models" / "tmp").mkdir()  # a folder, not a checkpoint: never suggested
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", recipe, cwd=tmp_path)
    typo = str(tmp_path / "models" / "gpt3")
    path = "it is a path, not a hub id (org/name), so train will refuse it"
    for model, hint, what in ((typo, f" (did you mean '{tmp_path / 'models' / 'gpt2'}'?)", path),
                              (str(tmp_path / "models" / "tmq"), "", path),
                              ("./models/gpt", " (did you mean './models/gpt2'?)", path),
                              # the slip in a folder above the model's (README's saves/dmeo_pt/model): no hint before
                              ("./modles/gpt2", " (did you mean './models/gpt2'?)", path),
                              ("./Qwen/Qwen3-0.6B", " (a hub id is written without './': Qwen/Qwen3-0.6B)", path),
                              ("models/gpt", " (did you mean 'models/gpt2'?)",  # the hub is never asked for it
                               "it reads as a local path (under models/), so train will refuse it"),
                              ("Qwen/Qwen3-0.6B", "", "it reads as a local path (under Qwen/) and is not in the hub "
                               "cache, so train downloads it if it is a hub id and otherwise refuses it")):
        out = pipeline("validate", recipe, f"model_name_or_path={model}", cwd=tmp_path, as_typed=model == typo).stdout
        assert (f"note: model_name_or_path: directory '{model}' does not exist{hint}, and no recipe in its folder "
                f"or under the working directory produces it; {what}") in out, out
        assert "hub id is downloaded" not in out
    assert "directory" in refused("train", recipe, f"model_name_or_path={typo}", cwd=tmp_path, as_typed=False)
    out = pipeline("validate", recipe, "model_name_or_path=Org/Name", cwd=tmp_path,
                   env=cli_env(HF_HUB_CACHE=str(tmp_path / "hub"))).stdout
    # the tests run with HF_HUB_OFFLINE=1 (cli_env), where train downloads nothing: the note said it would
    assert ("(HF_HUB_OFFLINE=1 here, so train will refuse it: `hf download Org/Name` on a machine with network into this"
            " cache, or unset HF_HUB_OFFLINE)") in out and "does not exist" not in out, out
    # a Qwen/ folder beside the recipe (another model fetched by hand): a cached Qwen/Qwen3-0.6B is what train loads,
    # no note; it said 'does not exist ... train reports it missing here before it tries the hub: fix the path'
    (tmp_path / "Qwen" / "Qwen2.5-0.5B").mkdir(parents=True)
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c" * 40, encoding="utf-8")
    out = pipeline("validate", recipe, "model_name_or_path=Qwen/Qwen3-0.6B", cwd=tmp_path, as_typed=False,
                   env=cli_env(HF_HUB_CACHE=str(tmp_path / "hub"))).stdout
    assert "does not exist" not in out and "train reports it missing" not in out, out


def test_validate_applies_the_length_policy_as_train_does(tmp_path):
    """validate said "data: OK" (exit 0) for data train refuses: rows over cutoff_len under overlength_policy:
    error, or every train row dropped as too long. It now gives train's own message."""
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)
    assert "data: OK" in pipeline("validate", recipe, cwd=tmp_path, as_typed=False).stdout
    for overrides, expected in ((["cutoff_len=12", "overlength_policy=error"],
                                 "examples are longer than cutoff_len 12 (overlength_policy: error); raise cutoff_len"),
                                (["cutoff_len=8"], "the train split has no examples; 21 rows, dropped: 21 over "
                                                   "cutoff_len; raise cutoff_len or add data")):
        # train as typed: its data check loads the tokenizer (torch); validate in-process
        said = {command: refused(command, recipe, *overrides, cwd=tmp_path, as_typed=command == "train")
                for command in ("validate", "train")}
        assert expected in said["validate"] and said["validate"] == said["train"], said
    assert not (tmp_path / "saves").exists()


def test_a_value_in_the_wrong_case_gets_the_suggestion(tmp_path):
    """finetuning_type=LoRA got no did-you-mean while Lora did: the suggestion compares case-insensitively."""
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    for given in ("LoRA", "Lora", "FULL"):
        err = refused("validate", recipe, f"finetuning_type={given}", cwd=tmp_path, as_typed=False)
        expected = "full" if given == "FULL" else "lora"
        assert f"finetuning_type: given '{given}', expected one of lora, oft, full, freeze (did you mean '{expected}'?)" \
            in err, err


def add_dataset(data: Path, name: str, entry: dict, rows: list | str, file_name: str = "raw/extra.jsonl") -> None:
    """One more registry entry beside write_data's, with its file (JSONL rows or raw text)."""
    text = rows if isinstance(rows, str) else "".join(json.dumps(row) + "\n" for row in rows)
    (data / file_name).write_text(text, encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**registry, name: {"file_name": file_name, **entry}}))


def test_openai_style_messages_under_the_default_sharegpt_tags(tmp_path):
    """OpenAI-style role/content turns without "tags" gave one identical "missing 'from'" line per row, and
    user/assistant roles under the default tags said "expected 'human' or 'gpt'" without saying the tags can
    change: one message per kind now, naming the first row, the count, and the tags to add."""
    def chat(user: str) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}

    data = write_data(tmp_path / "data")
    add_dataset(data, "chat", {"formatting": "sharegpt", "columns": {"messages": "messages"}},
                [chat(f"q{i}") for i in range(5)])
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", dataset="chat",
                          output_dir="saves/r")
    err = refused("build", recipe, cwd=tmp_path)
    assert err.count("error:") == 1, err
    assert ("extra.jsonl:1: messages[0]: missing 'from' (the role); the turn has: role, content; for OpenAI-style "
            'messages add "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", '
            '"assistant_tag": "assistant"} to the registry entry \'chat\' (5 rows alike; this is the first)'
            ) in err, err
    roles = [{"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}]
    add_dataset(data, "chat", {"formatting": "sharegpt"}, roles)
    err = refused("build", recipe, cwd=tmp_path, as_typed=False)
    assert ("extra.jsonl:1: conversations[0].from is 'user'; expected 'human' or 'gpt' (or 'system' as the first "
            "turn, 'function_call' / 'observation' for tool use); for user/assistant roles add \"tags\": "
            '{"user_tag": "user", "assistant_tag": "assistant"} to the registry entry \'chat\'\n') in err, err


def test_a_csv_file_separated_by_semicolons_or_tabs(tmp_path):
    """A ';'-separated .csv got "missing column 'instruction' (did you mean 'instruction;output'?)": the header of
    one column holding another separator is now named as the problem, once."""
    data = write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", dataset="table",
                          output_dir="saves/r")
    for sep, name, expected in ((";", "raw/t.csv", "looks ';'-separated: a .csv file separates columns with commas"),
                                ("\t", "raw/t.csv", "looks tab-separated: a .csv file separates columns with commas; "
                                                    "name it .tsv"),
                                (",", "raw/t.tsv", "looks comma-separated: a .tsv file separates columns with tabs; "
                                                   "name it .csv")):
        add_dataset(data, "table", {}, f"instruction{sep}output\nhi{sep}there\n", file_name=name)
        err = refused("build", recipe, cwd=tmp_path, as_typed=False)
        assert err.count("error:") == 1 and "did you mean" not in err, err
        assert f"{name}:1: the header has one column ({f'instruction{sep}output'!r}); the file {expected}" in err, err


def test_two_fields_reading_one_column(tmp_path):
    """columns.prompt and columns.response naming the same column built and trained a model to echo its prompt,
    without a word; a field moved onto another's default column (prompt: input) read it twice. Refused."""
    data = write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", dataset="same",
                          output_dir="saves/r")
    for columns, expected in (({"prompt": "instruction", "response": "instruction"},
                               "'prompt' and 'response' both read column 'instruction'; each field needs its own "
                               "column (a model trained so learns to repeat its prompt)"),
                              ({"prompt": "input"}, "'prompt' and 'query' (by default) both read column 'input'")):
        add_dataset(data, "same", {"columns": columns}, [{"instruction": "a", "input": "", "output": "b"}])
        err = refused("build", recipe, cwd=tmp_path, as_typed=False)
        assert err.count("error:") == 1 and f'"same".columns.prompt: {expected}' in err, err
    add_dataset(data, "same", {"ranking": True, "columns": {"prompt": "q", "response": "q", "chosen": "c",
                                                            "rejected": "r"}}, [])
    err = refused("build", recipe, "stage=dpo", cwd=tmp_path, as_typed=False)
    assert "read column" not in err, err  # response is not read for ranking data
    add_dataset(data, "same", {"columns": {"prompt": "output"}}, [{"output": "a corpus line"}])
    pipeline("build", recipe, "stage=pt", cwd=tmp_path, as_typed=False)  # pt reads the prompt only: output is not read twice


def test_a_command_without_a_recipe_names_only_the_recipe(tmp_path):
    """`python -m pipeline train` said "the following arguments are required: recipe, key=value"; overrides are
    optional."""
    for argv, missing in ((("train",), "recipe"), ((), "command, recipe")):
        err = refused(*argv, cwd=tmp_path, as_typed=bool(argv))
        assert err.endswith(f"error: the following arguments are required: {missing}\n"), err
        assert "usage: python -m pipeline command recipe [key=value ...]" in err, err


def test_inspect_refuses_a_negative_num_and_leaves_the_build_as_it_is(tmp_path):
    """inspect --num -1 rendered nothing without a word (0 is kept: the counts and histogram alone); and inspect, a
    read-only command, wrote token_lengths.png into the built dataset's folder (build's output). It goes to
    build/token_lengths-<names>.png."""
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    for num in ("-1", "two"):
        err = refused("inspect", recipe, "--num", num, cwd=tmp_path, as_typed=False)
        assert "error: argument --num: given" in err and "0 or more" in err, err
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)
    built = tmp_path / "data" / "build" / "tiny_sft"
    before = sorted(p.name for p in built.iterdir())
    out = pipeline("inspect", recipe, "--num", "1", cwd=tmp_path).stdout
    assert "histogram: data/build/token_lengths-tiny_sft.png" in out, out
    assert (tmp_path / "data" / "build" / "token_lengths-tiny_sft.png").is_file()
    assert sorted(p.name for p in built.iterdir()) == before


def test_a_duplicate_key_is_listed_with_the_recipes_other_mistakes(tmp_path):
    """A duplicate key stopped the reading: only it was listed, and the misspelled key and the wrong value came
    one rerun later. All are listed at once now, in file order (the last value of the duplicate is checked)."""
    write_data(tmp_path / "data")
    write_recipe(tmp_path / "base.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    (tmp_path / "r.yaml").write_text("extends: base.yaml\nlearning_rate: 1e-3\nlearning_rate: -2\nlora_rnak: 3\n"
                                     "stage: sfft\n", encoding="utf-8")
    err = refused("validate", "r.yaml", cwd=tmp_path, as_typed=False)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines[:4] == [
        "error: r.yaml:3:1: duplicate key 'learning_rate' (first set on line 2, again on line 3); keep one",
        "error: r.yaml:3:16: learning_rate: given -2, expected a number > 0 and <= 1",
        "error: r.yaml:4:1: lora_rnak: unknown key (did you mean 'lora_rank'?)",
        "error: r.yaml:5:8: stage: given 'sfft', expected one of pt, sft, dpo, kto, rm, ppo (did you mean 'sft'?)"], err


def test_epochs_in_a_recipe_that_inherits_max_steps_are_named_as_ignored(tmp_path):
    """A recipe extending one with max_steps (the demo's) and asking for num_train_epochs trained max_steps
    without a word (max_steps wins, as in transformers); a notice now names both lines and the way out."""
    write_data(tmp_path / "data")
    write_recipe(tmp_path / "base.yaml", model_name_or_path="tiny", dataset_dir="data", max_steps=5)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nnum_train_epochs: 2\n", encoding="utf-8")
    pipeline("build", "child.yaml", cwd=tmp_path, as_typed=False)
    err = pipeline("validate", "child.yaml", cwd=tmp_path, as_typed=False).stderr
    assert ("notice: child.yaml:2:19: num_train_epochs: 2 has no effect: max_steps 5 (base.yaml:" in err
            and "set max_steps: null (or the override max_steps=) to train by epochs" in err), err
    assert "num_train_epochs" not in pipeline("validate", "child.yaml", "max_steps=", cwd=tmp_path,
                                              as_typed=False).stderr
