"""Metrics against hand-computed values; every count is written out next to its assertion."""
from __future__ import annotations

import math

import pytest

from pipeline.evaluate import metrics as M


# ---------------------------------------------------------------- tokenisation and normalisation
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),  # punctuation is a token of its own
        ("  Café   naïve ", ["café", "naïve"]),  # accented letters stay inside the word
        ("Cafe\u0301", ["café"]),  # decomposed e + combining acute -> NFKC composes it
        ("我爱中文!", ["我", "爱", "中", "文", "!"]),  # CJK: one token per ideograph
        ("abc中文def", ["abc", "中", "文", "def"]),  # CJK splits out of a latin run
        ("カタカナ", ["カ", "タ", "カ", "ナ"]),  # kana: one token per character
        ("한국어 문장", ["한국어", "문장"]),  # Hangul is written with spaces: whole words
        ("ＡＢＣ，", ["abc", ","]),  # full-width forms fold to ASCII (NFKC)
        ("Straße STRASSE", ["strasse", "strasse"]),  # casefold, not just lower
        ("GPT-2 costs $3.50", ["gpt", "-", "2", "costs", "$", "3", ".", "50"]),
        ("snake_case x", ["snake_case", "x"]),
        ("", []),
        (" \n\t ", []),
    ],
)
def test_tokens(text, expected):
    assert M.tokens(text) == expected


def test_words_drop_punctuation_only():
    assert M.words("GPT-2 costs $3.50, 中文!") == ["gpt", "2", "costs", "3", "50", "中", "文"]
    assert M.words("snake_case ... !!") == ["snake_case"]


def test_normalize():
    assert M.normalize("  a \n\t b  ") == "a b"
    assert M.normalize("Cafe\u0301") == "Café"


# ---------------------------------------------------------------- exact match
@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("  The  cat\n", "The cat", 1.0),  # whitespace is normalised
        ("the cat", "The cat", 0.0),  # case matters for exact match
        ("The cat.", "The cat", 0.0),  # punctuation matters
        ("Cafe\u0301", "Café", 1.0),  # canonically equal unicode
        ("", "", 1.0),
        ("   ", "", 1.0),
        ("", "a", 0.0),
        ("a", "", 0.0),
    ],
)
def test_exact_match(pred, ref, expected):
    assert M.exact_match(pred, ref) == expected


# ---------------------------------------------------------------- token F1
def test_f1_partial_overlap():
    # pred: the cat sat on the mat (6); ref: the cat is on the mat (6)
    # common: the min(2,2)=2 + cat 1 + on 1 + mat 1 = 5 -> P = R = 5/6 -> F1 = 5/6
    assert M.token_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_f1_clips_repeated_words():
    # pred the x4, ref the cat: common = min(4, 1) = 1; P = 1/4, R = 1/2; F1 = 2*(1/8)/(3/4) = 1/3
    assert M.token_f1("the the the the", "the cat") == pytest.approx(1 / 3)


def test_f1_ignores_punctuation_and_case():
    # words: hello world vs hello world -> F1 = 1
    assert M.token_f1("Hello, world!", "hello world") == pytest.approx(1.0)
    # "The." vs "The sun is gray.": words the vs the sun is gray: P = 1, R = 1/4 -> F1 = 2*(1/4)/(5/4) = 2/5
    # (with "." as a token it would be 4/7: a matching full stop is no evidence of a right answer)
    assert M.token_f1("The.", "The sun is gray.") == pytest.approx(2 / 5)
    assert M.token_f1("...", "!!!") == 1.0  # no words on either side: both empty
    assert M.token_f1("...", "yes.") == 0.0


def test_f1_unicode_cjk():
    # 我 爱 中 文 vs 我 爱 英 文: common 3 of 4 each -> P = R = 3/4
    assert M.token_f1("我爱中文", "我爱英文") == pytest.approx(0.75)


@pytest.mark.parametrize("pred, ref, expected", [("", "", 1.0), ("", "a", 0.0), ("a", "", 0.0), ("dog", "cat", 0.0)])
def test_f1_empty_and_disjoint(pred, ref, expected):
    assert M.token_f1(pred, ref) == expected


# ---------------------------------------------------------------- ROUGE-L
def test_lcs_classic():
    # CLRS example: LCS(ABCBDAB, BDCABA) = 4 (e.g. BCBA)
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert M.lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert M.lcs_length([], list("abc")) == 0


def test_rouge_l_values():
    # LCS(the cat sat on the mat, the cat is on the mat) = the cat on the mat = 5 -> P = R = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # a b c d vs a c e: LCS = a c = 2; P = 2/4, R = 2/3; F = 2*(1/3)/(7/6) = 4/7
    assert M.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # order matters for ROUGE-L but not for F1: b a vs a b -> LCS 1, P = R = 1/2
    assert M.rouge_l("b a", "a b") == pytest.approx(0.5)
    # punctuation is not a word: "a, b." vs "a b" -> LCS 2 of 2 and 2
    assert M.rouge_l("a, b.", "a b") == pytest.approx(1.0)
    assert M.token_f1("b a", "a b") == pytest.approx(1.0)


@pytest.mark.parametrize("pred, ref, expected", [("", "", 1.0), ("", "a b", 0.0), ("a b", "", 0.0)])
def test_rouge_l_empty(pred, ref, expected):
    assert M.rouge_l(pred, ref) == expected


# ---------------------------------------------------------------- BLEU-4
def test_bleu_identical():
    assert M.sentence_bleu("the cat sat on the mat", "The cat sat on the mat") == pytest.approx(1.0)


