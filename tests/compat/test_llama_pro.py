"""LLaMA Pro as a LLaMA-Factory user runs it: expand a checkpoint (their scripts/llama_pro.py, here `python -m
pipeline expand`), then train LLaMA-Factory's extras/llama_pro/llama3_freeze_sft.yaml on it with only
model_name_or_path changed (use_llama_pro: only the expanded blocks train), or LoRA on those blocks alone.

Golden values: transformers (the expanded checkpoint gives the original model's logits: the new blocks are the
identity), LLaMA-Factory's formulas worked by hand (which original block each new index copies; the expanded block
ids stride - 1, 2 stride - 1, ...), the input tensors themselves (what must not change) and PEFT (the adapter
loads).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, write_hf_checkpoint
from tests.compat.test_lf_recipes import lf_checkout
from tests.reliability.rel_helpers import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXAMPLE = "examples/extras/llama_pro/llama3_freeze_sft.yaml"  # freeze_trainable_layers: 8, use_llama_pro: true
SHORT = ["max_steps=2", "warmup_ratio=0", "gradient_accumulation_steps=1"]  # test time: two steps that both move
# 8 original blocks, 8 new ones: by LLaMA-Factory's script (split = 8 / 8 = 1) a zeroed copy follows every block,
# so new index j copies original j // 2, and the odd indices are the new ones (stride 16 / 8 = 2: ids 1, 3, ..., 15)
EXPANDED_IDS = [1, 3, 5, 7, 9, 11, 13, 15]
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def block(name: str) -> int | None:
    m = re.search(r"(?:layers|h)\.(\d+)\.", name)
    return int(m[1]) if m else None


def state(path: Path) -> dict:
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(original, expanded): a transformers-written tiny Llama 3 of 8 blocks, expanded by 8 through the CLI."""
    root = tmp_path_factory.mktemp("llama_pro")
    write_hf_checkpoint(root / "llama", "llama", small_vocab=True, max_position_embeddings=2048, num_hidden_layers=8)
    done = pipeline("expand", "--model", root / "llama", "--output-dir", root / "llama-pro", "--num-expand", "8",
                    cwd=Path(__file__).resolve().parents[2])
    assert "from 8 to 16 blocks" in done.stderr and "use_llama_pro: true" in done.stderr
    return root / "llama", root / "llama-pro"


def logits(path: Path, ids: list[int]) -> "torch.Tensor":
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()(torch.tensor([ids])).logits


def test_expand_writes_what_transformers_loads_with_the_original_logits_and_llama_factorys_layout(checkpoints):
    original, expanded = checkpoints
    assert json.loads((expanded / "config.json").read_text())["num_hidden_layers"] == 16
    assert sorted(p.name for p in expanded.iterdir()) == sorted(p.name for p in original.iterdir())  # tokenizer too
    assert not list(expanded.glob("*.bin"))
    assert torch.equal(logits(original, [3, 17, 42, 99, 120, 7]), logits(expanded, [3, 17, 42, 99, 120, 7]))
    before, after = state(original), state(expanded)
    for name, tensor in after.items():
        new = block(name)
        if new is None:
            assert torch.equal(tensor, before[name]), name
            continue
        source = name.replace(f"layers.{new}.", f"layers.{new // 2}.")
        if new % 2 and name.endswith(ZEROED):
            assert not tensor.any(), name
        else:
            assert torch.equal(tensor, before[source]), name


@pytest.mark.slow  # ~20 s: builds, trains two steps and merges through the CLI
def test_llama_factory_example_trains_only_the_expanded_blocks_and_the_merge_loads_in_transformers(tmp_path,
                                                                                                   checkpoints):
    _, expanded = checkpoints
    work = lf_checkout(tmp_path, str(expanded))
    plan = run_main(["plan", EXAMPLE], work).out  # plan and build in this process: no interpreter start-up
    assert f"trainable blocks: {', '.join(map(str, EXPANDED_IDS))} of 0..15 (use_llama_pro" in plan
    assert run_main(["build", EXAMPLE], work).code == 0
    pipeline("train", EXAMPLE, *SHORT, cwd=work, timeout=600)
    pipeline("merge", EXAMPLE, *SHORT, cwd=work)
    before, after = state(expanded), state(work / "saves/llama3-8b-pro/freeze/sft/merged")
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if block(name) in EXPANDED_IDS}  # every tensor there, none elsewhere


