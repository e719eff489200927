"""Evaluation metrics for audio-visual classification and retrieval, in NumPy on the host.

AudioSet mAP / mAUC / d', VGGSound top-k accuracy, CAV-MAE-style audio<->video retrieval.
They run over predictions gathered from all devices, so every function takes a `valid` [N]
mask: rows with valid False (batch padding) are dropped before anything else.

Classification metrics match sklearn.metrics (ties included, see each docstring) up to float
rounding; the one deliberate difference is that classes where a metric is undefined give
NaN and are reported by id rather than scored 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import ndtri

# Columns ranked per block: bounds the [N, block] int64 temporaries (AudioSet eval: N ~ 20k).
_CLASS_BLOCK = 64
# Queries per block of the [block, N] similarity matrix.
_QUERY_BLOCK = 1024


def _drop_invalid(valid: Any, *arrays: Any) -> list[np.ndarray]:
  arrays = [np.asarray(a) for a in arrays]
  if valid is None:
    return arrays
  valid = np.asarray(valid, bool)
  if valid.shape != arrays[0].shape[:1]:
    raise ValueError(f"valid has shape {valid.shape}, expected ({arrays[0].shape[0]},)")
  return [a[valid] for a in arrays]


def _check_multilabel(scores: Any, targets: Any, valid: Any) -> tuple[np.ndarray, np.ndarray]:
  scores, targets = _drop_invalid(valid, scores, targets)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [N, C]")
  if not np.isin(targets, (0, 1)).all():
    raise ValueError("targets must be 0/1")
  if not np.isfinite(scores).all():
    raise ValueError("scores must be finite")  # as sklearn: NaN would corrupt the sort
  return scores.astype(np.float64), targets.astype(bool)


def _ap_auc_block(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-column (AP, AUC) of s [N, c] against t [N, c] bool, tied scores grouped as sklearn.

  sklearn's curves have one point per distinct score: a tie group enters all at once. So a
  positive's precision is the precision at the *end* of its tie group, and for AUC a tied
  positive/negative pair counts half (midranks), which is what the trapezoid gives.
  """
  n = s.shape[0]
  order = np.argsort(-s, axis=0, kind="stable")
  s, t = np.take_along_axis(s, order, 0), np.take_along_axis(t, order, 0)
  pos = np.arange(n)[:, None]
  change = np.diff(s, axis=0) != 0
  edge = np.ones((1, s.shape[1]), bool)
  is_end, is_start = np.concatenate([change, edge], 0), np.concatenate([edge, change], 0)
  # Index of the last / first row of each row's tie group.
  end = np.minimum.accumulate(np.where(is_end, pos, n)[::-1], axis=0)[::-1]
  start = np.maximum.accumulate(np.where(is_start, pos, 0), axis=0)
  tps = np.cumsum(t, axis=0, dtype=np.float64)
  precision_at_end = np.take_along_axis(tps / (pos + 1), end, 0)
  n_pos = t.sum(0)
  n_neg = n - n_pos
  with np.errstate(invalid="ignore", divide="ignore"):
    ap = (t * precision_at_end).sum(0) / n_pos
    midrank = n - (start + end) / 2  # ascending 1-based rank, ties averaged
    auc = ((t * midrank).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
  ap[n_pos == 0] = np.nan
  auc[(n_pos == 0) | (n_neg == 0)] = np.nan
  return ap, auc


def _ap_auc(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if scores.shape[0] == 0:
    return (np.full(scores.shape[1], np.nan),) * 2
  blocks = [_ap_auc_block(scores[:, c:c + _CLASS_BLOCK], targets[:, c:c + _CLASS_BLOCK])
            for c in range(0, scores.shape[1], _CLASS_BLOCK)]
  return (np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]))


