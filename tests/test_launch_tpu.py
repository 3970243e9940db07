"""Tests of launch/tpu.py: the gcloud command lines it prints with --dry-run."""
import importlib.metadata
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys
import time

import pytest

TPU_PY = pathlib.Path(__file__).resolve().parent.parent / "launch" / "tpu.py"
REPO = str(TPU_PY.parent.parent)
LOCATION = ["--zone=us-central2-b", "--project=my-project"]
V4_32 = ["--name", "moe-v4-32", "--zone", "us-central2-b",
         "--project", "my-project"]
JOB = ["--config", "configs/digits_vmoe.py:runlocal",
       "--workdir", "gs://my-bucket/runs/digits",
       "--tfds-data-dir", "gs://my-bucket/tfds"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
METADATA = ("curl -sf -H Metadata-Flavor:Google http://metadata.google."
            "internal/computeMetadata/v1/instance/attributes")
JAX_VERSION = importlib.metadata.version("jax")  # What setup pins.
INSTALL = (
    "(python3.11 -m venv ~/moe-venv || (sudo apt-get -o DPkg::Lock::"
    "Timeout=600 update -q && sudo apt-get -o DPkg::Lock::Timeout=600 "
    "install -y -q python3.11 python3.11-venv && python3.11 -m venv "
    "~/moe-venv)); ~/moe-venv/bin/pip install -q --upgrade pip; "
    f"~/moe-venv/bin/pip install -q -e ~/moe 'jax[tpu]=={JAX_VERSION}'; "
    "~/moe-venv/bin/python -c 'import jax, moe.main; "
    "print(\"moe installed, jax\", jax.__version__)'")
SETUP_FROM_TARBALL = (
    "set -e; rm -rf ~/moe; mkdir -p ~/moe; tar -xzf ~/moe.tar.gz -C ~/moe; "
    + INSTALL)
RUN_PREFIX = (
    "set -e; cd ~/moe; mkdir -p ~/moe-logs; if [ -f ~/moe-logs/train.pid ] "
    "&& kill -0 \"$(cat ~/moe-logs/train.pid)\" 2>/dev/null; then echo "
    "\"$(hostname): a job is already running (pid $(cat ~/moe-logs/"
    "train.pid)), see ~/moe-logs/train.log\" >&2; exit 1; fi; "
    "rm -f ~/moe-logs/train.exit; ")
RUN_MULTIHOST = (  # The same on every slice: the count is the worker's.
    f"endpoints=$({METADATA}/worker-network-endpoints) || [ $? -eq 22 ] || "
    "{ echo \"$(hostname): cannot read worker-network-endpoints from the "
    "TPU metadata\" >&2; exit 1; }; "
    "hosts=$(echo \"$endpoints\" | tr , \"\\n\" | grep -c .) || true; "
    "if [ \"$hosts\" -gt 1 ]; then "
    f"worker=$({METADATA}/agent-worker-number) || "
    "{ echo \"$(hostname): no agent-worker-number in the TPU metadata\" "
    ">&2; exit 1; }; first=${endpoints%%,*}; "
    "export MOE_NUM_PROCESSES=$hosts MOE_PROCESS_ID=$worker "
    "MOE_COORDINATOR_ADDRESS=${first##*:}:8476; fi; ")
RUN_SUFFIX = (
    "echo \"== $(date -u +%FT%TZ) start on $(hostname)\" >> "
    "~/moe-logs/train.log; nohup bash -c '~/moe-venv/bin/python -m moe.main "
    "--config configs/digits_vmoe.py:runlocal --workdir "
    "gs://my-bucket/runs/digits{extra}; echo $? > ~/moe-logs/train.exit' "
    ">> ~/moe-logs/train.log 2>&1 < /dev/null & echo $! > "
    "~/moe-logs/train.pid")
STATUS = (
    "if [ -f ~/moe-logs/train.exit ]; then cat ~/moe-logs/train.exit; "
    "elif [ -f ~/moe-logs/train.pid ] && kill -0 \"$(cat "
    "~/moe-logs/train.pid)\" 2>/dev/null; then echo running; "
    "else echo missing; fi")


@pytest.fixture(scope="module")
def tpu():
  spec = importlib.util.spec_from_file_location("launch_tpu", TPU_PY)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
  """Fails a test that would run a command."""
  def fail(*args, **kwargs):
    pytest.fail(f"subprocess.run called: {args} {kwargs}")
  monkeypatch.setattr(subprocess, "run", fail)


def dry_run(tpu, capsys, *argv, environ=None):
  """Runs tpu.py with --dry-run; returns (status, stdout lines, stderr)."""
  subcommand, *flags = argv
  status = tpu.main([subcommand, "--dry-run", *flags],
                    environ or {"TMPDIR": "/scratch"})
  out, err = capsys.readouterr()
  return status, out.splitlines(), err


def line(*argv):
  return shlex.join(argv)


def run_script(extra=""):
  return (RUN_PREFIX + "export TFDS_DATA_DIR=gs://my-bucket/tfds; "
          + RUN_MULTIHOST + RUN_SUFFIX.format(extra=extra))


FAKE_CURL = """#!/bin/sh
# The TPU metadata server: answers from $ENDPOINTS and $WORKER, 404 else.
for arg; do url=$arg; done
case "$url" in
  */worker-network-endpoints) [ -n "${ENDPOINTS+set}" ] || exit 22
                              printf %s "$ENDPOINTS" ;;
  */agent-worker-number) printf %s "$WORKER" ;;
  *) exit 22 ;;
esac
"""
FAKE_PYTHON = """#!/bin/sh
# moe.main: records the MOE_* variables and its arguments.
env | grep '^MOE_' | sort > "$HOME/moe-env"
echo "$@" > "$HOME/moe-args"
"""


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def run_on_fake_worker(command, tmp_path, endpoints=None, worker="0"):
  """Runs the --command of `command` in bash, as one worker would.

  Args:
    command: the printed `gcloud ... ssh --command=SCRIPT` line.
    tmp_path: the worker's home directory.
    endpoints: what the metadata server answers for
      worker-network-endpoints (None: it has no such attribute).
    worker: its agent-worker-number.

  Returns:
    The MOE_* variables moe.main saw, as a dict.
  """
  script = shlex.split(command)[-1].removeprefix("--command=")
  _executable(tmp_path / "bin" / "curl", FAKE_CURL)
  _executable(tmp_path / "moe-venv" / "bin" / "python", FAKE_PYTHON)
  (tmp_path / "moe").mkdir()
  env = {"HOME": str(tmp_path), "WORKER": worker,
         "PATH": f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin"}
  if endpoints is not None:
    env["ENDPOINTS"] = endpoints
  result = subprocess.run(["bash", "-c", script], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  exit_file = tmp_path / "moe-logs" / "train.exit"
  for _ in range(200):  # moe.main runs in the background (nohup).
    if exit_file.exists() and exit_file.read_text().strip():
      break
    time.sleep(0.05)
  assert exit_file.read_text().strip() == "0"
  lines = (tmp_path / "moe-env").read_text().split()
  return dict(entry.split("=", 1) for entry in lines)


def test_create_v4_32_spot(tpu, capsys):
  status, lines, _ = dry_run(tpu, capsys, "create", *V4_32,
                             "--accelerator-type", "v4-32", "--spot")
  assert status == 0
  assert lines == [
      "gcloud compute tpus tpu-vm create moe-v4-32 --zone=us-central2-b "
      "--project=my-project --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot"]


def test_create_queued_resource(tpu, capsys):
  status, lines, _ = dry_run(tpu, capsys, "create", *V4_32, "--queued",
                             "--accelerator-type", "v4-32", "--spot")
  assert status == 0
  assert lines == [line(
      *QR, "create", "moe-v4-32", *LOCATION, "--node-id=moe-v4-32",
      "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
      "--spot")]


def test_create_preemptible_with_explicit_runtime(tpu, capsys):
  _, lines, _ = dry_run(tpu, capsys, "create", *V4_32, "--accelerator-type",
                        "v4-32", "--runtime-version", "v2-alpha-tpuv4",
                        "--preemptible")
  assert lines == [line(*VM, "create", "moe-v4-32", *LOCATION,
                        "--accelerator-type=v4-32",
                        "--version=v2-alpha-tpuv4", "--preemptible")]


@pytest.mark.parametrize("given, gcloud_type, runtime, hosts", [
    ("v2-8", "v2-8", "tpu-ubuntu2204-base", 1),
    ("v3-32", "v3-32", "tpu-ubuntu2204-base", 4),
    ("v4-8", "v4-8", "tpu-ubuntu2204-base", 1),
    ("v4-32", "v4-32", "tpu-ubuntu2204-base", 4),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5p-128", "v5p-128", "v2-alpha-tpuv5", 16),
    ("v6e-8", "v6e-8", "v2-alpha-tpuv6e", 1),
    ("V6E-64", "v6e-64", "v2-alpha-tpuv6e", 16),
])
def test_accelerator_types(tpu, capsys, given, gcloud_type, runtime, hosts):
  accelerator = tpu.parse_accelerator(given)
  assert (accelerator.type, accelerator.hosts) == (gcloud_type, hosts)
  _, lines, _ = dry_run(tpu, capsys, "create", *V4_32,
                        "--accelerator-type", given)
  assert lines == [line(*VM, "create", "moe-v4-32", *LOCATION,
                        f"--accelerator-type={gcloud_type}",
                        f"--version={runtime}")]


def test_setup_copies_a_tarball_to_all_workers(tpu, capsys):
  status, lines, _ = dry_run(tpu, capsys, "setup", *V4_32)
  assert status == 0
  assert lines == [
      line("tar", "-czf", "/scratch/moe-checkout.tar.gz", "--exclude=.git",
           "--exclude=.venv", "--exclude=__pycache__", "--exclude=*.egg-info",
           "--exclude=.pytest_cache", "-C", REPO, "."),
      line(*VM, "scp", "/scratch/moe-checkout.tar.gz", "moe-v4-32:moe.tar.gz",
           *LOCATION, "--worker=all"),
      line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
           f"--command={SETUP_FROM_TARBALL}"),
  ]


def test_setup_clones_a_repository(tpu, capsys):
  _, lines, _ = dry_run(tpu, capsys, "setup", *V4_32, "--repo-url",
                        "https://github.com/me/moe.git", "--ref", "v0.1",
                        "--python", "python3.12")
  script = ("set -e; rm -rf ~/moe; git clone -q https://github.com/me/moe.git "
            "~/moe; git -C ~/moe checkout -q v0.1; "
            + INSTALL.replace("python3.11", "python3.12"))
  assert lines == [line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
                        f"--command={script}")]


def test_run_on_all_workers_of_a_v4_32(tpu, capsys):
  status, lines, _ = dry_run(
      tpu, capsys, "run", *V4_32, "--accelerator-type", "v4-32", *JOB, "--",
      "--config.total_steps=100", "--config.model.encoder.moe.router.name="
      "NoisyTopExpertsPerItem")
  assert status == 0
  extra = (" --config.total_steps=100 --config.model.encoder.moe.router.name"
           "=NoisyTopExpertsPerItem")
  assert lines == [line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
                        f"--command={run_script(extra)}")]


