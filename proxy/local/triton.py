"""Runs the real `tritonserver` from the nvidia-pytriton wheel on loopback, with the Python stub set up."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

INTERNAL_HEADER = "seekgate-internal"


class TritonLaunchError(RuntimeError):
    """A one-line, actionable reason why Triton could not be started."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    stubs: Path


@dataclass(frozen=True)
class TritonLaunch:
    model_repository: Path
    data_dir: Path
    checkpoint: Path | None = None
    host: str = "127.0.0.1"
    http_port: int = 18000
    grpc_port: int = 18001
    metrics_port: int = 18002
    config_name: str = "auto"          # auto | default | gpu | multigpu
    startup_timeout_s: float = 120.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def find_install() -> TritonInstall:
    try:
        import pytriton  # noqa: F401  (only to find the wheel's files)
    except ImportError as exc:
        raise TritonLaunchError(
            "nvidia-pytriton is not installed: run `pip install -e '.[model]'` "
            "(on a CPU machine install torch==2.13.0 first)") from exc
    root = Path(sys.modules["pytriton"].__file__).parent / "tritonserver"  # type: ignore[arg-type]
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends", root / "python_backend_stubs")
    if not install.binary.exists():
        raise TritonLaunchError(f"tritonserver binary missing at {install.binary}: reinstall nvidia-pytriton")
    return install


def prepare_backends(install: TritonInstall, data_dir: Path) -> Path:
    """A private copy of the backend directory with the stub for this interpreter in it.

    The wheel ships stubs for several Python versions beside the backend; the Python
    backend only looks for `triton_python_backend_stub` inside its own directory.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.stubs / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonLaunchError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    target = data_dir / "triton" / "backends"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(install.backends, target)
    shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
    return target


def stub_environment(checkpoint: Path | None) -> dict[str, str]:
    """The stub must load this interpreter's libpython and see this environment's packages.

    The stub's RPATH points at the wheel's bundled CUDA runtime relative to where the
    wheel put it; our copy lives elsewhere, so that directory goes on the path too.
    """
    env = dict(os.environ)
    site = sysconfig.get_paths()["purelib"]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    bundled = os.path.join(site, "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, bundled, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    # The stub starts its interpreter in isolated mode (PYTHONPATH ignored) and finds
    # it as `python3` on PATH: put this environment's bin first so it sees our packages.
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if checkpoint is not None:
        env["SEEKGATE_CHECKPOINT"] = str(checkpoint.resolve())
    return env


def gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def pick_config_name(requested: str) -> str | None:
    """`auto`: the GPU config when GPUs are visible, else config.pbtxt (CPU)."""
    if requested == "auto":
        return "gpu" if gpu_count() > 0 else None
    return None if requested == "default" else requested


def internal_key(data_dir: Path) -> str:
    """Secret header value that unlocks Triton's shared-memory API: only seekgate knows it."""
    path = data_dir / "secrets" / "triton-internal-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS just handed out, for tests and benchmarks: tritonserver cannot bind port 0."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As Triton does: connections left in TIME_WAIT must not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TritonLaunchError(
                f"{what} port {host}:{port} is already in use (another Triton?): stop it or "
                f"set triton.{what}_port in config/seekgate.yaml") from exc


def build_command(launch: TritonLaunch, install: TritonInstall, backends: Path) -> list[str]:
    key = internal_key(launch.data_dir)
    cmd = [
        str(install.binary),
        f"--model-repository={launch.model_repository.resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={launch.host}", f"--http-port={launch.http_port}",
        f"--grpc-address={launch.host}", f"--grpc-port={launch.grpc_port}",
        f"--metrics-address={launch.host}", f"--metrics-port={launch.metrics_port}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-sagemaker=false", "--allow-vertex-ai=false",
        # Clients never register shared memory directly; seekgate adds this header
        # only for principals the policy lets touch shared memory.
        f"--http-restricted-api=shared-memory:{INTERNAL_HEADER}={key}",
        f"--grpc-restricted-protocol=shared-memory:{INTERNAL_HEADER}={key}",
        "--log-info=true",
    ]
    config_name = pick_config_name(launch.config_name)
    if config_name:
        cmd.append(f"--model-config-name={config_name}")
    return cmd + list(launch.extra_args)


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _failure_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    # Most specific first: a model's load error says more than "failed to load all models".
    for marker in ("Bad option", "failed to load '", "UNAVAILABLE", "error"):
        for line in lines:
            if marker in line:
                return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else "no output"


class TritonProcess:
    """One tritonserver child process: start, wait until ready, stop."""

    def __init__(self, launch: TritonLaunch) -> None:
        self.launch = launch
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = launch.data_dir / "triton" / "triton.log"

    @property
    def http_url(self) -> str:
        return f"http://{self.launch.host}:{self.launch.http_port}"

    def start(self) -> None:
        launch = self.launch
        if not any(launch.model_repository.glob("*/config.pbtxt")):
            raise TritonLaunchError(f"no model repository at {launch.model_repository} "
                                    "(expected <model>/config.pbtxt, e.g. deepseek/config.pbtxt)")
        for what, port in (("http", launch.http_port), ("grpc", launch.grpc_port), ("metrics", launch.metrics_port)):
            check_port_free(launch.host, port, what)
        install = find_install()
        backends = prepare_backends(install, launch.data_dir)
        cmd = build_command(launch, install, backends)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        # Own process group, so a Ctrl-C meant for seekgate reaches Triton only through us.
        self.proc = subprocess.Popen(cmd, env=stub_environment(launch.checkpoint), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.launch.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise TritonLaunchError(
                    f"tritonserver exited with code {self.proc.returncode}: {_failure_line(self.log_path)} "
                    f"(full log: {self.log_path})")
            if _ready(self.launch.host, self.launch.http_port):
                return
            time.sleep(0.2)
        self.stop()
        raise TritonLaunchError(
            f"tritonserver not ready after {self.launch.startup_timeout_s:.0f}s: {_failure_line(self.log_path)} "
            f"(full log: {self.log_path})")

    def stop(self, timeout: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The Python backend's stub processes share Triton's process group; a Triton
        # that died hard leaves them orphaned, so the group is swept either way.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode

    def __enter__(self) -> TritonProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(launch: TritonLaunch) -> int:
    """`seekgate triton`: start, report, forward SIGINT/SIGTERM, stop Triton with us."""
    triton = TritonProcess(launch)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with triton:
        print(f"triton ready: http {triton.http_url}, grpc {launch.host}:{launch.grpc_port}, "
              f"metrics {launch.host}:{launch.metrics_port}; log {triton.log_path}", flush=True)
        while not stopping and triton.proc is not None and triton.proc.poll() is None:
            time.sleep(0.2)
        code = triton.proc.poll() if triton.proc else 0
    return 0 if stopping else (code or 1)
