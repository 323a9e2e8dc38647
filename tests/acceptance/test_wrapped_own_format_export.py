"""An image-text checkpoint fine-tuned in full, then exported from the run's own model/ folder, through the CLI.

A Qwen2_5_VLForConditionalGeneration (a tiny vision transformer around a 2-layer Qwen2 decoder, as transformers'
save_pretrained writes it: the hub's spellings model.* / visual.*; the smallest wrapper fixture of the suite,
tests/acceptance/test_vl_text_cli.py) -> a full sft run (output_dir/model/, our own format) -> LLaMA-Factory's merge
recipe with `model_name_or_path: saves/full/model` and `export_dir` -> `python -m pipeline export`. The export loads in
transformers as Qwen2_5_VLForConditionalGeneration with the logits of the run's model, the source's vision tower equal,
tensor for tensor, under the source's names, and its image processor file; a folder of ours written from that folder
(a next full run's model/) carries the same towers on, and exports them again.

Failed before: model/ held the decoder alone, and the export was refused ("saves/full/model is no
Qwen2_5_VLForConditionalGeneration checkpoint ... set model_name_or_path to the checkpoint the run started from").
"""
from __future__ import annotations

from tests.acceptance.harness import pipeline, write_recipe
from tests.acceptance.test_vl_text_cli import tiny_checkpoint


def test_a_full_runs_model_folder_exports_the_whole_image_text_checkpoint(workdir):
    import torch
    import transformers
    from safetensors.torch import load_file

    from pipeline.model.weights import load_model, save_hf, save_model

    base = workdir / "Qwen2.5-VL"
    source = tiny_checkpoint("qwen2_5_vl", base)
    run = write_recipe(workdir / "full.yaml", model_name_or_path=str(base), dataset_dir="data", template="qwen2_vl",
                       finetuning_type="full", output_dir="saves/full", learning_rate=1e-3, cutoff_len=128,
                       max_steps=1, val_size=None)
    pipeline("build", run, cwd=workdir, as_typed=False)
    pipeline("train", run, cwd=workdir)
    # LLaMA-Factory's merge recipe form (examples/merge_lora/*.yaml), the run's model/ as the model, no adapter
    (workdir / "export.yaml").write_text("model_name_or_path: saves/full/model\ntemplate: qwen2_vl\n"
                                         "export_dir: saves/exported\n", encoding="utf-8")
    pipeline("export", "export.yaml", cwd=workdir, as_typed=False)

    exported, model_dir = workdir / "saves/exported", workdir / "saves/full/model"
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    theirs = cls.from_pretrained(exported).eval()
    ours = load_model(model_dir).eval()
    x = torch.randint(10, source.config.text_config.vocab_size - 30, (2, 20), generator=torch.Generator().manual_seed(0))
    before = source.state_dict()
    tower = [k for k in before if k.startswith("model.visual.")]
    with torch.no_grad():
        want = ours(x)
        assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-4, rtol=0)
        assert (want - source(input_ids=x).logits).abs().max() > 1e-3  # the run trained
    assert len(tower) > 10 and all(torch.equal(before[k], theirs.state_dict()[k]) for k in tower)
    assert set(load_file(exported / "model.safetensors")) == set(load_file(base / "model.safetensors"))
    assert (exported / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()

    # a next full run's model/, written from this folder (its source), carries the towers on
    again = save_model(ours, workdir / "next/model", source=model_dir)
    save_hf(load_model(again), workdir / "next/merged", source=again)
    twice = cls.from_pretrained(workdir / "next/merged").eval()
    with torch.no_grad():
        assert torch.allclose(twice(input_ids=x).logits, want, atol=1e-4, rtol=0)
    assert all(torch.equal(before[k], twice.state_dict()[k]) for k in tower)