def test_run_on_one_host_is_single_process(tpu, capsys, monkeypatch,
                                           tmp_path):
  _, lines, _ = dry_run(tpu, capsys, "run", *V4_32, "--accelerator-type",
                        "v4-8", *JOB)
  assert lines == [line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
                        f"--command={run_script()}")]
  monkeypatch.undo()  # Runs the worker's script for real.
  assert run_on_fake_worker(lines[0], tmp_path / "one",
                            "unknown:unknown:10.130.0.2") == {}
  assert run_on_fake_worker(lines[0], tmp_path / "none", None) == {}


@pytest.mark.parametrize("hosts", [2, 4])
def test_run_counts_the_hosts_from_the_slice_metadata(
    tpu, capsys, monkeypatch, tmp_path, hosts):
  _, lines, _ = dry_run(tpu, capsys, "run", *V4_32, "--accelerator-type",
                        "v5litepod-16", *JOB)
  assert len(lines) == 1
  assert "/worker-network-endpoints" in lines[0]
  assert "MOE_NUM_PROCESSES=$hosts " in lines[0]
  assert not any(f"MOE_NUM_PROCESSES={n}" in lines[0] for n in range(10))
  monkeypatch.undo()  # Runs the worker's script for real.
  endpoints = ",".join(f"unknown:unknown:10.130.0.{i + 5}"
                       for i in range(hosts))
  assert run_on_fake_worker(lines[0], tmp_path, endpoints, worker="1") == {
      "MOE_NUM_PROCESSES": str(hosts), "MOE_PROCESS_ID": "1",
      "MOE_COORDINATOR_ADDRESS": "10.130.0.5:8476"}
  assert (tmp_path / "moe-args").read_text().startswith(
      "-m moe.main --config configs/digits_vmoe.py:runlocal")


