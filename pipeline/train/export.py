"""The trained weights as people use them: adapter/ (PEFT layout) for LoRA, model/ (our own format) otherwise.

They are taken from the fp32 master weights, whatever the precision and ZeRO stage: under bf16/fp16 the
module holds rounded 16-bit copies, and under ZeRO-3 each rank holds only a slice of every parameter
(saving `model.state_dict()` there is how LoRA checkpoints came out empty in LLaMA-Factory #1226 and
axolotl #705). `deepspeed_compat.fp32_master` gathers a parameter's full fp32 value on every rank
(a collective under ZeRO-3, so all ranks take part); rank 0 puts the values into the model's skeleton
(pipeline.model.build.build_skeleton: names and shapes, no weights), writes it with the model layer's
`save_adapter` / `save_model`, then re-opens the file and checks every expected tensor is there, with
the expected shape, non-empty and finite.

Why a skeleton: LoRA writes only trained tensors, and full fine-tuning trains every tensor, so neither needs
the base weights (a PiSSA adapter is converted with its starting pairs, which the Exporter is given: a plain LoRA
for the original base, pipeline.model.lora.pissa_converted). model/ is fp32, or bf16 under pure_bf16, where the
weights trained are bf16 and nothing else exists (the values exactly, at half the size; LLaMA-Factory's Trainer
writes them so); a LoRA / OFT adapter is fp32, as it trained there (PEFT's fp32 adapter on the bf16 base), and its
additional_target modules bf16, as they trained and as PEFT writes its modules_to_save.
freeze writes its frozen weights exactly as loaded (in bf16 under pure_bf16, as it trained): it reads them from the base
into the skeleton at each write, one tensor at a time (`frozen`), and lets them go once written. Building
the model for real, as freeze did before, kept an fp32 copy of the whole model on the host for the rest of
the run (32 GB for an 8B model); it remains the way where the recipe changes the base as it builds it
(a config override, an adapter folded in: pipeline.model.build.base_as_built).

The final export of a run repeats the last checkpoint's, whose weights are the same: it is linked from there
(`write(..., same_as=checkpoint)`), not gathered, written and verified a second time.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.data.added_tokens import TokenNames
from pipeline.names import trains_adapter
from pipeline.runtime import deepspeed_compat, dist, hostmem
from pipeline.runtime.layout import RunLayout


def trainable_state(engine: Any) -> dict[str, Any]:
    """name -> fp32 CPU tensor for every trainable parameter on rank 0, {} on the other ranks.

    Every rank must call it: under ZeRO the full value is gathered by a collective. Only rank 0 writes, so
    only rank 0 keeps a host copy; before, every rank did, and full fine-tuning of an 8B model on 8 GPUs held
    8 x 32 GB of host memory on the node at each save where 32 GB is needed.
    """
    keep = dist.is_main()
    state = {}
    for name, p in engine.module.named_parameters():
        if deepspeed_compat.trains(p):
            value = deepspeed_compat.fp32_master(engine, p)
            if keep:
                state[name] = value.detach().float().cpu().clone()
    return state


def verify_tensors(path: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Re-open a written safetensors file: exactly the expected keys and shapes, non-empty, finite."""
    import torch
    from safetensors import safe_open

    problems = []
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        problems += [f"missing tensor {k}" for k in sorted(set(expected) - keys)]
        problems += [f"unexpected tensor {k}" for k in sorted(keys - set(expected))]
        for key in sorted(keys & set(expected)):
            tensor = handle.get_tensor(key)
            if tuple(tensor.shape) != tuple(expected[key]):
                problems.append(f"{key} has shape {list(tensor.shape)}, expected {list(expected[key])}")
            elif tensor.numel() == 0:
                problems.append(f"{key} is empty")
            elif not bool(torch.isfinite(tensor).all()):
                problems.append(f"{key} holds NaN or inf")
    if problems:
        raise RuntimeError(f"{path} was written incompletely: " + "; ".join(problems))


