#!/usr/bin/env python3
r"""Cloud TPU launcher: creates a TPU VM or pod slice and runs `moe.main` on it.

  python launch/tpu.py create --accelerator-type v4-32 [--spot] [--queued]
                              [--internal-ips]
  python launch/tpu.py setup  [--repo-url URL [--ref REF]] [--jax-version V]
  python launch/tpu.py run    --config configs/EXP.py[:ARG] --workdir gs://B/D
                              [--tfds-data-dir gs://B/T]
                              [--restart-on-preemption] [-- MOE_MAIN_FLAGS...]
  python launch/tpu.py logs   [--worker N] [--lines N] [--follow]
  python launch/tpu.py ssh    [--worker N] [--command CMD]
  python launch/tpu.py ssh    --worker all --command CMD
  python launch/tpu.py delete [--yes]

Every subcommand also takes --name, --zone, --project and --dry-run; --dry-run
prints the exact commands (one per line, shell-quoted) instead of running
them. Flags fall back on environment variables (MOE_TPU_NAME, MOE_TPU_ZONE,
MOE_TPU_PROJECT or CLOUDSDK_CORE_PROJECT, MOE_TPU_ACCELERATOR, ...; each
flag's --help names its own). Bad input exits with status 2 and one line.

`setup` copies this checkout (a tarball; or a `git clone` of --repo-url) to
every worker and installs it in a virtual environment with `jax[tpu]` pinned
to the jax version installed here (or --jax-version), from the package
registry alone, so that every worker gets the same jax, jaxlib and libtpu.
`run` starts `python -m moe.main --config ... --workdir ...` on every worker
at once, in the background (nohup), with output appended to
~/moe-logs/train.log on each worker. Each worker reads the slice's own
metadata: with more than one entry in `worker-network-endpoints`, it exports
MOE_NUM_PROCESSES (the number of entries), MOE_PROCESS_ID (its
`agent-worker-number`) and MOE_COORDINATOR_ADDRESS (the first entry's
address), so that `moe.parallel.multihost` initialises `jax.distributed` on
every host; no table of hosts per accelerator type is involved. A job
restarted with the same --workdir resumes from its last checkpoint;
`run --restart-on-preemption` stays in the foreground and does that by itself
(see launch/README.md). `--internal-ips` creates the slice without external
IP addresses and reaches it over its internal ones (`--internal-ip` of
`gcloud ... ssh` and `scp`), for organisations that block external IPs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

REMOTE_DIR = "~/moe"
REMOTE_VENV = "~/moe-venv"
REMOTE_TARBALL = "moe.tar.gz"  # Relative to the remote home directory.
LOG_FILE = "~/moe-logs/train.log"
EXIT_FILE = "~/moe-logs/train.exit"
PID_FILE = "~/moe-logs/train.pid"
# No longer used: `setup` installs jax[tpu] and libtpu from the package
# registry alone, pinned to one version.
LIBTPU_FIND_LINKS = (
    "https://storage.googleapis.com/jax-releases/libtpu_releases.html")
METADATA_URL = ("http://metadata.google.internal/computeMetadata/v1/"
                "instance/attributes")
COORDINATOR_PORT = 8476  # The port jax's own Cloud TPU detection uses.
PREEMPTED_EXIT_STATUS = "143"  # moe.main after SIGTERM: 128 + 15.
APT = "sudo apt-get -o DPkg::Lock::Timeout=600"
TARBALL_EXCLUDES = (".git", ".venv", "__pycache__", "*.egg-info",
                    ".pytest_cache")

HEALTHY_STATES = ("READY", "ACTIVE")
LOST_STATES = ("PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED", "FAILED")

# Settings that fall back on environment variables, first one set wins.
ENV_VARS = {
    "name": ("MOE_TPU_NAME",),
    "zone": ("MOE_TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE"),
    "project": ("MOE_TPU_PROJECT", "CLOUDSDK_CORE_PROJECT"),
    "queued": ("MOE_TPU_QUEUED",),
    "accelerator_type": ("MOE_TPU_ACCELERATOR",),
    "runtime_version": ("MOE_TPU_RUNTIME_VERSION",),
    "spot": ("MOE_TPU_SPOT",),
    "internal_ips": ("MOE_TPU_INTERNAL_IPS",),
    "jax_version": ("MOE_JAX_VERSION",),
    "repo_url": ("MOE_REPO_URL",),
    "ref": ("MOE_REPO_REF",),
    "workdir": ("MOE_WORKDIR",),
    "tfds_data_dir": ("TFDS_DATA_DIR",),
}
BOOLEAN_SETTINGS = ("queued", "spot", "internal_ips")
_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")


class UsageError(Exception):
  """Bad input: reported as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as gcloud names its accelerator types (`v4-32`).

  Attributes:
    prefix: the part before the dash.
    unit: what the number after the dash counts.
    per_host: units per host (VM) of a multi-host slice, for estimates
      only: `run` counts the hosts from the slice's metadata instead.
    single_host_max: the largest number that fits on one host.
    runtime: default TPU software (runtime) version for JAX.
    sizes: the numbers gcloud accepts; empty means every multiple of
      `per_host` up to `max_size`.
    max_size: see `sizes`.
    preemptible: whether gcloud offers legacy preemptible TPUs
      (`--preemptible`); the others have Spot VMs (`--spot`) only.
  """
  prefix: str
  unit: str
  per_host: int
  single_host_max: int
  runtime: str
  sizes: tuple[int, ...] = ()
  max_size: int = 0
  preemptible: bool = False

  def accepts(self, size: int) -> bool:
    if self.sizes:
      return size in self.sizes
    return size % self.per_host == 0 and self.per_host <= size <= self.max_size

  def hosts(self, size: int) -> int:
    """Hosts of a `size` slice: an estimate, `run` does not depend on it."""
    return 1 if size <= self.single_host_max else size // self.per_host

  def describe(self) -> str:
    if self.sizes:
      allowed = "|".join(map(str, self.sizes))
    else:
      allowed = f"multiple of {self.per_host} up to {self.max_size}"
    return f"{self.prefix}-N (N {self.unit}: {allowed})"


_CLASSIC_RUNTIME = "tpu-ubuntu2204-base"
_LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
GENERATIONS = {g.prefix: g for g in (
    Generation("v2", "TensorCores", 8, 8, _CLASSIC_RUNTIME,
               sizes=(8, 32, 128, 256, 512), preemptible=True),
    Generation("v3", "TensorCores", 8, 8, _CLASSIC_RUNTIME,
               sizes=(8, 32, 64, 128, 256, 512, 1024, 2048), preemptible=True),
    Generation("v4", "TensorCores", 8, 8, _CLASSIC_RUNTIME, max_size=4096,
               preemptible=True),
    Generation("v5litepod", "chips", 4, 8, "v2-alpha-tpuv5-lite",
               sizes=_LITE_SIZES),
    Generation("v5p", "TensorCores", 8, 8, "v2-alpha-tpuv5", max_size=12288),
    Generation("v6e", "chips", 4, 8, "v2-alpha-tpuv6e", sizes=_LITE_SIZES),
)}
GENERATION_ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A parsed accelerator type."""
  generation: Generation
  size: int

  @property
  def type(self) -> str:
    return f"{self.generation.prefix}-{self.size}"

  @property
  def hosts(self) -> int:
    return self.generation.hosts(self.size)