def test_run_stops_if_the_metadata_server_is_unreachable(tpu, capsys,
                                                         monkeypatch,
                                                         tmp_path):
  _, lines, _ = dry_run(tpu, capsys, "run", *V4_32, "--accelerator-type",
                        "v4-32", *JOB)
  script = shlex.split(lines[0])[-1].removeprefix("--command=")
  monkeypatch.undo()  # Runs the worker's script for real.
  _executable(tmp_path / "bin" / "curl", "#!/bin/sh\nexit 7\n")
  (tmp_path / "moe").mkdir()
  result = subprocess.run(
      ["bash", "-c", script], capture_output=True, text=True, check=False,
      env={"HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
  assert result.returncode == 1
  assert "cannot read worker-network-endpoints" in result.stderr
  assert not (tmp_path / "moe-logs" / "train.pid").exists()


def test_run_with_restart_prints_the_recovery_plan(tpu, capsys):
  status, lines, _ = dry_run(tpu, capsys, "run", *V4_32, "--queued", "--spot",
                             "--accelerator-type", "v4-32", *JOB,
                             "--restart-on-preemption")
  assert status == 0
  assert lines[0] == lines[-1] == line(
      *VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
      f"--command={run_script()}")
  assert lines[1:6] == [
      line(*QR, "describe", "moe-v4-32", *LOCATION,
           "--format=value(state.state)"),
      line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=0",
           f"--command={STATUS}"),
      line(*QR, "delete", "moe-v4-32", *LOCATION, "--force", "--quiet"),
      line(*QR, "create", "moe-v4-32", *LOCATION, "--node-id=moe-v4-32",
           "--accelerator-type=v4-32",
           "--runtime-version=tpu-ubuntu2204-base", "--spot"),
      line("tar", "-czf", "/scratch/moe-checkout.tar.gz", "--exclude=.git",
           "--exclude=.venv", "--exclude=__pycache__", "--exclude=*.egg-info",
           "--exclude=.pytest_cache", "-C", REPO, "."),
  ]
  assert len(lines) == 9 and "--worker=all" in lines[7]


def test_setup_pins_jax_to_the_local_version(tpu, capsys):
  _, lines, _ = dry_run(tpu, capsys, "setup", *V4_32)
  assert f"'jax[tpu]=={JAX_VERSION}'" in lines[-1]
  assert " -f " not in lines[-1] and "libtpu_releases" not in lines[-1]
  _, lines, _ = dry_run(tpu, capsys, "setup", *V4_32, "--jax-version",
                        "0.4.35")
  assert lines[-1] == line(
      *VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
      f"--command={SETUP_FROM_TARBALL.replace(JAX_VERSION, '0.4.35')}")


def test_setup_needs_a_jax_version_without_local_jax(tpu, capsys,
                                                     monkeypatch):
  monkeypatch.setattr(tpu, "local_jax_version", lambda: None)
  status, lines, err = dry_run(tpu, capsys, "setup", *V4_32)
  assert (status, lines) == (2, [])
  assert err == ("tpu.py setup: error: jax is not installed in this Python, "
                 "so setup has no version to pin jax[tpu] to on the workers: "
                 "pip install -e . here, or pass --jax-version or set "
                 "MOE_JAX_VERSION (e.g. --jax-version 0.4.35)\n")
  _, lines, _ = dry_run(tpu, capsys, "setup", *V4_32,
                        environ={"MOE_JAX_VERSION": "0.4.38"})
  assert "'jax[tpu]==0.4.38'" in lines[-1]
  status, _, _ = dry_run(tpu, capsys, "run", *V4_32, "--accelerator-type",
                         "v4-32", *JOB)
  assert status == 0  # Only setup (or a restart) needs the version.


def test_preemptible_is_for_v2_to_v4(tpu, capsys):
  for accelerator in ("v2-8", "v3-32", "v4-8"):
    status, lines, _ = dry_run(tpu, capsys, "create", *V4_32,
                               "--accelerator-type", accelerator,
                               "--preemptible")
    assert status == 0 and lines[0].endswith(" --preemptible")
  _, lines, _ = dry_run(tpu, capsys, "create", *V4_32, "--accelerator-type",
                        "v5litepod-16", "--spot")
  assert lines[0].endswith(" --spot")


def test_ssh_runs_a_command_on_all_workers(tpu, capsys):
  status, lines, _ = dry_run(tpu, capsys, "ssh", *V4_32, "--worker", "all",
                             "--command", "pgrep -a python")
  assert status == 0
  assert lines == [line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
                        "--command=pgrep -a python")]


