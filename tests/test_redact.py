"""No credential leaves the process: one redaction, checked against a table of URI shapes, used
by the banner, the UI command, the store's errors and `fbft predict`; basic-auth servers work."""

from __future__ import annotations

import base64
import http.server
import threading
from typing import ClassVar

import pytest

from fbft.core.redact import redact
from fbft.study import tracking

SECRETS = ("pa/ss", "p@ss", "s3cr3t", "p%40ss%2Fx", "AKIAEXAMPLE", "deadbeef", "tok123")

# (uri, what must be left of it)
TABLE = [
    ("postgresql://bob:pa/ss@db.example:5432/mlflow", "postgresql://***@db.example:5432/mlflow"),
    ("postgresql+psycopg2://bob:p@ss@db/mlflow", "postgresql+psycopg2://***@db/mlflow"),
    ("mysql://bob:p%40ss%2Fx@db:3306/m?charset=utf8", "mysql://***@db:3306/m?charset=utf8"),
    ("http://alice:s3cr3t@mlflow.local:5000", "http://***@mlflow.local:5000"),
    ("https://tok123@mlflow.local/", "https://***@mlflow.local/"),
    ("https://alice:pa/ss?x@host/path", "https://***@host/path"),
    ("https://h/api?api_key=s3cr3t&x=1", "https://h/api?api_key=***&x=1"),
    ("https://h/api?token=tok123", "https://h/api?token=***"),
    ("https://h/api?access_token=tok123#frag", "https://h/api?access_token=***#frag"),
    ("https://h/api?auth=s3cr3t", "https://h/api?auth=***"),
    ("https://h/api?password=pa/ss&user=bob", "https://h/api?password=***&user=bob"),
    ("https://h/api?Password=p@ss", "https://h/api?Password=***"),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAEXAMPLE%2F2024"
        "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok123",
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=***&X-Amz-Credential=***"
        "&X-Amz-Signature=***&X-Amz-Security-Token=***",
    ),
    ("https://h/cb#access_token=tok123&state=1", "https://h/cb#access_token=***&state=1"),
    ("https://h/login?next=https://bob:s3cr3t@other/", "https://h/login?next=https://***@other/"),
    ("sqlite:////home/bob/mlflow.db", "sqlite:////home/bob/mlflow.db"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("s3://bucket/runs/v@2", "s3://bucket/runs/v@2"),
    ("http://mlflow.local:5000/#/experiments/1", "http://mlflow.local:5000/#/experiments/1"),
]


@pytest.mark.parametrize(("uri", "shown"), TABLE)
def test_every_uri_shape_is_redacted_alone_and_inside_text(uri, shown):
    assert redact(uri) == shown
    message = f"OperationalError: could not connect to '{uri}' (host down)\nretry {uri}."
    assert redact(message) == f"OperationalError: could not connect to '{shown}' (host down)\n" + (
        f"retry {shown}."
    )
    assert not any(s in redact(message) for s in SECRETS if s not in shown)
    assert redact(shown) == shown  # idempotent
    assert tracking.redact is redact  # one function, wherever the study imports it from


def test_the_ui_command_never_prints_a_database_password():
    uri = "postgresql://bob:pa/ss@db/mlflow"
    assert tracking.ui_command(uri) == "mlflow ui --backend-store-uri postgresql://***@db/mlflow"
    assert "s3cr3t" not in tracking.ui_command("http://alice:s3cr3t@host:5000")
    sqlite = "sqlite:////tmp/x/mlflow.db"
    assert tracking.ui_command(sqlite).startswith(f"mlflow ui --backend-store-uri {sqlite} ")


def test_an_unusable_store_error_names_it_without_the_password(tmp_path):
    with pytest.raises(tracking.TrackingError) as err:
        tracking.prepare_store("postgresql://bob:pa/ss@127.0.0.1:9/mlflow")
    assert "pa/ss" not in str(err.value) and "postgresql://***@127.0.0.1:9/mlflow" in str(err.value)
    with pytest.raises(tracking.TrackingError) as err:
        tracking.prepare_store("http://alice:s3cr3t@127.0.0.1:9")  # nothing listens on port 9
    assert "does not answer" in str(err.value) and "s3cr3t" not in str(err.value)


class _BasicAuthHealth(http.server.BaseHTTPRequestHandler):
    """/health answers 200 only with alice's credentials, as a server behind basic auth."""

    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        header = self.headers.get("Authorization")
        type(self).seen.append(header)
        good = "Basic " + base64.b64encode(b"alice:p@ss/word").decode()
        self.send_response(200 if self.path == "/health" and header == good else 401)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


def test_a_basic_auth_server_uri_is_accepted_and_its_credentials_are_sent():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        client = tracking.prepare_store(f"http://alice:p%40ss%2Fword@127.0.0.1:{port}")
        assert client is not None
        assert _BasicAuthHealth.seen[-1] == "Basic " + base64.b64encode(b"alice:p@ss/word").decode()
    finally:
        server.shutdown()
        server.server_close()