def test_bleu_partial_with_smoothing():
    # pred the cat sat on the mat, ref the cat is on the mat; c = r = 6 -> BP = 1
    # 1-grams 5/6 (the 2, cat, on, mat); 2-grams 3/5 (the cat, on the, the mat); 3-grams 1/4 (on the mat);
    # 4-grams 0/3 -> smoothed 0.1/3.  product = 5/6 * 3/5 * 1/4 * 1/30 = 1/240 -> BLEU = 240^(-1/4)
    assert M.sentence_bleu("the cat sat on the mat", "the cat is on the mat") == pytest.approx(240 ** -0.25)


def test_bleu_brevity_penalty_and_short_hypothesis():
    # pred the cat (c = 2), ref 6 words (r = 6): 1-grams 2/2, 2-grams 1/1, 3- and 4-grams have no
    # n-grams at all -> 0.1 / max(1, 0) = 0.1 each. BP = exp(1 - 6/2) = e^-2.
    # BLEU = e^-2 * (1 * 1 * 0.1 * 0.1)^(1/4) = e^-2 / sqrt(10)
    got = M.sentence_bleu("the cat", "the cat sat on the mat")
    assert got == pytest.approx(math.exp(-2) / math.sqrt(10))


def test_bleu_clips_repeated_words():
    # pred the x4 (c = 4), ref the cat (r = 2) -> BP = 1 (c > r)
    # 1-grams: min(4, 1) = 1 of 4; 2-grams 0/3 -> 0.1/3; 3-grams 0/2 -> 0.1/2; 4-grams 0/1 -> 0.1
    # product = 1/4 * 1/30 * 1/20 * 1/10 = 1/24000
    assert M.sentence_bleu("the the the the", "the cat") == pytest.approx(24000 ** -0.25)


def test_bleu_cjk_is_word_level_per_ideograph():
    # 我 爱 中 文 vs 我 爱 英 文: c = r = 4, BP = 1
    # 1-grams 3/4; 2-grams 1/3 (我爱); 3-grams 0/2 -> 0.05; 4-grams 0/1 -> 0.1
    # product = 3/4 * 1/3 * 0.05 * 0.1 = 1/800
    assert M.sentence_bleu("我爱中文", "我爱英文") == pytest.approx(800 ** -0.25)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [("", "", 1.0), ("", "the cat", 0.0), ("the cat", "", 0.0), ("dog", "cat", 0.0), ("a b c d e", "v w x y z", 0.0)],
)
def test_bleu_empty_and_no_unigram_match(pred, ref, expected):
    assert M.sentence_bleu(pred, ref) == expected


def test_bleu_counts_punctuation():
    # "the cat ." vs "the cat": c = 3, r = 2 -> BP = 1; 1-grams 2/3, 2-grams 1/2, 3-grams 0/1 -> 0.1,
    # 4-grams none -> 0.1 / max(1, 0) = 0.1; product = 2/3 * 1/2 * 0.1 * 0.1 = 1/300
    assert M.sentence_bleu("the cat.", "the cat") == pytest.approx(300 ** -0.25)


def test_corpus_bleu_sums_counts():
    # example 1 (above): matches [5, 3, 1, 0], totals [6, 5, 4, 3], c = 6, r = 6
    # example 2 (above): matches [2, 1, 0, 0], totals [2, 1, 0, 0], c = 2, r = 6
    # corpus: p = 7/8, 4/6, 1/4, 0.1/3 -> product 7/1440; BP = exp(1 - 12/8) = e^-0.5
    preds = ["the cat sat on the mat", "the cat"]
    refs = ["the cat is on the mat", "the cat sat on the mat"]
    assert M.corpus_bleu(preds, refs) == pytest.approx(math.exp(-0.5) * (7 / 1440) ** 0.25)
    # a one-example corpus scores its sentence BLEU
    assert M.corpus_bleu(preds[:1], refs[:1]) == pytest.approx(240 ** -0.25)


def test_corpus_bleu_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.corpus_bleu(["a"], ["a", "b"])


# ---------------------------------------------------------------- aggregation
def test_aggregate_means_and_corpus_bleu():
    preds = ["the cat sat on the mat", "the cat", "Exact"]
    refs = ["the cat is on the mat", "the cat sat on the mat", "Exact"]
    agg = M.aggregate(preds, refs)
    assert agg["n"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    # F1: 5/6; the cat vs 6 words: common 2, P = 1, R = 1/3 -> 1/2; exact -> 1
    assert agg["f1"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    # ROUGE-L: 5/6; LCS 2 -> P = 1, R = 1/3 -> 1/2; 1
    assert agg["rouge_l"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    # "Exact" alone: 1-gram 1/1, no 2..4-grams -> 0.1^3 smoothing -> (0.001)^(1/4), BP = 1
    single = 0.001 ** 0.25
    assert agg["sentence_bleu"] == pytest.approx((240 ** -0.25 + math.exp(-2) / math.sqrt(10) + single) / 3)
    # corpus: matches [8, 4, 1, 0], totals [9, 6, 4, 3], c = 9, r = 13 -> BP = exp(1 - 13/9)
    # product = 8/9 * 4/6 * 1/4 * 1/30 = 32/6480 = 2/405
    assert agg["bleu"] == pytest.approx(math.exp(1 - 13 / 9) * (2 / 405) ** 0.25)


def test_aggregate_empty_corpus():
    assert M.aggregate([], [])["n"] == 0


def test_score_example_names():
    assert set(M.score_example("a", "a")) == set(M.METRIC_NAMES)