def test_internal_ips(tpu, capsys):
  flag = ["--internal-ips"]
  assert dry_run(tpu, capsys, "create", *V4_32, "--accelerator-type",
                 "v4-32", "--spot", *flag)[1] == [line(
                     *VM, "create", "moe-v4-32", *LOCATION,
                     "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base", "--spot",
                     "--internal-ips")]
  assert dry_run(tpu, capsys, "create", *V4_32, "--queued",
                 "--accelerator-type", "v4-32", *flag)[1][0].endswith(
                     "--runtime-version=tpu-ubuntu2204-base --internal-ips")
  _, setup, _ = dry_run(tpu, capsys, "setup", *V4_32, *flag)
  assert setup[1] == line(*VM, "scp", "/scratch/moe-checkout.tar.gz",
                          "moe-v4-32:moe.tar.gz", *LOCATION, "--worker=all",
                          "--internal-ip")
  assert setup[2] == line(*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=all",
                          "--internal-ip", f"--command={SETUP_FROM_TARBALL}")
  for argv in (["ssh"], ["logs"], ["run", "--accelerator-type", "v4-32",
                                   *JOB]):
    lines = dry_run(tpu, capsys, *argv, *V4_32, *flag)[1]
    assert lines[0].startswith(line(*VM, "ssh", "moe-v4-32", *LOCATION)
                               + " --worker=") and "--internal-ip" in lines[0]
  delete = dry_run(tpu, capsys, "delete", *V4_32, *flag)[1]
  assert delete == [line(*VM, "delete", "moe-v4-32", *LOCATION)]
  environ = {"MOE_TPU_INTERNAL_IPS": "1", "TMPDIR": "/scratch"}
  assert dry_run(tpu, capsys, "setup", *V4_32, environ=environ)[1] == setup


