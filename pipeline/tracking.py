"""MLflow experiment tracking, when asked for, and never in the way.

Asked for: ``MLFLOW_TRACKING_URI`` set in the environment, or a job's ``--mlflow-uri`` (which
wins). Not asked for, a ``Tracker`` does nothing and ``mlflow`` is never imported. Asked for,
each job logs to one MLflow run through ``mlflow.MlflowClient`` (explicit run ids, no global
"active run"): jobs.finetune its config as params, one step of metrics per epoch (from the
rank-0 worker, as the epoch ends) and model.pt and history.json as artifacts; jobs.nightly_eval
one run per night in the experiment of its history folder, each set's figures as metrics, the
verdict and exit code as tags, report.html and nightly.json as artifacts; jobs.predict its
summary's figures.

The job's own outputs stay the source of truth: any failure of the tracking server (unreachable,
refusing, slow) is one warning line, the tracker stops logging, and the job's exit code and
outputs are what they would have been. HTTP retries are capped (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
2, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 10 s, unless set): an unreachable server costs seconds, not
MLflow's default minutes of backoff.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pipeline import storage

ENV = "MLFLOW_TRACKING_URI"
RUN_ID_FILE = "mlflow_run_id"  # in a fine-tuning run's folder: its resume continues that run
URI_HELP = ("MLflow tracking URI (http://host:5000, sqlite:////abs/path/mlflow.db, ...); empty: "
            "$MLFLOW_TRACKING_URI, or no tracking when that is unset too. A server that fails "
            "is one warning: the job's own outputs and exit code stand")
PARAM_MAX = 6000  # MLflow's limit on a param value's length (characters)


def uri_of(flag: str = "") -> str:
    """The tracking URI a job uses: ``flag`` (``--mlflow-uri``), else ``$MLFLOW_TRACKING_URI``,
    else '' (no tracking)."""
    return flag or os.environ.get(ENV, "")


def redacted(uri: str) -> str:
    """``uri`` without the user and password it may carry (``http://u:p@host`` -> ``http://host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested dict as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def numeric(d: dict) -> dict[str, float]:
    """The finite numbers of ``d`` (nested dicts flattened, bools left out), as MLflow metrics."""
    out = {}
    for k, v in _flat(d).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
                and abs(v) != float("inf"):
            out[k] = float(v)
    return out


def summary_figures(summary) -> dict:
    """The figures of a summary.json (``predictions.Summary``) worth a metric: top-1, top-5,
    ECE, ReaL top-1/top-5 (percent), samples, failures, images/s and each interval's bounds
    (``top1_ci95_lo``, ``top1_ci95_hi``, ...); None where a figure does not apply."""
    out = {k: summary.get(k) for k in ("top1", "top5", "ece", "real_top1", "real_top5",
                                       "samples", "failures", "images_per_s")}
    for key in ("top1_ci95", "top5_ci95", "real_top1_ci95"):
        out[f"{key}_lo"], out[f"{key}_hi"] = summary.get(key) or (None, None)
    return out


class Tracker:
    """One MLflow run of a job, or nothing (``uri`` ''). Every method returns quietly; the first
    failure logs one warning naming the URI and what failed, and the tracker is off from then
    on. ``run_id``: the run this tracker logs to (None when off)."""

    def __init__(self, uri: str, run_id: str | None = None, what: str = "tracking"):
        self.uri, self.run_id, self.what = uri, run_id, what
        self.client = None
        self.off = not uri
        if not self.off:
            self._do("connecting", self._connect)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, *, run_id: str = "",
              tags: dict | None = None) -> "Tracker":
        """A tracker on a new run named ``run_name`` in ``experiment`` (created when missing),
        or on the existing run ``run_id`` (a resumed fine-tuning run), set running again."""
        t = cls(uri, what=f"MLflow run {run_name!r} in experiment {experiment!r}")
        if t.off:
            return t

        def begin():
            if run_id:
                t.client.update_run(run_id, status="RUNNING")
                t.run_id = run_id
                return
            exp = t.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else t.client.create_experiment(experiment)
            t.run_id = t.client.create_run(exp_id, run_name=run_name,
                                           tags={k: str(v) for k, v in (tags or {}).items()}
                                           ).info.run_id
        t._do("starting the run", begin)
        return t

    @property
    def enabled(self) -> bool:
        return not self.off and self.run_id is not None

    def _connect(self):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)

    def _do(self, doing: str, fn, *args):
        if self.off:
            return None
        retries = logging.getLogger("urllib3.connectionpool")
        level = retries.level
        retries.setLevel(logging.ERROR)  # its retry lines: the one warning below says it all
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking is never in the way of the job
            self.off = True
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: MLflow tracking at {redacted(self.uri)} failed while {doing} "
                  f"({type(e).__name__}: {first[:200]}): no more tracking for this job; its "
                  f"own outputs and exit code stand", file=sys.stderr, flush=True)
            return None
        finally:
            retries.setLevel(level)

    def params(self, params: dict) -> None:
        """Log ``params`` (nested dicts as dotted keys, values as text); keys the run has
        already (a resumed run) are left as they are: MLflow's params are immutable."""
        if not self.enabled:
            return

        def go():
            from mlflow.entities import Param

            have = self.client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:PARAM_MAX]) for k, v in _flat(params).items()
                   if k not in have]
            for i in range(0, len(new), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=new[i:i + 100])
        self._do("logging params", go)

    def metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the finite numbers of ``metrics`` (``numeric``) at ``step``."""
        if not self.enabled:
            return

        def go():
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step or 0) for k, v in numeric(metrics).items()]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        self._do("logging metrics", go)

    def tags(self, tags: dict) -> None:
        """Set ``tags`` (values as text)."""
        if not self.enabled:
            return

        def go():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))
        self._do("setting tags", go)

    def artifact(self, path: str) -> None:
        """Log the file ``path`` (a local path or a URI ``pipeline.storage`` reads) as an
        artifact of the run, under its own name."""
        if not self.enabled:
            return

        def go():
            import tempfile

            if not storage.is_uri(path):
                self.client.log_artifact(self.run_id, path)
                return
            with tempfile.TemporaryDirectory() as d:
                local = os.path.join(d, storage.basename(path))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
                self.client.log_artifact(self.run_id, local)
        self._do(f"logging artifact {path}", go)

    def end(self, ok: bool = True) -> None:
        """Mark the run FINISHED (``ok``) or FAILED."""
        if not self.enabled:
            return
        self._do("ending the run", lambda: self.client.set_terminated(
            self.run_id, status="FINISHED" if ok else "FAILED"))