class Exporter:
    """Writes adapter/ or model/ under a directory from the engine's fp32 master weights."""

    def __init__(self, engine: Any, model_name_or_path: str, finetuning_type: str, build: Callable[[], Any],
                 tokenizer_from: str | None = None, skeleton: Callable[[], Any] | None = None,
                 frozen: Callable[[set[str]], Mapping[str, Any]] | None = None,
                 pissa_start: Mapping[str, Any] | None = None, new_tokens: TokenNames | None = None,
                 split_special_tokens: bool = False, dtype: str = "fp32"):
        """build: the model as train built it (fp32 copy); skeleton: the same on the meta device; frozen: names ->
        their base tensors in fp32, where the base is what train built from (freeze); pissa_start: a PiSSA run's
        starting pairs (pipeline.model.lora.pissa_start), which the adapter is converted with; dtype: model/'s
        (pipeline.recipe.precision.weights_dtype: bf16 under pure_bf16, whose weights are bf16, frozen ones too), and
        that of an adapter's additional_target modules."""
        self.engine, self._build, self._skeleton, self._frozen = engine, build, skeleton, frozen
        self.dtype = dtype
        self.pissa_start = pissa_start
        self.base, self.lora = str(model_name_or_path), trains_adapter(finetuning_type)  # lora/oft: adapter/
        self.tokenizer_from = str(tokenizer_from or model_name_or_path)  # tokenizer_name_or_path, else the base
        self.new_tokens = new_tokens or TokenNames()  # the recipe's added tokens: in the exported tokenizer files
        self.split_special_tokens = split_special_tokens  # the recipe's, in the exported tokenizer_config.json
        self._model: Any = None

    def target(self, directory: str | Path) -> Path:
        """directory/adapter or directory/model (pipeline.runtime.layout names them)."""
        layout = RunLayout(directory)
        return layout.adapter if self.lora else layout.model

    def model(self) -> Any:
        """A CPU fp32 copy of the model (rank 0 only), built once without touching the training RNG."""
        import torch

        if self._model is None:
            with torch.random.fork_rng(devices=[]):
                self._model = self._build().float().cpu().eval()
        return self._model

    def filled(self, state: dict[str, Any]) -> Any:
        """The model to write, holding `state`: the skeleton when `state` is all the written tensors need,
        else the built copy (freeze: frozen weights as loaded)."""
        import torch

        if self._skeleton is not None:
            model = self._skeleton()
            model.load_state_dict(state, strict=False, assign=True)
            model.tie_weights()
            if not self.lora and self._frozen is not None:
                self._fill_frozen(model)
            if self.lora:
                from pipeline.model.lora import lora_state_dict

                needed = lora_state_dict(model).values()
            else:
                needed = model.parameters()
            if not any(t.is_meta for t in needed):
                return model
        model = self.model()
        with torch.no_grad():
            result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"trained parameters not found in the export model: {result.unexpected_keys}")
        return model

    def _fill_frozen(self, model: Any) -> None:
        """The skeleton's empty (frozen) tensors from the base; any the base lacks, or holds in another shape,
        stay empty, and filled() falls back to the built copy."""
        import torch

        empty = {n: t for n, t in model.state_dict(keep_vars=True).items() if t.is_meta}
        if not empty:
            return
        with torch.random.fork_rng(devices=[]):  # a preset base is a seeded build: keep the training RNG
            values = self._frozen(set(empty))
        values = {n: v for n, v in values.items() if tuple(v.shape) == tuple(empty[n].shape)}
        model.load_state_dict(values, strict=False, assign=True)
        model.tie_weights()

    def write(self, directory: str | Path, same_as: str | Path | None = None) -> Path | None:
        """Collective; rank 0 writes directory/adapter or directory/model and returns it.

        same_as: a checkpoint of the same weights (the last one of a run) whose export is linked instead."""
        if same_as is not None and self.target(same_as).is_dir():
            return link_export(self.target(same_as), self.target(directory)) if dist.is_main() else None
        state = trainable_state(self.engine)
        if not dist.is_main():
            return None
        target = self._save(self.filled(state), directory)
        del state
        if self._model is None:  # the filled skeleton is gone: hand its space back, not keep it in the C heap
            hostmem.release_freed()
        return target

    def _save(self, model: Any, directory: str | Path) -> Path:
        """Write `model` as adapter/ or model/ under `directory`, then re-read and check every tensor."""
        if self.lora:
            from pipeline.model.lora import ADAPTER_WEIGHTS, adapter_state, save_adapter

            target = save_adapter(self._modules_as_held(model), self.target(directory),
                                  {"base_model_name_or_path": self.base}, start=self.pissa_start)
            expected = {k: tuple(v.shape) for k, v in adapter_state(model, self.pissa_start).items()}
            verify_tensors(target / ADAPTER_WEIGHTS, expected)
            if self.new_tokens or self.split_special_tokens:  # PEFT users resize the base to the adapter's
                # tokenizer before loading it, and load that tokenizer to encode as training did
                copy_tokenizer_files(self.tokenizer_from, target, self.new_tokens, self.split_special_tokens)
        else:
            from pipeline.model.config import base_folder
            from pipeline.model.weights import SINGLE, plain_state_dict, save_model

            target = save_model(model, self.target(directory), self.dtype, source=base_folder(self.base))
            expected = {k: tuple(v.shape) for k, v in plain_state_dict(model).items()}
            verify_tensors(target / SINGLE, expected)
            copy_tokenizer_files(self.tokenizer_from, target, self.new_tokens, self.split_special_tokens)
            copy_generation_config(self.base, target)
        return target

    def _modules_as_held(self, model: Any) -> Any:
        """The modules trained in full beside the adapter (additional_target, PEFT's modules_to_save) in the run's
        weights dtype, as PEFT's save_pretrained writes what it holds: bf16 under pure_bf16 (the adapter's own
        weights stay fp32 there, pipeline.model.adapter.upcast_adapter), else fp32."""
        from pipeline.model.weights import DTYPES

        for name in getattr(model, "_lora_additional", []):
            model.get_submodule(name).to(DTYPES[self.dtype])
        return model


