"""One typed config per job: a dataclass whose fields carry their help text.

Kept instead of tyro / jsonargparse / simple-parsing (all on PyPI), measured 2026-11-29: tyro
1.0.16 brings three packages (tyro, typeguard, docstring_parser) and imports in ~40 ms against
~6 ms for argparse + dataclasses, and would need every config rewritten with Annotated/Literal
types; this module is ~140 lines of argparse that also keep the project's own rules (every
``*_fraction`` flag in [0, 1], positional file lists, options shared by inheritance, e.g.
``predict.PredictOptions`` in the predict and nightly configs).

``parse(Config, argv)`` builds the argparse parser from the dataclass: ints and floats are
type-checked, ``choices`` come from field metadata, booleans become ``--x/--no-x`` pairs and
unknown flags fail. The resolved config is a frozen dataclass; ``to_dict`` records it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from pipeline.errors import USER_ERRORS, exit_code_of


def option(default: Any, help: str, choices=None, required: bool = False,  # noqa: A002
           recorded: bool = True):
    """A flag of a job's config. ``recorded=False``: left out of ``to_dict``, so it is never
    written into the files that record a run (a tracking URI may carry credentials)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "required": required,
                                       "recorded": recorded})


def positional(help: str, metavar: str):  # noqa: A002
    """One or more positional arguments, parsed into a tuple of strings."""
    return dataclasses.field(default=(), metadata={"help": help, "positional": metavar})


def repeated(help: str, metavar: str, required: bool = False):  # noqa: A002
    """A flag that may be given several times (``--data a=A --data b=B``), parsed into a tuple of
    strings in the order given; empty when absent."""
    return dataclasses.field(default=(), metadata={"help": help, "repeat": metavar,
                                                   "required": required})


TYPES = {"int": int, "float": float, "str": str}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each flag's help, except where the help names its
    default itself, or the default is empty (the help says what empty means): "(default: )"
    said nothing, twice over after "(default: ./demo-<time>)"."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default in ("", None):
            return action.help
        return super()._get_help_string(action)


def parse(cls, argv=None, job: str = ""):
    """Parse ``argv`` into the frozen dataclass ``cls``; exits with usage on bad input."""
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{job}",
        description=cls.__doc__,
        formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=meta["positional"],
                                help=meta["help"], type=str)
            continue
        kw = {"help": meta.get("help", ""), "dest": f.name}
        if meta.get("repeat"):
            parser.add_argument(flag, action="append", metavar=meta["repeat"], type=str,
                                required=bool(meta.get("required")), default=argparse.SUPPRESS,
                                **kw)
            continue
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        if typ == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                **kw)
            continue
        if meta.get("required"):
            kw["required"] = True  # no "(default: ...)" in --help for a flag one must give
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = f.default
        parser.add_argument(flag, type=TYPES[typ], choices=meta.get("choices"), **kw)
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="also print Ray's own progress, plan and checkpoint lines (without "
                             "it they stay in Ray's session logs, /tmp/ray/session_latest/logs)")
    args = vars(parser.parse_args(argv))
    VERBOSE["on"] = args.pop("verbose")
    for name, value in args.items():  # every *_fraction flag is a fraction, never a percent
        if name.endswith("_fraction") and not 0 <= value <= 1:
            parser.error(f"--{name.replace('_', '-')} is a fraction in [0, 1] (0.05 is 5%), "
                         f"not {value:g}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional") or f.metadata.get("repeat"):
            args[f.name] = tuple(args.get(f.name) or ())
    return cls(**args)


def to_dict(cfg) -> dict:
    """The config as it is recorded (config.json, nightly.json, model.pt): every flag but those
    declared ``recorded=False``."""
    unrecorded = {f.name for f in dataclasses.fields(cfg) if not f.metadata.get("recorded", True)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unrecorded}


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


VERBOSE = {"on": False}  # --verbose, which every job takes (``parse``)


def init_ray(num_cpus: int | None = None):
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one. Without
    --verbose, Ray's own progress, plan and checkpoint lines stay in its session logs
    (``ray_compat.quiet_ray_logs``); the job's own lines, warnings and errors are printed."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    remote = bool(os.environ.get("RAY_ADDRESS"))
    level = logging.INFO
    if not VERBOSE["on"]:
        from pipeline import ray_compat

        ray_compat.quiet_ray_logs(local=not remote)
        level = logging.WARNING  # "Started a local Ray instance", "Connecting to ..."
    if remote:
        ray.init(log_to_driver=True, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True, logging_level=level)
    from pipeline import data

    data.configure_context()


def deadline_option(default: str):
    """The --deadline flag (``pipeline.deadline``): a duration, ``0`` for none."""
    from pipeline import deadline

    return option(default, deadline.DEADLINE_HELP)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)


def reports_errors(main):
    """Decorator for a job's main(): user errors (``errors.USER_ERRORS``: the project's own
    types and OSError) become `error: ...` on stderr and exit 1, a UsageError exit 2, one with
    an ``exit_code`` (``pipeline.errors``: 6 deadline, 7 --max-wait, 8 overlapping night) that;
    RESNET_PIPELINE_DEBUG=1 re-raises them with their traceback. Anything else, a ValueError
    from numpy or torch included, keeps its traceback: a bug."""
    import functools

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if os.environ.get("RESNET_PIPELINE_DEBUG"):
                raise
            print(f"error: {str(e).strip()}", file=sys.stderr)
            return exit_code_of(e)
    return wrapper
