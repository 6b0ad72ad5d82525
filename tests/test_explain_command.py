"""End to end against the real ``twistd -n labelgw`` (static services from a config file, no Docker):
``python -m labelgw explain`` and the admin listener's ``/healthz``, also while labelgw drains on SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from support.net import free_port

from labelgw.cli.explain_command import main


def config(tmp_path: Path, backends: list[int], drain_grace: float = 10.0) -> Path:
    path = tmp_path / "labelgw.yaml"
    listed = ", ".join(f'"127.0.0.1:{port}"' for port in backends)
    path.write_text(
        f"docker: false\ndrain_grace: {drain_grace}\nservices:\n"
        f"  api:\n    hosts: [api.localhost]\n    path: /api\n    strip_prefix: true\n    backends: [{listed}]\n"
    )
    return path


def explain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # From a directory outside the repository: the installed labelgw, as a user runs it.
    return subprocess.run(
        [sys.executable, "-m", "labelgw", "explain", *args], cwd=cwd, capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_explain_prints_the_route_the_costs_and_the_choice_and_counts_nothing(labelgw: Any, tmp_path: Path) -> None:
    gw = labelgw("--config", str(config(tmp_path, [free_port(), free_port()])), docker_host=None)
    assert gw.admin_url is not None
    result = explain("http://api.localhost:8080/api/users?id=7", "--admin", gw.admin_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    print(text)
    assert "route     api.localhost/api -> service api over http, prefix stripped; sent upstream as /users?id=7" in text
    assert "balancer  wrt: cost = latency estimate" in text
    chosen = [line for line in text.splitlines() if line.startswith("  -> ")]
    assert len(chosen) == 1
    # The 30 ms default estimate, decayed (Peak EWMA, to now) over the moment between the dry pick and the read of
    # the costs: 30 when they are read within ~0.2 ms, 29.999 on a loaded machine.
    cost = float(chosen[0].split("cost", 1)[1].split()[0])
    assert 29.99 <= cost <= 30.0, chosen[0]
    # Static backends are named after their service and address.
    assert sum(1 for line in text.splitlines() if line.startswith(("     api[127.0.0.1:", "  -> api[127.0.0.1:"))) == 2
    assert "answer    forwarded to api[127.0.0.1:" in text and "as /users?id=7" in text

    result = explain("api.localhost/api", "--admin", gw.admin_url, "--json", cwd=tmp_path)
    view = json.loads(result.stdout)
    assert view["route"]["service"] == "api" and view["choice"]["address"].startswith("127.0.0.1:")
    # Asking sent nothing and counted nothing.
    _, state = get(gw.admin_url + "/api/state")
    assert [b["requests"] for b in state["services"]["api"]["backends"]] == [0, 0]

    result = explain("http://nowhere.localhost/", "--admin", gw.admin_url, cwd=tmp_path)
    assert result.returncode == 0 and "answer    404: no route for host 'nowhere.localhost'" in result.stdout
    result = explain("ftp://api.localhost/", "--admin", gw.admin_url, cwd=tmp_path)
    assert result.returncode == 2 and "not an http or https URL" in result.stderr


def test_explain_says_when_the_admin_listener_does_not_answer() -> None:
    err = io.StringIO()
    assert main(["http://api.localhost/", "--admin", f"http://127.0.0.1:{free_port()}", "--timeout", "2"], err=err) == 1
    assert "cannot ask the admin listener at http://127.0.0.1:" in err.getvalue()


REPO = Path(__file__).resolve().parent.parent


def dockerfile_healthcheck() -> tuple[list[str], str]:
    """The image's HEALTHCHECK command (exec form) and the URL it checks by default."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    command = json.loads(line.split(" CMD ", 1)[1])
    [default] = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ENV LABELGW_HEALTHZ=")]
    return command, default


def run_healthcheck(url: str) -> int:
    command, _ = dockerfile_healthcheck()
    assert command[0] == "python"
    env = dict(os.environ, LABELGW_HEALTHZ=url)
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_the_image_checks_the_default_admin_listener() -> None:
    command, default = dockerfile_healthcheck()
    assert default == "http://127.0.0.1:8081/healthz"
    assert command[:2] == ["python", "-c"] and "LABELGW_HEALTHZ" in command[2]
    # Nothing listening: unhealthy (exit 1; Docker reserves 2).
    assert run_healthcheck(f"http://127.0.0.1:{free_port()}/healthz") == 1


def test_healthz_is_200_while_serving_and_503_while_draining(labelgw: Any, tmp_path: Path) -> None:
    # A backend that accepts and never answers keeps one request in flight: SIGTERM then waits for it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    gw = labelgw("--config", str(config(tmp_path, [silent.getsockname()[1]], drain_grace=5)), docker_host=None)
    assert get(gw.admin_url + "/healthz") == (200, {"status": "serving"})
    assert run_healthcheck(gw.admin_url + "/healthz") == 0  # the Dockerfile's HEALTHCHECK
    client = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        client.sendall(b"GET /api/x HTTP/1.1\r\nHost: api.localhost\r\n\r\n")
        accepted, _ = silent.accept()  # the request reached the backend
        os.kill(gw.pid, signal.SIGTERM)
        deadline = time.monotonic() + 4
        answers = []
        while time.monotonic() < deadline:
            answers.append(get(gw.admin_url + "/healthz"))
            if answers[-1][0] == 503:
                break
            time.sleep(0.05)
        assert answers[-1] == (503, {"status": "draining"}), answers
        assert run_healthcheck(gw.admin_url + "/healthz") == 1
        assert gw.returncode is None
    finally:
        client.close()
    # The client gone, the drain ends, and so does labelgw (the admin listener last).
    gw.process.wait(10)
    assert gw.returncode in (0, -signal.SIGTERM)  # twistd ends by the signal it got (Twisted >= 22.8)
    accepted.close()
    silent.close()


def test_the_services_middlewares_are_printed() -> None:
    # qa: the terminal explanation left out the middlewares that /explain reports (and that decide the answer).
    import io

    from labelgw.cli.explain_command import render

    view = {
        "url": "http://shop.localhost/", "host": "shop.localhost", "target": "/", "route": None, "version": None,
        "service": {"name": "shop", "balancer": "wrt"}, "cost": "", "backends": [], "not_ready": [],
        "middleware": {"ratelimit": {"keys": 0}, "breaker": {"state": "open"}, "fallback": {"service": "spare", "status": None}},
        "answer": "the circuit breaker is open: diverted to the fallback service 'spare'",
    }
    out = io.StringIO()
    render(view, out)
    assert "chain     ratelimit, breaker open, fallback service spare\n" in out.getvalue()
