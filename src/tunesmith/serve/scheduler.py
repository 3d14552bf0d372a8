"""Dynamic batching: one thread runs the models, requests wait briefly to share a batch.

Request handlers put jobs on a queue and await their futures; the scheduler
thread takes the first job, waits up to ``max_wait_s`` for more (up to
``max_batch`` rows: a request's ``n`` completions are rows), and runs them as
one *round*. It waits only while another request is queued or being received
(the HTTP side says when one arrives), so a lone client pays no wait. In a
round:

- generation jobs are grouped by module tree: all LoRA adapters of a base
  share one batched generation (each row names its adapter), every other
  tree runs its own sub-batch;
- classification jobs are grouped by model id (heads differ in shape);
- admin work (loading, unloading adapters) runs between rounds, so no model
  changes under a forward pass.

A sub-batch that fails is run again request by request, so a bad request
fails alone and the others in its batch are answered. The models run in
this one thread only: PyTorch uses the cores inside each forward, and the
event loop stays free to accept and stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.batching import FeatureDataset
from tunesmith.models.completions import GenerationRequest, GenerationResult
from tunesmith.runs.predict import predict_features
from tunesmith.serve.catalog import Served
from tunesmith.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class GenerateJob:
    """Complete ``request`` with model id ``served``."""

    served: Served
    request: GenerationRequest
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return self.request.n


@dataclass
class ClassifyJob:
    """Classify (or tag) the encoded ``records`` with model id ``served``."""

    served: Served
    records: list[dict[str, Any]]
    features: list[dict[str, Any]]
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return len(self.records)


@dataclass
class CallJob:
    """Run ``call`` between rounds (loading or unloading a model)."""

    call: Callable[[], Any]
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return 0


Job = GenerateJob | ClassifyJob | CallJob


class Scheduler:
    """The thread that runs every model call, in rounds of batched jobs.

    Args:
        metrics: Where rounds are recorded.
        max_batch: Rows per round at most (1: one request at a time, no batching).
        max_wait_s: How long the first job of a round waits for company.
        classify_batch: Rows per forward pass when classifying.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.01,
        classify_batch: int = 64,
    ) -> None:
        self.metrics = metrics
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.classify_batch = classify_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._arriving = 0  # requests received and not yet submitted (being parsed)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the jobs queued so far, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the result or the exception."""
        self._queue.put(job)
        return job.future

    def arrive(self, count: int = 1) -> None:
        """Say that a request was received and will be submitted soon (or ``count=-1``: not)."""
        with self._lock:
            self._arriving += count

    # -- the thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            try:
                self._round(jobs)
            except BaseException as err:  # pragma: no cover - _round answers every job
                log.exception("scheduler round failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
            if stop:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` plus what arrives within the wait, up to ``max_batch`` rows."""
        jobs, rows = [first], first.rows
        if isinstance(first, CallJob):
            return jobs, False
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            if self._queue.empty() and self._arriving <= 0:
                break  # nobody else is coming: a lone request does not wait
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += job.rows
        return jobs, False

    def _round(self, jobs: Sequence[Job]) -> None:
        started = time.perf_counter()
        generated = 0
        trees: dict[int, list[GenerateJob]] = {}
        for job in jobs:
            if isinstance(job, GenerateJob):
                trees.setdefault(id(job.served.tree), []).append(job)
        for group in trees.values():
            generated += self._generate(group)
        models: dict[str, list[ClassifyJob]] = {}
        for job in jobs:
            if isinstance(job, ClassifyJob):
                models.setdefault(job.served.name, []).append(job)
        for group in models.values():
            self._classify(group)
        for job in jobs:  # after the requests queued before it: they saw the old catalog
            if isinstance(job, CallJob):
                _answer(job, job.call)
        rows = sum(job.rows for job in jobs)
        if rows:
            self.metrics.round(rows, time.perf_counter() - started, generated)

    def _generate(self, jobs: list[GenerateJob]) -> int:
        """One batched generation for jobs on one tree; alone each when it fails."""
        tree = jobs[0].served.tree
        try:
            if not tree.mixed:
                tree.activate(jobs[0].served.name)
            assert tree.generator is not None
            results: list[GenerationResult] = tree.generator.generate([j.request for j in jobs])
        except Exception as err:
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return 0
            log.warning(
                "a batch of %d failed (%s); running its requests one by one", len(jobs), err
            )
            return sum(self._generate([job]) for job in jobs)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
        return sum(r.completion_tokens for r in results)

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        """One prediction pass over the jobs of one model id; alone each when it fails."""
        served = jobs[0].served
        try:
            served.tree.activate(served.name)
            features = [f for job in jobs for f in job.features]
            records = [r for job in jobs for r in job.records]
            rows = predict_features(
                served.tree.model,
                served.task,
                served.tokenizer,
                served.labels,
                records,
                FeatureDataset(features),
                self.classify_batch,
            )
        except Exception as err:
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return
            for job in jobs:
                self._classify([job])
            return
        start = 0
        for job in jobs:
            job.future.set_result(rows[start : start + job.rows])
            start += job.rows


def _answer(job: CallJob, call: Callable[[], Any]) -> None:
    try:
        job.future.set_result(call())
    except Exception as err:
        job.future.set_exception(err)
