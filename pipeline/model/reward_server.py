"""reward_model_type api: a reward model behind an HTTP server, as LLaMA-Factory 0.9.5's PPO asks it.

LLaMA-Factory (train/ppo/trainer.py get_rewards, train/ppo/ppo_utils.py get_rewards_from_server) decodes each row's
prompt + response token ids with the policy's tokenizer (skip_special_tokens=False: the template's markup and the
stop token stay in the text), POSTs one request per mini-batch of per_device_train_batch_size rows,

    {"model": "model", "messages": ["<text of row 1>", "<text of row 2>", ...]}

as JSON to the reward_model URL, and reads `response.json()["scores"]`, one number per message. Each rank asks for
its own rows. This module is that client on the standard library (urllib.request: no new dependency), without
torch, so the recipe rule can check the URL: its form for every command (validate and plan never contact the
server), and for train whether anything answers there at all, before the model loads (reachable), so a dead server
costs seconds, not a model load and a rollout. What the server answers to a real request is checked when it
answers: a failed request, a status other than 2xx, or a body without `scores` as a list of one finite number per
message is one UserError naming the URL and what came back, never a traceback or a score made up.
"""
from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

from pipeline.errors import UserError

SCORE_TIMEOUT_S = 300.0  # one request: a large reward model scoring a mini-batch of long texts takes seconds
REACH_TIMEOUT_S = 10.0  # the start's check that the server answers at all
SHOWN_CHARS = 300  # of a reply quoted in a message
EXAMPLE_URL = "http://127.0.0.1:8000/score"


def url_problem(url: str) -> str | None:
    """What is wrong with the form of a reward server's URL (LLaMA-Factory asserts it starts with "http"), or None:
    http(s), a host, a valid port, no user:password@ (urllib sends no credentials from a URL)."""
    expected = (f"expected the URL of a reward server, http:// or https:// and a host (e.g. {EXAMPLE_URL}), which "
                "is POSTed the decoded rows and answers their scores (docs/ppo.md#a-reward-server)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0-65535
    except ValueError as err:
        return f"given {url!r}: {err}; {expected}"
    if parts.scheme not in ("http", "https"):
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        hint = f" (did you mean 'http://{url}'?)" if "://" not in url and not url.startswith("/") else ""
        return f"given {url!r} ({scheme}) with reward_model_type api{hint}; {expected}"
    if not parts.hostname:
        return f"given {url!r} (no host) with reward_model_type api; {expected}"
    if parts.username is not None or parts.password is not None:
        return (f"given a URL with user:password@ in it with reward_model_type api: urllib sends no credentials "
                f"taken from a URL; {expected}")
    if port == 0:
        return f"given {url!r} (port 0) with reward_model_type api; {expected}"
    return None


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why nothing answers at `url`, or None when a server does. It is sent a GET, through the opener the scores'
    POSTs take (proxies, TLS): any HTTP status, a 404 or a 405 of a POST-only route included, is a server that
    answers; only a connection that fails (refused, unknown host, TLS, timeout) is unreachable. A scoring request
    is not sent: an empty one may be refused by a server that expects rows, and a made-up row would reach the
    user's reward model."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, http.client.HTTPException, ValueError) as err:
        return _failure(err)


def request_scores(url: str, messages: Sequence[str], timeout: float = SCORE_TIMEOUT_S) -> list[float]:
    """The server's score of each message: LLaMA-Factory's request (a JSON body {"model": "model", "messages": [...]},
    Content-Type application/json) and its reading of the reply (its `scores`), checked: a UserError naming the URL
    and what came back when the request fails or the reply is not one finite number per message."""
    body = json.dumps({"model": "model", "messages": list(messages)}).encode("utf-8")  # as requests' json=
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, reply = response.status, response.read()
    except urllib.error.HTTPError as err:
        raise UserError(_message(url, len(messages), f"answered HTTP {err.code} {err.reason}", _read(err))) from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise UserError(_message(url, len(messages), f"could not be asked: {_failure(err)}", None)) from None
    scores, wrong = _scores(reply, len(messages))
    if wrong:
        raise UserError(_message(url, len(messages), f"answered HTTP {status}, but {wrong}", reply))
    return scores


def _scores(reply: bytes, count: int) -> tuple[list[float], str | None]:
    """The reply's `scores` when it is a list of `count` finite numbers (not booleans), else what is wrong."""
    try:
        value = json.loads(reply.decode("utf-8"))
    except ValueError:
        return [], "its body is not JSON"
    scores = value.get("scores") if isinstance(value, dict) else None
    if not isinstance(scores, list):
        return [], "its body has no list \"scores\""
    if len(scores) != count:
        return [], f"its \"scores\" has {len(scores)} entries for {count} messages"
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return [], f"its score {i} is {json.dumps(score)[:40]}, not a finite number"
    return [float(s) for s in scores], None


def _read(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read()
    except (OSError, http.client.HTTPException):
        return b""


def _failure(err: BaseException) -> str:
    """A failed connection in words: urllib wraps the socket's error in URLError.reason."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _message(url: str, count: int, what: str, reply: bytes | None) -> str:
    """One message: the URL, what happened, the reply (its first SHOWN_CHARS characters), what was expected."""
    shown = ""
    if reply is not None:
        text = reply.decode("utf-8", errors="replace")
        cut = f"... ({len(text):,} characters)" if len(text) > SHOWN_CHARS else ""
        shown = f": {text[:SHOWN_CHARS]!r}{cut}" if text else " (an empty body)"
    return (f"reward_model: the reward server {url} {what}{shown}, asked to score {count} message"
            f"{'s' if count != 1 else ''}; expected HTTP 2xx and a JSON body {{\"scores\": [...]}} with one finite "
            "number per message, in their order, as LLaMA-Factory's PPO reads it (docs/ppo.md#a-reward-server); "
            "check that the server runs, that reward_model is its scoring route, and the server's log")
