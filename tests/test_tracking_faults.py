"""A tracking server that is down never stalls or kills training (issue 17, item 5). One that refuses connections
or never answers when the run starts is one line and exit code 2 within raysemi's request bounds, before the run
folder holds anything; a real ``mlflow server`` that dies or freezes mid-run costs one warning line, and the run
finishes, checkpointed, with its summary saying where tracking stopped. Every server binds to 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raysemi.cli import main
from raysemi.engine.checkpoint import load_state
from raysemi.tracking.runs import HTTP_DEFAULTS, MlflowCallback
from tests.test_bad_input import TRACKED

#: A bound on a command that must not hang; what the bounds cost is measured by the benchmarks, not here.
HANG_GUARD_S = 60
#: Six iterations, an evaluation at 2, 4 and 6: the server goes away right after the first one is logged.
MID_RUN = ["--iters", "6", "--set", "train.eval_every=2", "--set", "train.log_every=1"]
STOP_AT = 2


@pytest.fixture(autouse=True)
def mlflow_http_settings_unset() -> Iterator[None]:
    """raysemi writes its HTTP defaults into os.environ: each test starts without them (so the defaults are what
    it sees) and leaves the environment as it found it."""
    saved = {name: os.environ.pop(name, None) for name in HTTP_DEFAULTS}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], float]:
    """``raysemi train argv``: its exit code, its stderr lines that are not progress lines, its wall time."""
    started = time.monotonic()
    code = main([*TRACKED, *argv])
    elapsed = time.monotonic() - started
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("iteration ")]
    return code, lines, elapsed


def test_a_server_that_refuses_connections_stops_the_run_before_it_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    code, lines, elapsed = _train(["--tracking-uri", uri, "--out", str(tmp_path / "run")], capsys)
    assert code == 2, lines
    assert len(lines) == 1 and uri in lines[0] and "Connection refused" in lines[0], lines
    assert not (tmp_path / "run" / "config.yaml").exists()  # the same command runs once the server is up
    assert elapsed < HANG_GUARD_S


def test_a_server_that_never_answers_stops_the_run_within_the_request_bounds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(0.2)  # lets the thread see ``done``
    held: list[socket.socket] = []
    done = threading.Event()

    def accept_and_keep_quiet() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(silent.accept()[0])

    quiet = threading.Thread(target=accept_and_keep_quiet, daemon=True)
    quiet.start()
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        code, lines, elapsed = _train(["--tracking-uri", uri, "--out", str(tmp_path / "run")], capsys)
    finally:
        done.set()
        quiet.join()
        for connection in [silent, *held]:
            connection.close()
    assert code == 2, lines
    timeout = HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert len(lines) == 1 and uri in lines[0] and f"no answer within {timeout} s" in lines[0], lines
    assert len(held) == 1 + int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])  # one request and its retry
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert elapsed < HANG_GUARD_S


class MlflowServer:
    """A real ``mlflow server`` on a sqlite store, started on first use and again after a test killed it (starting
    one takes most of these tests' time, so the tests share it). MLflow's job runner is off: it would start seven
    more processes that these tests never use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = f"sqlite:///{folder / 'mlruns.db'}"
        self.process: subprocess.Popen[bytes] | None = None
        self.uri = ""

    def up(self) -> str:
        if self.process is not None and self.process.poll() is None:
            return self.uri
        port = _free_port()
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", self.store, "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        self.uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self.uri
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    pytest.fail("mlflow server did not come up")
                time.sleep(0.25)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.kill()


def _after_first_eval(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` once the run's first evaluation has reached the server, inside the real training command."""
    logged = MlflowCallback.on_eval

    def on_eval(self: MlflowCallback, iteration: int, metrics: dict) -> None:
        logged(self, iteration, metrics)
        if iteration == STOP_AT:
            action()

    monkeypatch.setattr(MlflowCallback, "on_eval", on_eval)


def _assert_finished_untracked(out: Path, code: int, lines: list[str], uri: str, reason: str) -> dict:
    stopped = f"stopped at iteration {STOP_AT + 1}: {uri}: {reason}"
    assert code == 0, lines
    assert lines == [f"raysemi train: warning: MLflow tracking {stopped}; the run continues untracked"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow_tracking"] == stopped
    assert summary["iterations"] == 6 and len(summary["eval_history"]) == 3
    assert load_state(out / "checkpoints" / "last.pt")["iteration"] == 6
    return summary


def _assert_logged_until_the_failure(client: MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # not marked FINISHED: it holds only what was logged before the failure
    steps = {m.step for m in client.get_metric_history(run_id, "loss/sup")}
    # a frozen server still handles the request it timed out on once it thaws
    assert set(range(1, STOP_AT + 1)) <= steps <= set(range(1, STOP_AT + 2))
    assert [m.step for m in client.get_metric_history(run_id, "val/miou")] == [STOP_AT]


@pytest.mark.slow
def test_a_server_that_freezes_mid_run_costs_one_bounded_wait_and_a_warning(
        mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP: the kernel still accepts connections for the frozen server, nothing answers them. A timeout set in
    the environment wins over raysemi's default."""
    uri = mlflow_server.up()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    _after_first_eval(monkeypatch, lambda: mlflow_server.signal(signal.SIGSTOP))
    out = tmp_path / "run"
    try:
        code, lines, elapsed = _train([*MID_RUN, "--tracking-uri", uri, "--out", str(out)], capsys)
    finally:
        mlflow_server.signal(signal.SIGCONT)
    summary = _assert_finished_untracked(out, code, lines, uri, "no answer within 2 s (MLFLOW_HTTP_REQUEST_TIMEOUT)")
    assert elapsed < HANG_GUARD_S
    _assert_logged_until_the_failure(MlflowClient(uri), summary["mlflow_run_id"])


@pytest.mark.slow
def test_a_server_that_dies_mid_run_costs_a_warning_and_nothing_else(
        mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = mlflow_server.up()
    _after_first_eval(monkeypatch, mlflow_server.kill)
    out = tmp_path / "run"
    code, lines, elapsed = _train([*MID_RUN, "--tracking-uri", uri, "--out", str(out)], capsys)
    summary = _assert_finished_untracked(out, code, lines, uri, "Connection refused")
    assert elapsed < HANG_GUARD_S
    _assert_logged_until_the_failure(MlflowClient(mlflow_server.store), summary["mlflow_run_id"])
