"""Where a run's steady-state time went, so that a user sees at once whether it is input-bound
(ray-project/ray#50128: 13 of an epoch's 14 s spent waiting on ``iter_torch_batches``).

- Fine-tuning (``train_worker.train_one_epoch``): each step after the first is split into the
  time the worker was blocked on its ``DataIterator`` for the next batch (``data wait``) and the
  time from holding the batch to the step's loss read back on the host (``compute``: the copy to
  the device, forward, backward, optimizer step and, under DDP, the gradient all-reduce, which
  also waits for the slowest worker). The first step is left out: it waits for the epoch's data
  pipeline to start (``train_first_step_seconds``). Summed over the workers.
- Prediction (``predictor.Predictor``): each actor's seconds inside its ``__call__`` (the copy to
  the device, the model, top-k and the copy back; with ``--decode-in actor`` the decoding too,
  timed apart as well) over the span from the start of its first batch to the end of its last
  (``busy share``); the rest of that span the actor waited for decoded batches or for the
  driver to take its output. Summed over the actors that predicted two batches or more (one
  batch's span is that batch: 100% whatever the input did). Actor start-up (loading the model)
  is outside the span.

A train data-wait share above ``INPUT_BOUND`` or a predictor busy share below ``1 -
INPUT_BOUND`` is called input-bound in the printed line.
"""

from __future__ import annotations

import time

import numpy as np

INPUT_BOUND = 0.5


def share(part: float, whole: float) -> float | None:
    """``part / whole``, or None when nothing was timed (``whole`` 0: e.g. a one-step epoch)."""
    return part / whole if whole > 0 else None


def train_text(wait_share: float | None) -> str:
    """The fine-tuning line, e.g. ``steady train steps waited for data 63% of the time:
    input-bound (...)``."""
    if wait_share is None:
        return "data wait: not measured (no step after the first in this epoch)"
    text = f"steady train steps waited for data {wait_share:.0%} of the time"
    if wait_share > INPUT_BOUND:
        text += (": input-bound (decoding is the bottleneck: more CPUs for the decode "
                 "tasks (more or bigger nodes, a lower --cpus-per-worker))")
    return text


def predictor_text(busy_share: float | None, actors: int, decode_part: float = 0.0) -> str:
    """The prediction line, e.g. ``predictor busy 41% of its time (2 actors): input-bound
    (...)``; ``decode_part``: the share of the busy time spent decoding (``--decode-in
    actor``), said when there is any."""
    if busy_share is None:
        return ("predictor busy share: not measured (no actor predicted more than one batch: "
                "too few images to time)")
    decoding = f"; {decode_part:.0%} of that decoding" if decode_part > 0 else ""
    text = (f"predictor busy {busy_share:.0%} of its time ({actors} actor"
            f"{'s' if actors != 1 else ''}{decoding})")
    if busy_share < 1 - INPUT_BOUND:
        text += (": input-bound (the actors waited for decoded batches: more CPUs for "
                 "decoding (more nodes, a lower --cpus-per-actor), --decode-device cuda on a "
                 "GPU node, or fewer --actors)")
    return text


class SteadyClock:
    """Rows per second in steady state: from the first batch on, whose own time is start-up (the
    actors starting, the model loading, the data pipeline filling), not throughput. The one
    definition behind prediction's ``steady_images_per_s``, fine-tuning's
    ``train_steady_images_per_s`` and the harness's plain loops. Times are ``time.monotonic()``
    seconds; ``start`` (default: now) is when the run began."""

    def __init__(self, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.first: float | None = None  # when the first batch was marked
        self.first_rows = 0
        self.rows = 0

    def mark(self, rows: int, now: float | None = None) -> None:
        """Count a batch of ``rows`` at ``now`` (default: now); the first one starts the clock."""
        if self.first is None:
            self.first = time.monotonic() if now is None else now
            self.first_rows = rows
        self.rows += rows

    @property
    def steady_rows(self) -> int:
        """The rows after the first batch."""
        return self.rows - self.first_rows

    def startup_seconds(self, end: float | None = None) -> float:
        """Seconds from ``start`` to the first batch (to ``end``, default now, without one)."""
        until = self.first if self.first is not None else (
            time.monotonic() if end is None else end)
        return until - self.start

    def rate(self, end: float | None = None) -> float:
        """Steady rows per second up to ``end`` (default now); 0.0 before a second batch."""
        end = time.monotonic() if end is None else end
        if self.first is None or self.steady_rows <= 0 or end <= self.first:
            return 0.0
        return self.steady_rows / (end - self.first)


class BusyShare:
    """The predictor actors' busy share (above) from the timing columns of their output batches
    (``predictor.TIMING_COLUMNS``): each actor's seconds inside ``Predictor.__call__`` over the
    span from the start of its first call to the end of its last, summed over the actors that
    made two calls or more (one call's span is that call: always 100%, a figure that says
    nothing)."""

    def __init__(self):
        # actor -> {"first", "last" (wall clock), "busy", "decode" (seconds), "calls" (starts)}
        self.actors: dict[str, dict] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for actor in set(batch["_actor"].tolist()):
            mine = batch["_actor"] == actor
            a = self.actors.setdefault(actor, {"first": float("inf"), "last": float("-inf"),
                                               "busy": 0.0, "decode": 0.0, "calls": set()})
            a["first"] = min(a["first"], float(batch["_call_start"][mine].min()))
            a["last"] = max(a["last"], float(batch["_call_end"][mine].max()))
            a["busy"] += float(batch["_busy_s"][mine].sum())
            a["decode"] += float(batch["_decode_s"][mine].sum())
            a["calls"].update(batch["_call_start"][mine].tolist())

    def facts(self) -> dict:
        """summary.json's ``predictor_busy_share`` (None: no actor made two calls),
        ``predictor_busy_seconds`` and ``predictor_decode_seconds`` (all actors; decoding is
        part of busy with ``--decode-in actor``), ``predictor_actors`` (the actors that
        predicted) and ``predictor_calls``."""
        timed = [a for a in self.actors.values() if len(a["calls"]) >= 2]
        busy = sum(a["busy"] for a in timed)
        return {"predictor_busy_share": share(
                    busy, sum(a["last"] - a["first"] for a in timed)),
                "predictor_busy_seconds": sum(a["busy"] for a in self.actors.values()),
                "predictor_decode_seconds": sum(a["decode"] for a in self.actors.values()),
                "predictor_actors": len(self.actors),
                "predictor_calls": sum(len(a["calls"]) for a in self.actors.values())}
