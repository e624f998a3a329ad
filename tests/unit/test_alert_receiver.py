"""The test webhook receiver (`recloop alerts listen`, `recloop.alerts.WebhookReceiver`) over real
sockets: malformed requests get 400 and the receiver keeps working; `recloop alerts listen` never prints
the webhook secret."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from standardwebhooks import Webhook

from recloop.alerts import WebhookReceiver, new_secret

REPO = Path(__file__).resolve().parents[2]


def raw_request(url: str, head: str, body: bytes = b"", *, shutdown_write: bool = False) -> bytes:
    """Sends `head` (request line and headers, without the blank line) and `body` over a plain socket and
    returns everything the server answers before closing."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer, "the receiver closed the connection without answering"
    return int(answer.split(b" ", 2)[1])


def signed(secret: str, body: str, event_id: str = "evt_test") -> dict[str, str]:
    from datetime import UTC, datetime

    sent_at = datetime.now(UTC).replace(microsecond=0)
    return {"webhook-id": event_id, "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Webhook(secret).sign(event_id, sent_at, body), "content-type": "application/json"}


def post_head(headers: dict[str, str]) -> str:
    return "\r\n".join(["POST /webhooks/recloop HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())])


@pytest.fixture()
def receiver():
    secret = new_secret()
    with WebhookReceiver(secret) as r:
        r.secret = secret
        yield r


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "", None])
def test_a_bad_or_missing_content_length_is_400(receiver, length):
    headers = {} if length is None else {"Content-Length": length}
    answer = raw_request(receiver.url, post_head(headers), b"{}", shutdown_write=True)
    assert status_of(answer) == 400 and b"Content-Length" in answer
    assert receiver.malformed == 1 and receiver.events == []


def test_an_oversized_body_is_400_without_reading_it(receiver):
    answer = raw_request(receiver.url, post_head({"Content-Length": str(WebhookReceiver.MAX_BODY + 1)}), b"x" * 10,
                         shutdown_write=True)
    assert status_of(answer) == 400 and b"larger than" in answer


def test_a_stalled_body_is_400_after_the_timeout():
    with WebhookReceiver(new_secret(), timeout=0.5) as receiver:
        t0 = time.perf_counter()
        answer = raw_request(receiver.url, post_head({"Content-Length": "100"}), b"{}")  # and then nothing
        assert status_of(answer) == 400 and b"did not arrive" in answer
        assert time.perf_counter() - t0 < 10


def test_a_body_shorter_than_announced_is_400(receiver):
    answer = raw_request(receiver.url, post_head({"Content-Length": "100"}), b"{}", shutdown_write=True)
    assert status_of(answer) == 400 and b"shorter" in answer


@pytest.mark.parametrize("body", ["not json", "[1, 2]", "\udcff"])
def test_a_signed_body_that_is_not_a_json_object_is_400(receiver, body):
    raw = body.encode("utf-8", "surrogateescape")
    text = raw.decode("utf-8", "replace")
    headers = signed(receiver.secret, text)
    answer = raw_request(receiver.url, post_head({**headers, "Content-Length": str(len(raw))}), raw)
    assert status_of(answer) in (400, 401)  # a body that is not UTF-8 cannot carry a valid signature
    assert receiver.events == []


def test_after_malformed_requests_a_real_delivery_still_arrives(receiver):
    for length in ("abc", "-1"):
        raw_request(receiver.url, post_head({"Content-Length": length}), shutdown_write=True)
    body = json.dumps({"type": "model.promoted", "text": "version 1 is champion"})
    answer = httpx.post(receiver.url, content=body, headers=signed(receiver.secret, body, "evt_ok"))
    assert answer.status_code == 204
    assert [e["id"] for e in receiver.events] == ["evt_ok"] and receiver.malformed == 2


def test_a_forged_delivery_is_still_401(receiver):
    body = json.dumps({"type": "model.promoted"})
    headers = signed(new_secret(), body)
    assert httpx.post(receiver.url, content=body, headers=headers).status_code == 401
    assert receiver.rejected == 1


def test_listen_never_prints_the_secret(tmp_path):
    """`recloop alerts listen` writes a new secret to a file only the user can read and prints how to use
    it; a malformed request is answered 400 and the receiver keeps listening."""
    env = {**os.environ, "RECLOOP_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("RECLOOP_ALERT_WEBHOOK_SECRET", None)
    env.pop("RECLOOP_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "recloop.cli", "alerts", "listen", "--port", "0", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(3)]
        assert lines[0].startswith("listening on http://127.0.0.1:"), lines
        url = lines[0].split()[2].rstrip(";")
        secret_file = tmp_path / "home" / "alerts" / "listen-secret"
        secret = secret_file.read_text().strip()
        assert secret.startswith("whsec_")
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert f"export RECLOOP_ALERT_WEBHOOK_SECRET=$(cat {secret_file})" in lines[2]
        assert status_of(raw_request(url, post_head({"Content-Length": "abc"}), shutdown_write=True)) == 400
        body = json.dumps({"type": "model.promoted", "text": "version 1 is champion"})
        assert httpx.post(url, content=body, headers=signed(secret, body, "evt_listen")).status_code == 204
        shown = json.loads(proc.stdout.readline())
        assert shown["id"] == "evt_listen"
        assert proc.poll() is None  # still listening
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    printed = "".join(lines) + out + err
    assert secret not in printed and secret.removeprefix("whsec_") not in printed
    assert "Traceback" not in printed


def test_listen_with_the_secret_in_the_environment_does_not_echo_it(tmp_path):
    secret = new_secret()
    env = {**os.environ, "RECLOOP_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "RECLOOP_ALERT_WEBHOOK_SECRET": secret}
    proc = subprocess.Popen([sys.executable, "-m", "recloop.cli", "alerts", "listen", "--port", "0", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(3)]
        time.sleep(0.2)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    printed = "".join(lines) + out + err
    assert lines[0].startswith("listening on") and "RECLOOP_ALERT_WEBHOOK_SECRET" in lines[2]
    assert secret not in printed and secret.removeprefix("whsec_") not in printed
