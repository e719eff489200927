"""Metrics against sklearn.metrics (per class), a brute-force retrieval reference, and cases
built by hand: classes without positives, ties, perfect / reversed scores, padding masks."""

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from avmae import metrics

N, C = 200, 10
SEEDS = (0, 1, 2, 3)


def random_multilabel(seed, integer_scores=False):
  rng = np.random.default_rng(seed)
  targets = (rng.random((N, C)) < rng.uniform(0.05, 0.5, C)).astype(np.int64)
  # Scores correlated with targets, so AP / AUC are far from chance and errors show.
  scores = targets * rng.uniform(0, 2, C) + rng.normal(size=(N, C))
  if integer_scores:  # ~5 distinct values per class: many ties, mixed positives/negatives
    scores = np.round(scores).astype(np.int64)
  return scores, targets


def sk_per_class(fn, scores, targets):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # undefined classes: sklearn warns, we compare NaN/0
    return np.array([fn(targets[:, c], scores[:, c]) for c in range(targets.shape[1])])


@pytest.mark.parametrize("integer_scores", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_ap_and_auc_match_sklearn(seed, integer_scores):
  scores, targets = random_multilabel(seed, integer_scores)
  ap, info = metrics.average_precision(scores, targets)
  np.testing.assert_allclose(ap, sk_per_class(skm.average_precision_score, scores, targets),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ap, skm.average_precision_score(targets, scores, average=None),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(info["num_positives"], targets.sum(0))
  assert info["classes_without_positives"] == []
  auc = metrics.roc_auc(scores, targets)
  np.testing.assert_allclose(auc, sk_per_class(skm.roc_auc_score, scores, targets),
                             rtol=1e-12, atol=1e-12)
  m = metrics.mean_average_precision(scores, targets)
  assert m["map"] == pytest.approx(skm.average_precision_score(targets, scores), abs=1e-12)
  assert m["num_classes_without_positives"] == 0
  a = metrics.mean_auc_dprime(scores, targets)
  assert a["auc"] == pytest.approx(skm.roc_auc_score(targets, scores), abs=1e-12)
  assert a["d_prime"] == pytest.approx(np.sqrt(2) * stats.norm.ppf(a["auc"]), abs=1e-9)


def test_all_tied_scores():
  rng = np.random.default_rng(5)
  targets = (rng.random((N, C)) < 0.3).astype(int)
  scores = np.zeros((N, C))  # one threshold: AP = prevalence, AUC = 0.5
  ap, _ = metrics.average_precision(scores, targets)
  np.testing.assert_allclose(ap, targets.mean(0), rtol=1e-12)
  np.testing.assert_allclose(ap, sk_per_class(skm.average_precision_score, scores, targets))
  np.testing.assert_allclose(metrics.roc_auc(scores, targets), 0.5)


def test_class_without_positives_and_class_all_positive():
  scores, targets = random_multilabel(7)
  targets[:, 2] = 0
  targets[:, 5] = 1
  ap, info = metrics.average_precision(scores, targets)
  assert np.isnan(ap[2]) and info["classes_without_positives"] == [2]
  assert ap[5] == 1.0
  sk = sk_per_class(skm.average_precision_score, scores, targets)
  assert sk[2] == 0.0  # sklearn scores it 0; we leave it out of the mean instead
  keep = np.arange(C) != 2
  np.testing.assert_allclose(ap[keep], sk[keep], rtol=1e-12)
  m = metrics.mean_average_precision(scores, targets)
  assert m["map"] == pytest.approx(sk[keep].mean(), abs=1e-12)
  assert m["num_classes_without_positives"] == 1 and m["classes_without_positives"] == [2]
  auc = metrics.roc_auc(scores, targets)
  assert np.isnan(auc[2]) and np.isnan(auc[5])
  sk_auc = sk_per_class(skm.roc_auc_score, scores, targets)
  np.testing.assert_allclose(auc, sk_auc, rtol=1e-12)  # sklearn 1.9 also gives NaN
  a = metrics.mean_auc_dprime(scores, targets)
  assert a["auc"] == pytest.approx(np.nanmean(sk_auc), abs=1e-12)
  assert a["classes_skipped"] == [2, 5] and a["num_classes_skipped"] == 2


def test_perfect_and_reversed_scores():
  _, targets = random_multilabel(8)
  perfect = targets + np.random.default_rng(8).uniform(0, 0.5, targets.shape)
  np.testing.assert_allclose(metrics.average_precision(perfect, targets)[0], 1.0)
  np.testing.assert_allclose(metrics.roc_auc(perfect, targets), 1.0)
  assert metrics.mean_auc_dprime(perfect, targets)["d_prime"] == np.inf
  ap, _ = metrics.average_precision(-perfect, targets)
  np.testing.assert_allclose(ap, sk_per_class(skm.average_precision_score, -perfect, targets))
  np.testing.assert_allclose(metrics.roc_auc(-perfect, targets), 0.0)


def test_d_prime():
  assert metrics.d_prime(0.5) == 0.0
  auc = np.array([0.1, 0.6, 0.9, 0.99])
  np.testing.assert_allclose(metrics.d_prime(auc), np.sqrt(2) * stats.norm.ppf(auc))


def test_bad_inputs():
  with pytest.raises(ValueError, match="0/1"):
    metrics.average_precision(np.zeros((3, 2)), np.full((3, 2), 2))
  with pytest.raises(ValueError, match="finite"):
    metrics.roc_auc(np.full((3, 2), np.nan), np.zeros((3, 2)))
  with pytest.raises(ValueError):
    metrics.retrieval(np.zeros((3, 4)), np.zeros((4, 4)))


def random_multiclass(seed, integer_scores=False):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, C, N)
  scores = rng.normal(size=(N, C)) + 1.5 * np.eye(C)[labels]
  return (np.round(scores) if integer_scores else scores), labels


@pytest.mark.parametrize("integer_scores", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_matches_sklearn(seed, integer_scores):
  scores, labels = random_multiclass(seed, integer_scores)
  for k in (1, 2, 3, 5, 9):
    expected = skm.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(C))
    assert metrics.top_k_accuracy(scores, labels, k) == expected, k


def test_top_k_ties_and_large_k():
  _, labels = random_multiclass(9)
  # Constant scores: sklearn puts the highest class index first among ties, so only the
  # last class is a top-1 hit, and the last k classes are top-k hits.
  const = np.zeros((N, C))
  assert metrics.top_k_accuracy(const, labels, 1) == np.mean(labels == C - 1)
  assert metrics.top_k_accuracy(const, labels, 3) == np.mean(labels >= C - 3)
  assert metrics.top_k_accuracy(const, labels, 3) == skm.top_k_accuracy_score(
      labels, const, k=3, labels=np.arange(C))
  for k in (C, C + 5):
    with pytest.warns(UndefinedMetricWarning):
      assert skm.top_k_accuracy_score(labels, const, k=k, labels=np.arange(C)) == 1.0
    assert metrics.top_k_accuracy(const, labels, k) == 1.0


def test_valid_mask_drops_padding():
  scores, targets = random_multilabel(10)
  labels = np.argmax(targets + scores, 1)
  valid = np.random.default_rng(10).random(N) < 0.7
  pad = lambda x: np.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
  padded_scores = np.where(valid[:, None], scores, np.nan)  # garbage in padding rows is fine
  ap, _ = metrics.average_precision(padded_scores, pad(targets), valid)
  np.testing.assert_array_equal(ap, metrics.average_precision(scores[valid], targets[valid])[0])
  np.testing.assert_array_equal(metrics.roc_auc(padded_scores, pad(targets), valid),
                                metrics.roc_auc(scores[valid], targets[valid]))
  assert metrics.mean_average_precision(scores, targets, valid) == \
      metrics.mean_average_precision(scores[valid], targets[valid])
  assert metrics.top_k_accuracy(scores, pad(labels), 2, valid) == \
      metrics.top_k_accuracy(scores[valid], labels[valid], 2)
  a, v = noisy_pairs(10, 6.0)
  assert metrics.retrieval(a, v, valid) == metrics.retrieval(a[valid], v[valid])
  none = np.zeros(N, bool)
  assert np.isnan(metrics.mean_average_precision(scores, targets, none)["map"])
  assert np.isnan(metrics.top_k_accuracy(scores, labels, 1, none))
  assert np.isnan(metrics.retrieval(a, v, none)["r1"])


def noisy_pairs(seed, noise, n=N, d=16):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d))
  return a, 3.0 * a + noise * rng.normal(size=(n, d))  # scale: cosine must not care


