"""Prometheus metrics; names are a contract (DESIGN.md), all prefixed ``said_``."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

MESSAGES = Counter("said_messages_total", "Kafka messages by final outcome.", ["topic", "outcome"])
DEAD_LETTERS = Counter(
    "said_dead_letters_total", "Messages written to the DLQ, by source topic and reason.", ["topic", "reason"]
)
PARKED = Counter(
    "said_parked_interactions_total",
    "Interactions that arrived before their item: parked, applied when it came, expired, or overflow.",
    ["outcome"],
)
PARKED_NOW = Gauge("said_parked_interactions_waiting", "Interactions parked now, waiting for their item.")
CONSUMER_LAG = Gauge("said_consumer_lag", "Messages behind the high watermark.", ["topic", "partition"])
BATCH_SECONDS = Histogram(
    "said_consumer_batch_seconds",
    "Time to store, dead-letter and commit one consumed batch, from its hand-over to the writer.",
    ["topic"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DB_RETRIES = Counter("said_db_retries_total", "Writes retried because the database was down.")
ALIGNMENT_LOSS = Histogram(
    "said_alignment_loss",
    "Per-item alignment cross-entropy.",
    ["cohort"],
    buckets=(0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8),
)
TOKEN_ACCURACY = Histogram(
    "said_alignment_token_accuracy",
    "Per-item teacher-forced token accuracy of the aligned text.",
    ["cohort"],
    buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
)
RECONSTRUCTED = Counter(
    "said_alignment_reconstructions_total",
    "Items whose text greedy decoding from their soft tokens rebuilt exactly, or not.",
    ["cohort", "outcome"],
)
REFERENCE_TOKEN_ACCURACY = Gauge(
    "said_alignment_reference_token_accuracy",
    "Token accuracy of the reference cohort of the active aligner (the fresh items' bar).",
)
DRIFT_RATIO = Gauge(
    "said_alignment_drift_ratio", "Mean fresh loss / mean loss of the reference cohort (same path, same bar)."
)
PENDING_ITEMS = Gauge("said_pending_items", "Items waiting for alignment.")
FAILED_ITEMS = Gauge(
    "said_failed_items", "Items whose alignment failed too often (alignment_jobs.last_error)."
)
FENCED_WRITES = Counter(
    "said_fenced_writes_total", "Vectors a worker did not write because it had lost the item's lease."
)
FRESH_ITEM_SECONDS = Histogram(
    "said_fresh_item_seconds",
    "Seconds from an item event's arrival to the item being servable.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)
INDEX_ITEMS = Gauge("said_index_items", "Vectors in the served FAISS index.")
SCORER_RETRAINS = Counter("said_scorer_retrains_total", "Scorer retrains by outcome.", ["outcome"])
SCORER_VAL_NDCG = Gauge("said_scorer_val_ndcg10", "Validation NDCG@10 of the last candidate.")
ROLLBACKS = Counter(
    "said_version_rollbacks_total",
    "Active versions rolled back to the one served before, because their file failed its checksum.",
    ["kind"],
)
SERVING_PROBLEMS = Gauge(
    "said_serving_problems",
    "1 while a scorer replica cannot load the active version of kind (aligner, scorer): "
    "it serves the last good one.",
    ["kind"],
)
QUERY_CACHE = Counter(
    "said_scorer_query_cache_total", "Query vectors taken from the cache (hit) or encoded (miss).", ["result"]
)
SCORER_REQUESTS = Counter("said_scorer_requests_total", "Scorer requests.", ["endpoint", "status"])
SCORER_SECONDS = Histogram(
    "said_scorer_seconds",
    "Scorer request latency.",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)


def serve_metrics(port: int) -> None:
    """Expose ``/metrics`` on ``port`` (0 disables it)."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