def average_precision(scores: Any, targets: Any,
                      valid: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
  """Per-class AP [C] as sklearn's average_precision_score (step-wise, not interpolated).

  Tied scores form one threshold, as in sklearn's precision_recall_curve. Classes without
  positives get NaN (sklearn gives 0 with a warning); info lists them and the positive counts.
  """
  scores, targets = _check_multilabel(scores, targets, valid)
  ap, _ = _ap_auc(scores, targets)
  num_positives = targets.sum(0)
  return ap, dict(num_positives=num_positives,
                  classes_without_positives=np.flatnonzero(num_positives == 0).tolist())


def mean_average_precision(scores: Any, targets: Any, valid: Any = None) -> dict[str, Any]:
  """mAP: macro mean over classes with at least one positive (AudioSet); skipped ones listed."""
  ap, info = average_precision(scores, targets, valid)
  skipped = info["classes_without_positives"]
  return dict(map=float(np.nanmean(ap)) if len(skipped) < ap.size else float("nan"),
              num_classes_without_positives=len(skipped), classes_without_positives=skipped)


def roc_auc(scores: Any, targets: Any, valid: Any = None) -> np.ndarray:
  """Per-class ROC AUC [C] as sklearn's roc_auc_score; a tie between a positive and a negative
  counts half. NaN where a class has only positives or only negatives."""
  _, auc = _ap_auc(*_check_multilabel(scores, targets, valid))
  return auc


def d_prime(auc: Any) -> Any:
  """Sensitivity index d' = sqrt(2) * Phi^-1(AUC) as AudioSet papers report (inf at AUC 1)."""
  return np.sqrt(2.0) * ndtri(auc)


def mean_auc_dprime(scores: Any, targets: Any, valid: Any = None) -> dict[str, Any]:
  """Mean per-class AUC over the classes where it is defined, and d' of that mean."""
  auc = roc_auc(scores, targets, valid)
  skipped = np.flatnonzero(np.isnan(auc)).tolist()
  mean = float(np.nanmean(auc)) if len(skipped) < auc.size else float("nan")
  return dict(auc=mean, d_prime=float(d_prime(mean)), num_classes_skipped=len(skipped),
              classes_skipped=skipped)


def top_k_accuracy(scores: Any, labels: Any, k: int, valid: Any = None) -> float:
  """Fraction of rows whose label is among the k highest scores, as top_k_accuracy_score.

  Ties are broken exactly as sklearn does (a stable ascending argsort, reversed): among equal
  scores the *higher* class index ranks first. So with constant scores only the last class
  is a top-1 hit. k >= C gives 1.0 (sklearn warns that it is meaningless).
  """
  scores, labels = _drop_invalid(valid, scores, labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"scores {scores.shape} must be [N, C] and labels {labels.shape} [N]")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if labels.size == 0:
    return float("nan")
  labels = labels.astype(np.int64)
  if labels.min() < 0 or labels.max() >= scores.shape[1]:
    raise ValueError("labels must be in [0, C)")
  true = np.take_along_axis(scores, labels[:, None], 1)
  later = np.arange(scores.shape[1])[None] > labels[:, None]
  # Classes ranked ahead of the true one: strictly higher score, or tied with a higher index.
  ahead = (scores > true).sum(1) + ((scores == true) & later).sum(1)
  return float(np.mean(ahead < k))


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval(query: Any, gallery: Any, valid: Any = None) -> dict[str, Any]:
  """Recall@{1,5,10} (fractions), median and mean rank of paired embeddings.

  Query i's true match is gallery i; similarity is cosine. Rank is 1-based and optimistic:
  1 + the number of gallery items with a strictly greater similarity, so tied items do not
  push the true one down. Degenerate (e.g. collapsed, identical) embeddings therefore score
  well; num_queries_with_ties counts queries whose true match ties with another item. The
  median of an even count is the mean of the middle two ranks (np.median, as CAV-MAE does).
  """
  query, gallery = _drop_invalid(valid, query, gallery)
  if query.ndim != 2 or query.shape != gallery.shape:
    raise ValueError(f"query {query.shape} and gallery {gallery.shape} must both be [N, D]")
  q, g = _l2_normalize(query.astype(np.float64)), _l2_normalize(gallery.astype(np.float64))
  n = q.shape[0]
  ranks, tied = np.empty(n, np.int64), np.empty(n, bool)
  for i in range(0, n, _QUERY_BLOCK):
    sims = q[i:i + _QUERY_BLOCK] @ g.T
    rows = np.arange(sims.shape[0])
    true = sims[rows, rows + i][:, None]
    ranks[i:i + _QUERY_BLOCK] = 1 + (sims > true).sum(1)
    tied[i:i + _QUERY_BLOCK] = (sims == true).sum(1) > 1
  nan = float("nan")
  return dict(r1=float(np.mean(ranks <= 1)) if n else nan,
              r5=float(np.mean(ranks <= 5)) if n else nan,
              r10=float(np.mean(ranks <= 10)) if n else nan,
              median_rank=float(np.median(ranks)) if n else nan,
              mean_rank=float(np.mean(ranks)) if n else nan,
              num_queries=n, num_queries_with_ties=int(tied.sum()))


def retrieval_both_ways(audio: Any, video: Any, valid: Any = None) -> dict[str, dict[str, Any]]:
  """Audio->video (audio queries, video gallery) and video->audio retrieval."""
  return dict(a2v=retrieval(audio, video, valid), v2a=retrieval(video, audio, valid))