def brute_force_ranks(query, gallery):
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  order = np.argsort(-(q @ g.T), axis=1)
  return 1 + np.argmax(order == np.arange(len(q))[:, None], axis=1)


@pytest.mark.parametrize("noise", [3.0, 6.0, 12.0])
def test_retrieval_matches_brute_force(noise, monkeypatch):
  monkeypatch.setattr(metrics, "_QUERY_BLOCK", 37)  # exercise the blocking
  a, v = noisy_pairs(int(noise), noise)
  for query, gallery in ((a, v), (v, a)):
    ranks = brute_force_ranks(query, gallery)
    r = metrics.retrieval(query, gallery)
    assert 0 < r["r1"] < 1  # the case discriminates
    for k in (1, 5, 10):
      assert r[f"r{k}"] == np.mean(ranks <= k)
    assert r["median_rank"] == np.median(ranks) and r["mean_rank"] == np.mean(ranks)
    assert r["num_queries"] == N and r["num_queries_with_ties"] == 0
  both = metrics.retrieval_both_ways(a, v)
  assert both == dict(a2v=metrics.retrieval(a, v), v2a=metrics.retrieval(v, a))
  assert both["a2v"] != both["v2a"]


def test_retrieval_constructed_cases():
  a, _ = noisy_pairs(11, 0.0)
  r = metrics.retrieval(a, a)
  assert r["r1"] == 1.0 and r["median_rank"] == 1.0 and r["mean_rank"] == 1.0
  r = metrics.retrieval(a, -a)  # the true match is the least similar item
  assert r["r10"] == 0.0 and r["median_rank"] == N
  rng = np.random.default_rng(11)
  r = metrics.retrieval(rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16)))
  assert r["r1"] < 0.01 and r["r10"] < 0.03 and abs(r["mean_rank"] - 500.5) < 50


def test_retrieval_ties_are_optimistic():
  # Every gallery item is the same vector: all tie with the true match, all rank 1.
  q = np.random.default_rng(12).normal(size=(20, 4))
  r = metrics.retrieval(q, np.ones((20, 4)))
  assert r["r1"] == 1.0 and r["num_queries_with_ties"] == 20
  # Query 0's true match ties with item 1 and loses to item 2: rank 2, not 3.
  g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  q = np.array([[1.0, 1.1], [1.0, 0.0], [0.0, 1.0]])
  r = metrics.retrieval(q, g)
  assert r["mean_rank"] == pytest.approx((2 + 1 + 1) / 3) and r["num_queries_with_ties"] == 2
