"""Metric definitions against independent references: closed forms, hand-computed edit
distances, known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from unimoe.evaluation.divergence import kl_divergence, paired_kl
from unimoe.evaluation.errors import EvaluationError
from unimoe.evaluation.frechet import (
    frechet_distance,
    frechet_distance_from_embeddings,
    gaussian_stats,
    small_sample_warning,
)
from unimoe.evaluation.normalize import normalize_text
from unimoe.evaluation.similarity import cosine_similarity
from unimoe.evaluation.text_metrics import char_errors, corpus_rate, word_errors


# ------------------------------------------------------------------ Frechet / FAD
def _closed_form(mu1, s1, mu2, s2):
    """Textbook formula with scipy's sqrtm (independent of the eigenvalue route)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_matches_closed_form_for_known_gaussians():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-10)


def test_frechet_one_dimensional_is_mean_and_std_gap():
    # For 1-D Gaussians d^2 = (m1 - m2)^2 + (sigma1 - sigma2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        (1 - 3) ** 2 + (2 - 3) ** 2
    )


def test_fad_of_two_gaussian_sample_sets_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    a = rng.multivariate_normal(mu1, s1, size=40000)
    b = rng.multivariate_normal(mu2, s2, size=40000)
    expected = _closed_form(mu1, s1, mu2, s2)
    assert frechet_distance_from_embeddings(a, b) == pytest.approx(expected, rel=0.03)
    # and the sample statistics themselves are the unbiased ones
    st = gaussian_stats(a[:50])
    np.testing.assert_allclose(st.cov, np.cov(a[:50].T, ddof=1))


def test_frechet_of_identical_sets_is_zero_not_negative():
    x = np.random.default_rng(2).standard_normal((30, 50))  # fewer samples than dims: singular covariance
    value = frechet_distance_from_embeddings(x, x.copy())
    assert value >= 0.0 and value < 1e-6


def test_frechet_needs_two_samples_and_warns_when_small():
    with pytest.raises(EvaluationError, match="at least 2"):
        frechet_distance_from_embeddings(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(EvaluationError, match="sizes differ"):
        frechet_distance_from_embeddings(np.random.rand(4, 3), np.random.rand(4, 2))
    assert "rank-deficient" in small_sample_warning(10, 128, "generated set")
    assert small_sample_warning(500, 128, "generated set") is None


# ------------------------------------------------------------------ KL
def test_kl_on_known_distributions_and_direction():
    p_ref, p_gen = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(ref || gen), by hand
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(p_ref, p_gen)[0] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - reverse) > 0.1  # the direction matters, and we use ref || gen
    # softmax(log p) = p, so logits log(p) give the same number
    assert paired_kl(np.log(p_ref), np.log(p_gen))[0] == pytest.approx(expected, abs=1e-5)
    assert paired_kl(np.log(p_ref), np.log(p_ref))[0] == pytest.approx(0.0, abs=1e-5)


def test_kl_zero_reference_mass_contributes_nothing_and_sigmoid_variant():
    assert kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.25, 0.75]]))[0] == pytest.approx(math.log(4), abs=1e-5)
    # sigmoid: independent Bernoullis per class
    r, g = 0.8, 0.3
    bern = r * math.log(r / g) + (1 - r) * math.log((1 - r) / (1 - g))
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    got = paired_kl(np.array([[logit(r), logit(r)]]), np.array([[logit(g), logit(g)]]), "sigmoid")[0]
    assert got == pytest.approx(2 * bern, abs=1e-4)
    with pytest.raises(EvaluationError, match="activation"):
        paired_kl(np.zeros((1, 2)), np.zeros((1, 2)), "relu")


# ------------------------------------------------------------------ WER / CER / normaliser
def test_wer_hand_computed():
    # ref 6 words; hyp: "sat"->"sit" (substitution), second "the" deleted -> 2 edits
    c = word_errors("the cat sit on mat", "the cat sat on the mat")
    assert (c.errors, c.total) == (2, 6)
    assert c.rate == pytest.approx(2 / 6)
    assert word_errors("a b c", "a b c").rate == 0.0
    # insertion-heavy hypotheses can exceed 1
    assert word_errors("x y z w", "a").rate == pytest.approx(4.0)


def test_cer_hand_computed_and_corpus_aggregation():
    c = char_errors("kitten", "sitting")  # k->s, e->i, +g : 3 edits over 7 reference chars
    assert (c.errors, c.total) == (3, 7)
    counts = [word_errors("a b", "a c"), word_errors("x y z w", "x y z w")]  # 1/2 and 0/4
    assert corpus_rate(counts) == pytest.approx(1 / 6)  # sum edits / sum words, not mean of rates (0.25)
    with pytest.raises(EvaluationError):
        word_errors("hello", "").rate


@pytest.mark.parametrize(
    "raw, language, expected",
    [
        ("Hello, World!", "en", "hello world"),
        ("It's 3.5 km away - about 1,000 steps.", "en", "its 3.5 km away about 1000 steps"),
        ("[laughs] Okay (background noise) then...", "en", "okay then"),
        ("  MIXED\tcase\nlines ", "en", "mixed case lines"),
        ("你好，世界！ 今天 好", "zh", "你好世界今天好"),
    ],
)
def test_normaliser_known_strings(raw, language, expected):
    assert normalize_text(raw, language) == expected


def test_normalisation_makes_formatting_differences_free():
    ref = normalize_text("The quick brown fox jumps over the lazy dog.")
    hyp = normalize_text(" the Quick brown fox, jumps over the lazy dog")
    assert word_errors(hyp, ref).rate == 0.0


def test_cosine_similarity_known_values():
    assert float(cosine_similarity(np.array([1.0, 0.0]), np.array([1.0, 1.0]))) == pytest.approx(1 / math.sqrt(2))
    assert float(cosine_similarity(np.array([2.0, 4.0]), np.array([1.0, 2.0]))) == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="zeros"):
        cosine_similarity(np.zeros(3), np.ones(3))
