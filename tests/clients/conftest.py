"""Starts one `diffctl serve` for the whole client test session.

The server gets an A1111-style `models/` folder built from the repository's tiny fixtures:

    Stable-diffusion/sd1-tiny/                   diffusers folder (the --model)
    Stable-diffusion/sd1-tiny-file.safetensors   the same model as one file
    ControlNet/cn-a/                             diffusers ControlNet for sd1-tiny
    Lora/kohya.safetensors                       kohya LoRA for sd1-tiny

Set DIFFCTL_BIN to the binary (tests/clients/run.sh does); target/debug/diffctl otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
USER, PASSWORD = "user", "pass"
STARTUP_TIMEOUT_S = 120

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Server:
    base_url: str
    auth: tuple
    models_dir: Path
    port: int
    state_dir: Path
    stdout_path: Path
    stderr_path: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def sdapi(self) -> str:
        return self.base_url + "/sdapi/v1"

    def log_tail(self, n_chars: int = 6000) -> str:
        parts = []
        for name, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                if len(text) > n_chars:
                    text = "...\n" + text[-n_chars:]
                parts.append(f"--- diffctl serve {name} ({path}) ---\n{text}")
        status = self.proc.poll()
        parts.append(f"--- server process: {'running' if status is None else f'exited with {status}'} ---")
        return "\n".join(parts)


_SERVER: Server | None = None


def _binary() -> Path:
    env = os.environ.get("DIFFCTL_BIN")
    path = Path(env) if env else REPO / "target" / "debug" / "diffctl"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(
            f"diffctl binary not found at {path} (set DIFFCTL_BIN, or run tests/clients/run.sh, which builds it)",
            returncode=2,
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(src: Path, dst: Path) -> None:
    """Symlinks, as people lay out A1111 models folders; the server must follow them. The
    folder model is then the same path as --model, so it is listed once."""
    assert src.exists(), f"fixture missing: {src}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


def _make_models_dir(root: Path) -> Path:
    models = root / "models"
    _link(FIXTURES / "models" / "sd1-tiny", models / "Stable-diffusion" / "sd1-tiny")
    _link(FIXTURES / "checkpoints" / "sd1-tiny.safetensors", models / "Stable-diffusion" / "sd1-tiny-file.safetensors")
    _link(FIXTURES / "controlnets" / "cn-a", models / "ControlNet" / "cn-a")
    _link(FIXTURES / "lora" / "kohya.safetensors", models / "Lora" / "kohya.safetensors")
    return models


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def diffctl_server(tmp_path_factory):
    global _SERVER
    binary = _binary()
    root = tmp_path_factory.mktemp("diffctl-serve")
    models = _make_models_dir(root)
    state = root / "state"
    port = _free_port()
    cmd = [
        str(binary), "serve",
        "--model", str(FIXTURES / "models" / "sd1-tiny"),
        "--models-dir", str(models),
        "--model-config", str(FIXTURES / "models" / "sd1-tiny"),
        "--port", str(port),
        "--state-dir", str(state),
        "--api-auth", f"{USER}:{PASSWORD}",
    ]
    stdout_path, stderr_path = root / "serve.stdout", root / "serve.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    server = Server(base_url, (USER, PASSWORD), models, port, state, stdout_path, stderr_path, proc)
    _SERVER = server

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer yet"
    ready = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = requests.get(base_url + "/sdapi/v1/sd-models", auth=server.auth, timeout=5)
            if r.status_code == 200:
                ready = True
                break
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    if not ready:
        _stop(proc)
        why = (
            f"exited with status {proc.returncode}"
            if proc.returncode is not None and time.monotonic() < deadline
            else f"did not answer 200 on GET /sdapi/v1/sd-models within {STARTUP_TIMEOUT_S} s (last: {last})"
        )
        pytest.fail(f"diffctl serve {why}\ncommand: {' '.join(cmd)}\n{server.log_tail()}", pytrace=False)

    yield server

    _stop(proc)
    _SERVER = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test, attach the end of the server's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _SERVER is not None:
        report.sections.append(("diffctl serve log (tail)", _SERVER.log_tail(4000)))
        item.session.config._diffctl_failed = True  # type: ignore[attr-defined]


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_diffctl_failed", False) and _SERVER is not None:
        sys.stderr.write("\n" + _SERVER.log_tail(20000) + "\n")


# --- per-client fixtures -------------------------------------------------------------------------


class _TimeoutSession(requests.Session):
    """A requests session whose calls time out instead of hanging the suite."""

    def __init__(self, timeout: float = 120):
        super().__init__()
        self._timeout = timeout

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


@pytest.fixture
def http(diffctl_server):
    """`requests` session with HTTP Basic auth."""
    s = _TimeoutSession()
    s.auth = diffctl_server.auth
    yield s
    s.close()


@pytest.fixture
def webui(diffctl_server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=diffctl_server.port, sampler="Euler a", steps=3)
    api.session = _TimeoutSession()
    api.set_auth(*diffctl_server.auth)
    return api


@pytest.fixture
def sd_models(http, diffctl_server):
    r = http.get(diffctl_server.sdapi + "/sd-models")
    assert r.status_code == 200, f"sd-models: {r.status_code} {r.text[:500]}"
    return r.json()


def _find_model(models, wanted: str) -> dict:
    """The sd-models entry for `wanted` ("sd1-tiny" or "sd1-tiny-file")."""
    for m in models:
        if m.get("model_name") == wanted:
            return m
    for m in models:
        title = m.get("title", "")
        if title == wanted or title.startswith(wanted + " [") or title.startswith(wanted + ".safetensors"):
            return m
    raise AssertionError(f"no model named {wanted!r} in GET /sdapi/v1/sd-models: {models}")


@pytest.fixture
def model_titles(sd_models):
    """(title of the sd1-tiny folder model, title of sd1-tiny-file.safetensors)."""
    return _find_model(sd_models, "sd1-tiny")["title"], _find_model(sd_models, "sd1-tiny-file")["title"]


@pytest.fixture
def restore_model(http, diffctl_server, model_titles):
    """Whatever a test switches to, the server is back on the sd1-tiny folder model afterwards."""
    yield
    r = http.post(diffctl_server.sdapi + "/options", json={"sd_model_checkpoint": model_titles[0]})
    assert r.status_code == 200, f"switching back to {model_titles[0]!r}: {r.status_code} {r.text[:500]}"