def parse_accelerator(text: str) -> Accelerator:
  """Parses an accelerator type such as 'v4-32' or 'v5e-16'.

  Args:
    text: `PREFIX-N`; 'v5e' is accepted for gcloud's 'v5litepod'.

  Returns:
    The accelerator, with its gcloud name in `.type`.

  Raises:
    UsageError: naming the known generations and sizes.
  """
  prefix, _, number = text.strip().lower().partition("-")
  generation = GENERATIONS.get(GENERATION_ALIASES.get(prefix, prefix))
  if generation and number.isdigit() and generation.accepts(int(number)):
    return Accelerator(generation, int(number))
  known = "; ".join(g.describe() for g in GENERATIONS.values())
  raise UsageError(f"unknown accelerator type {text!r}; known: {known} "
                   f"(v5e-N is accepted for v5litepod-N)")


# Settings.


def _env_value(dest: str, environ: Mapping[str, str]) -> str | None:
  for var in ENV_VARS.get(dest, ()):
    if environ.get(var):
      return environ[var]
  return None


def _env_flag(dest: str, environ: Mapping[str, str]) -> bool:
  text = (_env_value(dest, environ) or "").strip().lower()
  if text in _TRUE or text in _FALSE:
    return text in _TRUE
  raise UsageError(f"{ENV_VARS[dest][0]}={text!r} is not a boolean "
                   f"(use 1/0, true/false, yes/no)")


