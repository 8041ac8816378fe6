"""The launchers in launch/: the commands they print and start, and their input checks.

Each script runs in a subprocess against a temporary hostfile and a stand-in checkout (a directory with a train.py).
Dry runs are checked argument by argument; real runs use stub launchers (deepspeed, mpirun, srun, torchrun) on PATH
that report the arguments and environment they were started with. No Gaudi, GPU, Slurm or MPI is needed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="the launchers are bash scripts and bash is not installed")

# Variables the launchers read; the tests start each script without the developer's own values of them.
READ_BY_LAUNCHERS = ("PT_HPU_", "PT_TE_", "HCCL_", "FI_", "NCCL_", "SLURM_", "DRY_RUN", "FP8TRAIN_ROOT", "PYTHON")
RUN_DIR = re.compile(r"hydra\.run\.dir=runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(?P<name>.+)")
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NTASKS": "16"}


def launch(script: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(READ_BY_LAUNCHERS)}
    base.update(env or {})
    return subprocess.run(
        [BASH, str(LAUNCH / script), *map(str, args)], capture_output=True, text=True, env=base, timeout=60
    )


def printed_command(stdout: str) -> list[str]:
    """The argv a launcher printed: the line after its '[name] command...' line, shell-unquoted."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(r"\[\w+\] command", line))
    return shlex.split(lines[at + 1])


def printed_env(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith("    ")]


@pytest.fixture
def hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two Gaudi2 nodes\n\ngaudi-a slots=8\ngaudi-b slots=4   # four cards free here\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A stand-in checkout: the launchers only need its train.py to exist."""
    path = tmp_path / "checkout"
    path.mkdir()
    (path / "train.py").write_text("")
    return path


