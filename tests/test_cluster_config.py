"""Offline checks of cluster.yaml (the Ray cluster launcher config for AWS).

Nothing here talks to a cloud: the config is validated the way `ray up`
validates it before it creates anything (`prepare_config` merges the AWS
defaults, then `validate_config` checks it against the JSON schema shipped in
the installed ray package), the EC2 parts are checked against botocore's local
RunInstances model, the `ray start` / `ray job submit` command lines are parsed
by Ray's own CLI definitions, and the crontab installer is run against a fake
`crontab` in a temporary HOME.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = ROOT / "cluster.yaml"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

CRON_MARKER = "# resnet-pipeline:nightly-eval"
PROJECT_DIR = "/home/ubuntu/resnet-pipeline"
NIGHTLY_CMD = (
    "ray job submit --address http://127.0.0.1:8265 "
    f"--working-dir {PROJECT_DIR} -- python -m jobs.nightly_eval "
    "--data s3://{b}/imagenet-shards/val.json "
    "--weights s3://{b}/models/current/model.pt "
    "--history s3://{b}/nightly --deadline 8h --max-wait 30m"
)
# the tracking server from ~/.resnet-pipeline.env, expanded by cron's shell ('' : no tracking)
MLFLOW_ARG = ' --mlflow-uri "$MLFLOW_TRACKING_URI"'

# GPUs per instance for the types this config may use; anything else must
# still be a GPU family (g*/p*) and declare GPUs.
KNOWN_GPU_COUNTS = {
    "g5.12xlarge": 4,
    "p3.8xlarge": 4,
    "g5.48xlarge": 8,
    "p4d.24xlarge": 8,
}
GPU_FAMILY = re.compile(r"^(g|p)\d")

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_text() -> str:
    return CONFIG_PATH.read_text()


@pytest.fixture
def config(raw_text) -> dict:
    # Fresh copy per test: some tests mutate it.
    return yaml.safe_load(raw_text)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def launcher_validate(cfg: dict) -> None:
    """What `ray up` does before any cloud call (commands._bootstrap_config)."""
    validate_config(prepare_config(copy.deepcopy(cfg)))


def worker_types(cfg: dict) -> dict:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


def all_commands(cfg: dict):
    for key in COMMAND_LISTS:
        for cmd in cfg.get(key) or []:
            yield key, cmd


def ray_subcommand_args(cmd: str, sub: str) -> list[str]:
    """Arguments following `ray <sub>` up to the end of that shell command."""
    m = re.search(rf"\bray {sub}\b(.*?)(?:;|&&|\|\||$)", cmd, re.S)
    assert m, f"no `ray {sub}` in {cmd!r}"
    return shlex.split(m.group(1))


def the_command(cfg: dict, key: str, needle: str) -> str:
    hits = [c for c in cfg[key] if needle in c]
    assert len(hits) == 1, f"expected exactly one {key} entry containing {needle!r}"
    return hits[0]


def bucket_from(cfg: dict) -> str:
    cmd = the_command(cfg, "setup_commands", "RESNET_BUCKET=")
    m = re.search(r"RESNET_BUCKET='([^']+)'", cmd)
    assert m, cmd
    return m.group(1)


# --------------------------------------------------------------------------
# schema validation (and proof that it can fail)
# --------------------------------------------------------------------------


def test_schema_file_is_the_one_ray_validates_with():
    assert SCHEMA_PATH.is_file(), SCHEMA_PATH
    import inspect

    assert "ray-schema.json" in inspect.getsource(validate_config)


def test_config_matches_shipped_schema(config, schema):
    # The file as written (no defaults merged) ...
    jsonschema.validate(config, schema)
    # ... and exactly what `ray up` validates.
    launcher_validate(config)


def test_config_uses_provider_aws(config):
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


BROKEN = {
    "misspelled top-level key": lambda c: _rename(
        c, "head_setup_commands", "head_setup_comands"
    ),
    "misspelled node-type key": lambda c: _rename(
        c["available_node_types"]["gpu.4x"], "max_workers", "max_worker"
    ),
    "misspelled auth key": lambda c: _rename(
        c["auth"], "ssh_private_key", "ssh_privat_key"
    ),
    "max_workers as string": lambda c: c.__setitem__("max_workers", "10"),
    "min_workers as float": lambda c: c["available_node_types"]["gpu.8x"].__setitem__(
        "min_workers", 0.5
    ),
    "GPU count as string": lambda c: c["available_node_types"]["gpu.4x"][
        "resources"
    ].__setitem__("GPU", "4"),
    "use_internal_ips as string": lambda c: c["provider"].__setitem__(
        "use_internal_ips", "true"
    ),
    "start commands not a list": lambda c: c.__setitem__(
        "worker_start_ray_commands", "ray start --address=$RAY_HEAD_IP:6379"
    ),
    "node type without resources": lambda c: c["available_node_types"][
        "cpu.worker"
    ].pop("resources"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_copy_fails_validation(config, schema, breakage):
    broken = copy.deepcopy(config)
    BROKEN[breakage](broken)
    with pytest.raises(jsonschema.ValidationError):
        launcher_validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_rejects_min_workers_above_global_max(config):
    broken = copy.deepcopy(config)
    broken["max_workers"] = 1
    broken["available_node_types"]["gpu.4x"]["min_workers"] = 2
    broken["available_node_types"]["gpu.4x"]["max_workers"] = 2
    with pytest.raises(ValueError, match="min_workers"):
        launcher_validate(broken)


def test_node_configs_are_valid_run_instances_requests(config):
    """node_config is free-form in Ray's schema; botocore's model is not."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import validate_parameters

    op = (
        botocore_session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
    )
    instance_types = set(op.input_shape.members["InstanceType"].enum)
    for name, nt in config["available_node_types"].items():
        params = copy.deepcopy(nt["node_config"])
        # Mirror the AWS node provider: SubnetIds is Ray's own key.
        subnets = params.pop("SubnetIds")
        params.update(SubnetId=subnets[0], MinCount=1, MaxCount=1)
        validate_parameters(params, op.input_shape)  # raises on typos/types
        assert params["InstanceType"] in instance_types, name