def _fill_from_environ(args: argparse.Namespace,
                       environ: Mapping[str, str]) -> None:
  """Replaces each unset flag that has environment variables by their value."""
  for dest in ENV_VARS:
    if not hasattr(args, dest) or getattr(args, dest):
      continue
    if dest in BOOLEAN_SETTINGS:
      setattr(args, dest, _env_flag(dest, environ))
    else:
      setattr(args, dest, _env_value(dest, environ))


def _require(args: argparse.Namespace, dest: str, example: str) -> None:
  if getattr(args, dest, None):
    return
  flag = "--" + dest.replace("_", "-")
  variables = " or ".join(ENV_VARS.get(dest, ()))
  where = f"pass {flag} or set {variables}" if variables else f"pass {flag}"
  raise UsageError(f"missing {dest.replace('_', ' ')}: {where} "
                   f"(e.g. {example})")


def _check_pattern(value: str, pattern: str, what: str, example: str) -> None:
  if not re.fullmatch(pattern, value):
    raise UsageError(f"{what} {value!r} is not valid (e.g. {example})")


def resolve(args: argparse.Namespace,
            environ: Mapping[str, str]) -> argparse.Namespace:
  """Completes the parsed flags from the environment and validates them.

  Args:
    args: the parsed command line.
    environ: the environment variables to fall back on.

  Returns:
    `args`, completed: `accelerator` is an `Accelerator` (or None where the
    subcommand does not need one), `runtime_version` is set, and so is
    `jax_version` where `setup` may run.

  Raises:
    UsageError: for a missing or invalid setting.
  """
  _fill_from_environ(args, environ)
  _require(args, "name", "--name moe-v4-32")
  _check_pattern(args.name, r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", "TPU name",
                 "moe-v4-32: lowercase letters, digits and hyphens")
  _require(args, "zone", "--zone us-central2-b")
  _check_pattern(args.zone, r"[a-z]+-[a-z]+[0-9]+-[a-z]", "zone",
                 "us-central2-b")
  _require(args, "project", "--project my-project")
  args.accelerator = None
  if hasattr(args, "accelerator_type"):
    _resolve_slice(args)
  if hasattr(args, "workdir"):
    _resolve_job(args)
  if hasattr(args, "jax_version"):
    _resolve_jax_version(args)
  if args.subcommand == "ssh":
    _resolve_ssh(args)
  return args


def _resolve_slice(args: argparse.Namespace) -> None:
  """Validates the accelerator type, runtime and provisioning model."""
  _require(args, "accelerator_type", "--accelerator-type v4-32")
  args.accelerator = parse_accelerator(args.accelerator_type)
  args.runtime_version = (args.runtime_version
                          or args.accelerator.generation.runtime)
  if args.preemptible and not args.accelerator.generation.preemptible:
    legacy = ", ".join(g.prefix for g in GENERATIONS.values() if g.preemptible)
    raise UsageError(
        f"--preemptible exists only for {legacy}; {args.accelerator.type} "
        f"takes --spot (Spot VMs) instead")
  if args.spot and args.preemptible:
    raise UsageError("--spot and --preemptible exclude each other "
                     "(MOE_TPU_SPOT may be set)")
  if args.queued and args.preemptible:
    raise UsageError("queued resources take --spot, not --preemptible")


def _resolve_job(args: argparse.Namespace) -> None:
  """Validates the training job: config, workdir, poll interval."""
  _require(args, "config", "--config configs/digits_vmoe.py")
  _require(args, "workdir", "--workdir gs://my-bucket/runs/exp1")
  if args.accelerator.hosts > 1 and not args.workdir.startswith("gs://"):
    raise UsageError(
        f"workdir {args.workdir!r} must be a gs:// path on the multi-host "
        f"slice {args.accelerator.type} (all its hosts write each checkpoint "
        f"together)")
  if args.poll_seconds <= 0:
    raise UsageError(f"--poll-seconds must be > 0, got {args.poll_seconds}")


