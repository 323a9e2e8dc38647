"""reward_model_type api's client (pipeline.model.reward_server, pipeline.model.reward.ServerScorer) against a real
HTTP server on 127.0.0.1 (tests/helpers/reward_server.py): the URL forms refused, the request LLaMA-Factory 0.9.5
sends (ppo_utils.py get_rewards_from_server), the replies refused, the rows of a padded batch and the requests they
are cut into. The CLI run and its refusals: tests/compat/test_ppo_reward_models.py."""
from __future__ import annotations

import time

import pytest

from pipeline.errors import UserError
from pipeline.model.reward_server import request_scores, unreachable, url_problem
from tests.helpers.reward_server import ScoringServer, refusing_url


@pytest.mark.parametrize("url, said", [
    ("saves/rm", "given 'saves/rm' (no scheme) with reward_model_type api (did you mean 'http://saves/rm'?)"),
    ("ftp://host/score", "given 'ftp://host/score' (scheme 'ftp') with reward_model_type api;"),
    ("http:///score", "given 'http:///score' (no host)"),
    ("http://host:99999/score", "given 'http://host:99999/score': Port out of range 0-65535;"),
    ("http://host:0/score", "given 'http://host:0/score' (port 0)"),
    ("http://user:secret@host/score", "given a URL with user:password@ in it"),
])
def test_a_url_of_another_form_is_refused(url, said):
    problem = url_problem(url)
    assert problem is not None and problem.startswith(said) and "expected the URL of a reward server" in problem
    assert "secret" not in problem  # a password is never echoed


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/score", "https://rm.example.org/v1/score?key=x",
                                 "http://[::1]:8000/"])
def test_http_and_https_urls_pass(url):
    assert url_problem(url) is None


def test_the_request_is_llama_factory_s_and_the_scores_come_back_in_order():
    """LLaMA-Factory's body {"model": "model", "messages": [...]} as application/json; non-ASCII text and markup
    arrive as sent; the reply's scores, ints included, as floats."""
    texts = ["héllo <|eot_id|>", "", "a\nb"]
    with ScoringServer(reply=lambda messages: (200, b'{"scores": [1, -2.5, 3e2], "other": "ignored"}')) as server:
        assert request_scores(server.url, texts) == [1.0, -2.5, 300.0]
    assert server.posts == [{"path": "/score", "content_type": "application/json",
                             "body": {"model": "model", "messages": texts}}]


@pytest.mark.parametrize("status, body, said", [
    (500, b"x" * 1000, "answered HTTP 500 Internal Server Error: '" + "x" * 300 + "'... (1,000 characters)"),
    (200, b"<html>", "answered HTTP 200, but its body is not JSON: '<html>'"),
    (200, b"", "answered HTTP 200, but its body is not JSON (an empty body)"),
    (200, b'{"rewards": [1, 2]}', 'answered HTTP 200, but its body has no list "scores"'),
    (200, b'{"scores": [1]}', 'answered HTTP 200, but its "scores" has 1 entries for 2 messages'),
    (200, b'{"scores": [1, NaN]}', "answered HTTP 200, but its score 1 is NaN, not a finite number"),
    (200, b'{"scores": [true, 1]}', "answered HTTP 200, but its score 0 is true, not a finite number"),
    (200, b'{"scores": [[1], [2]]}', "answered HTTP 200, but its score 0 is [1], not a finite number"),
], ids=["http-error", "not-json", "empty", "no-scores", "too-few", "nan", "bool", "nested"])
def test_a_reply_without_one_finite_score_per_message_is_one_message(status, body, said):
    with ScoringServer(reply=lambda messages: (status, body)) as server:
        with pytest.raises(UserError) as err:
            request_scores(server.url, ["a", "b"])
    assert len(err.value.messages) == 1
    assert err.value.messages[0].startswith(f"reward_model: the reward server {server.url} {said}"), err.value.messages


def test_a_server_that_is_down_or_silent_is_one_message():
    with refusing_url() as url:
        assert unreachable(url).startswith("ConnectionRefusedError")
        with pytest.raises(UserError, match=r"could not be asked: ConnectionRefusedError"):
            request_scores(url, ["a"])

    def slow(messages):
        time.sleep(2)
        return 200, b'{"scores": [1]}'
    with ScoringServer(reply=slow) as server:
        assert unreachable(server.url) is None  # its GET is answered (405): a server is there
        with pytest.raises(UserError, match=r"could not be asked: .*timed out"):
            request_scores(server.url, ["a"], timeout=0.3)


def test_the_scorer_posts_each_row_s_attended_tokens_in_mini_batches():
    """ServerScorer: each row's attended ids (right or left padded) decoded, rows_per_request rows a request (the
    last one shorter), the scores back as (B,) float32 in the rows' order."""
    torch = pytest.importorskip("torch")
    from pipeline.model.reward import ServerScorer

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [0, 3, 4, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]])
    with ScoringServer(reply=lambda messages: (200, str({"scores": [len(m) for m in messages]}).replace("'", '"')
                                               .encode())) as server:
        scores = ServerScorer(server.url, lambda row: "-".join(map(str, row)), 2)(ids, mask)
    assert [post["body"]["messages"] for post in server.posts] == [["5-6-7", "8-9"], ["3-4-2"]]
    assert scores.dtype == torch.float32 and scores.tolist() == [5.0, 3.0, 5.0]


ROW = "<|begin_of_text|>I do n't know , rock ' n roll . Who 's there ?<|eot_id|>"


@pytest.mark.parametrize("flag, sent", [
    # Meta's Llama 3 files say true: transformers 4.57's clean_up_tokenization (tokenization_utils_base.py:3971-3994)
    # by hand, " n't" -> "n't", " ," -> ",", " ' " -> "'", " ." -> ".", " 's" -> "'s", " ?" -> "?"
    (True, "<|begin_of_text|>I don't know, rock'n roll. Who's there?<|eot_id|>"),
    (False, ROW),  # Qwen2.5's files say false: the text as decoded
    (None, ROW),  # no key: transformers 4.57's default false (tokenization_utils_base.py:1453)
], ids=["true", "false", "absent"])
def test_the_server_gets_the_text_transformers_4_decodes(tmp_path, flag, sent):
    """LLaMA-Factory 0.9.5's PPO (TRL 0.8.6-0.9.6, released for transformers 4) posts batch_decode(..., skip_special_tokens=
    False), which applies clean_up_tokenization where tokenizer_config.json's clean_up_tokenization_spaces is true;
    the scorer stage ppo builds (ServerScorer.for_policy) on the checkpoint's files posts that text, special tokens
    kept, and decode() (eval, chat, generate: transformers 5's text) is unchanged."""
    import json

    torch = pytest.importorskip("torch")
    from pipeline.data.tokenizer_files import read_tokenizer
    from pipeline.model.reward import ServerScorer
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    write_small_tokenizer_dir(tmp_path, "llama3", size=300)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("clean_up_tokenization_spaces")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config if flag is None else
                                                               {**config, "clean_up_tokenization_spaces": flag}))
    tokenizer = read_tokenizer(tmp_path)
    ids = tokenizer.encode_special(ROW)
    assert tokenizer.decode(ids) == ROW
    pad, n = tokenizer.pad_id, len(ids)
    with ScoringServer() as server:  # one row right-padded, one left-padded: the attended ids alike
        ServerScorer.for_policy(server.url, tokenizer, 2)(torch.tensor([ids + [pad] * 2, [pad] * 2 + ids]),
                                                          torch.tensor([[1] * n + [0] * 2, [0] * 2 + [1] * n]))
    assert server.posts[0]["body"]["messages"] == [sent, sent]