@pytest.mark.slow  # ~12 s: trains two steps through the CLI
def test_lora_with_use_llama_pro_adapts_only_the_expanded_blocks_and_peft_loads_it(tmp_path, checkpoints):
    peft = pytest.importorskip("peft")
    _, expanded = checkpoints
    work = lf_checkout(tmp_path, str(expanded))
    lora = [*SHORT, "finetuning_type=lora", "lora_target=all"]
    assert run_main(["build", EXAMPLE], work).code == 0
    pipeline("train", EXAMPLE, *lora, cwd=work, timeout=600)
    adapter = work / "saves/llama3-8b-pro/freeze/sft/adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {block(t) for t in targets} == set(EXPANDED_IDS)
    assert len(targets) == 7 * len(EXPANDED_IDS)  # q, k, v, o, gate, up, down in each
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(expanded), adapter)
    wrapped = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert len(wrapped) == len(targets) and {block(n) for n in wrapped} == set(EXPANDED_IDS)


@pytest.mark.parametrize("family, layers", [("gpt2", "n_layer"), ("qwen2", "num_hidden_layers"),
                                            ("qwen3", "num_hidden_layers")])
def test_expand_keeps_the_logits_of_every_family(tmp_path, family, layers):
    """GPT-2's c_proj biases are zeroed too (else the copy adds them to the residual); Qwen's per-block
    layer_types follow their blocks."""
    write_hf_checkpoint(tmp_path / "m", family, small_vocab=True, **{layers: 4})
    done = run_main(["expand", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "x"),
                     "--num-expand", "2"], tmp_path)
    assert done.code == 0, done.err
    config = json.loads((tmp_path / "x/config.json").read_text())
    assert config[layers] == 6 and len(config.get("layer_types") or [0] * 6) == 6
    ids = [5, 9, 31, 2, 77]
    assert torch.allclose(logits(tmp_path / "m", ids), logits(tmp_path / "x", ids), rtol=0, atol=1e-6)
    after = state(tmp_path / "x")
    for i in (2, 5):  # split 4 / 2 = 2: new blocks after originals 1 and 3
        zeroed = [n for n in after if block(n) == i and n.endswith(("o_proj.weight", "down_proj.weight",
                                                                    "c_proj.weight", "c_proj.bias"))]
        assert len(zeroed) == (4 if family == "gpt2" else 2) and not any(after[n].any() for n in zeroed)


def test_expand_refuses_with_one_message_and_exit_2(tmp_path):
    write_hf_checkpoint(tmp_path / "m", "llama", small_vocab=True)  # 2 blocks
    argv = ["expand", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "x")]
    done = run_main([*argv, "--num-expand", "3"], tmp_path)
    assert done.code == 2 and done.err == ("error: --num-expand: given 3, expected a divisor of the model's 2 blocks "
                                           "(LLaMA Pro puts one new block after every num_layers / N): one of 1, 2\n")
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x/keep.txt").write_text("mine")
    done = run_main([*argv, "--num-expand", "2"], tmp_path)
    assert done.code == 2 and "is not an empty folder; expand never overwrites" in done.err
    assert (tmp_path / "x/keep.txt").read_text() == "mine"
    done = run_main([*argv[:-1], str(tmp_path / "x/keep.txt"), "--num-expand", "2"], tmp_path)
    assert done.code == 2 and "keep.txt is an existing file; expand never overwrites" in done.err, done.err
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    done = run_main([*argv[:-1], str(tmp_path / "y"), "--num-expand", "2"], tmp_path)
    assert done.code == 2 and "architectures is ['FalconForCausalLM']; expand knows" in done.err
    done = run_main(["expand", "--model", "gpt2-small", "--output-dir", str(tmp_path / "y"), "--num-expand", "2"],
                    tmp_path)  # a preset name, or a typo: the folder is missing, not its config.json
    assert done.code == 2 and done.err.startswith("error: --model: gpt2-small: no such folder; expected a Hugging "
                                                  "Face checkpoint folder or a hub id ORG/NAME"), done.err
    assert "Traceback" not in done.err


