"""Time attribution (pipeline/timeshare.py): whether a fine-tuning epoch waited for data and how
busy the predictor actors were, so a user sees at once whether a run is input-bound."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from jobs import finetune
from pipeline import model as modellib, timeshare, train_worker


class SlowBatches:
    """A stand-in for Ray Train's DataIterator: ``steps`` batches of 4 decoded 32x32 images,
    each handed over ``delay`` seconds after it is asked for (a decode stage that cannot keep
    up)."""

    def __init__(self, steps: int, delay: float):
        self.steps, self.delay = steps, delay

    def iter_batches(self, batch_size, **_):
        rng = np.random.default_rng(0)
        for i in range(self.steps):
            time.sleep(self.delay)
            yield {"image": rng.integers(0, 256, (batch_size, 3, 32, 32), dtype=np.uint8),
                   "label": rng.integers(0, 4, batch_size).astype(np.int64),
                   "error": np.full(batch_size, "", dtype=object),
                   "key": np.array([f"k{i}_{j}" for j in range(batch_size)], dtype=object),
                   "shard": np.full(batch_size, "s", dtype=object)}


def _epoch(steps: int, delay: float) -> dict:
    classes = modellib.imagenet_classes()[:4]
    cfg = dataclasses.replace(
        finetune.loop_config(finetune.FinetuneConfig(train="-", val="-", weights="none",
                                                     batch_size=4, crop_size=32)),
        classes=tuple(classes), num_classes=4, train_samples=4 * steps, world_size=1,
        shuffle_buffer=0, amp_dtype=torch.float32)
    state = train_worker.build_state(cfg, torch.device("cpu"))
    metrics, failures = train_worker.train_one_epoch(state, SlowBatches(steps, delay), cfg, 0)
    assert failures == [] and metrics["train_images"] == 4 * steps
    return metrics


def test_an_epoch_that_waits_on_its_data_says_so_and_one_that_does_not_says_that():
    slow = _epoch(steps=5, delay=0.25)
    # the four steady steps (the first is start-up, left out) each waited 0.25 s
    assert 4 * 0.25 <= slow["train_data_wait_seconds"] < 4 * 0.25 + 0.5
    assert slow["train_compute_seconds"] > 0
    assert slow["train_data_wait_share"] == pytest.approx(
        slow["train_data_wait_seconds"]
        / (slow["train_data_wait_seconds"] + slow["train_compute_seconds"]))
    # a 32x32 step of ResNet-18 at batch 4 takes tens of ms on 2 cores, far below 0.25 s (and
    # 0.17 s on a loaded machine: the share read 0.597 once, so the bar is the contract's)
    assert slow["train_data_wait_share"] > timeshare.INPUT_BOUND
    assert "input-bound" in timeshare.train_text(slow["train_data_wait_share"])

    fast = _epoch(steps=5, delay=0.0)
    assert fast["train_data_wait_share"] < 0.2
    assert "input-bound" not in timeshare.train_text(fast["train_data_wait_share"])


def test_a_one_step_epoch_says_the_data_wait_was_not_measured():
    m = _epoch(steps=1, delay=0.0)
    assert m["train_data_wait_share"] is None and m["train_data_wait_seconds"] == 0
    assert "not measured" in timeshare.train_text(None)


def _timed_rows(actor: str, calls: list[tuple[float, float, int]], decode: float = 0.0) -> dict:
    """Predictor output timing columns for ``calls`` of (start, end, rows) on one actor, each
    call spending ``decode`` seconds decoding."""
    rows = [(start, end, (end - start) / n, decode / n) for start, end, n in calls
            for _ in range(n)]
    return {"_actor": np.array([actor] * len(rows), dtype=object),
            "_call_start": np.array([r[0] for r in rows]),
            "_call_end": np.array([r[1] for r in rows]),
            "_busy_s": np.array([r[2] for r in rows]),
            "_decode_s": np.array([r[3] for r in rows])}


def test_predictor_busy_share_is_busy_seconds_over_each_actors_span():
    busy = timeshare.BusyShare()
    # actor a: calls 0-1 and 3-4 (busy 2 s of a 4 s span); actor c: 5-6 and 6-8 (3 of 3 s);
    # actor b: one call, 10-12 (its span is its call: 100% whatever the input did; left out)
    a = _timed_rows("a", [(0.0, 1.0, 3), (3.0, 4.0, 5)], decode=0.5)
    c = _timed_rows("c", [(5.0, 6.0, 2), (6.0, 8.0, 2)])
    b = _timed_rows("b", [(10.0, 12.0, 4)])
    # the driver's batches need not be the actors': rows of all, split anywhere
    rows = {k: np.concatenate([a[k], c[k], b[k]]) for k in a}
    busy.add({k: v[:5] for k, v in rows.items()})
    busy.add({k: v[5:] for k, v in rows.items()})
    facts = busy.facts()
    assert facts["predictor_actors"] == 3 and facts["predictor_calls"] == 5
    assert facts["predictor_busy_seconds"] == pytest.approx(7.0)
    assert facts["predictor_decode_seconds"] == pytest.approx(1.0)
    assert facts["predictor_busy_share"] == pytest.approx(5.0 / 7.0)
    assert timeshare.BusyShare().facts()["predictor_busy_share"] is None
    one = timeshare.BusyShare()
    one.add(b)
    assert one.facts()["predictor_busy_share"] is None  # one call each: not a figure


def test_the_busy_line_calls_a_waiting_predictor_input_bound():
    assert "input-bound" in timeshare.predictor_text(0.3, 2)
    assert "2 actors" in timeshare.predictor_text(0.3, 2)
    assert "input-bound" not in timeshare.predictor_text(0.9, 1)
    assert "not measured" in timeshare.predictor_text(None, 0)
    assert "60% of that decoding" in timeshare.predictor_text(0.9, 1, 0.6)