def local_jax_version() -> str | None:
  """The version of jax installed in this Python, or None if it is not."""
  try:
    return importlib.metadata.version("jax")
  except importlib.metadata.PackageNotFoundError:
    return None


def _resolve_jax_version(args: argparse.Namespace) -> None:
  """Sets the version `setup` pins `jax[tpu]` to: the flag, else jax's here."""
  args.jax_version = args.jax_version or local_jax_version()
  may_set_up = (args.subcommand == "setup"
                or getattr(args, "restart_on_preemption", False))
  if not may_set_up:
    return
  if not args.jax_version:
    raise UsageError(
        "jax is not installed in this Python, so setup has no version to pin "
        "jax[tpu] to on the workers: pip install -e . here, or pass "
        "--jax-version or set MOE_JAX_VERSION (e.g. --jax-version 0.4.35)")
  _check_pattern(args.jax_version,
                 r"[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.(post|dev)[0-9]+)*",
                 "jax version", "--jax-version 0.4.35, a release on PyPI")


def _resolve_ssh(args: argparse.Namespace) -> None:
  """Refuses an interactive shell on all workers at once."""
  if args.worker == "all" and not args.command:
    raise UsageError(
        "--worker all needs --command CMD (CMD runs on every worker); an "
        "interactive shell takes one worker: --worker N (default 0)")


# gcloud command lines.


def _location(s: argparse.Namespace) -> list[str]:
  return [f"--zone={s.zone}", f"--project={s.project}"]


def _tpu_vm(verb: str, *positional: str, s: argparse.Namespace,
            flags: Sequence[str] = ()) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional,
          *_location(s), *flags]


def _queued(verb: str, s: argparse.Namespace,
            flags: Sequence[str] = ()) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, s.name,
          *_location(s), *flags]


def _internal_ip(s: argparse.Namespace) -> list[str]:
  """The ssh/scp flag that reaches the workers over their internal IPs."""
  return ["--internal-ip"] if s.internal_ips else []


def create_command(s: argparse.Namespace) -> list[str]:
  """The gcloud command that creates the TPU VM or queued resource."""
  model = ["--spot"] if s.spot else ["--preemptible"] if s.preemptible else []
  model += ["--internal-ips"] if s.internal_ips else []
  accelerator = f"--accelerator-type={s.accelerator.type}"
  if s.queued:
    return _queued("create", s, [f"--node-id={s.name}", accelerator,
                                 f"--runtime-version={s.runtime_version}",
                                 *model])
  return _tpu_vm("create", s.name, s=s,
                 flags=[accelerator, f"--version={s.runtime_version}", *model])


def delete_command(s: argparse.Namespace, quiet: bool) -> list[str]:
  """The gcloud command that deletes the slice (and its queued resource)."""
  prompt = ["--quiet"] if quiet else []
  if s.queued:
    return _queued("delete", s, ["--force", *prompt])
  return _tpu_vm("delete", s.name, s=s, flags=prompt)


def state_command(s: argparse.Namespace) -> list[str]:
  """The gcloud command that prints the slice's state (READY, ACTIVE, ...)."""
  if s.queued:
    return _queued("describe", s, ["--format=value(state.state)"])
  return _tpu_vm("describe", s.name, s=s, flags=["--format=value(state)"])


def ssh_command(s: argparse.Namespace, worker: str,
                remote: str | None = None) -> list[str]:
  """`gcloud ... ssh` to one worker or all, running `remote` if given."""
  command = [f"--command={remote}"] if remote else []
  return _tpu_vm("ssh", s.name, s=s,
                 flags=[f"--worker={worker}", *_internal_ip(s), *command])


def _script(*steps: str) -> str:
  """A one-line shell script that stops at the first failing step."""
  return "; ".join(("set -e",) + steps)


def local_tarball(environ: Mapping[str, str]) -> str:
  """Where `setup` writes the tarball of this checkout."""
  return os.path.join(environ.get("TMPDIR") or "/tmp", "moe-checkout.tar.gz")


