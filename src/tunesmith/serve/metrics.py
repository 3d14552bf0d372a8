"""What the server measures: traffic, latency, throughput, batching, and input drift.

Kept in memory (a window of the latest latencies and inputs per model id) and
read through ``/metrics`` as JSON, or as Prometheus text with
``?format=prometheus``. Drift (seed 003's production monitoring): for each
model id the input lengths in tokens and, for classifiers, the predicted
labels of the latest requests are compared with the profile of the training
split saved in the checkpoint, as a population stability index (PSI).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from tunesmith.data.profile import decile_shares, population_stability

#: Latencies and inputs kept per model id (a sliding window).
WINDOW = 2000


def _percentiles(values: Any) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)), 4) for q in (50, 95, 99)}


@dataclass
class ModelStats:
    """One model id's counters and windows."""

    profile: dict[str, Any] | None = None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    token_rates: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    input_tokens: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    predicted: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    def snapshot(self) -> dict[str, Any]:
        rates = list(self.token_rates)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": _percentiles(list(self.latencies)),
            "tokens_per_s": round(float(np.mean(rates)), 2) if rates else None,
            "drift": self.drift(),
        }

    def drift(self) -> dict[str, Any]:
        """Served inputs against the training profile (None where either side is missing)."""
        lengths = list(self.input_tokens)
        served: dict[str, Any] = {
            "window": len(lengths),
            "input_tokens_mean": round(float(np.mean(lengths)), 3) if lengths else None,
        }
        profile = self.profile or {}
        train = profile.get("input_tokens")
        served["train_input_tokens_mean"] = train["mean"] if train else None
        served["input_tokens_psi"] = (
            round(population_stability([0.1] * 10, decile_shares(lengths, train["deciles"])), 4)
            if train and lengths
            else None
        )
        predicted = list(self.predicted)
        if predicted:
            counts = Counter(predicted)
            served["label_shares"] = {k: round(v / len(predicted), 4) for k, v in counts.items()}
        shares = profile.get("labels")
        if shares is not None:
            served["train_label_shares"] = shares
        if shares and predicted:
            names = list(shares)
            actual = [counts.get(n, 0) / len(predicted) for n in names]
            served["labels_psi"] = round(population_stability(list(shares.values()), actual), 4)
        return served


class Metrics:
    """Counters shared by the request handlers and the scheduler thread (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.models: dict[str, ModelStats] = {}
        self.status: Counter = Counter()
        self.batch_rows: Counter = Counter()
        self.rounds = 0
        self.busy_s = 0.0
        self.generated_tokens = 0

    def track(self, name: str, profile: dict[str, Any] | None) -> None:
        """Start (or keep) the counters of model id ``name``."""
        with self._lock:
            self.models.setdefault(name, ModelStats()).profile = profile

    def response(self, status: int) -> None:
        with self._lock:
            self.status[status] += 1

    def request(
        self,
        name: str,
        latency_s: float,
        *,
        ok: bool,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        input_tokens: list[int] | None = None,
        predicted: list[str] | None = None,
    ) -> None:
        """Record one finished request of model id ``name``."""
        with self._lock:
            stats = self.models.setdefault(name, ModelStats())
            stats.requests += 1
            if not ok:
                stats.errors += 1
                return
            stats.latencies.append(latency_s)
            stats.prompt_tokens += prompt_tokens
            stats.completion_tokens += completion_tokens
            if completion_tokens:
                stats.token_rates.append(completion_tokens / max(latency_s, 1e-9))
            stats.input_tokens.extend(input_tokens or [])
            stats.predicted.extend(predicted or [])

    def round(self, rows: int, seconds: float, generated: int) -> None:
        """Record one scheduling round (its rows, busy time and generated tokens)."""
        with self._lock:
            self.rounds += 1
            self.batch_rows[rows] += 1
            self.busy_s += seconds
            self.generated_tokens += generated

    def snapshot(self, queued: int, in_flight: int) -> dict[str, Any]:
        """Everything, as one JSON-ready dict."""
        with self._lock:
            rounds = self.rounds
            mean_rows = sum(k * v for k, v in self.batch_rows.items()) / max(rounds, 1)
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "resident_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                "in_flight": in_flight,
                "queued": queued,
                "responses": {str(k): v for k, v in sorted(self.status.items())},
                "batches": {
                    "rounds": rounds,
                    "mean_rows": round(mean_rows, 3),
                    "rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
                },
                "generated_tokens": self.generated_tokens,
                "generated_tokens_per_busy_s": round(self.generated_tokens / self.busy_s, 2)
                if self.busy_s
                else None,
                "models": {name: s.snapshot() for name, s in sorted(self.models.items())},
            }


def prometheus(snapshot: dict[str, Any]) -> str:
    """The snapshot as Prometheus text exposition (gauges and counters, one line each)."""
    lines = [
        f"tunesmith_in_flight {snapshot['in_flight']}",
        f"tunesmith_resident_bytes {int(snapshot['resident_mb'] * 2**20)}",
        f"tunesmith_queued {snapshot['queued']}",
        f"tunesmith_batch_rounds_total {snapshot['batches']['rounds']}",
        f"tunesmith_batch_mean_rows {snapshot['batches']['mean_rows']}",
        f"tunesmith_generated_tokens_total {snapshot['generated_tokens']}",
    ]
    lines += [
        f'tunesmith_responses_total{{status="{code}"}} {n}'
        for code, n in snapshot["responses"].items()
    ]
    for name, stats in snapshot["models"].items():
        label = f'model="{name}"'
        lines += [
            f"tunesmith_requests_total{{{label}}} {stats['requests']}",
            f"tunesmith_errors_total{{{label}}} {stats['errors']}",
            f"tunesmith_prompt_tokens_total{{{label}}} {stats['prompt_tokens']}",
            f"tunesmith_completion_tokens_total{{{label}}} {stats['completion_tokens']}",
        ]
        for q, value in stats["latency_s"].items():
            if value is not None:
                quantile = int(q[1:]) / 100
                lines.append(f'tunesmith_latency_seconds{{{label},quantile="{quantile}"}} {value}')
        for key in ("input_tokens_psi", "labels_psi", "input_tokens_mean"):
            value = stats["drift"].get(key)
            if value is not None:
                lines.append(f"tunesmith_drift_{key}{{{label}}} {value}")
    return "\n".join(lines) + "\n"