def recipe(tmp_path: Path, model: Path, **keys) -> Path:
    lines = {"model_name_or_path": str(model), "stage": "sft", "dataset": "identity", "template": "llama3",
             "dataset_dir": str(Path(__file__).parent / "lf_data"), "output_dir": str(tmp_path / "run"),
             "use_llama_pro": True, **keys}
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return path


def test_use_llama_pro_mistakes_name_the_key_and_line(tmp_path, checkpoints):
    write_hf_checkpoint(tmp_path / "m", "llama", small_vocab=True, num_hidden_layers=6)
    err = run_main(["validate", str(recipe(tmp_path, tmp_path / "m", finetuning_type="freeze",
                                           freeze_trainable_layers=4))], tmp_path).err
    assert ("r.yaml:9:26: freeze_trainable_layers: given 4, expected a divisor of the model's 6 blocks (LLaMA Pro "
            "puts one new block after every num_layers / N): one of 1, 2, 3, 6; with use_llama_pro it is the "
            "--num-expand") in err
    err = run_main(["validate", str(recipe(tmp_path, tmp_path / "m", finetuning_type="full"))], tmp_path).err
    assert "r.yaml:7:16: use_llama_pro: is true but finetuning_type is full; LLaMA Pro trains only the blocks" in err
    done = run_main(["plan", str(recipe(tmp_path, tmp_path / "m", finetuning_type="lora",
                                        freeze_trainable_layers=3))], tmp_path)
    assert done.code == 0, done.err  # freeze_trainable_layers counts the expanded blocks under lora too
    assert "trainable blocks: 1, 3, 5 of 0..5 (use_llama_pro" in done.out  # stride 6 / 3 = 2
    lora = dict(finetuning_type="lora", freeze_trainable_layers=8)
    _, expanded = checkpoints  # `expand`'s checkpoint: the new blocks' o_proj / down_proj are zero
    for keys, message in (({"pissa_init": True}, "r.yaml:10:13: pissa_init: is true with use_llama_pro, but the "
                                                 "expanded blocks' o_proj and down_proj (GPT-2's c_proj) are zero"),
                          ({"use_dora": True}, "r.yaml:10:11: use_dora: is true with use_llama_pro, but the expanded"),
                          ({"lora_target": "q_proj,v_proj"}, "r.yaml:10:14: lora_target: given ['q_proj', 'v_proj'], "
                                                             "which leaves out the output projections")):
        done = run_main(["validate", str(recipe(tmp_path, expanded, **lora, **keys))], tmp_path)
        assert done.code == 2 and message in done.err and "Traceback" not in done.err, (keys, done.err)
        # where those projections are not zero (blocks already trained; here: a model never expanded) each trains
        done = run_main(["plan", str(recipe(tmp_path, tmp_path / "m", **{**lora, "freeze_trainable_layers": 3},
                                                **keys))], tmp_path)
        assert done.code == 0, (keys, done.err)
    # the zero projections trained in full (additional_target, PEFT's modules_to_save): LoRA behind them trains too
    done = run_main(["plan", str(recipe(tmp_path, expanded, **lora, lora_target="q_proj,v_proj",
                                            additional_target="o_proj,down_proj"))], tmp_path)
    assert done.code == 0, done.err


