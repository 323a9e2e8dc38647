"""LLaMA-Factory 0.9.3+'s keys for added tokens as a user brings them: a save_pretrained Qwen2 with an untied head
(384 rows, a byte-level BPE of 381 ids), alpaca data holding the tokens, a YAML file of token: description lines and
a LoRA recipe with add_tokens (not special), add_special_tokens (overridden by the config, with a notice),
new_special_tokens_config and init_special_tokens: desc_init -> `python -m pipeline build`, `train`, `merge`.

Golden values: transformers' AutoTokenizer on the base with add_tokens(..., special_tokens=False) then add_tokens(...,
special_tokens=True), as LLaMA-Factory's patch_tokenizer adds them (ids, encodings, decoding); LLaMA-Factory's
_description_based_initialization recomputed here from the base's safetensors (each described row: the mean of the
input embedding's rows of its description's tokens, in the embedding and in the untied head alike); PEFT's
PeftModel on the base resized to the adapter's tokenizer gives merged/'s logits."""
from __future__ import annotations

import json

from tests.acceptance.harness import assert_close, pipeline, write_data, write_hf_checkpoint, write_recipe

PLAIN = "<note>"
DESCRIBED = {"<think>": "the start of the reasoning", "</think>": "the end of it"}
ROWS = [{"instruction": f"question {i} {PLAIN}", "input": "",
         "output": f"<think>step {i}</think>the answer is {i}"} for i in range(8)]


