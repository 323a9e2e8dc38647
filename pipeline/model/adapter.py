"""What every adapter method shares (LoRA in pipeline.model.lora, OFT in pipeline.model.oft): the wrapped-Linear
base class AdapterLinear, the walk that wraps the targeted Linears, how the targets and the modules trained in full
beside them (additional_target, PEFT's modules_to_save) are chosen, and the facts about a model they read (its
family, a reward model's score head, a tied head). Kept apart so that lora (which reads and loads adapters of
either method) and oft (a method) both import it and not each other.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from pipeline.model.config import adapted, in_blocks, lora_candidates, select_modules
from pipeline.model.families import GPT2, Family
from pipeline.model.gpt import held_dtype
from pipeline.names import split_names

TIED = ("embed_tokens", "lm_head")  # one matrix when the head is tied (tie_word_embeddings): trained as one module
HALF = (torch.bfloat16, torch.float16)  # the dtypes PEFT's cast_adapter_dtype upcasts to fp32


class AdapterLinear(nn.Module):
    """A frozen Linear with a trained adapter beside it (LoRA here, OFT in pipeline.model.oft): what merge,
    save_adapter / load_adapter and adapters_disabled see, whatever the method.

    A method says how it is written for PEFT (peft_type, peft_config, peft_params), what its merged Linear is
    (merged_weight) and when it changes nothing (unchanged_by); RECIPE_KEYS maps its adapter_config.json keys to the
    recipe keys that set them (a loaded adapter must match the model's)."""

    peft_type = "LORA"
    method = "LoRA"  # its name in messages
    RECIPE_KEYS: Mapping[str, str] = {}

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.disabled = False  # adapters_disabled(): the base Linear alone (a preference loss's reference)

    def peft_config(self, family: Family) -> dict[str, Any]:
        """This layer's settings as adapter_config.json writes them (one set for the whole adapter)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """The weight of the one Linear that computes this layer (eval mode), in fp32 and nn.Linear layout."""
        raise NotImplementedError

    def peft_params(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """PEFT's name for each trained tensor (after the module's key) -> (ours, stored transposed)."""
        raise NotImplementedError

    def unchanged_by(self) -> str | None:
        """The PEFT tensor whose value makes this layer's update nothing, or None when the update is real."""
        raise NotImplementedError


def replace_linears(model: nn.Module, wrap: Callable[[nn.Linear], AdapterLinear], targets: set[str] | None = None,
                    prefix: str = "") -> list[str]:
    """The walk itself, for any adapter: each targeted Linear becomes wrap(linear); returns the paths."""
    replaced = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Linear) and (targets is None or path in targets):
            wrapper = upcast_adapter(wrap(child))
            setattr(model, name, wrapper.train(child.training))  # a new module would start in training mode
            replaced.append(path)
        elif not isinstance(child, AdapterLinear):
            replaced += replace_linears(child, wrap, targets, prefix=path + ".")
    return replaced


def upcast_adapter(wrapper: AdapterLinear) -> AdapterLinear:
    """The adapter's own weights (peft_params: LoRA's A and B, DoRA's magnitude, OFT's rotation) in fp32 when the
    base layer is bf16 / fp16, their values as made in the base's dtype: PEFT's get_peft_model and
    PeftModel.from_pretrained create them in the base layer's dtype and then upcast them (cast_adapter_dtype, on by
    default: autocast_adapter_dtype=True, which LLaMA-Factory 0.9.5 leaves on). So under pure_bf16 the adapter trains
    in fp32 on the bf16 base, with fp32 optimizer states; the forward casts the input to the adapter's dtype and the
    result back (LinearWithLoRA.forward, OFTLayer.forward), as PEFT's does. Modules trained in full beside it (modules_to_save,
    additional_target) stay in the base's dtype, as PEFT leaves them."""
    for param, _ in wrapper.peft_params().values():
        if param.dtype in HALF:
            param.data = param.data.float()
    return wrapper


