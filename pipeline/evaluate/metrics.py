"""Generation metrics: exact match, token F1, ROUGE-L and BLEU-4, all on words (never characters).

Every metric is a number in [0, 1] (the report shows them as percentages). Definitions:

- normalize(text): Unicode NFKC (composed accents; full-width forms folded to ASCII), strip, and every
  run of whitespace collapsed to one space.
- exact match: normalize(prediction) == normalize(reference). Case matters ("Paris" != "paris");
  the lenient metrics below ignore case.
- tokens(text): normalize, then casefold (so "Straße" and "STRASSE" match), then split into
  * one token per CJK ideograph / kana (Chinese and Japanese are written without spaces, so "中文" is
    two tokens, "中" and "文"),
  * runs of other word characters (letters, digits, underscore in any script: "café", "naïve", "42"),
  * one token per remaining non-space character (punctuation: "," "." "!" "?" ...).
  words(text) are the same without the punctuation tokens.
- token F1 (SQuAD-style, on words: punctuation is dropped as SQuAD does, so that "." matching "."
  earns nothing; articles are kept): common = sum over words of min(count in prediction, count in
  reference); P = common/len(pred), R = common/len(ref), F1 = 2PR/(P+R).
- ROUGE-L (on words, as the rouge-score package): L = length of the longest common subsequence;
  P = L/len(pred), R = L/len(ref), F = 2PR/(P+R) (beta = 1).
- BLEU-4 (Papineni et al. 2002, one reference, on tokens: punctuation counts, as in sacreBLEU's
  13a tokenisation): clipped n-gram precisions p_1..p_4, brevity penalty
  BP = 1 if c > r else exp(1 - r/c) (c, r = prediction/reference lengths; BP = 0 when c = 0),
  BLEU = BP * exp(mean(log p_n)). Smoothing: Chen & Cherry (2014) method 1 as in NLTK's
  SmoothingFunction().method1: a precision whose match count is 0 becomes epsilon / max(1, total) with
  epsilon = 0.1. As in NLTK, no unigram match at all gives BLEU = 0. Sentence BLEU therefore equals
  nltk.translate.bleu_score.sentence_bleu(ref, hyp, smoothing_function=method1) on our tokens.
  Corpus BLEU sums the clipped matches, n-gram totals and lengths over all examples before applying
  the same formula (so a one-example corpus scores its sentence BLEU).
- Empty strings: both empty (no tokens/words) scores 1 on every metric (nothing was asked, nothing
  was said); exactly one empty scores 0.

Aggregates: exact match, F1, ROUGE-L and sentence BLEU are means of the per-example scores; `bleu` is
corpus BLEU.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MAX_ORDER = 4
EPSILON = 0.1  # Chen & Cherry method 1 / NLTK method1 default

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w)+|[^\w\s]", re.UNICODE)
_WORD = re.compile(r"\w", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)

METRIC_NAMES = ("exact_match", "f1", "rouge_l", "bleu")


def normalize(text: str) -> str:
    """NFKC, strip, collapse whitespace: differences a reader would not call different answers."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def tokens(text: str) -> list[str]:
    """Case-folded word/punctuation tokens; CJK ideographs and kana one per character."""
    return _TOKEN.findall(normalize(text).casefold())


def words(text: str) -> list[str]:
    """tokens() without punctuation: what F1 and ROUGE-L compare."""
    return [t for t in tokens(text) if _WORD.match(t)]


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _empty_score(pred: Sequence[str], ref: Sequence[str]) -> float | None:
    """Both empty -> 1, one empty -> 0, neither -> None (compute the metric)."""
    if not pred or not ref:
        return float(not pred and not ref)
    return None


def _f_measure(common: int, n_pred: int, n_ref: int) -> float:
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    empty = _empty_score(pred, ref)
    if empty is not None:
        return empty
    common = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(common, len(pred), len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by the classic O(len(a) * len(b)) table, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    empty = _empty_score(pred, ref)
    if empty is not None:
        return empty
    return _f_measure(lcs_length(pred, ref), len(pred), len(ref))


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


@dataclass
class BleuStats:
    """Sufficient statistics of BLEU: add them over examples for corpus BLEU."""

    matches: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)
    totals: list[int] = field(default_factory=lambda: [0] * MAX_ORDER)
    pred_len: int = 0
    ref_len: int = 0

    def __add__(self, other: "BleuStats") -> "BleuStats":
        return BleuStats(
            [a + b for a, b in zip(self.matches, other.matches)],
            [a + b for a, b in zip(self.totals, other.totals)],
            self.pred_len + other.pred_len,
            self.ref_len + other.ref_len,
        )

    def score(self) -> float:
        if self.pred_len == 0 or self.ref_len == 0:
            return float(self.pred_len == 0 and self.ref_len == 0)
        if self.matches[0] == 0:
            return 0.0
        log_p = 0.0
        for m, t in zip(self.matches, self.totals):
            log_p += math.log(m / t if m > 0 else EPSILON / max(1, t))
        c, r = self.pred_len, self.ref_len
        brevity = 1.0 if c > r else math.exp(1 - r / c)
        return brevity * math.exp(log_p / MAX_ORDER)


def bleu_stats(prediction: str, reference: str) -> BleuStats:
    pred, ref = tokens(prediction), tokens(reference)
    stats = BleuStats(pred_len=len(pred), ref_len=len(ref))
    for n in range(1, MAX_ORDER + 1):
        pred_ngrams, ref_ngrams = _ngrams(pred, n), _ngrams(ref, n)
        stats.matches[n - 1] = sum((pred_ngrams & ref_ngrams).values())  # clipped counts
        stats.totals[n - 1] = max(0, len(pred) - n + 1)
    return stats


def sentence_bleu(prediction: str, reference: str) -> float:
    return bleu_stats(prediction, reference).score()


def corpus_bleu(predictions: Iterable[str], references: Iterable[str]) -> float:
    total = BleuStats()
    for pred, ref in zip(predictions, references, strict=True):
        total = total + bleu_stats(pred, ref)
    return total.score()


def score_example(prediction: str, reference: str) -> dict[str, float]:
    """Per-example scores under the names used in predictions.jsonl and metrics.json."""
    return {
        "exact_match": exact_match(prediction, reference),
        "f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "bleu": sentence_bleu(prediction, reference),
    }


def aggregate(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus scores: means of per-example EM/F1/ROUGE-L/sentence BLEU, and corpus BLEU as `bleu`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "rouge_l": 0.0, "bleu": 0.0, "sentence_bleu": 0.0, "n": 0}
    per = [score_example(p, r) for p, r in zip(predictions, references)]
    out = {name: sum(s[name] for s in per) / n for name in ("exact_match", "f1", "rouge_l")}
    out["bleu"] = corpus_bleu(predictions, references)
    out["sentence_bleu"] = sum(s["bleu"] for s in per) / n
    out["n"] = n
    return out
