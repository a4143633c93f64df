"""Where a run's steady-state time went, so that a user sees at once whether it is input-bound
(ray-project/ray#50128: 13 of an epoch's 14 s spent waiting on ``iter_torch_batches``).

- Fine-tuning (``train_worker.train_one_epoch``): each step after the first is split into the
  time the worker was blocked on its ``DataIterator`` for the next batch (``data wait``) and the
  time from holding the batch to the step's loss read back on the host (``compute``: the copy to
  the device, forward, backward, optimizer step and, under DDP, the gradient all-reduce, which
  also waits for the slowest worker). The first step is left out: it waits for the epoch's data
  pipeline to start (``train_first_step_seconds``). Summed over the workers.
- Prediction (``predict.Predictor``): each actor's seconds inside its ``__call__`` (the copy to
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