@pytest.mark.parametrize("argv, expected", [
    (["logs"], [*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=0",
                "--command=tail -n 100 ~/moe-logs/train.log"]),
    (["logs", "--worker", "3", "--lines", "20", "--follow"],
     [*VM, "ssh", "moe-v4-32", *LOCATION, "--worker=3",
      "--command=tail -n 20 -F ~/moe-logs/train.log"]),
    (["ssh", "--worker", "1"], [*VM, "ssh", "moe-v4-32", *LOCATION,
                                "--worker=1"]),
    (["delete"], [*VM, "delete", "moe-v4-32", *LOCATION]),
    (["delete", "--yes"], [*VM, "delete", "moe-v4-32", *LOCATION, "--quiet"]),
    (["delete", "--queued"], [*QR, "delete", "moe-v4-32", *LOCATION,
                              "--force"]),
])
def test_logs_ssh_delete(tpu, capsys, argv, expected):
  status, lines, _ = dry_run(tpu, capsys, *argv, *V4_32)
  assert status == 0
  assert lines == [line(*expected)]


def test_environment_variables_give_the_defaults(tpu, capsys):
  environ = {"MOE_TPU_NAME": "moe-v4-32", "MOE_TPU_ZONE": "us-central2-b",
             "CLOUDSDK_CORE_PROJECT": "my-project",
             "MOE_TPU_ACCELERATOR": "v4-32", "MOE_TPU_SPOT": "1",
             "MOE_TPU_QUEUED": "yes",
             "MOE_WORKDIR": "gs://my-bucket/runs/digits",
             "TFDS_DATA_DIR": "gs://my-bucket/tfds", "TMPDIR": "/scratch"}
  from_env = [dry_run(tpu, capsys, *argv, environ=environ)[1] for argv in (
      ["create"], ["setup"],
      ["run", "--config", "configs/digits_vmoe.py:runlocal"])]
  from_flags = [dry_run(tpu, capsys, *argv, *V4_32)[1] for argv in (
      ["create", "--accelerator-type", "v4-32", "--spot", "--queued"],
      ["setup"], ["run", "--accelerator-type", "v4-32", *JOB])]
  assert from_env == from_flags