def test_output_norms_reach_the_residual_through_their_branch_projection():
    """Which zeroed projection of an expanded block each norm waits for, by hand from the blocks' forwards
    (transformers 5.24): Llama's input_layernorm feeds attention (o_proj), post_attention_layernorm the MLP
    (down_proj); Gemma 2 / 3's and Glm4's branch output norms (ours attn_output_norm / mlp_output_norm) normalise
    o_proj's / down_proj's output (Gemma3DecoderLayer.forward, Glm4DecoderLayer.forward), zero while it is;
    Olmo2DecoderLayer.forward: x + post_attention_layernorm(self_attn(x)), x + post_feedforward_layernorm(mlp(x)).
    OLMo 2's post_attention_layernorm was read as the MLP's input (down_proj) before."""
    from pipeline.model.expand import output_projection

    o, down = "layers.3.self_attn.o_proj", "layers.3.mlp.down_proj"
    llama = {"input_layernorm": o, "self_attn.q_proj": o, "post_attention_layernorm": down, "mlp.up_proj": down,
             "attn_output_norm": o, "mlp_output_norm": down}
    assert {m: output_projection(f"layers.3.{m}") for m in llama} == llama
    olmo2 = {"self_attn.q_norm": o, "post_attention_layernorm": o, "mlp.gate_proj": down,
             "post_feedforward_layernorm": down}
    assert {m: output_projection(f"layers.3.{m}", post_norm=True) for m in olmo2} == olmo2
    assert output_projection("norm") is None and output_projection("layers.3.unknown_part") is None


def test_why_lora_on_expanded_blocks_needs_their_output_projections(checkpoints):
    """What the refusals above rest on, in PEFT on the expanded checkpoint: LoRA on q_proj / v_proj of an expanded
    block gets no gradient (its zero o_proj passes nothing on), PiSSA there starts at A = B = 0 (no gradient either),
    DoRA on its zero o_proj gives NaN; plain LoRA with o_proj trains."""
    import peft

    _, expanded = checkpoints
    ids = torch.tensor([[3, 17, 42, 99]])

    def grads(**config) -> list[torch.Tensor]:
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(expanded),
                                    peft.LoraConfig(r=2, layers_to_transform=[1], **config))
        model(ids, labels=ids).loss.backward()
        return [p.grad for n, p in model.named_parameters() if p.requires_grad]

    assert all(not g.any() for g in grads(target_modules=["q_proj", "v_proj"]))
    assert all(not g.any() for g in grads(target_modules=["o_proj", "down_proj"], init_lora_weights="pissa"))
    assert any(g.isnan().any() for g in grads(target_modules=["o_proj"], use_dora=True))
    assert any(g.any() for g in grads(target_modules=["o_proj"]))


def test_expanded_block_ids_are_llama_factorys():
    """LLaMA-Factory's example: Llama 3 8B's 32 blocks + 8 = 40, stride 5: ids 4, 9, ..., 39."""
    from pipeline.model.config import llama_pro_blocks
    from pipeline.model.expand import expanded_layout

    assert llama_pro_blocks(40, 8) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [i for i, (_, new) in enumerate(expanded_layout(32, 8)) if new] == [4, 9, 14, 19, 24, 29, 34, 39]
    assert [source for source, _ in expanded_layout(32, 8)][:10] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]


def blocks_trained(expanded: Path, out: Path, names: tuple[str, ...] = ZEROED) -> Path:
    """`expanded` as after a use_llama_pro run on its new blocks, merged: their `names` (o_proj and down_proj) no
    longer zero (small random values, written by transformers' save_pretrained); the tokenizer files copied."""
    import shutil

    model = transformers.AutoModelForCausalLM.from_pretrained(expanded)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in EXPANDED_IDS:
            for name in names:
                weight = model.model.layers[i].get_submodule(name.rsplit(".", 1)[0]).weight
                weight.copy_(0.02 * torch.randn(weight.shape, generator=gen))
    model.save_pretrained(out)
    for path in expanded.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, out / path.name)
    return out


