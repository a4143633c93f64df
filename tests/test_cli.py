"""What every job's command line does with errors (jobs/_cli.py, pipeline/errors.py): the
project's own errors and OSError get one line (exit 1, a UsageError exit 2); bugs keep their
traceback."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UsageError


def test_programming_errors_keep_their_traceback_user_errors_get_one_line(capsys):
    """RuntimeError (a torch shape or device bug) used to print one line and exit 1, and so did
    any ValueError, numpy's and torch's included: user errors are the project's own types."""
    from jobs import _cli
    from pipeline.errors import InputError, PipelineError

    def job(exc):
        @_cli.reports_errors
        def main(argv=None):
            raise exc
        return main

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        job(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))()
    assert job(PipelineError("run r stopped"))() == 1
    assert job(UsageError("--actors 3 x ..."))() == 2
    assert job(FileNotFoundError("manifest m does not exist"))() == 1
    assert job(InputError("manifest m is not valid JSON"))() == 1
    try:
        np.zeros(3).reshape(2, 2)  # a numpy bug in the project's code: a ValueError
    except ValueError as numpy_bug:
        with pytest.raises(ValueError, match="cannot reshape"):
            job(numpy_bug)()
    assert capsys.readouterr().err.splitlines() == [
        "error: run r stopped", "error: --actors 3 x ...", "error: manifest m does not exist",
        "error: manifest m is not valid JSON"]


def _one_image_manifest(path) -> str:
    """A manifest that loads (its shard is never read): for the checks made before Ray."""
    import json

    from pipeline import shards

    path.write_text(json.dumps({
        "format": shards.FORMAT, "format_version": shards.FORMAT_VERSION, "split": "val",
        "classes": [{"index": 0, "id": "a", "name": "a"}], "total_samples": 1,
        "shards": [{"file": "val-000000.tar", "samples": 1, "bytes": 10, "sha256": "0" * 64,
                    "first_key": "k", "last_key": "k"}]}))
    return str(path)


@pytest.mark.parametrize("job,argv,expected", [
    ("shard", ["--source", "{tmp}/no-such-folder", "--out", "{tmp}/out"],
     "no-such-folder does not exist"),
    ("shard", ["--source", "{tmp}/flat", "--out", "{tmp}/out"], "no known layout in"),
    ("shard", ["--source", "{tmp}/imagenetv2-threshold0.7-format-val", "--out", "{tmp}/out",
               "--v2-variant", "top-images"], "contradicts the folder name"),
    ("shard", ["--source", "{tmp}/flat", "--out", "{tmp}/out", "--layout", "imagenet-v2"],
     "has no images to shard in layout imagenet-v2 (1 file skipped, e.g. holiday.jpg: file "
     "outside any class folder)"),
    ("predict", ["--data", "{tmp}/missing.json", "--out", "{tmp}/out"],
     "manifest {tmp}/missing.json does not exist"),
    ("predict", ["--data", "{tmp}/notes.txt", "--out", "{tmp}/out"], "is not valid JSON"),
    ("predict", ["--data", "{manifest}", "--out", "{tmp}/out", "--weights", "{tmp}/w.pt"],
     "weights '{tmp}/w.pt': not DEFAULT, IMAGENET1K_V1, none, nor an existing file"),
    # weights whose classes lack the data's, a file that is no weights, a folder for a manifest
    ("predict", ["--data", "{manifest}", "--out", "{tmp}/out", "--weights", "{tmp}/inet.pt"],
     "the model's 1000 classes lack 1 of the data's classes"),
    ("embed", ["--data", "{manifest}", "--out", "{tmp}/out", "--weights", "{tmp}/notes.txt"],
     "cannot be loaded safely"),
    ("predict", ["--data", "{tmp}", "--out", "{tmp}/out"], "is a folder: pass its manifest"),
    ("shard", ["--source", "{tmp}/classes", "--out", "{tmp}/out", "--classes-from",
               "{manifest}"], "class b is not in the class list"),
    ("finetune", ["--train", "{manifest}", "--val", "{tmp}/missing.json", "--storage-path",
                  "{tmp}/out"], "manifest {tmp}/missing.json does not exist"),
    ("nightly_eval", ["--data", "{tmp}/missing.json", "--history", "{tmp}/out", "--weights",
                      "none"],
     "no such manifest"),
    # GPU decoding without a GPU for the actors (it used to decode with PIL, silently)
    ("predict", ["--data", "{manifest}", "--out", "{tmp}/out", "--decode-device", "cuda"],
     "--decode-device cuda decodes on the predictor actors' GPUs: add --use-gpu"),
    ("nightly_eval", ["--data", "{manifest}", "--history", "{tmp}/out", "--weights", "none",
                      "--decode-device", "cuda"], "add --use-gpu"),
])
def test_bad_inputs_fail_before_ray_starts(job, argv, expected, tmp_path, monkeypatch, capsys):
    """A wrong path, an unknown layout, a missing manifest or weights file: one line, before a
    local Ray cluster starts (~10 s and its log lines on 2 cores), and no output folder made."""
    import importlib

    from jobs import _cli
    from tests.conftest import run_job

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(_cli, "init_ray", no_ray)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "holiday.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a manifest")
    for i in range(1000):
        (tmp_path / "imagenetv2-threshold0.7-format-val" / str(i)).mkdir(parents=True)
    manifest = _one_image_manifest(tmp_path / "val.json")
    if "inet.pt" in " ".join(argv):
        import torch
        from torchvision.models import resnet18

        torch.save(resnet18().state_dict(), tmp_path / "inet.pt")
    (tmp_path / "classes" / "b").mkdir(parents=True)
    (tmp_path / "classes" / "b" / "x.jpg").write_bytes(b"x")
    fill = lambda s: s.format(tmp=tmp_path, manifest=manifest)  # noqa: E731
    main = importlib.import_module(f"jobs.{job}").main
    code, text = run_job(main, [fill(a) for a in argv], capsys)
    assert code in (1, 2) and fill(expected) in text, text
    assert text.startswith("error: ") and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job", ["shard", "predict", "finetune", "evaluate", "nightly_eval",
                                 "classify", "embed", "probe", "benchmark", "demo"])
def test_help_never_says_an_empty_or_a_second_default(job, capsys):
    """argparse appended "(default: )" to every flag whose default is empty, and a second
    "(default: )" where the help named its default itself."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"jobs.{job}").main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    import re

    assert "(default: )" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)
    assert "(default: " in text  # the non-empty defaults are still shown