@pytest.fixture
def stubs(tmp_path: Path):
    """stubs(name, body) puts an executable NAME on a fresh PATH directory; returns the env with that PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def make(name: str, body: str) -> dict[str, str]:
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
        return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    return make


def test_every_script_parses():
    scripts = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
    assert {p.name for p in scripts} >= {
        "common.sh",
        "gaudi_deepspeed.sh",
        "gaudi_mpirun.sh",
        "gaudi_slurm.sbatch",
        "cuda.sh",
    }
    for script in scripts:
        result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


@pytest.mark.parametrize("script", ["gaudi_deepspeed.sh", "gaudi_mpirun.sh", "gaudi_slurm.sbatch", "cuda.sh"])
def test_help(script):
    result = launch(script, "-h")
    assert result.returncode == 0 and result.stdout.startswith("usage:")


def test_gaudi_deepspeed_dry_run(hostfile, root):
    result = launch(
        "gaudi_deepspeed.sh", "-H", hostfile, "-p", "29600", "-n", "llama7b", "--dry-run", "--",
        "model=llama2_7b", "precision=fp8_smooth_gaudi2", "precision.engine=te",
        env={"FP8TRAIN_ROOT": str(root), "HCCL_SOCKET_IFNAME": "ib0", "UNRELATED": "x"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[:9] == [
        "deepspeed", "--hostfile", str(hostfile), "--master_addr", "gaudi-a", "--master_port", "29600",
        "--no_local_rank", str(root / "train.py"),
    ]  # fmt: skip
    assert argv[9:-1] == [
        "backend=hpu", "parallel=deepspeed", "model=llama2_7b", "precision=fp8_smooth_gaudi2", "precision.engine=te"
    ]  # fmt: skip
    assert RUN_DIR.fullmatch(argv[-1])["name"] == "llama7b"
    assert "2 node(s), 12 rank(s), master gaudi-a:29600" in result.stdout
    assert printed_env(result.stdout) == ["PT_HPU_LAZY_MODE=1", "HCCL_SOCKET_IFNAME=ib0"]
    assert "dry run, not started" in result.stdout
    assert not (root / ".deepspeed_env").exists()  # a dry run writes nothing


def test_gaudi_deepspeed_writes_deepspeed_env_and_starts_deepspeed(hostfile, root, stubs, tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text("# scale-out over host NICs\nHCCL_OVER_OFI=1\n\n  FI_PROVIDER=verbs\nPT_HPU_LAZY_MODE=0\n")
    env = stubs(
        "deepspeed",
        'echo "stub cwd=$PWD lazy=$PT_HPU_LAZY_MODE ofi=$HCCL_OVER_OFI"\nprintf "stub arg %s\\n" "$@"\n',
    )
    env.update(FP8TRAIN_ROOT=str(root), PT_HPU_LAZY_MODE="1", HCCL_SOCKET_IFNAME="ib0")
    result = launch("gaudi_deepspeed.sh", "-H", hostfile, "-e", env_file, "model=tiny", env=env)
    assert result.returncode == 0, result.stderr
    # The env file wins over the shell (PT_HPU_LAZY_MODE=0); the shell's HCCL_* variables are passed on.
    written = (root / ".deepspeed_env").read_text()
    assert written == "HCCL_SOCKET_IFNAME=ib0\nPT_HPU_LAZY_MODE=0\nHCCL_OVER_OFI=1\nFI_PROVIDER=verbs\n"
    for line in written.splitlines():  # what DeepSpeed's reader does with each line: split at the first '='
        key, value = line.split("=", 1)
        assert key and value and " " not in line
    # The printed command is the one that ran, from the checkout's root, with the environment exported.
    assert f"stub cwd={root} lazy=0 ofi=1" in result.stdout
    started = [line.removeprefix("stub arg ") for line in result.stdout.splitlines() if line.startswith("stub arg")]
    assert started == printed_command(result.stdout)[1:]
    assert started[-3:-1] == ["parallel=deepspeed", "model=tiny"]


def test_user_overrides_replace_the_launchers_defaults(hostfile, root):
    result = launch(
        "gaudi_deepspeed.sh", "-H", hostfile, "--dry-run", "--",
        "backend=cpu", "hydra.run.dir=runs/mine", "resume=auto",
        env={"FP8TRAIN_ROOT": str(root)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[9:] == ["parallel=deepspeed", "backend=cpu", "hydra.run.dir=runs/mine", "resume=auto"]


def test_dry_run_from_the_environment(hostfile, root):
    result = launch("gaudi_deepspeed.sh", "-H", hostfile, env={"FP8TRAIN_ROOT": str(root), "DRY_RUN": "1"})
    assert result.returncode == 0 and "dry run, not started" in result.stdout
    assert printed_command(result.stdout)[0] == "deepspeed"
    result = launch("gaudi_deepspeed.sh", "-H", hostfile, env={"FP8TRAIN_ROOT": str(root), "DRY_RUN": "yes"})
    assert result.returncode == 2 and "DRY_RUN must be 0 or 1" in result.stderr


def test_gaudi_mpirun_dry_run(hostfile, root):
    result = launch(
        "gaudi_mpirun.sh", "-H", hostfile, "-c", "4", "--dry-run", "--", "model=tiny",
        env={"FP8TRAIN_ROOT": str(root), "FI_PROVIDER": "efa"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[:-1] == [
        "mpirun", "--allow-run-as-root", "-n", "12", "--bind-to", "core", "--map-by", "socket:PE=4",
        "--rank-by", "slot", "-hostfile", str(hostfile), "-wdir", str(root),
        "-x", "MASTER_ADDR=gaudi-a", "-x", "MASTER_PORT=29500", "-x", "PT_HPU_LAZY_MODE=1", "-x", "FI_PROVIDER=efa",
        "python3", str(root / "train.py"), "backend=hpu", "parallel=deepspeed", "model=tiny",
    ]  # fmt: skip
    assert RUN_DIR.fullmatch(argv[-1])["name"] == "gaudi"


def test_scale_out_over_host_nics_passes_the_library_path(hostfile, root, tmp_path):
    env_file = tmp_path / "ofi.env"
    env_file.write_text("HCCL_OVER_OFI=1\nHCCL_GAUDI_DIRECT=1\nFI_PROVIDER=verbs\n")
    env = {"FP8TRAIN_ROOT": str(root), "LD_LIBRARY_PATH": "/opt/libfabric/lib"}
    result = launch("gaudi_mpirun.sh", "-H", hostfile, "-e", env_file, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    exported = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-x"]
    assert exported == [
        "MASTER_ADDR=gaudi-a", "MASTER_PORT=29500", "LD_LIBRARY_PATH=/opt/libfabric/lib", "PT_HPU_LAZY_MODE=1",
        "HCCL_OVER_OFI=1", "HCCL_GAUDI_DIRECT=1", "FI_PROVIDER=verbs",
    ]  # fmt: skip
    # Without HCCL_OVER_OFI the library path stays the node's own.
    result = launch("gaudi_mpirun.sh", "-H", hostfile, "--dry-run", env=env)
    assert "LD_LIBRARY_PATH=/opt/libfabric/lib" not in printed_command(result.stdout)


def test_gaudi_mpirun_default_cores_per_rank(hostfile, root):
    result = launch("gaudi_mpirun.sh", "-H", hostfile, "--dry-run", env={"FP8TRAIN_ROOT": str(root)})
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"socket:PE=[1-9]\d*", printed_command(result.stdout)[7])


def test_gaudi_slurm_dry_run(root, stubs):
    env = stubs("scontrol", 'test "$*" = "show hostnames node-[a-b]" && printf "node-a\\nnode-b\\n"\n')
    env.update(SLURM, FP8TRAIN_ROOT=str(root))
    result = launch("gaudi_slurm.sbatch", "-n", "llama", "--dry-run", "--", "model=llama2_7b", env=env)
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[:6] == [
        "srun", "--kill-on-bad-exit=1",
        "bash", "-c", 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"',
        "fp8train-rank",
    ]  # fmt: skip
    assert argv[6:] == [
        "python3", str(root / "train.py"), "backend=hpu", "parallel=deepspeed", "resume=auto", "model=llama2_7b",
        "hydra.run.dir=runs/slurm-4242_llama",
    ]  # fmt: skip
    assert printed_env(result.stdout) == ["PT_HPU_LAZY_MODE=1", "MASTER_ADDR=node-a", "MASTER_PORT=29500"]
    assert "job 4242: 2 node(s), 16 rank(s), master node-a:29500" in result.stdout


@pytest.mark.parametrize("script", ["gaudi_deepspeed.sh", "gaudi_mpirun.sh", "gaudi_slurm.sbatch"])
def test_compiled_gaudi_runs_get_eager_mode(script, hostfile, root, stubs):
    # backend.compile=true needs PT_HPU_LAZY_MODE=0 (fp8train refuses torch.compile in lazy mode): the launchers
    # pass 0 then, also over the 1 that docker/Dockerfile.gaudi puts in every shell.
    env = stubs("scontrol", 'printf "node-a\\nnode-b\\n"\n')
    env.update(SLURM, FP8TRAIN_ROOT=str(root))
    where = [] if script.endswith(".sbatch") else ["-H", hostfile]

    def lazy_mode(*overrides: str, **shell: str) -> str:
        result = launch(script, *where, "--dry-run", "--", *overrides, env={**env, **shell})
        assert result.returncode == 0, result.stderr
        passed = printed_env(result.stdout) + printed_command(result.stdout)  # mpirun: as -x KEY=value arguments
        return next(kv for kv in passed if kv.startswith("PT_HPU_LAZY_MODE="))

    assert lazy_mode("model=tiny") == "PT_HPU_LAZY_MODE=1"
    assert lazy_mode("backend.compile=true") == "PT_HPU_LAZY_MODE=0"
    assert lazy_mode("backend.compile=True", "backend.compile_scope=block") == "PT_HPU_LAZY_MODE=0"
    assert lazy_mode("backend.compile=false") == "PT_HPU_LAZY_MODE=1"
    assert lazy_mode("backend.compile=true", PT_HPU_LAZY_MODE="1") == "PT_HPU_LAZY_MODE=0"
    assert lazy_mode("model=tiny", PT_HPU_LAZY_MODE="0") == "PT_HPU_LAZY_MODE=0"


def test_gaudi_slurm_maps_slurm_ranks_to_torch_ranks(root, stubs):
    stubs("scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun's stand-in starts two of the job's four tasks (those on the second node), as Slurm would number them.
    env = stubs("srun", 'shift\nfor i in 0 1; do SLURM_PROCID=$((i + 2)) SLURM_LOCALID=$i SLURM_NTASKS=4 "$@"; done\n')
    stubs("fake-python", 'echo "rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE at=$MASTER_ADDR:$MASTER_PORT $2"\n')
    env.update(SLURM, FP8TRAIN_ROOT=str(root), PYTHON="fake-python")
    result = launch("gaudi_slurm.sbatch", "-p", "29700", env=env)
    assert result.returncode == 0, result.stderr
    ranks = [line for line in result.stdout.splitlines() if line.startswith("rank=")]
    assert ranks == [
        "rank=2 local=0 world=4 at=node-a:29700 backend=hpu",
        "rank=3 local=1 world=4 at=node-a:29700 backend=hpu",
    ]


def test_gaudi_slurm_runs_from_slurms_copy_of_the_script(tmp_path, stubs):
    """sbatch runs a copy of the script from its spool directory: the checkout is found via the submit dir."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(LAUNCH / "gaudi_slurm.sbatch", spool / "slurm_script")
    env = stubs("scontrol", 'printf "node-a\\n"\n')
    env.update(SLURM, SLURM_SUBMIT_DIR=str(REPO), DRY_RUN="1")
    run = [BASH, str(spool / "slurm_script")]
    base = {k: v for k, v in os.environ.items() if not k.startswith(READ_BY_LAUNCHERS)}
    result = subprocess.run(run, capture_output=True, text=True, env={**base, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert printed_command(result.stdout)[7] == str(REPO / "train.py")
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)  # submitted from outside a checkout
    result = subprocess.run(run, capture_output=True, text=True, env={**base, **env}, timeout=60)
    assert result.returncode == 2 and "launch/common.sh not found" in result.stderr


def test_cuda_torchrun_one_node(root, stubs):
    env = stubs("nvidia-smi", 'printf "GPU 0: A (UUID: x)\\nGPU 1: A (UUID: y)\\n"\n')
    env.update(FP8TRAIN_ROOT=str(root))
    result = launch("cuda.sh", "--dry-run", "--", "model=llama_1b", env=env)
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[:-1] == [
        "torchrun", "--standalone", "--nproc_per_node=2", str(root / "train.py"),
        "backend=cuda", "parallel=deepspeed", "model=llama_1b",
    ]  # fmt: skip
    assert RUN_DIR.fullmatch(argv[-1])["name"] == "cuda"


def test_cuda_torchrun_multi_node_runs_torchrun(root, stubs):
    env = stubs("torchrun", 'echo "stub nccl=$NCCL_SOCKET_IFNAME args=$*"\n')
    env.update(FP8TRAIN_ROOT=str(root), NCCL_SOCKET_IFNAME="eth1")
    args = ["-g", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "hydra.run.dir=runs/mine"]
    result = launch("cuda.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    expected = [
        "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500", "--nproc_per_node=8",
        str(root / "train.py"), "backend=cuda", "parallel=deepspeed", "hydra.run.dir=runs/mine",
    ]  # fmt: skip
    assert printed_command(result.stdout) == ["torchrun", *expected]
    assert f"stub nccl=eth1 args={' '.join(expected)}" in result.stdout


def test_cuda_deepspeed_over_a_hostfile(hostfile, root):
    result = launch("cuda.sh", "-H", hostfile, "--dry-run", env={"FP8TRAIN_ROOT": str(root), "NCCL_DEBUG": "INFO"})
    assert result.returncode == 0, result.stderr
    argv = printed_command(result.stdout)
    assert argv[:9] == [
        "deepspeed", "--hostfile", str(hostfile), "--master_addr", "gaudi-a", "--master_port", "29500",
        "--no_local_rank", str(root / "train.py"),
    ]  # fmt: skip
    assert argv[9:11] == ["backend=cuda", "parallel=deepspeed"]
    assert printed_env(result.stdout) == ["NCCL_DEBUG=INFO"]


BAD_HOSTFILES = [
    ("gaudi-a 8\n", "line 1: 'gaudi-a 8' is not 'HOST slots=N'"),
    ("gaudi-a slots=8 max_slots=8\n", "line 1: 'gaudi-a slots=8 max_slots=8' is not 'HOST slots=N'"),
    ("gaudi-a slots=8\ngaudi-b slots=0\n", "line 2: slots=0 must be a positive integer"),
    ("gaudi-a slots=eight\n", "line 1: slots=eight must be a positive integer"),
    ("gaudi-a slots=-2\n", "line 1: slots=-2 must be a positive integer"),
    ("gaudi-a slots=8\n\ngaudi-a slots=8\n", "line 3: host gaudi-a is listed twice"),
    ("# nobody\n\n", "lists no hosts"),
]


@pytest.mark.parametrize("script", ["gaudi_deepspeed.sh", "gaudi_mpirun.sh", "cuda.sh"])
@pytest.mark.parametrize("text,message", BAD_HOSTFILES)
def test_malformed_hostfile_is_refused(script, text, message, tmp_path, root):
    path = tmp_path / "hostfile"
    path.write_text(text)
    result = launch(script, "-H", path, "--dry-run", env={"FP8TRAIN_ROOT": str(root)})
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "command" not in result.stdout


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("gaudi_deepspeed.sh", [], "no hostfile: pass -H FILE"),
        ("gaudi_deepspeed.sh", ["-H", "{tmp}/missing"], "hostfile '{tmp}/missing' not found"),
        ("gaudi_mpirun.sh", ["-H", "{tmp}/missing"], "hostfile '{tmp}/missing' not found"),
        ("gaudi_deepspeed.sh", ["-H", "{hostfile}", "--bogus"], "unknown option '--bogus'"),
        ("gaudi_deepspeed.sh", ["-H"], "option -H needs a value"),
        ("gaudi_deepspeed.sh", ["-H", "{hostfile}", "-p", "70000"], "port must be an integer in 1..65535"),
        ("gaudi_deepspeed.sh", ["-H", "{hostfile}", "-n", "a/b"], "name 'a/b' may only hold"),
        ("gaudi_deepspeed.sh", ["-H", "{hostfile}", "-e", "{tmp}/none.env"], "env file '{tmp}/none.env' not found"),
        ("gaudi_deepspeed.sh", ["-H", "{hostfile}", "-e", "{tmp}/bad.env"], "bad.env line 2: 'B=two words'"),
        ("gaudi_mpirun.sh", ["-H", "{hostfile}", "-c", "0"], "--cores-per-rank must be a positive integer"),
        ("gaudi_mpirun.sh", ["-H", "{hostfile}", "--nnodes", "2"], "unknown option '--nnodes'"),
        ("gaudi_slurm.sbatch", [], "$SLURM_JOB_ID is not set: this is not inside a Slurm job"),
        ("cuda.sh", ["--nnodes", "2", "--node-rank", "0", "--master-addr", "h"], "pass hydra.run.dir=runs/NAME"),
        ("cuda.sh", ["--nnodes", "2", "--node-rank", "0", "hydra.run.dir=runs/x"], "needs --master-addr"),
        ("cuda.sh", ["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "hydra.run.dir=runs/x"], "0..1"),
        ("cuda.sh", ["--node-rank", "1", "-g", "2"], "need --nnodes N with N > 1"),
        ("cuda.sh", ["-H", "{hostfile}", "-g", "2"], "drop -g/--nnodes"),
        ("cuda.sh", ["-g", "zero"], "--gpus must be a positive integer"),
    ],
)
def test_bad_input_is_refused_with_one_message(script, args, message, hostfile, root, tmp_path):
    (tmp_path / "bad.env").write_text("A=1\nB=two words\n")
    fill = {"tmp": str(tmp_path), "hostfile": str(hostfile)}
    result = launch(script, *[a.format(**fill) for a in args], env={"FP8TRAIN_ROOT": str(root), "DRY_RUN": "1"})
    assert result.returncode == 2
    assert message.format(**fill) in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.parametrize("script", ["gaudi_deepspeed.sh", "gaudi_mpirun.sh", "cuda.sh"])
def test_missing_train_py_is_refused(script, hostfile, tmp_path):
    result = launch(script, "-H", hostfile, "--dry-run", env={"FP8TRAIN_ROOT": str(tmp_path)})
    assert result.returncode == 2 and f"train.py not found in '{tmp_path}'" in result.stderr


def test_missing_launcher_is_named(hostfile, root, tmp_path):
    env = {"FP8TRAIN_ROOT": str(root), "PATH": f"{tmp_path}{os.pathsep}{Path(BASH).parent}"}  # no deepspeed here
    if shutil.which("deepspeed", path=env["PATH"]):
        pytest.skip("deepspeed is installed next to bash")
    result = launch("gaudi_deepspeed.sh", "-H", hostfile, env=env)
    assert result.returncode == 2 and "deepspeed not found on PATH" in result.stderr


def test_launch_readme_shows_what_the_launcher_prints(root):
    """The dry run quoted in launch/README.md is the launcher's output, up to the checkout path and the time."""
    readme = (LAUNCH / "README.md").read_text()
    quoted = re.search(r"A dry run of it .*?```\n(.*?)```", readme, re.S)[1]
    (root / "launch").mkdir()
    (root / "launch" / "hostfile").write_text("gaudi2-node-1 slots=8\ngaudi2-node-2 slots=8\n")
    result = launch(
        "gaudi_deepspeed.sh", "-H", root / "launch" / "hostfile", "-n", "llama7b_fp8", "--dry-run", "--",
        "model=llama2_7b", "precision=fp8_smooth_gaudi2", "precision.engine=te", "parallel.zero_stage=1",
        env={"FP8TRAIN_ROOT": str(root), "HCCL_SOCKET_IFNAME": "ens1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = re.escape(quoted.replace("/workspace/fp8train", str(root))).replace(
        re.escape("<date>_<time>"), r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    )
    assert re.fullmatch(expected, result.stdout)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    scripts = [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")]
    result = subprocess.run(["shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout
