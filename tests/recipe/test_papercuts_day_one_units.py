"""pipeline.lock.unwritable: the refusal the output_dir lock would give, found without leaving anything on disk (for
`train --dry-run`, which takes no lock: tests/acceptance/test_papercuts_day_one.py drives it through the CLI)."""
from __future__ import annotations

import errno
import os

import pytest

from pipeline.errors import UserError
from pipeline.lock import exclusive, unwritable


def listing(root) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_a_writable_place_is_no_problem_and_nothing_is_made(tmp_path):
    (tmp_path / "runs").mkdir()
    before = listing(tmp_path)
    assert unwritable(tmp_path / "runs") is None  # existing
    assert unwritable(tmp_path / "a" / "b" / "out", "r.yaml:3: output_dir") is None  # to be created, with parents
    assert listing(tmp_path) == before


def test_a_file_in_the_way_is_the_message_the_lock_gives(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    target = tmp_path / "notes.txt" / "run"
    said = unwritable(target, "r.yaml:3: output_dir").messages
    with pytest.raises(UserError) as refusal, exclusive(target, "train r.yaml", "r.yaml:3: output_dir", writes=True):
        pass
    assert refusal.value.messages == said
    assert said == [f"r.yaml:3: output_dir: {target} cannot be created: {tmp_path / 'notes.txt'} is a file, not a "
                    "directory; move it away or choose another directory"]


def test_an_existing_folder_is_asked_not_probed(tmp_path, monkeypatch):
    """A folder without write permission (os.access says no) or on a read-only mount (statvfs's ST_RDONLY): said
    without a probe file, which would change the folder's mtime."""
    out = tmp_path / "out"
    out.mkdir()
    mtime = out.stat().st_mtime_ns
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert unwritable(out).messages == [f"{out} cannot be written: {os.strerror(errno.EACCES)} ({out}); choose a "
                                        "directory this user may write, or make that one writable"]
    monkeypatch.undo()

    class ReadOnly:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    assert f"{out} cannot be written: {os.strerror(errno.EROFS)} ({out})" in unwritable(out).messages[0]
    assert out.stat().st_mtime_ns == mtime


def test_a_dry_run_locks_nothing(write, manifest):
    from pipeline.__main__ import lock_targets
    from pipeline.recipe import resolve

    manifest("d", train=8)
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 3\noutput_dir: saves/r\n")
    r = resolve("r.yaml", command="train")
    assert [str(p) for p, _ in lock_targets("train", r)] == ["saves/r"]
    assert lock_targets("train", r, dry_run=True) == []


def test_qwen2_windows_that_are_no_suffix_export_as_layer_types_with_the_same_logits(tmp_path):
    """Qwen2 layers that slide but are no suffix of the stack (only the middle one here), which max_window_layers (the
    layers from it on) cannot say: transformers 5's Qwen2Config reads layer_types first (__post_init__ derives it from
    max_window_layers only where it is absent), so the export writes it, and the merged model loads with the windows it
    was read with. A guard: the export wrote layer_types before this test was written (tests/model/test_families.py
    covers Qwen3's first-layer window the same way)."""
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pipeline.model.weights import load_model, save_hf

    types = ["full_attention", "sliding_attention", "full_attention"]
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=3, layer_types=types)
    torch.manual_seed(0)
    theirs = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms off their init values
    theirs.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src").eval()
    assert ours.cfg.layer_windows == (None, 3, None)
    save_hf(ours, tmp_path / "out", special={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["use_sliding_window"], written["sliding_window"], written["layer_types"]) == (True, 3, types)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.layer_types == types
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 positions > the window of 3
    full = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**config.to_dict(), "layer_types": None,
                                                                      "use_sliding_window": False})).eval()
    full.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert torch.allclose(back(x).logits, theirs(x).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(full(x).logits, theirs(x).logits, atol=1e-3, rtol=0)  # the window matters here


def test_additional_target_all_is_a_name_and_an_adapter_listing_it_loads_as_peft_loads_it():
    """'all' is lora_target's word for every Linear, not additional_target's: there it is a module name, as PEFT
    matches modules_to_save (LLaMA-Factory passes the text on), and no module bears it. An adapter_config.json that
    LLaMA-Factory wrote with it (modules_to_save: ["all"]) trained nothing in full: PEFT skips the name, and so does
    saved_modules. Golden: PEFT 0.21, utils/other.py:1088 (`key.endswith(target_key)`, no error when none matches)."""
    torch = pytest.importorskip("torch")
    from pipeline.model.adapter import saved_modules
    from pipeline.model.config import all_saved_message, module_paths, saved_whole, select_modules
    from pipeline.model.config import PRESETS
    from pipeline.model.families import FAMILIES

    cfg = PRESETS["tiny"]
    with pytest.raises(UserError) as refusal:
        select_modules(module_paths(cfg), ["all"], key="additional_target", family=cfg.hf)
    assert refusal.value.messages == [all_saved_message(FAMILIES["gpt2"])]
    assert len(select_modules(module_paths(cfg), ["all"], family=cfg.hf)) > 0  # lora_target's 'all': every Linear
    assert not saved_whole("transformer.h.0.attn.c_attn", "all")

    model = torch.nn.Module()
    model.ln_f = torch.nn.LayerNorm(4)
    assert saved_modules(model, {"modules_to_save": ["all", "ln_f"]}) == ["ln_f"]
    assert saved_modules(model, {"modules_to_save": ["ln_f", "wte"]}) == ["ln_f", "wte"]  # a misspelt one is refused later


def test_a_read_only_mount_is_said_as_one_not_as_permission_denied(tmp_path, monkeypatch):
    """On a read-only mount access(2) fails with EROFS, for root too: os.access said no, and both probes (the dry
    run's of output_dir's nearest existing parent, and the real run's of an existing output_dir before the lock) said
    "Permission denied", sending the user to chmod. The mount stands in here (statvfs's ST_RDONLY, os.access no, as
    the kernel answers there); a folder without write permission keeps "Permission denied". Failed before: EACCES's
    words for the read-only mount."""
    ro, out = tmp_path / "ro", tmp_path / "ro" / "out"
    out.mkdir(parents=True)
    real_statvfs, real_access = os.statvfs, os.access
    read_only = {str(ro), str(out)}

    class ReadOnly:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly() if str(path) in read_only else real_statvfs(path))
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) not in read_only and real_access(path, mode))
    rofs = f"cannot be written: {os.strerror(errno.EROFS)}"
    for target, verb in ((ro / "new" / "run", "created"), (out, "written")):  # the dry run's probe
        (message,) = unwritable(target, "r.yaml:3: output_dir").messages
        assert message.startswith(f"r.yaml:3: output_dir: {target} cannot be {verb}: {os.strerror(errno.EROFS)} ("), \
            message
    with pytest.raises(UserError) as refusal, exclusive(out, "train r.yaml", "r.yaml:3: output_dir", writes=True):
        pass  # the real run's
    assert refusal.value.messages == [f"r.yaml:3: output_dir: {out} {rofs} ({out}); choose a directory this user may "
                                      "write, or make that one writable"]
    read_only.clear()  # a folder this user may not write, on a writable mount
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(out) and real_access(path, mode))
    assert f"cannot be written: {os.strerror(errno.EACCES)} ({out})" in unwritable(out).messages[0]