def _tar_command(path: str) -> list[str]:
  excludes = [f"--exclude={pattern}" for pattern in TARBALL_EXCLUDES]
  return ["tar", "-czf", path, *excludes, "-C", str(REPO_ROOT), "."]


def _fetch_source_steps(s: argparse.Namespace) -> list[str]:
  """Remote steps that put the project in REMOTE_DIR."""
  if not s.repo_url:
    return [f"rm -rf {REMOTE_DIR}", f"mkdir -p {REMOTE_DIR}",
            f"tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR}"]
  steps = [f"rm -rf {REMOTE_DIR}",
           f"git clone -q {shlex.quote(s.repo_url)} {REMOTE_DIR}"]
  if s.ref:
    steps.append(f"git -C {REMOTE_DIR} checkout -q {shlex.quote(s.ref)}")
  return steps


def _install_steps(python: str, jax_version: str) -> list[str]:
  """Remote steps that create the virtual environment and install.

  `jax[tpu]==jax_version` pins jaxlib and libtpu too, from the package
  registry alone, so that every worker runs the same versions.
  """
  py = shlex.quote(python)
  pip = f"{REMOTE_VENV}/bin/pip"
  jax_tpu = shlex.quote(f"jax[tpu]=={jax_version}")
  return [
      f"({py} -m venv {REMOTE_VENV} || ({APT} update -q && {APT} install "
      f"-y -q {py} {py}-venv && {py} -m venv {REMOTE_VENV}))",
      f"{pip} install -q --upgrade pip",
      f"{pip} install -q -e {REMOTE_DIR} {jax_tpu}",
      f"{REMOTE_VENV}/bin/python -c 'import jax, moe.main; "
      f"print(\"moe installed, jax\", jax.__version__)'",
  ]


def setup_commands(s: argparse.Namespace,
                   environ: Mapping[str, str]) -> list[list[str]]:
  """Commands that copy the project to every worker and install it."""
  remote = _script(*_fetch_source_steps(s),
                   *_install_steps(s.python, s.jax_version))
  install = ssh_command(s, "all", remote)
  if s.repo_url:
    return [install]
  tarball = local_tarball(environ)
  copy = _tpu_vm("scp", tarball, f"{s.name}:{REMOTE_TARBALL}", s=s,
                 flags=["--worker=all", *_internal_ip(s)])
  return [_tar_command(tarball), copy, install]


def _multihost_steps() -> list[str]:
  """Remote steps exporting the settings `moe.parallel.multihost` reads.

  Everything comes from the slice's own metadata on each worker, as jax's
  own Cloud TPU detection reads it: the number of processes is the number
  of comma-separated 'worker-network-endpoints' (each 'name:id:address' or
  'address'), the first of them is worker 0, the coordinator, and the
  process id is the worker's 'agent-worker-number'. With one endpoint, or
  no such attribute (HTTP 404: curl's status 22), nothing is exported and
  the job runs as one process; an unreachable metadata server stops it.
  """
  fetch = f"curl -sf -H Metadata-Flavor:Google {METADATA_URL}"

  def fail(what: str) -> str:
    return f"{{ echo \"$(hostname): {what}\" >&2; exit 1; }}"

  return [
      f"endpoints=$({fetch}/worker-network-endpoints) || [ $? -eq 22 ] || "
      + fail("cannot read worker-network-endpoints from the TPU metadata"),
      "hosts=$(echo \"$endpoints\" | tr , \"\\n\" | grep -c .) || true",
      f"if [ \"$hosts\" -gt 1 ]; then "
      f"worker=$({fetch}/agent-worker-number) || "
      + fail("no agent-worker-number in the TPU metadata") + "; "
      "first=${endpoints%%,*}; "
      "export MOE_NUM_PROCESSES=$hosts MOE_PROCESS_ID=$worker "
      f"MOE_COORDINATOR_ADDRESS=${{first##*:}}:{COORDINATOR_PORT}; fi",
  ]


def _train_command(s: argparse.Namespace) -> str:
  main_args = ["--config", s.config, "--workdir", s.workdir, *s.main_args]
  return (f"{REMOTE_VENV}/bin/python -m moe.main {shlex.join(main_args)}; "
          f"echo $? > {EXIT_FILE}")


