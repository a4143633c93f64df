"""Shared fixtures: a local Ray cluster, and small generated image trees and shards."""

from __future__ import annotations

import os

import pytest

from pipeline import shards, sources, synthetic
from pipeline.synthetic import photo_like  # noqa: F401  (re-exported for the tests)


def pytest_report_header(config):
    """The machine the run's times and figures belong to (CPU, instruction sets, what
    ``--precision auto`` runs; RESNET_PIPELINE_CPU_BF16=0 plays a CPU without bf16)."""
    from pipeline import machine

    return f"machine: {machine.describe()}"


def pytest_terminal_summary(terminalreporter):
    """The machine line again under the times (``make test`` runs ``pytest -q``, which hides the
    header)."""
    from pipeline import machine

    terminalreporter.write_line(f"machine: {machine.describe()}")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    from pipeline import data, faults

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray's workers inherit this, so faults.arm() in a test reaches them (pipeline/faults.py)
    os.environ.setdefault(faults.FAULT_FILE, str(tmp_path_factory.mktemp("faults") / "armed"))
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
    data.configure_context()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _loopback_head(tmp_path_factory):
    from tests import raycluster

    if raycluster.unavailable():
        pytest.skip(raycluster.unavailable())
    c = raycluster.start_head(tmp_path_factory.mktemp("cluster-token"))
    yield c
    c.stop()
    import shutil

    shutil.rmtree(c.temp_dir, ignore_errors=True)


@pytest.fixture
def loopback_cluster(_loopback_head):
    """The session's Ray cluster on loopback (tests/raycluster.py): its head alone, started once;
    the test starts the worker node it needs, which is taken away after it."""
    _loopback_head.wait_for_nodes(1)
    yield _loopback_head
    _loopback_head.stop_worker()


@pytest.fixture
def armed_fault(ray_local):
    """faults.arm for one test; disarmed after it, whatever happens."""
    from pipeline import faults

    yield faults.arm
    faults.disarm()


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """ROOT/{train,val}/<shape>/*.jpg: 4 classes, 8 train and 4 val images each."""
    root = tmp_path_factory.mktemp("images")
    synthetic.generate_image_folder(str(root), {"train": 8, "val": 4}, num_classes=4, seed=1,
                                    size_range=(64, 128))
    return root


@pytest.fixture(scope="session")
def shard_set(image_tree, tmp_path_factory, ray_local):
    """Train and val shards of ``image_tree`` (3 train shards, 2 val shards)."""
    out = tmp_path_factory.mktemp("shards")
    train = shards.write_shards(sources.scan_source(str(image_tree / "train"), "train"),
                                str(out), samples_per_shard=12, progress=False)
    val_src = sources.with_classes(sources.scan_source(str(image_tree / "val"), "val"),
                                   train.classes)
    shards.write_shards(val_src, str(out), samples_per_shard=10, progress=False)
    return out


def read_tar_members(path) -> list:
    """(TarInfo, bytes) for every member of a tar, in order: for tests that damage shards."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(i, tar.extractfile(i).read()) for i in tar]


def write_tar_members(path, members) -> None:
    """Write (TarInfo, bytes) members back as a tar, sizes fixed up to the bytes given."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def corrupt_one_member(out, manifest):
    """Rewrite the manifest's first shard with one JPEG cut to a third (the tar stays valid);
    return the sample's key and the shard's path."""
    path = out / manifest.shards[0].file
    members = read_tar_members(path)
    victim = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".jpg"))
    info, payload = members[victim]
    members[victim] = (info, payload[: len(payload) // 3])
    write_tar_members(path, members)
    return info.name.split(".")[0], str(path)


def finetune_config(shard_dir, tmp_path, **kw):
    """A FinetuneConfig for 2 CPU Ray Train workers on tiny shards; ``kw`` overrides."""
    from jobs import finetune

    base = dict(train=str(shard_dir / "train.json"), val=str(shard_dir / "val.json"),
                weights="none", epochs=2, num_workers=2, cpus_per_worker=0.5, threads=1,
                storage_path=str(tmp_path / "runs"), name="t", batch_size=8, lr=0.05,
                crop_size=32, shuffle_buffer=16, warmup_epochs=0.5, precision="fp32")
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def run_job(main, argv, capsys) -> tuple[int, str]:
    """A job's ``main(argv)`` as a user runs it: (its exit code, what it printed, stderr first)."""
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.err + out.out


def last_checkpoint_state(tmp_path, name="t") -> dict:
    """The state of the checkpoint Ray Train recorded last (the one a rerun resumes from)."""
    from pipeline import train

    state = train.recorded_state(str(tmp_path / "runs"), name)
    assert state is not None, f"run {name} has no recorded checkpoint"
    return state


TABLES_DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "RELIABILITY.md")


def render_table(rows, first_column: str) -> str:
    lines = [f"| {first_column} | job | observed outcome |", "|---|---|---|"]
    lines += [f"| {c} | `{j}` | {o.replace('|', '/')} |" for c, j, o in rows]
    return "\n".join(lines)


def check_readme_table(name: str, table: str) -> None:
    """docs/RELIABILITY.md must carry ``table`` between <!-- NAME:begin --> and <!-- NAME:end -->;
    with UPDATE_README_TABLES=1 (``make readme-tables``) it is written there first. (The name
    is historical: the tables lived in README.md before it became the quick start.)"""
    from pipeline import docsection

    if os.environ.get("UPDATE_README_TABLES"):
        docsection.write(TABLES_DOC, name, table)
    assert docsection.block(name, table) in open(TABLES_DOC).read(), \
        f"docs/RELIABILITY.md's {name} is stale: make readme-tables"


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """Random-init ResNet-18 weights saved as a plain state_dict (1000 ImageNet classes)."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(resnet18().state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def imagenet_like_shards(tmp_path_factory, ray_local):
    """(source folder, shard folder): 12 photo-like JPEGs in three wnid folders, so a
    1000-class head applies unchanged; val shards of 5."""
    import numpy as np

    root = tmp_path_factory.mktemp("inet")
    rng = np.random.default_rng(5)
    for wnid in ["n01440764", "n01443537", "n01484850"]:
        (root / wnid).mkdir()
        for k in range(4):
            w, h = int(rng.integers(150, 400)), int(rng.integers(150, 400))
            photo_like(rng, w, h).save(root / wnid / f"{wnid}_{k}.JPEG", quality=88)
    out = tmp_path_factory.mktemp("inet_shards")
    shards.write_shards(sources.scan_source(str(root), "val"), str(out), samples_per_shard=5,
                        progress=False)
    return root, out


def predict_small(manifest, weights, out, **kw):
    """jobs.predict's run at fp32, batch 4, no progress bar; ``kw`` sets other flags."""
    from jobs import predict as predict_job

    return predict_job.run(predict_job.PredictConfig(
        data=manifest, weights=weights, out=out, precision="fp32", batch_size=4,
        progress=False, **kw))