def lf_oft_targets(model: "torch.nn.Module") -> list[str]:
    """LLaMA-Factory 0.9.5's OFT targets under use_llama_pro, re-typed: find_all_linear_modules (every Linear's last
    name but lm_head) for lora_target all, then find_expanded_modules with num_layer_trainable 8 (stride 16 / 8, the
    module names holding '.{id}.' for an id of range(stride - 1, 16 + stride - 1, stride) and a target)."""
    linears = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    stride = 16 // 8
    ids = [f".{i}." for i in range(stride - 1, 16 + stride - 1, stride)]
    return [n for n, _ in model.named_modules() if any(t in n for t in linears) and any(i in n for i in ids)]


def peft_oft(path: Path, targets: tuple[str, ...] | None = None,
             modules_to_save: list[str] | None = None) -> "torch.nn.Module":
    """PEFT's OFT as LLaMA-Factory builds it with use_llama_pro (default oft_block_size 32): on the expanded blocks'
    lora_target modules (`all` when targets is None), additional_target as modules_to_save."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    chosen = [n for n in lf_oft_targets(model) if targets is None or n.endswith(targets)]
    return peft.get_peft_model(model, peft.OFTConfig(r=0, oft_block_size=32, target_modules=chosen,
                                                     modules_to_save=modules_to_save))


def peft_grads(path: Path, targets: tuple[str, ...] | None = None,
               modules_to_save: list[str] | None = None) -> dict[str, "torch.Tensor"]:
    """The gradient of every trained tensor of peft_oft's model after one backward of the language-model loss."""
    model = peft_oft(path, targets, modules_to_save)
    ids = torch.tensor([[3, 17, 42, 99]])
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_oft_on_expanded_blocks_runs_once_their_output_projections_are_trained(tmp_path, checkpoints):
    """LLaMA-Factory 0.9.5 gives OFT the lora_target modules of the expanded blocks (find_expanded_modules, as for
    LoRA). OFT rotates a layer's input, so a zero weight stays zero and passes no gradient back: on the checkpoint
    `expand` wrote every OFT gradient is zero (PEFT), and the recipe is refused at use_llama_pro, unless a module
    trained in full (additional_target) gets a gradient there (PEFT's modules_to_save); once the blocks' o_proj and
    down_proj are trained every OFT module there gets one (PEFT), plan counts PEFT's trainable numbers, and train's
    model wraps exactly LLaMA-Factory's modules."""
    from pipeline.model.adapter import AdapterLinear, family_of_model
    from pipeline.model.build import build_model
    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args

    _, expanded = checkpoints
    assert all(not g.any() for g in peft_grads(expanded).values())
    oft = dict(finetuning_type="oft", freeze_trainable_layers=8)
    done = run_main(["validate", str(recipe(tmp_path, expanded, **oft))], tmp_path)
    assert done.code == 2 and "Traceback" not in done.err
    assert done.errors == [
        f"{tmp_path / 'r.yaml'}:7:16: use_llama_pro: is true with finetuning_type oft, but in {expanded} the "
        "expanded blocks' output projections behind lora_target's modules (o_proj for attention, down_proj for the "
        "MLP) are zero, as `python -m pipeline expand` writes them: OFT rotates a layer's input, a rotated zero weight "
        "stays zero and passes no gradient back, so nothing this recipe trains would ever move (LLaMA-Factory runs it "
        "with a grad_norm of 0); train the expanded blocks first (finetuning_type: freeze, or lora, with "
        "use_llama_pro) and OFT their merged model, train those projections in full beside OFT (additional_target: "
        "o_proj,down_proj, every block's, as PEFT's modules_to_save, with a lora_target that leaves them out), or use "
        "finetuning_type: lora here"], done.err

    # additional_target trains modules in full: LLaMA-Factory 0.9.5 hands it to PEFT as modules_to_save, which takes
    # every block's module of that name. A zero o_proj trained in full gets a gradient (its input times the
    # output's), so that recipe trains (and the rotations behind o_proj move from its second step); a norm behind
    # the zero o_proj gets none, so additional_target naming only that one is refused as OFT alone is
    full = peft_grads(expanded, ("q_proj", "v_proj"), ["o_proj", "input_layernorm"])

    def grad(part: str, i: int) -> "torch.Tensor":
        [found] = [g for n, g in full.items() if f"layers.{i}.{part}." in n]
        return found

    assert all(grad("self_attn.o_proj", i).any() and not grad("input_layernorm", i).any() for i in EXPANDED_IDS)
    assert not any(grad(f"self_attn.{p}", i).any() for p in ("q_proj", "v_proj") for i in EXPANDED_IDS)
    assert grad("input_layernorm", 0).any()  # an original block's
    for extra, code in (("o_proj", 0), ("layers.1.input_layernorm", 2)):
        done = run_main(["plan", str(recipe(tmp_path, expanded, **oft, lora_target="q_proj,v_proj",
                                            additional_target=extra))], tmp_path)  # the rules, no data needed
        assert done.code == code and "Traceback" not in done.err, (extra, done.err)
        assert ("use_llama_pro: is true with finetuning_type oft" in done.err) == (code == 2), done.err

    trained = blocks_trained(expanded, tmp_path / "trained")
    moved = peft_grads(trained)
    assert len(moved) == 7 * len(EXPANDED_IDS) and all(g.any() for g in moved.values())
    path = recipe(tmp_path, trained, **oft)
    plan = run_main(["plan", str(path)], tmp_path).out
    assert (f"trainable blocks: {', '.join(map(str, EXPANDED_IDS))} of 0..15 (use_llama_pro: the 8 blocks `python -m "
            "pipeline expand` inserted; OFT on lora_target inside them)") in plan, plan
    theirs = peft_oft(trained)
    assert f"{sum(p.numel() for p in theirs.parameters() if p.requires_grad):,} trainable" in plan
    ours = build_model(*recipe_args(resolve(str(path), command="train")))
    family = family_of_model(ours)
    wrapped = {family.to_hf(n) for n, m in ours.named_modules() if isinstance(m, AdapterLinear)}
    assert wrapped == set(lf_oft_targets(transformers.AutoModelForCausalLM.from_pretrained(trained)))