def run_script(s: argparse.Namespace) -> str:
  """The script each worker runs: start the job in the background, return."""
  steps = [
      f"cd {REMOTE_DIR}",
      f"mkdir -p {os.path.dirname(LOG_FILE)}",
      f"if [ -f {PID_FILE} ] && kill -0 \"$(cat {PID_FILE})\" 2>/dev/null; "
      f"then echo \"$(hostname): a job is already running (pid "
      f"$(cat {PID_FILE})), see {LOG_FILE}\" >&2; exit 1; fi",
      f"rm -f {EXIT_FILE}",
  ]
  if s.tfds_data_dir:
    steps.append(f"export TFDS_DATA_DIR={shlex.quote(s.tfds_data_dir)}")
  steps.extend(_multihost_steps())
  steps.extend([
      f"echo \"== $(date -u +%FT%TZ) start on $(hostname)\" >> {LOG_FILE}",
      f"nohup bash -c {shlex.quote(_train_command(s))} >> {LOG_FILE} 2>&1 "
      f"< /dev/null & echo $! > {PID_FILE}",
  ])
  return _script(*steps)


def launch_command(s: argparse.Namespace) -> list[str]:
  """The command that starts the job on all workers at once."""
  return ssh_command(s, "all", run_script(s))


def job_status_command(s: argparse.Namespace) -> list[str]:
  """Prints the exit status of the job on worker 0, 'running' or 'missing'."""
  remote = (f"if [ -f {EXIT_FILE} ]; then cat {EXIT_FILE}; "
            f"elif [ -f {PID_FILE} ] && kill -0 \"$(cat {PID_FILE})\" "
            f"2>/dev/null; then echo running; else echo missing; fi")
  return ssh_command(s, "0", remote)


def logs_command(s: argparse.Namespace) -> list[str]:
  follow = " -F" if s.follow else ""
  return ssh_command(s, s.worker, f"tail -n {s.lines}{follow} {LOG_FILE}")


# Running commands.


class Runner:
  """Runs commands, or with `dry_run` prints them shell-quoted.

  Attributes:
    dry_run: print instead of running.
  """

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, argv: Sequence[str],
          capture: bool = False) -> subprocess.CompletedProcess:
    """Runs `argv` (no shell); `capture` collects stdout and stderr."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return subprocess.CompletedProcess(list(argv), 0, "", "")
    try:
      return subprocess.run(list(argv), check=False, text=True,
                            capture_output=capture)
    except FileNotFoundError:
      _say(f"{argv[0]} not found on PATH (gcloud: install the Google Cloud "
           f"CLI, https://cloud.google.com/sdk/docs/install).")
      return subprocess.CompletedProcess(list(argv), 127, "", "")

  def run_all(self, commands: Sequence[Sequence[str]]) -> int:
    """Runs `commands` in order; returns the first non-zero status, or 0."""
    for argv in commands:
      status = self.run(argv).returncode
      if status:
        return status
    return 0


def _say(message: str) -> None:
  print(f"tpu.py: {message}", file=sys.stderr, flush=True)


def slice_state(s: argparse.Namespace, runner: Runner) -> str:
  """'healthy', 'lost' (preempted...), 'gone' (deleted), or 'pending'."""
  result = runner.run(state_command(s), capture=True)
  if result.returncode:
    return "gone" if "NOT_FOUND" in result.stderr else "pending"
  state = result.stdout.strip()
  if state in HEALTHY_STATES:
    return "healthy"
  return "lost" if state in LOST_STATES else "pending"


def job_status(s: argparse.Namespace, runner: Runner) -> str | None:
  """The job's status on worker 0 (see `job_status_command`), or None."""
  result = runner.run(job_status_command(s), capture=True)
  words = result.stdout.split()
  return words[-1] if result.returncode == 0 and words else None


def restart_plan(s: argparse.Namespace,
                 environ: Mapping[str, str]) -> list[list[str]]:
  """What `supervise` runs: one check round, then one recovery."""
  return [state_command(s), job_status_command(s), delete_command(s, True),
          create_command(s), *setup_commands(s, environ), launch_command(s)]


