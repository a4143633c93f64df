"""Throughput of each stage side by side with its baseline and the machine's ceiling:
`python -m jobs.benchmark [--device cpu|cuda]` (the tables: bench/cpu_table.py and
bench/gpu_table.py; the measurements they share: pipeline/benchmark.py)."""

from __future__ import annotations

import json
import os
import shlex
import sys

from bench.config import DOCS, DOCS_MARKER, BenchmarkConfig, resolve
from jobs import _cli
from pipeline import docsection


def command_line(argv) -> str:
    """The command as run, for the record: ``python -m jobs.benchmark`` and its flags."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m jobs.benchmark", *map(shlex.quote, args)])


@_cli.reports_errors
def main(argv=None) -> int:
    cfg = resolve(_cli.parse(BenchmarkConfig, argv, "benchmark"))
    _cli.setup_logging()
    if cfg.device == "cuda":
        from bench import gpu_table  # no Ray: runs on a bare GPU machine

        results = gpu_table.measure(cfg, "cuda")
        results["command"] = command_line(argv)
        section, check = gpu_table.report(results), None
    elif cfg.scale:
        from bench import scale

        results = scale.run(cfg.scale, cfg.workdir)
        section, check = scale.report(results, command_line(argv)), None
    else:
        from bench import cpu_table

        results, section = cpu_table.measure_table(cfg, command_line(argv))
        check = cpu_table.check_ceilings
    print("\n" + section)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nfigures written to {cfg.json}")
    if check:
        check(results)  # after printing and --json: the figures show why it failed
    if cfg.write_docs:
        docsection.write(DOCS, DOCS_MARKER["scale" if cfg.scale else cfg.device], section)
        print(f"\nwrote the results into {os.path.normpath(DOCS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
