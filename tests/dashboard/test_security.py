"""What the dashboard refuses: traversal (plain and encoded, on a real socket), foreign Host headers,
requests without the token off loopback, and serving off loopback without TLS."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.runs import DashboardError, RunIndex
from dashboard.server import LOOPBACK_HOSTS, prepare, start_dashboard
from fedsite.cli import main
from tests.dashboard.helpers import make_run

SECRET = "TOPSECRET-not-a-results-file"


def raw_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send the request line exactly as written (no client-side normalisation of `..`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.fixture()
def served(tmp_path: Path):
    (tmp_path / "secret.txt").write_text(SECRET)
    root = tmp_path / "results"
    make_run(root / "run")
    (root / "run" / "secret.txt").write_text(SECRET)  # in a run folder, but not a results file
    board = start_dashboard([root], "127.0.0.1:0")
    yield board, tmp_path
    board.stop()


def test_traversal_is_refused_in_every_spelling(served) -> None:
    board, tmp_path = served
    port = urlsplit(board.url).port
    secret = str(tmp_path / "secret.txt")
    targets = [
        "/../secret.txt", "/../../secret.txt", "/static/../../secret.txt", "/static/..%2f..%2fsecret.txt", "/%2e%2e/secret.txt",
        "/%2E%2E/%2E%2E/etc/passwd", "/.%2e/secret.txt", "/static/%2e%2e%2fapp.py", "/api/runs/..%2F..%2Fsecret.txt",
        "/api/runs/%2Fetc%2Fpasswd", "//etc/passwd", "/static//etc/passwd", "/static/..\\..\\secret.txt", "/static/%5c..%5csecret.txt",
        "/static/app.js%00.png", secret, f"/static{secret}", f"/api/runs/{secret}", f"/api/runs/{secret}/config", "/etc/passwd",
        "/api/runs/run/secret.txt", "/static/dashboard.py", "/static/../app.py", "/run/metrics.jsonl",
    ]  # fmt: skip
    for target in targets:
        status, data = raw_get(port, target)
        assert status in (400, 404), target
        assert SECRET.encode() not in data and b"root:" not in data, target
    assert raw_get(port, "/../")[0] == 400
    assert raw_get(port, "/api/runs")[0] == 200  # the server still answers


def test_host_header_must_name_loopback_on_loopback(served) -> None:
    board, _ = served
    port = urlsplit(board.url).port
    assert raw_get(port, "/api/runs", host=f"localhost:{port}")[0] == 200
    assert raw_get(port, "/api/runs", host=f"[::1]:{port}")[0] == 200
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):  # DNS rebinding
        assert raw_get(port, "/api/runs", host=host)[0] == 400


def test_the_token_is_required_and_compared_exactly(tmp_path: Path) -> None:
    token = "s3cret-token-value"
    client = TestClient(create_app(RunIndex([make_run(tmp_path / "run")]), token=token), base_url="https://dash.example")
    for path in ("/", "/api/runs", "/static/app.js", "/static/plotly.min.js"):
        assert client.get(path).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {token[:-1]}"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get(f"/api/runs?token={token}").status_code == 401  # the query is only for the first page load
    first = client.get(f"/?token={token}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/" and token not in first.headers["location"]
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "secure" in cookie and "samesite=strict" in cookie
    assert client.get("/api/runs").status_code == 200  # the cookie now carries it
    client.cookies.clear()
    client.cookies.set("fedsite_dashboard", "wrong")
    assert client.get("/api/runs").status_code == 401


def test_off_loopback_needs_tls_and_then_a_token(tmp_path: Path, capsys) -> None:
    folder = make_run(tmp_path / "run")
    with pytest.raises(DashboardError, match="off loopback: it needs TLS"):
        prepare([folder], "0.0.0.0:0", None)
    assert main(["dashboard", str(folder), "--address", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsite: error: dashboard on '0.0.0.0:0' is off loopback") and "\n" not in err
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    from coordinator.certs import write_service_files

    write_service_files(tmp_path / "certs", [], 1, 0, False)
    board = start_dashboard([folder], "0.0.0.0:0", tmp_path / "certs")
    try:
        assert board.token and board.url.startswith("https://") and board.url.endswith(f"/?token={board.token}")
        port = urlsplit(board.url).port
        verify = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        with httpx.Client(verify=verify, base_url=f"https://127.0.0.1:{port}") as https:
            assert https.get("/api/runs").status_code == 401
            assert https.get("/api/runs", headers={"Authorization": f"Bearer {board.token}"}).json()["runs"][0]["name"] == "run"
            assert https.get(f"/?token={board.token}", follow_redirects=True).status_code == 200  # redirected to the page, cookie set
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=5)  # no plain HTTP on the TLS port
    finally:
        board.stop()


def test_loopback_hosts_and_bad_addresses() -> None:
    assert {"127.0.0.1", "localhost", "::1"} <= LOOPBACK_HOSTS
    for address in ("nonsense", "127.0.0.1:", "127.0.0.1:99999", ":8050"):
        with pytest.raises(DashboardError, match="HOST:PORT"):
            prepare([], address, None)