def supervise(s: argparse.Namespace, runner: Runner,
              environ: Mapping[str, str],
              sleep: Callable[[float], None] = time.sleep) -> int:
  """Watches a launched job and restarts it until it finishes.

  Every `s.poll_seconds`: a preempted, failed or deleted slice is deleted
  and created again, then set up and the job launched (it resumes from
  the workdir); on a healthy slice, a job that stopped after SIGTERM (exit
  143) or vanished (host restart) is launched again.

  Args:
    s: the resolved settings of `run`.
    runner: runs the gcloud commands.
    environ: the environment (for the tarball path of `setup`).
    sleep: waits between checks.

  Returns:
    0 once the job exits with 0; 1 once it exits with another status.
  """
  needs_setup = False
  while True:
    sleep(s.poll_seconds)
    state = slice_state(s, runner)
    if state in ("lost", "gone"):
      _recreate(s, runner, state)
      needs_setup = True
    elif state == "healthy" and needs_setup:
      needs_setup = bool(runner.run_all(
          [*setup_commands(s, environ), launch_command(s)]))
    elif state == "healthy":
      final_status = _check_job(s, runner)
      if final_status is not None:
        return final_status


def _recreate(s: argparse.Namespace, runner: Runner, state: str) -> None:
  """Deletes a lost slice (not a gone one) and creates it again."""
  _say(f"slice {s.name} is {state}; creating it again.")
  if state == "lost":
    runner.run(delete_command(s, quiet=True))
  runner.run(create_command(s))


def _check_job(s: argparse.Namespace, runner: Runner) -> int | None:
  """Relaunches a stopped job; returns 0 or 1 once the job has ended."""
  status = job_status(s, runner)
  if status == "0":
    _say(f"the job on {s.name} finished.")
    return 0
  if status in (PREEMPTED_EXIT_STATUS, "missing"):
    _say(f"the job on {s.name} stopped ({status}); launching it again.")
    runner.run(launch_command(s))
  elif status not in (None, "running"):
    _say(f"the job on {s.name} failed with status {status}; see "
         f"`python launch/tpu.py logs`. The slice is still up.")
    return 1
  return None


# Subcommands: each takes the resolved settings, a runner and the
# environment, and returns the exit status.


def _create(s: argparse.Namespace, runner: Runner, environ) -> int:
  del environ
  return runner.run_all([create_command(s)])


def _setup(s: argparse.Namespace, runner: Runner, environ) -> int:
  return runner.run_all(setup_commands(s, environ))


def _run(s: argparse.Namespace, runner: Runner, environ) -> int:
  status = runner.run_all([launch_command(s)])
  if status or not s.restart_on_preemption:
    return status
  if runner.dry_run:
    return runner.run_all(restart_plan(s, environ))
  return supervise(s, runner, environ)


def _logs(s: argparse.Namespace, runner: Runner, environ) -> int:
  del environ
  return runner.run_all([logs_command(s)])


def _ssh(s: argparse.Namespace, runner: Runner, environ) -> int:
  del environ
  return runner.run_all([ssh_command(s, s.worker, s.command)])


def _delete(s: argparse.Namespace, runner: Runner, environ) -> int:
  del environ
  return runner.run_all([delete_command(s, quiet=s.yes)])


# Command line.


def _help(dest: str, text: str) -> str:
  variables = ENV_VARS.get(dest)
  return f"{text} (env {', '.join(variables)})" if variables else text


def _worker(text: str) -> str:
  if text == "all" or text.isdigit():
    return text
  raise argparse.ArgumentTypeError(f"expected a worker number or 'all', "
                                   f"got {text!r}")


def _common_flags() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--name", help=_help("name", "TPU VM / slice name"))
  parser.add_argument("--zone", help=_help("zone", "zone, e.g. us-central2-b"))
  parser.add_argument("--project", help=_help("project", "Cloud project"))
  parser.add_argument("--queued", action="store_true", default=None,
                      help=_help("queued", "a queued resource of the same "
                                 "name holds the slice (create, delete)"))
  parser.add_argument("--internal-ips", action="store_true", default=None,
                      help=_help("internal_ips", "no external IPs: create "
                                 "the slice with --internal-ips, ssh and scp "
                                 "with --internal-ip (from inside its VPC)"))
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands instead of running them")
  return parser


