"""MLflow tracking (issue 36): runs read back with MlflowClient from a local SQLite store (and,
in a slow test, from an `mlflow server` over HTTP, as a cluster would use it); an unreachable
server changes no exit code and loses nothing; not configured, MLflow is not even imported."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline import predictions, tracking


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id])


def test_not_configured_mlflow_is_not_even_imported():
    code = ("import os, sys; os.environ.pop('MLFLOW_TRACKING_URI', None); "
            "from jobs import finetune, nightly_eval, predict; from pipeline import tracking; "
            "t = tracking.Tracker.start(tracking.uri_of(''), 'e', 'r'); "
            "t.metrics({'a': 1.0}); t.params({'p': 1}); t.artifact('x'); t.end(); "
            "assert not t.enabled; assert 'mlflow' not in sys.modules, 'imported'")
    env = {k: v for k, v in os.environ.items() if k != tracking.ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_metrics_keep_the_finite_numbers_only():
    assert tracking.numeric({"a": 1, "b": float("nan"), "c": "x", "d": True, "e": None,
                             "f": {"g": 2.5}, "h": float("inf")}) == {"a": 1.0, "f.g": 2.5}


def test_an_unreachable_server_is_one_warning_and_changes_nothing(shard_set, tmp_path, capsys):
    """The job's outputs and exit code are what they are without tracking; the warning names
    the server; the job does not wait on it for long."""
    from jobs import predict as predict_job

    out = tmp_path / "eval"
    t0 = time.monotonic()
    code = predict_job.main(["--data", str(shard_set / "val.json"), "--weights", "none",
                             "--out", str(out), "--precision", "fp32", "--no-progress",
                             "--mlflow-uri", "http://127.0.0.1:9"])
    seconds = time.monotonic() - t0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [ln for ln in captured.err.splitlines() if "MLflow tracking at" in ln]
    assert len(lines) == 1 and "http://127.0.0.1:9" in lines[0], captured.err
    assert (out / "_SUCCESS").exists() and predictions.Summary.read(str(out)).samples == 16
    assert seconds < 120


def test_a_night_is_one_mlflow_run_with_its_figures_verdict_and_report(
        shard_set, tmp_path, monkeypatch):
    from jobs import nightly_eval

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(tracking.ENV, uri)
    history = tmp_path / "history"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = nightly_eval.main(["--data", f"val={shard_set / 'val.json'}", "--weights", "none",
                                  "--history", str(history), "--precision", "fp32",
                                  "--batch-size", "8", "--no-progress"])
    assert code == 0, err.getvalue()
    [run] = _runs(uri, f"nightly {history}")
    record = json.loads(next((history / "runs").glob("*/nightly.json")).read_text())
    assert run.info.run_name == record["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["verdict"] == record["verdict"] and run.data.tags["exit_code"] == "0"
    summary = predictions.Summary.read(record["sets"][0]["predictions_dir"])
    assert run.data.metrics["val.top1"] == pytest.approx(summary.top1)
    assert run.data.metrics["val.top1_ci95_lo"] == pytest.approx(summary.top1_ci95[0])
    assert "val.ece" in run.data.metrics and "val.top5" in run.data.metrics
    names = {a.path for a in _client(uri).list_artifacts(run.info.run_id)}
    assert names == {"report.html", "nightly.json"}
    assert "mlflow_uri" not in json.dumps(record["config"])  # a URI may carry credentials


@pytest.mark.slow
def test_a_fine_tune_logs_each_epoch_and_its_resume_continues_the_same_run(
        shard_set, tmp_path, ray_local, monkeypatch):
    from jobs import finetune
    from pipeline import train
    from tests.conftest import finetune_config

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finetune.run(finetune_config(shard_set, tmp_path, epochs=2, mlflow_uri=uri))
    [run] = _runs(uri, train.TRACKING_EXPERIMENT)
    client = _client(uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert steps == [1, 2] and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.05"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model.pt",
                                                                      "history.json"}
    assert (tmp_path / "runs" / "t" / tracking.RUN_ID_FILE).read_text() == run.info.run_id
    # two more epochs: the same MLflow run goes on, steps 3 and 4, no second run
    finetune.run(finetune_config(shard_set, tmp_path, epochs=4, mlflow_uri=uri))
    [again] = _runs(uri, train.TRACKING_EXPERIMENT)
    assert again.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert steps == [1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_predict_logs_to_an_mlflow_server_over_http(shard_set, tmp_path, capsys):
    """`mlflow server` on 127.0.0.1, as a team's tracking server: the job logs over HTTP."""
    import urllib.request

    from jobs import predict as predict_job

    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host",
         "127.0.0.1", "--port", str(port), "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}")
        out = tmp_path / "eval"
        code = predict_job.main(["--data", str(shard_set / "val.json"), "--weights", "none",
                                 "--out", str(out), "--precision", "fp32", "--no-progress",
                                 "--mlflow-uri", uri])
        assert code == 0, capsys.readouterr().err
        summary = predictions.Summary.read(str(out))
        [run] = _runs(uri, predict_job.TRACKING_EXPERIMENT)
        assert run.info.run_name == summary.run_id
        assert run.data.metrics["top1"] == pytest.approx(summary.top1)
        assert run.data.metrics["samples"] == 16 and run.data.tags["arch"] == "resnet18"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_tracking_uri_is_a_flag_never_recorded():
    from jobs import _cli, finetune, nightly_eval

    for config, argv in ((finetune.FinetuneConfig, ["--train", "t", "--val", "v"]),
                         (nightly_eval.NightlyConfig, ["--data", "d", "--weights", "w",
                                                      "--history", "h"])):
        cfg = _cli.parse(config, argv + ["--mlflow-uri", "http://u:secret@host"], "x")
        assert cfg.mlflow_uri == "http://u:secret@host"
        recorded = _cli.to_dict(cfg)
        assert "mlflow_uri" not in recorded and "secret" not in str(recorded)
    assert tracking.redacted("http://u:secret@host:5000/x") == "http://host:5000/x"