@pytest.mark.slow  # ~15 s: trains two steps through the CLI
def test_oft_on_a_partly_trained_expansion_moves_what_peft_gives_a_gradient(tmp_path, checkpoints):
    """The expanded blocks' o_proj trained, their down_proj still zero (say a LoRA run on attention alone, merged):
    PEFT's OFT gradients are non-zero on the attention modules and zero on the MLP ones there. A lora_target of MLP
    modules alone is refused (nothing would train; LLaMA-Factory 0.9.5 runs it with grad_norm 0); lora_target: all
    trains through the CLI, and after two steps exactly the rotations PEFT gives a gradient have moved (the MLP ones
    are still the identity), in an adapter PEFT loads."""
    import peft
    from safetensors.torch import load_file

    _, expanded = checkpoints
    partly = blocks_trained(expanded, tmp_path / "partly", names=("self_attn.o_proj.weight",))
    moves = {n.split("base_model.model.")[1].split(".oft_R")[0] for n, g in peft_grads(partly).items() if g.any()}
    assert moves == {f"model.layers.{i}.self_attn.{p}" for i in EXPANDED_IDS for p in ("q_proj", "k_proj", "v_proj",
                                                                                        "o_proj")}
    work = lf_checkout(tmp_path / "lf", str(partly))
    assert run_main(["build", EXAMPLE], work).code == 0
    oft = [*SHORT, "finetuning_type=oft"]
    done = run_main(["validate", EXAMPLE, *oft, "lora_target=gate_proj,up_proj,down_proj"], work)
    assert done.code == 2 and "Traceback" not in done.err, done.err
    assert [e.split(": ", 1)[1] for e in done.errors] == [
        f"use_llama_pro: is true with finetuning_type oft, but in {partly} the expanded blocks' output projections "
        "behind lora_target's modules (o_proj for attention, down_proj for the MLP) are zero, as `python -m pipeline "
        "expand` writes them: OFT rotates a layer's input, a rotated zero weight stays zero and passes no gradient "
        "back, so nothing this recipe trains would ever move (LLaMA-Factory runs it with a grad_norm of 0); train the "
        "expanded blocks first (finetuning_type: freeze, or lora, with use_llama_pro) and OFT their merged model, "
        "train those projections in full beside OFT (additional_target: o_proj,down_proj, every block's, as PEFT's "
        "modules_to_save, with a lora_target that leaves them out), or use finetuning_type: lora here"], done.err
    pipeline("train", EXAMPLE, *oft, "lora_target=all", cwd=work, timeout=600)
    adapter = work / "saves/llama3-8b-pro/freeze/sft/adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 7 * len(EXPANDED_IDS)
    assert {n.removeprefix("base_model.model.").removesuffix(".oft_R.weight") for n, t in tensors.items()
            if t.any()} == moves
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(partly), adapter)
    assert sum(n.endswith("oft_R.default.weight") for n, _ in model.named_parameters()) == len(tensors)


