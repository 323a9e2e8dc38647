"""new_special_tokens in train's preflight: with LoRA they make the embedding and head train in full, which stage dpo's
adapters-off reference cannot keep under ZeRO-3 (as for additional_target)."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError


@pytest.mark.parametrize("keys,refused", [("new_special_tokens: <think>\n", True), ("resize_vocab: true\n", True),
                                          ("add_tokens: <note>\n", True),
                                          ("new_special_tokens: <|endoftext|>\n", False), ("", False)])
def test_dpo_zero3_refuses_what_trains_the_embedding_in_full(tmp_path, monkeypatch, keys, refused):
    from pipeline.recipe import resolve
    from pipeline.train.run import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nstage: dpo\nzero_stage: 3\n"
                                     + keys, encoding="utf-8")
    r = resolve("r.yaml", [])
    if not refused:
        preflight(r)
        return
    with pytest.raises(UserError, match="with resize_vocab or added tokens: the embedding and the head"):
        preflight(r)