def cast_keeping_adapters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), the adapters' own weights left as they are (fp32: upcast_adapter), so that an adapter loaded
    in fp32 (adapter_name_or_path) keeps its values, as PEFT keeps them; and a GPTModel's tensors that transformers
    holds fp32 in a model of `dtype` held fp32 (gpt.held_dtype)."""
    kept = {id(param) for wrapper in model.modules() if isinstance(wrapper, AdapterLinear)
            for param, _ in wrapper.peft_params().values()}
    cfg = getattr(model, "cfg", None)
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            want = held_dtype(cfg, f"{path}.{name}".lstrip("."), dtype) if cfg is not None else dtype
            if id(param) not in kept and param.is_floating_point() and param.dtype != want:
                param.data = param.data.to(want)
        for name, buffer in module.named_buffers(recurse=False):
            want = held_dtype(cfg, f"{path}.{name}".lstrip("."), dtype) if cfg is not None else dtype
            if buffer.is_floating_point() and buffer.dtype != want:
                module._buffers[name] = buffer.to(want)
    return model


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def embedding_names(model: nn.Module) -> list[str]:
    """Our modules PEFT puts LoRA on when target_modules names them but which take none here: every nn.Embedding (the
    token embedding, GPT-2's learned position table pos_embed: PEFT 0.21 makes each a lora.Embedding) and the output
    head (TIED). One list, so a name or a pattern reaching any of them is refused one way (lora.embedding_targets)."""
    tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return list(dict.fromkeys([*tables, *(n for n in TIED if isinstance(getattr(model, n, None), nn.Module))]))


def adapter_targets(model: nn.Module, targets: str | Iterable[str] | None,
                    additional_targets: str | Iterable[str] | None,
                    blocks: Iterable[int] | None = None) -> tuple[list[str], list[str]]:
    """(the Linears an adapter wraps, the modules trained in full beside it), as apply_lora describes them; any
    adapter method (LoRA, OFT) picks its modules this one way. A Linear in both trains in full only (config.adapted:
    PEFT's rule)."""
    family = family_of_model(model)
    chosen = in_blocks(select_modules(lora_candidates(linear_names(model)), targets, family=family), blocks)
    modules = [n for n, _ in model.named_modules() if n]
    extra = [] if not additional_targets else select_modules(modules, additional_targets, key="additional_target",
                                                             family=family)
    if is_reward_model(model) and "score" not in extra:  # a new head trains in full (PEFT SEQ_CLS's modules_to_save)
        extra.append("score")
    if head_is_tied(model) and set(TIED) & set(extra):
        # training either trains the shared matrix, so both modules are saved and restored (PEFT's
        # ensure_weight_tying): with one of them the adapter would give PEFT another model than the trained one
        extra = [n for n in modules if n in extra or n in TIED]
    patterns = split_names(additional_targets)
    return adapted(chosen, patterns, family), extra  # no adapter on a module trained in full (PEFT's modules_to_save)


PEFT_SEQ_CLS_HEADS = ("classifier", "score")  # what PeftModelForSequenceClassification adds to modules_to_save


def saved_modules(model: nn.Module, config: Mapping[str, Any]) -> list[str]:
    """An adapter_config.json's modules_to_save as PEFT reads it onto `model`. PEFT (0.21, utils/other.py
    _set_trainable, called with strict_module_check=False) wraps every module whose name ends with a listed name and
    skips a name that matches none; PeftModelForSequenceClassification appends "classifier" and "score" to every
    task_type SEQ_CLS config, so PEFT's own SEQ_CLS adapters list both where a decoder has one. Those two are
    dropped here when no module bears the name. Any other name must match (select_modules refuses it otherwise): a
    misspelt module there trains nothing in PEFT, without a word; and the adapter's tensors are checked against the
    modules either way (load_adapter), so a list naming nothing the file holds is still refused. But for "all", which
    LLaMA-Factory's additional_target: all writes there (config.all_saved_message): dropped where no module's name
    ends with it, as PEFT skips it; such an adapter trained nothing in full."""
    names = list(config.get("modules_to_save") or [])
    droppable = {"all", *(PEFT_SEQ_CLS_HEADS if config.get("task_type") == "SEQ_CLS" else ())}
    if droppable & set(names):
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        names = [n for n in names if n not in droppable or n in present]
    return names


def train_additional(model: nn.Module, extra: list[str]) -> None:
    """The modules trained in full beside the adapter (additional_target, PEFT's modules_to_save): trainable, and
    remembered for save_adapter."""
    for name in extra:
        model.get_submodule(name).requires_grad_(True)
    model._lora_additional = extra  # type: ignore[assignment]  # remembered for save_adapter (modules_to_save)


def family_of_model(model: nn.Module) -> Family:
    """The model's family (a GPTModel's cfg.family); a bare module (unit tests) counts as GPT-2."""
    cfg = getattr(model, "cfg", None)
    return cfg.hf if cfg is not None else GPT2


def is_reward_model(model: nn.Module) -> bool:
    """Whether the model has transformers' `score` head (XForSequenceClassification, stage rm)."""
    return isinstance(getattr(model, "score", None), nn.Module)


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head's weight is the token embedding's Parameter (tie_word_embeddings)."""
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    return embed is not None and head is not None and head.weight is embed.weight