def _slice_flags() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--accelerator-type", help=_help(
      "accelerator_type", "e.g. v4-32, v5litepod-16 (or v5e-16), v5p-128, "
      "v6e-8"))
  parser.add_argument("--runtime-version", help=_help(
      "runtime_version", "TPU software version; default: the JAX one of the "
      "generation"))
  parser.add_argument("--spot", action="store_true", default=None,
                      help=_help("spot", "Spot VMs (preemptible, cheaper)"))
  parser.add_argument("--preemptible", action="store_true",
                      help="legacy preemptible TPU VMs (v2-v4 only; later "
                      "generations take --spot)")
  return parser


def _source_flags() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--repo-url", help=_help(
      "repo_url", "git clone this on the workers instead of copying a "
      "tarball of this checkout"))
  parser.add_argument("--ref", help=_help("ref", "branch, tag or commit "
                                          "to check out after the clone"))
  parser.add_argument("--python", default="python3.11",
                      help="Python (>= 3.11) on the workers; installed with "
                      "apt if missing (default: %(default)s)")
  parser.add_argument("--jax-version", help=_help(
      "jax_version", "pin jax[tpu] to this version on the workers; default: "
      "the jax installed in this Python"))
  return parser


def _job_flags() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--config", help="configs/EXP.py[:ARG] for moe.main")
  parser.add_argument("--workdir", help=_help(
      "workdir", "checkpoints and TensorBoard logs; gs:// on multi-host"))
  parser.add_argument("--tfds-data-dir", help=_help(
      "tfds_data_dir", "exported as TFDS_DATA_DIR on the workers"))
  parser.add_argument("--restart-on-preemption", action="store_true",
                      help="stay in the foreground; recreate, set up and "
                      "relaunch after preemptions until the job finishes")
  parser.add_argument("--poll-seconds", type=float, default=300.0,
                      help="check interval of --restart-on-preemption "
                      "(default: %(default)s)")
  return parser


def build_parser() -> argparse.ArgumentParser:
  """The `tpu.py` argument parser with its six subcommands."""
  parser = argparse.ArgumentParser(
      prog="tpu.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="subcommand", required=True)
  common, slice_, source = _common_flags(), _slice_flags(), _source_flags()
  sub.add_parser("create", parents=[common, slice_],
                 help="create the TPU VM or queued resource")
  sub.add_parser("setup", parents=[common, source],
                 help="copy the project to all workers and install it")
  sub.add_parser("run", parents=[common, slice_, source, _job_flags()],
                 help="start moe.main on all workers; flags after -- go to "
                 "moe.main")
  logs = sub.add_parser("logs", parents=[common], help="tail a worker's log")
  logs.add_argument("--worker", type=_worker, default="0",
                    help="worker number or 'all' (default: 0)")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  ssh = sub.add_parser("ssh", parents=[common],
                       help="shell on one worker, or a command on workers")
  ssh.add_argument("--worker", type=_worker, default="0",
                   help="worker number or 'all' (needs --command; default: 0)")
  ssh.add_argument("--command", help="run this on the worker(s) instead of "
                   "opening a shell")
  delete = sub.add_parser("delete", parents=[common],
                          help="delete the slice (asks unless --yes)")
  delete.add_argument("--yes", action="store_true",
                      help="do not ask for confirmation")
  return parser


SUBCOMMANDS = {"create": _create, "setup": _setup, "run": _run,
               "logs": _logs, "ssh": _ssh, "delete": _delete}


def _split_main_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits off what follows the first '--' (flags for moe.main)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  cut = argv.index("--")
  return argv[:cut], argv[cut + 1:]


def main(argv: Sequence[str] | None = None,
         environ: Mapping[str, str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  environ = os.environ if environ is None else environ
  own_args, main_args = _split_main_args(
      sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(own_args)
  try:
    if main_args and args.subcommand != "run":
      raise UsageError(f"only run passes flags after '--' to moe.main, "
                       f"got {shlex.join(main_args)!r}")
    args.main_args = main_args
    settings = resolve(args, environ)
  except UsageError as e:
    print(f"tpu.py {args.subcommand}: error: {e}", file=sys.stderr)
    return 2
  return SUBCOMMANDS[args.subcommand](settings, Runner(args.dry_run), environ)


if __name__ == "__main__":
  sys.exit(main())