def test_flags_win_over_environment_variables(tpu, capsys):
  environ = {"MOE_TPU_NAME": "other", "MOE_TPU_ZONE": "europe-west4-a",
             "MOE_TPU_PROJECT": "mine", "CLOUDSDK_CORE_PROJECT": "gcloud-one",
             "MOE_TPU_ACCELERATOR": "v5e-16"}
  _, lines, _ = dry_run(tpu, capsys, "create", "--name", "moe-v4-32",
                        "--accelerator-type", "v4-32", environ=environ)
  assert lines == [line(*VM, "create", "moe-v4-32", "--zone=europe-west4-a",
                        "--project=mine", "--accelerator-type=v4-32",
                        "--version=tpu-ubuntu2204-base")]


@pytest.mark.parametrize("argv, environ, message", [
    (["create", *V4_32, "--accelerator-type", "v7-8"], {},
     "unknown accelerator type 'v7-8'; known: v2-N"),
    (["create", *V4_32, "--accelerator-type", "v4-12"], {},
     "v4-N (N TensorCores: multiple of 8 up to 4096)"),
    (["create", *V4_32], {}, "missing accelerator type: pass "
     "--accelerator-type or set MOE_TPU_ACCELERATOR"),
    (["setup", "--name", "moe", "--project", "p"], {},
     "missing zone: pass --zone or set MOE_TPU_ZONE or CLOUDSDK_COMPUTE_ZONE"),
    (["delete", "--name", "moe", "--zone", "us-central2-b"], {},
     "missing project: pass --project or set MOE_TPU_PROJECT or "
     "CLOUDSDK_CORE_PROJECT"),
    (["ssh", "--zone", "us-central2-b", "--project", "p"], {},
     "missing name: pass --name or set MOE_TPU_NAME"),
    (["run", *V4_32, "--accelerator-type", "v4-32", *JOB[:2], "--workdir",
      "/tmp/run"], {}, "workdir '/tmp/run' must be a gs:// path on the "
     "multi-host slice v4-32 (all its hosts"),
    (["run", *V4_32, "--accelerator-type", "v4-32", *JOB[:2]], {},
     "missing workdir: pass --workdir or set MOE_WORKDIR"),
    (["run", *V4_32, "--accelerator-type", "v4-8", *JOB[2:]], {},
     "missing config: pass --config"),
    (["create", *V4_32, "--accelerator-type", "v4-8", "--preemptible"],
     {"MOE_TPU_SPOT": "1"}, "--spot and --preemptible exclude each other"),
    (["create", *V4_32, "--accelerator-type", "v4-8", "--queued",
      "--preemptible"], {}, "queued resources take --spot, not --preemptible"),
    (["create", *V4_32, "--accelerator-type", "v4-8"],
     {"MOE_TPU_SPOT": "maybe"}, "MOE_TPU_SPOT='maybe' is not a boolean"),
    (["create", *V4_32[:4], "--zone", "central", "--accelerator-type",
      "v4-8"], {}, "zone 'central' is not valid"),
    (["ssh", *V4_32[2:], "--name", "My_TPU"], {}, "TPU name 'My_TPU' is not "
     "valid"),
    (["delete", *V4_32, "--", "--config.total_steps=1"], {},
     "only run passes flags after '--' to moe.main"),
    (["create", *V4_32, "--accelerator-type", "v5litepod-16",
      "--preemptible"], {}, "--preemptible exists only for v2, v3, v4; "
     "v5litepod-16 takes --spot (Spot VMs) instead"),
    (["create", *V4_32, "--accelerator-type", "v5p-8", "--preemptible"], {},
     "v5p-8 takes --spot"),
    (["run", *V4_32, "--accelerator-type", "v6e-8", "--preemptible", *JOB],
     {}, "v6e-8 takes --spot"),
    (["ssh", *V4_32, "--worker", "all"], {},
     "--worker all needs --command CMD"),
    (["setup", *V4_32, "--jax-version", "latest"], {},
     "jax version 'latest' is not valid"),
])
def test_bad_input_exits_2_with_one_line(tpu, capsys, argv, environ, message):
  status, lines, err = dry_run(tpu, capsys, *argv, environ=environ)
  assert status == 2
  assert lines == []
  assert len(err.splitlines()) == 1
  assert err.startswith(f"tpu.py {argv[0]}: error: ")
  assert message in err


