"""The benchmark harness's own rules: ceilings it refuses, the docs section it writes, and the
decode function it times being the stage's."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bench import cpu_table
from bench import config
from pipeline import docsection
from pipeline import benchmark as bench, data, presets
from pipeline.errors import PipelineError, UsageError


def test_a_job_faster_than_its_ceiling_fails_loudly():
    cpu_table.check_ceilings({"eval_vs_ceiling": 1.02, "eval_fp32_vs_ceiling_fp32": 0.7})
    with pytest.raises(PipelineError, match=r"eval_fp32_vs_ceiling_fp32 = 1.10 exceeds 1.02"):
        cpu_table.check_ceilings({"eval_vs_ceiling": 0.95, "eval_fp32_vs_ceiling_fp32": 1.1})


def test_targets_are_judged_in_their_direction():
    summary = cpu_table.target_summary({"decode_per_core_vs_pil": 0.79, "eval_mem_ratio_4x": 1.2,
                                        "unrelated": 3.0})
    assert summary == {
        "decode_per_core_vs_pil": {"op": ">=", "target": 0.8, "value": 0.79, "met": False},
        "eval_mem_ratio_4x": {"op": "<=", "target": 1.25, "value": 1.2, "met": True}}


def test_the_docs_section_is_replaced_between_the_markers_only(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"intro\n{config.DOCS_BEGIN}\nold table\n{config.DOCS_END}\nafter\n")
    docsection.write(str(doc), config.DOCS_MARKER["cpu"], "new table")
    assert doc.read_text() == (f"intro\n{config.DOCS_BEGIN}\nnew table\n"
                               f"{config.DOCS_END}\nafter\n")
    doc.write_text("no markers here\n")
    with pytest.raises(ValueError, match="B.md needs exactly one"):
        docsection.write(str(doc), config.DOCS_MARKER["cpu"], "x")
    assert doc.read_text() == "no markers here\n"


def test_the_repositorys_benchmark_doc_has_one_harness_section():
    text = open(config.DOCS).read()
    assert text.count(config.DOCS_BEGIN) == text.count(config.DOCS_END) == 1


def test_the_timed_decode_function_sees_what_the_ray_stage_sees(shard_set):
    manifest = str(shard_set / "val.json")
    batches = bench.raw_batches(manifest, batch_size=3)
    direct = {}
    for b in batches:
        out = data.decode_batch(b, presets.EvalTransform(), num_classes=4)
        assert list(out["error"]) == [""] * len(out["key"])
        direct.update(zip(out["key"], out["image"]))
    ds, m = data.read_decoded(manifest, presets.EvalTransform(), data.ReadPlan(batch_size=4))
    staged = {r["key"]: r["image"] for r in ds.take_all()}
    assert len(direct) == m.total_samples and sorted(direct) == sorted(staged)
    assert all(np.array_equal(direct[k], staged[k]) for k in staged)
    assert bench.decode_function_cpu(manifest, 4, batch_size=3, repeats=1) > 0


def test_the_decode_stages_own_cpu_is_found_in_its_task_workers(shard_set):
    """The decode row's target is judged on the CPU of the processes that ran the read/decode
    tasks: a pass must find them (a title Ray renamed would read 0 and pass any target)."""
    p = bench.stream_seconds(str(shard_set / "val.json"), batch_size=4)
    assert 0 < p.task_cpu <= p.cpu and p.wall > 0


def test_cpu_by_role_counts_each_process_from_its_first_reading():
    before = {1: ("driver", 5.0), 2: ("tasks", 1.0), 3: ("ray", 2.0)}
    after = {1: ("driver", 6.0), 2: ("tasks", 4.0), 3: ("ray", 2.5), 4: ("tasks", 0.5)}
    assert bench.cpu_by_role(before, after) == {"driver": 1.0, "tasks": 3.5, "ray": 0.5}


def test_a_differential_rate_the_noise_swamped_is_not_a_figure():
    assert bench.differential_rate(10, 2.0, 40, 5.0) == 10.0
    assert np.isnan(bench.differential_rate(10, 2.0, 40, 1.9))
    assert not cpu_table.target_met("shard_vs_tar_fsync", float("nan"))


@pytest.mark.parametrize("argv", [["--quick"], [], ["--quick", "--batch-size", "8"]])
def test_benchmark_training_rows_get_several_steady_steps_an_epoch(argv):
    from jobs import _cli

    cfg = config.resolve(_cli.parse(config.BenchmarkConfig, argv, "benchmark"))
    assert cpu_table.train_images(cfg) // cfg.batch_size >= cpu_table.MIN_TRAIN_STEPS


def test_benchmark_refuses_sizes_with_no_steady_step():
    from jobs import _cli

    cfg = config.resolve(_cli.parse(config.BenchmarkConfig, ["--train-images", "48"],
                                       "benchmark"))
    with pytest.raises(UsageError, match="1 steps an epoch"):
        cpu_table.train_images(cfg)


def test_the_sharding_target_is_judged_against_tar_that_also_fsyncs(tmp_path):
    """jobs.shard fsyncs every shard before it records it; `tar cf` alone does not: the target
    (0.5x) is judged on the row that does the same work, the plain row has none."""
    assert "shard_vs_tar_fsync" in cpu_table.TARGETS and "shard_vs_tar" not in cpu_table.TARGETS
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 100_000)
    assert bench.tar_seconds(str(src), str(tmp_path / "a.tar"), fsync=True) > 0
    assert (tmp_path / "a.tar").stat().st_size > 100_000


def test_the_model_alone_is_one_definition_for_both_tables(monkeypatch):
    """The CPU table's ceiling and the --device cuda table's first row time the same thing."""
    import torch

    from bench import gpu_table

    rate = bench.model_alone_rate(torch.device("cpu"), torch.float32, 2, repeats=1, warmup=0,
                                  calls=1, num_classes=10)
    assert rate > 0
    calls = []
    monkeypatch.setattr(bench, "model_alone_rate",
                        lambda device, dtype, batch, **kw: calls.append((device.type, dtype,
                                                                         batch)) or 1.0)
    bench.eval_ceiling_rate(torch.bfloat16, 4, 1, 8)
    sz = gpu_table.Sizes(batch=4, images=0, equiv_images=0, repeats=1, calls=1, warmup=0)
    assert gpu_table.model_rates(sz, torch.device("cpu"), torch.bfloat16) == {
        "model_img_s": 1.0, "model_fp32_img_s": 1.0}
    assert calls == [("cpu", torch.bfloat16, 4), ("cpu", torch.bfloat16, 4),
                     ("cpu", torch.float32, 4)]


def test_the_heavier_models_rows_compare_its_share_of_the_bound_with_resnet18s():
    """ResNet-50's rows (issue 35, item 7): its own CPU bound from its own model-alone rate and
    the same decode cost, and the job's share of that bound against ResNet-18's share."""
    from bench import cpu_table

    r = {"eval_ceiling_img_s": 50.0, "decode_fn_cpu_ms_per_img": 4.0, "eval_vs_cpu_bound": 0.8}
    rows: list = []
    cpu_table._heavier_rows("resnet50", 18.0, 20.0, "bf16", r, rows)
    bound = 1 / (1 / 20.0 + 4.0 / 1e3 / os.cpu_count())
    assert r["eval_heavy_cpu_bound_img_s"] == pytest.approx(bound)
    assert r["heavy_ceiling_vs_resnet18"] == pytest.approx(0.4)
    assert r["eval_heavy_vs_ceiling"] == pytest.approx(0.9)
    assert r["heavy_share_vs_resnet18"] == pytest.approx((18.0 / bound) / 0.8)
    assert len(rows) == 4 and rows[-1].startswith("| resnet50 vs resnet18: the job's share")
    assert "met" in rows[-1]  # 18/bound > 0.8: the heavier model keeps ResNet-18's share
    slow = {**r}
    cpu_table._heavier_rows("resnet50", 12.0, 20.0, "bf16", slow, [])
    assert not cpu_table.target_met("heavy_share_vs_resnet18", slow["heavy_share_vs_resnet18"])


def test_the_model_alone_rate_times_any_architecture_at_its_own_crop():
    import torch

    rate = bench.model_alone_rate(torch.device("cpu"), torch.float32, 2, repeats=1, warmup=0,
                                  calls=1, num_classes=10, arch="mobilenet_v3_small")
    assert rate > 0


@pytest.mark.slow  # ~20 s: four processes load torch
def test_the_cpu_ceiling_times_the_model_alone_in_both_layouts():
    """One process of a thread a core and one single-threaded process a core (the layout of
    --actors 0), each a real timing: its arguments reach eval_ceiling_rate in order."""
    import torch

    c = bench.cpu_ceiling(torch.float32, 2, 2, 10, repeats=1)
    assert c.cores == len(os.sched_getaffinity(0))
    assert c.one_actor > 0 and c.per_core > 0 and c.rate == max(c.one_actor, c.per_core)
    with pytest.raises(RuntimeError, match="per-core model-alone process exited"):
        bench.per_core_rate(torch.float32, 2, 2, arch="no_such_model", cores=2)