def test_add_tokens_and_described_special_tokens_train_merge_and_load_in_transformers_and_peft(tmp_path):
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    base = tmp_path / "qwen2"
    write_hf_checkpoint(base, "qwen2", small_vocab=True, tie_word_embeddings=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "think.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"think": {"file_name": "think.json"}}), encoding="utf-8")
    (tmp_path / "tokens.yaml").write_text("".join(f'"{t}": {d}\n' for t, d in DESCRIBED.items()), encoding="utf-8")
    # learning_rate 1e-9: one step leaves the rows where the init put them (to 1e-8), so merged/ shows the init
    recipe = write_recipe(tmp_path / "think.yaml", model_name_or_path=str(base), dataset_dir="data", dataset="think",
                          template="qwen", add_tokens=PLAIN, add_special_tokens="<unused>",
                          new_special_tokens_config="tokens.yaml", init_special_tokens="desc_init", cutoff_len=256,
                          val_size=0, learning_rate=1e-9, max_steps=1, output_dir="saves/think")
    pipeline("build", recipe, cwd=tmp_path)
    err = pipeline("train", recipe, cwd=tmp_path).stderr
    assert "add_special_tokens: new_special_tokens_config (tokens.yaml) gives the special tokens" in err, err
    pipeline("merge", recipe, cwd=tmp_path)
    out = tmp_path / "saves/think"

    theirs = transformers.AutoTokenizer.from_pretrained(base)
    assert theirs.add_tokens([PLAIN], special_tokens=False) == 1
    assert theirs.add_tokens(list(DESCRIBED), special_tokens=True) == 2
    ids_of = theirs.convert_tokens_to_ids([PLAIN, *DESCRIBED])
    for folder in ("merged", "adapter"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / folder)
        assert tokenizer.convert_tokens_to_ids([PLAIN, *DESCRIBED]) == ids_of and len(tokenizer) == len(theirs)
        assert "<unused>" not in tokenizer.get_vocab()
        text = f"a {PLAIN} b<think>c</think>d"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == theirs(text, add_special_tokens=False)["input_ids"] and set(ids_of) <= set(ids)
        # skip_special_tokens drops the special ones and keeps the plain one, as there
        assert tokenizer.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        assert PLAIN in tokenizer.decode(ids, skip_special_tokens=True)

    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    for token, description in DESCRIBED.items():
        words = [i for i in theirs(description, add_special_tokens=False)["input_ids"] if i not in ids_of]
        expected = embed[words].mean(dim=0)
        row = theirs.convert_tokens_to_ids(token)
        torch.testing.assert_close(merged.get_input_embeddings().weight[row], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged.get_output_embeddings().weight[row], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(merged.get_input_embeddings().weight[ids_of[1]],
                              merged.get_input_embeddings().weight[ids_of[2]])

    start = transformers.AutoModelForCausalLM.from_pretrained(base)
    start.resize_token_embeddings(len(theirs), pad_to_multiple_of=64, mean_resizing=False)
    peft = PeftModel.from_pretrained(start, out / "adapter").eval()
    batch = torch.tensor([theirs("x <note> <think>y</think>", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert_close(peft(batch).logits, merged(batch).logits)

    then_a_recipe_on_merged_without_the_keys_reads_the_tokens_from_its_files(tmp_path, out / "merged")

    # resume refuses another init (the checkpoint's rows were made by this one)
    err = pipeline("train", recipe, "init_special_tokens=desc_init_w_noise", "resume_from_checkpoint=latest",
                   cwd=tmp_path, expect=2).stderr
    assert "init_special_tokens" in err and "Traceback" not in err, err


def test_the_keys_users_get_wrong_exit_2_naming_the_file_and_line(tmp_path):
    """add_special_tokens beside new_special_tokens (one key under LLaMA-Factory's two names), and a
    new_special_tokens_config that is no token: description mapping: one message each, with the file's line."""
    base = tmp_path / "qwen2"
    write_hf_checkpoint(base, "qwen2", small_vocab=True)
    (tmp_path / "bad.yaml").write_text('"<a>": first\n"<b>": [not, text]\n', encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(base), template="qwen",
                          new_special_tokens="<a>", add_special_tokens="<b>", new_special_tokens_config="bad.yaml")
    err = pipeline("validate", recipe, cwd=tmp_path, expect=2).stderr
    lines = recipe.read_text().splitlines()
    at = {key: next(i + 1 for i, line in enumerate(lines) if line.startswith(key + ":"))
          for key in ("add_special_tokens", "new_special_tokens_config")}
    assert f"r.yaml:{at['add_special_tokens']}:21: add_special_tokens: given '<b>' beside new_special_tokens" in err, err
    assert f"r.yaml:{at['new_special_tokens_config']}:28: new_special_tokens_config: " in err, err
    assert "bad.yaml:2: <b>: description ['not', 'text']; expected text" in err and "Traceback" not in err, err
    (tmp_path / "bad.yaml").write_text('"<a>": first\n"<b>: broken\n', encoding="utf-8")
    err = pipeline("validate", recipe, "new_special_tokens=null", cwd=tmp_path, expect=2).stderr
    assert "bad.yaml:3:1: invalid YAML" in err and "add_special_tokens: given" not in err, err


def then_a_recipe_on_merged_without_the_keys_reads_the_tokens_from_its_files(tmp_path, merged):
    """A second recipe starting from merged/ without add_tokens / add_special_tokens: the tokens are the files'
    (special ones included) and one id each in the data, as transformers' AutoTokenizer on merged/ reads them (they
    were split into bytes before). Golden: AutoTokenizer(merged/) on the text `inspect` shows, prompt and answer."""
    import re

    import transformers

    from tests.reliability.rel_helpers import run_main

    recipe = write_recipe(tmp_path / "again.yaml", model_name_or_path=str(merged), dataset_dir="data",
                          dataset="think", template="qwen", cutoff_len=256, val_size=0, max_steps=1,
                          output_dir="saves/again")
    assert run_main(["build", str(recipe)], tmp_path).code == 0  # in this process: no interpreter start-up
    shown = run_main(["inspect", str(recipe)], tmp_path).out
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    samples = re.findall(r"· (\d+) tokens, (\d+) trained\n(.*?\]\]\n)", shown, re.S)
    assert samples and all("<think>" in text for *_, text in samples), shown
    for total, trained, text in samples:
        answer = re.search(r"\[\[(.*)\]\]", text, re.S).group(1)
        assert int(total) == len(theirs(text.replace("[[", "").replace("]]", "").rstrip("\n") + "\n",
                                        add_special_tokens=False)["input_ids"]), text
        assert int(trained) == len(theirs(answer, add_special_tokens=False)["input_ids"]), answer


def test_chatml_tokens_added_to_a_llama_base_make_its_qwen_template_and_generation_stop_there(tmp_path):
    """A base whose vocabulary lacks ChatML's markup, given it with add_special_tokens (the usual way to train a
    base on the qwen template), with spare embedding rows as Qwen's checkpoints have (448 for 384 ids: nothing
    grows) and made to answer one id whatever the input: <|im_end|>, the new stop word, then a spare row no token
    has. `inspect` says the new <|im_end|> ends the answers (it named the tokenizer's <|eot_id|>); `generate` on the
    base: the template is accepted (it was refused as if the tokens were not added),
    generation stops at the new <|im_end|> (with skip_special_tokens false a missed stop prints it), and the spare
    id decodes to nothing, as transformers' decode drops it (it was a KeyError, exit 1, in generate and eval).

    Golden values: transformers' add_tokens(..., special_tokens=True) on the base's tokenizer (the new ids) and its
    decode of the spare id."""
    import transformers

    from tests.acceptance.harness import always_answer

    base = tmp_path / "llama"
    model = write_hf_checkpoint(base, "llama", small_vocab=True, tie_word_embeddings=False, vocab_size=448)
    theirs = transformers.AutoTokenizer.from_pretrained(base)
    assert len(theirs) == 384 and theirs.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True) == 2
    im_end = theirs.convert_tokens_to_ids("<|im_end|>")
    spare = 400
    assert theirs.decode([spare]) == ""
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "chatml.yaml", model_name_or_path=str(base), template="qwen", dataset_dir="data",
                          add_special_tokens="<|im_start|>,<|im_end|>", skip_special_tokens=False, max_new_tokens=3)
    # in-process (as_typed=False, no interpreter start): build runs as typed in the first test; inspect names the
    # answers' end: the template's, not Llama's <|eot_id|>
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)
    assert f"<|im_end|> is EOS (id {im_end})" in pipeline("inspect", recipe, "--num", "1", cwd=tmp_path).stdout
    for answer, printed in ((im_end, ""), (spare, "")):
        always_answer(model, answer).save_pretrained(base, safe_serialization=True)
        # as typed, then in-process (the same code; generate keeps no state: a private sampling generator)
        done = pipeline("generate", recipe, "--prompt", "say hi", cwd=tmp_path, as_typed=answer == im_end)
        assert done.stdout == printed + "\n", (answer, done.stdout, done.stderr)

    then_merged_generates_and_chats_up_to_the_added_stop_word(tmp_path, model)


def then_merged_generates_and_chats_up_to_the_added_stop_word(tmp_path, model):
    """Trained (one step, which does not move the answers) with the plain <note> added too, and merged, the base
    made to say <note>, <|im_start|>, <|im_end|> (the added stop word), then <note> again: `generate --model merged`
    by the run's recipe and `chat` by a recipe on merged/ without the keys (its files hold the tokens) print what
    transformers' AutoTokenizer on merged/ decodes of the ids before <|im_end|> (skip_special_tokens false, then
    true), and stop there with room for more. Golden values: AutoTokenizer(merged/)'s ids of the tokens and decode."""
    import transformers

    from tests.acceptance.harness import answer_in_turn
    from tests.reliability.rel_helpers import run_main

    base = tmp_path / "llama"
    theirs = transformers.AutoTokenizer.from_pretrained(base)
    assert theirs.add_tokens([PLAIN], special_tokens=False) + theirs.add_tokens(["<|im_start|>", "<|im_end|>"],
                                                                                special_tokens=True) == 3
    said = theirs.convert_tokens_to_ids([PLAIN, "<|im_start|>", "<|im_end|>"])
    answer_in_turn(model, [*said, said[0]]).save_pretrained(base, safe_serialization=True)
    recipe = write_recipe(tmp_path / "note.yaml", model_name_or_path=str(base), template="qwen", dataset_dir="data",
                          add_tokens=PLAIN, add_special_tokens="<|im_start|>,<|im_end|>", skip_special_tokens=False,
                          max_new_tokens=8, cutoff_len=256, overlength_policy="truncate",
                          learning_rate=1e-3, max_steps=1, output_dir="saves/note")
    for command in ("build", "train", "merge"):  # in this process: no interpreter start-up
        assert run_main([command, str(recipe)], tmp_path).code == 0, command
    merged = tmp_path / "saves/note/merged"
    on_merged = transformers.AutoTokenizer.from_pretrained(merged)
    assert on_merged.convert_tokens_to_ids([PLAIN, "<|im_start|>", "<|im_end|>"]) == said

    done = pipeline("generate", recipe, "--model", "merged", "--prompt", "say hi", cwd=tmp_path, as_typed=False)
    assert done.stdout == on_merged.decode(said[:2], skip_special_tokens=False) + "\n", (done.stdout, done.stderr)
    chat = write_recipe(tmp_path / "chat.yaml", model_name_or_path=str(merged), template="qwen", max_new_tokens=8)
    reply = on_merged.decode(said[:2], skip_special_tokens=True)
    assert reply == PLAIN  # the special one is skipped, the plain one kept
    done = pipeline("chat", chat, cwd=tmp_path, input="say hi\nagain\n\n")
    assert done.stdout == f"{reply}\n{reply}\n", (done.stdout, done.stderr)


def test_inspect_says_no_eos_ends_the_answers_of_the_empty_template(tmp_path):
    """inspect's line names the token that ends each trained answer; LLaMA-Factory's `empty` template places none
    (format_assistant is StringFormatter(slots=["{{content}}"]), no eos_token), so naming the tokenizer's EOS there
    told a user their answers end with a token they never train. Golden: the EOS id from transformers'
    AutoTokenizer, shown for qwen3_nothink on the same data, and the rendered sample of `empty` lacking it."""
    import transformers

    from tests.reliability.rel_helpers import run_main

    base = tmp_path / "qwen3"
    write_hf_checkpoint(base, "qwen3", small_vocab=True, num_hidden_layers=1)
    im_end = transformers.AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    write_data(tmp_path / "data", n_sft=4)
    said = {}
    for template in ("empty", "qwen3_nothink"):
        recipe = write_recipe(tmp_path / f"{template}.yaml", model_name_or_path=str(base), template=template,
                              dataset_dir="data", cutoff_len=128, output_dir=f"saves/{template}")
        assert run_main(["build", str(recipe)], tmp_path).code == 0
        done = run_main(["inspect", str(recipe), "--num", "1"], tmp_path)
        assert done.code == 0, done.err
        said[template] = done.out
    assert "no EOS ends the answers (template empty)" in said["empty"] and "is EOS" not in said["empty"]
    assert "<|im_end|>" not in said["empty"] and f"<|im_end|> is EOS (id {im_end})" in said["qwen3_nothink"]