def test_argparse_errors_exit_2(tpu, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tpu.main(["logs", *V4_32, "--worker", "first", "--dry-run"], {})
  assert exit_info.value.code == 2
  assert "expected a worker number or 'all'" in capsys.readouterr().err


def test_missing_gcloud_is_status_127(tpu, capsys, monkeypatch):
  def not_installed(argv, **kwargs):
    raise FileNotFoundError(argv[0])
  monkeypatch.setattr(subprocess, "run", not_installed)
  assert tpu.main(["delete", *V4_32, "--yes"], {}) == 127
  assert "gcloud not found on PATH" in capsys.readouterr().err


class FakeGcloud:
  """Answers the supervisor's commands from scripted states and statuses."""

  def __init__(self, states, statuses):
    self.states, self.statuses = list(states), list(statuses)
    self.dry_run = False
    self.calls = []

  def run(self, argv, capture=False):
    del capture
    kind = self._kind(argv)
    self.calls.append(kind)
    stdout = {"state": lambda: self.states.pop(0),
              "status": lambda: self.statuses.pop(0)}.get(kind, str)()
    return subprocess.CompletedProcess(argv, 0, stdout, "")

  def run_all(self, commands):
    for argv in commands:
      self.run(argv)
    return 0

  @staticmethod
  def _kind(argv):
    command = argv[-1] if argv[0] == "gcloud" else ""
    if "describe" in argv:
      return "state"
    if command.startswith("--command=if [ -f ~/moe-logs/train.exit ]"):
      return "status"
    if "pip install" in command:
      return "setup"
    if "moe.main" in command:
      return "launch"
    return argv[4] if argv[0] == "gcloud" else argv[0]


def supervise(tpu, gcloud):
  settings = tpu.resolve(
      tpu.build_parser().parse_args(
          ["run", *V4_32, "--accelerator-type", "v4-32", "--spot", *JOB]),
      {})
  settings.main_args = []
  return tpu.supervise(settings, gcloud, {}, sleep=lambda seconds: None)


def test_supervisor_recreates_a_preempted_slice(tpu):
  gcloud = FakeGcloud(["PREEMPTED", "CREATING", "READY", "READY", "READY"],
                      ["running", "0"])
  assert supervise(tpu, gcloud) == 0
  assert gcloud.calls == [
      "state", "delete", "create", "state", "state", "tar", "scp", "setup",
      "launch", "state", "status", "state", "status"]


def test_supervisor_relaunches_after_sigterm_and_stops_on_failure(tpu):
  gcloud = FakeGcloud(["READY", "READY", "READY"], ["143", "running", "1"])
  assert supervise(tpu, gcloud) == 1
  assert gcloud.calls == ["state", "status", "launch", "state", "status",
                          "state", "status"]


def test_script_reports_bad_input_in_one_line(monkeypatch):
  monkeypatch.undo()  # This test runs the script for real.
  result = subprocess.run(
      [sys.executable, str(TPU_PY), "create", "--name", "moe", "--project",
       "p", "--accelerator-type", "v4-8", "--dry-run"],
      capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
      check=False)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr == (
      "tpu.py create: error: missing zone: pass --zone or set MOE_TPU_ZONE or "
      "CLOUDSDK_COMPUTE_ZONE (e.g. --zone us-central2-b)\n")