def test_expand_keeps_qwen2_windows_read_from_max_window_layers(tmp_path):
    """A Qwen2 config.json without layer_types (as transformers 4 writes it) slides from max_window_layers on
    (Qwen2Config: i >= max_window_layers); inserted blocks shift the originals' indices, so that bound must move with
    its block: here 3 of 4 (original block 2 full, 3 sliding) becomes 4 of 6, else original block 2, now at index 3,
    would slide (a 2-position window, rows of 7 tokens: the logits would change)."""
    write_hf_checkpoint(tmp_path / "m", "qwen2", small_vocab=True, num_hidden_layers=4, use_sliding_window=True,
                        sliding_window=2, max_window_layers=3)
    config = json.loads((tmp_path / "m/config.json").read_text())
    config.pop("layer_types", None)
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    done = run_main(["expand", "--model", str(tmp_path / "m"), "--output-dir", str(tmp_path / "x"),
                     "--num-expand", "2"], tmp_path)
    assert done.code == 0, done.err
    ids = [5, 9, 31, 2, 77, 14, 3]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "x").layer_types == ["full_attention"] * 4 + [
        "sliding_attention"] * 2
    assert torch.allclose(logits(tmp_path / "m", ids), logits(tmp_path / "x", ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("config_class, keys", [
    ("Qwen2Config", {"max_window_layers": 3}),
    ("Qwen2Config", {}),  # max_window_layers absent: Qwen2Config's default, 28, of 30 blocks
    ("Qwen3Config", {}),
    ("Qwen3Config", {"layer_types": ["full_attention"] * 29 + ["sliding_attention"]}),
])
def test_expanded_config_gives_each_block_its_sources_attention_as_transformers_reads_it(config_class, keys):
    """transformers' reading (layer_types, from max_window_layers or its default where config.json has none) of the
    expanded config.json is, block by block, its source block's in the original (30 blocks, 2 expanded)."""
    from pipeline.model.expand import checkpoint_family, expanded_config, expanded_layout

    config = {"architectures": [config_class.replace("Config", "ForCausalLM")], "num_hidden_layers": 30,
              "use_sliding_window": True, "sliding_window": 4, **keys}
    layout = expanded_layout(30, 2)
    before = getattr(transformers, config_class)(**config).layer_types
    after = getattr(transformers, config_class)(**expanded_config(config, layout, checkpoint_family(config, Path()))).layer_types
    assert after == [before[source] for source, _ in layout] and "sliding_attention" in after