def test_botocore_check_can_fail(config):
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    op = (
        botocore_session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
    )
    params = copy.deepcopy(config["available_node_types"]["gpu.4x"]["node_config"])
    params.pop("SubnetIds")
    params.update(MinCount=1, MaxCount=1, InstanceTyp=params.pop("InstanceType"))
    with pytest.raises(ParamValidationError):
        validate_parameters(params, op.input_shape)


# --------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------


def test_no_open_cidr_anywhere(raw_text):
    assert "0.0.0.0/0" not in raw_text
    assert "0.0.0.0" not in raw_text
    assert "::/0" not in raw_text


def test_token_auth_exported_in_every_start_command(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = config[key]
        assert any("ray start" in c for c in cmds), key
        for cmd in cmds:
            m = re.search(r"\bexport\b[^;&|]*\bRAY_AUTH_MODE=token\b", cmd)
            assert m, f"{key}: {cmd!r} does not export RAY_AUTH_MODE=token"
            if "ray start" in cmd:
                assert m.start() < cmd.index("ray start"), cmd


def test_token_auth_set_for_setup_and_login_shells(config):
    setup = "\n".join(config["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup
    assert ".bashrc" in setup


def test_token_file_shipped_from_rays_default_path(config):
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
    )

    mounts = config["file_mounts"]
    remote = f"/home/{config['auth']['ssh_user']}/.ray/auth_token"
    assert remote in mounts, mounts
    # The local side is where `ray get-auth-token --generate` writes.
    assert Path(os.path.expanduser(mounts[remote])) == _get_default_token_path()


def test_dashboard_bound_to_loopback_only(config, raw_text):
    from ray.scripts.scripts import start

    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1
    ctx = start.make_context("start", ray_subcommand_args(head_start[0], "start"))
    assert ctx.params["head"] is True
    assert ctx.params["dashboard_host"] == "127.0.0.1"
    hosts = re.findall(r"--dashboard-host[= ](\S+)", raw_text)
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts


def test_worker_start_command_parses(config):
    from ray.scripts.scripts import start

    worker_start = [
        c for c in config["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(worker_start) == 1
    ctx = start.make_context("start", ray_subcommand_args(worker_start[0], "start"))
    assert not ctx.params["head"]
    assert ctx.params["address"] == "$RAY_HEAD_IP:6379"


def test_internal_ips_only(config):
    assert config["provider"]["use_internal_ips"] is True


def test_launcher_never_creates_security_groups(config):
    # Without SecurityGroupIds on every node type the AWS bootstrap creates a
    # group with SSH open to the world; a provider.security_group block would
    # also make it create one.
    assert "security_group" not in config["provider"]
    for name, nt in config["available_node_types"].items():
        nc = nt["node_config"]
        assert nc.get("SecurityGroupIds"), name
        assert all(sg.startswith("sg-") for sg in nc["SecurityGroupIds"]), name
        assert nc.get("SubnetIds"), name
        assert all(s.startswith("subnet-") for s in nc["SubnetIds"]), name


def test_instance_profiles_and_imdsv2(config):
    for name, nt in config["available_node_types"].items():
        nc = nt["node_config"]
        arn = nc["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/\S+", arn), name
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
        assert "KeyName" in nc, name  # required when auth.ssh_private_key is set


def test_iam_policy_is_described(raw_text):
    for needle in ("s3:GetObject", "s3:PutObject", "ray-runs/*", "imagenet-shards/*",
                   "iam:PassRole"):
        assert needle in raw_text, needle


# --------------------------------------------------------------------------
# node types and scaling bounds
# --------------------------------------------------------------------------


def test_head_is_cpu_only(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"])
    assert head["resources"].get("GPU", 0) == 0


def test_gpu_worker_types_declare_gpus(config):
    gpu_counts = set()
    for name, nt in worker_types(config).items():
        itype = nt["node_config"]["InstanceType"]
        gpus = nt["resources"].get("GPU", 0)
        if GPU_FAMILY.match(itype) or gpus:
            assert GPU_FAMILY.match(itype), f"{name}: GPUs on {itype}"
            assert gpus > 0, f"{name}: {itype} without GPU resources"
            if itype in KNOWN_GPU_COUNTS:
                assert gpus == KNOWN_GPU_COUNTS[itype], name
            gpu_counts.add(gpus)
    assert {4, 8} <= gpu_counts, gpu_counts


def test_worker_bounds(config):
    global_max = config["max_workers"]
    total_min = 0
    for name, nt in worker_types(config).items():
        lo, hi = nt["min_workers"], nt["max_workers"]
        assert 0 <= lo <= hi, name
        assert hi <= global_max, name
        total_min += lo
    assert total_min <= global_max


# --------------------------------------------------------------------------
# project installation
# --------------------------------------------------------------------------


def test_project_mounted_and_installed_on_every_node(config):
    assert config["file_mounts"][PROJECT_DIR] == "."
    # setup_commands run on head and workers alike.
    assert any(
        re.search(rf"pip install\b.*-e {re.escape(PROJECT_DIR)}\b", c)
        for c in config["setup_commands"]
    )
    # A node-type-level worker_setup_commands would replace the global ones.
    for name, nt in config["available_node_types"].items():
        assert "worker_setup_commands" not in nt, name


def test_cluster_ray_matches_local_ray():
    """The launcher needs the same Ray on the nodes as on your machine."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    ray_pins = [d for d in deps if re.match(r"ray(\[|==|\s|$)", d)]
    assert len(ray_pins) == 1, ray_pins
    m = re.search(r"==\s*([\w.]+)$", ray_pins[0])
    assert m, f"ray is not pinned: {ray_pins[0]}"
    assert m.group(1) == ray.__version__


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_all_commands_are_valid_bash(config):
    for key, cmd in all_commands(config):
        # Ray runs each command as `bash --login -c -i '...; (CMD)'`.
        r = subprocess.run(["bash", "-n", "-c", f"({cmd})"], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"{key}: {cmd!r}\n{r.stderr}"


# --------------------------------------------------------------------------
# nightly evaluation cron entry
# --------------------------------------------------------------------------


def test_crontab_entry_static(config):
    cmd = the_command(config, "head_setup_commands", "crontab")
    assert "ray job submit" in cmd
    assert "python -m jobs.nightly_eval" in cmd
    assert NIGHTLY_CMD.format(b="${RESNET_BUCKET}") in cmd
    assert ' --mlflow-uri \\"\\$MLFLOW_TRACKING_URI\\" >>' in cmd  # escaped for echo "..."
    # Marker used both to drop the old line and to tag the new one.
    assert cmd.count(CRON_MARKER) == 2
    assert "crontab -l" in cmd and "crontab -" in cmd
    from ray.dashboard.modules.job.cli import submit

    # The submit command ends where its output redirection starts.
    submit_line = cmd[cmd.index("ray job submit"):].split(" >>")[0]
    ctx = submit.make_context("submit", shlex.split(submit_line)[3:])
    assert ctx.params["address"] == "http://127.0.0.1:8265"
    assert ctx.params["working_dir"] == PROJECT_DIR
    assert ctx.params["entrypoint"][:3] == ("python", "-m", "jobs.nightly_eval")


FAKE_CRONTAB = """#!/bin/sh
# Minimal stand-in for crontab(1): -l prints, - replaces from stdin.
case "$1" in
  -l) [ -f "$CRONTAB_STORE" ] || { echo "no crontab" >&2; exit 1; }
      cat "$CRONTAB_STORE" ;;
  -)  # like the real one: read all of stdin before replacing the table
      tmp="$CRONTAB_STORE.new"; cat > "$tmp" && mv "$tmp" "$CRONTAB_STORE" ;;
  *)  exit 2 ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_crontab_install_is_idempotent(config, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    crontab = fakebin / "crontab"
    crontab.write_text(FAKE_CRONTAB)
    crontab.chmod(crontab.stat().st_mode | stat.S_IEXEC)
    store = tmp_path / "crontab.txt"
    env = {
        "HOME": str(home),
        "PATH": f"{fakebin}:/usr/bin:/bin",
        "CRONTAB_STORE": str(store),
    }

    write_env = the_command(config, "setup_commands", "RESNET_BUCKET=")
    install = the_command(config, "head_setup_commands", "crontab")

    def run(cmd):
        r = subprocess.run(["bash", "-c", f"({cmd})"], env=env, cwd=home,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def tagged_lines():
        return [l for l in store.read_text().splitlines() if CRON_MARKER in l]

    run(write_env)
    run(install)  # no crontab yet
    store.write_text(store.read_text() + "15 3 * * * echo unrelated\n")
    run(install)
    run(install)  # e.g. `ray up` run again

    lines = tagged_lines()
    assert len(lines) == 1, store.read_text()
    assert "15 3 * * * echo unrelated" in store.read_text()
    line = lines[0]
    assert line.startswith("0 2 * * * "), line  # 02:00 daily (head runs in UTC)
    bucket = bucket_from(config)
    assert NIGHTLY_CMD.format(b=bucket) + MLFLOW_ARG in line
    assert "RAY_AUTH_MODE=token" in line
    assert ".resnet-pipeline.env" in line
    assert "%" not in line  # cron would turn it into a newline

    # The command part (after the 5 schedule fields) is valid sh for cron.
    cmd_part = line.split(None, 5)[5]
    r = subprocess.run(["sh", "-n", "-c", cmd_part], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    # Changing the schedule replaces the entry instead of adding one.
    run(write_env.replace("0 2 * * *", "30 4 * * *"))
    run(install)
    lines = tagged_lines()
    assert len(lines) == 1 and lines[0].startswith("30 4 * * * "), lines