def link_export(source: Path, target: Path) -> Path:
    """target/ as a copy of source/ (an export already written and verified): each file hard-linked (no bytes
    copied; deleting the checkpoint later leaves it whole), copied where the filesystem cannot link."""
    from pipeline.io import atomic_dir

    with atomic_dir(target) as tmp:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            copy = tmp / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, copy)
            except OSError:
                shutil.copy2(path, copy)
    return target


def copy_tokenizer_files(model_name_or_path: Any, target: Path, new_tokens: TokenNames | None = None,
                         split_special_tokens: bool = False) -> None:
    """The tokenizer files of the run (the base checkpoint's, or tokenizer_name_or_path's) beside model/, so that
    model/ (or the run's output_dir, as LLaMA-Factory's inference and merge recipes name it) works as
    model_name_or_path with its own vocabulary; with the tokens the recipe adds added to them, and its
    split_special_tokens (tokenizer_files.write_recipe_settings)."""
    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.tokenizer_files import write_recipe_settings

    names = new_tokens or TokenNames()
    tokenizer = load_tokenizer(model_name_or_path).with_tokens(names.plain, names.special)
    tokenizer = tokenizer.split_special() if split_special_tokens else tokenizer
    for path in tokenizer.files:
        relative = path.name if path.parent.name != "original" else f"original/{path.name}"
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / relative)
    write_recipe_settings(target, tokenizer)


def copy_generation_config(model_name_or_path: str, target: Path) -> None:
    """The base checkpoint's generation_config.json beside model/ (a preset has none), as merge finds it beside the
    base: exported LLaMA-Factory's way (`python -m pipeline export`, model_name_or_path: output_dir), model/ then
    gets the base's decoding defaults (Qwen3's temperature 0.6, top_k 20, top_p 0.95) as merge's export of the run
    does, and the tokenizer read from model/ stops where the base's does (its stop ids are read from this file)."""
    from pipeline.model.config import config_path

    path = config_path(model_name_or_path)  # None for a preset
    if path is not None and (path.parent / "generation_config.json").is_file():
        shutil.copyfile(path.parent / "generation_config.json", target / "generation_config.json")
