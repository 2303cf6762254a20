"""``--notify-webhook``: a real HTTP server on loopback receives the JSON POST when a tiny training run
ends (done, error, cancelled); retries, an unreachable receiver and bad URLs; the CLI's flag."""

from __future__ import annotations

import base64
import json
import logging
import queue
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lorapg.cli import main as cli_main
from lorapg.config import Settings, load_settings
from lorapg.diffusion.engine import DiffusionEngine
from lorapg.diffusion.lora_library import LoraLibrary
from lorapg.errors import UserError
from lorapg.jobs import CANCELLED, DONE, ERROR, JobQueue
from lorapg.notifications import WebhookNotifier, check_webhook_url, url_host
from lorapg.services.build import build_services
from lorapg.services.training import TrainingService
from tests import process_factory
from tests.app_server import ROOT
from tests.training_data import write_images

FAST = dict(rank=4, alpha=4, epochs=1, sample_steps=0, gradient_checkpointing=False, batch_size=3)
WAIT = 120  # seconds: a bound for a hang, never a measurement
SECRET = "tok3n-s3cret"


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST (and its headers, in ``headers``) and each GET
    (body None), answers with scripted status codes (200 once the script runs out; a 3xx points at
    ``location``) and, while ``hold`` is clear, keeps the request waiting."""

    def __init__(self, codes: tuple[int, ...] = ()):
        self.codes = list(codes)
        self.requests: queue.Queue[tuple[str, dict | None]] = queue.Queue()
        self.headers: list[dict[str, str]] = []
        self.location = ""
        self.hold = threading.Event()
        self.hold.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.record(json.loads(body))

            def do_GET(self) -> None:  # what a followed redirect would send
                self.record(None)

            def record(self, body: dict | None) -> None:
                receiver.headers.append(dict(self.headers))
                receiver.requests.put((self.path, body))
                assert receiver.hold.wait(WAIT)
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # the test reads self.requests, not stderr
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{SECRET}?key={SECRET}"

    def next(self) -> tuple[str, dict]:
        return self.requests.get(timeout=WAIT)

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture()
def trainer_for(tiny_models, tmp_path):
    """A TrainingService on the tiny SD model whose runs notify the given notifier; a dataset "foxes"."""
    settings = Settings(
        model=str(tiny_models["sd15"]),
        lora_dir=tmp_path / "loras",
        models_dir=tmp_path / "models",
        outputs=tmp_path / "outputs",
        device="cpu",
    )
    jobs = JobQueue()
    source = tmp_path / "upload"
    write_images(source, 3)

    def make(notifier: WebhookNotifier) -> TrainingService:
        engine = DiffusionEngine(LoraLibrary(settings.lora_dir), torch.device("cpu"), torch.float32)
        training = TrainingService(settings, jobs, engine, notifier=notifier)
        training.dataset_add("foxes", sorted(source.iterdir()))
        return training

    yield make
    jobs.close(WAIT)


def fast_notifier(url: str) -> WebhookNotifier:
    return WebhookNotifier(url, timeout=WAIT, backoff=0.01)


def config(training: TrainingService, **changes):
    return training.config_for(
        {"name": "fox", "trigger": "zqx_fox", "images": str(training.dataset_folder("foxes")), **FAST, **changes}
    )


def test_a_finished_run_posts_its_outcome(trainer_for, receiver):
    training = trainer_for(fast_notifier(receiver.url))
    run = training.submit(config(training))
    path, payload = receiver.next()
    assert run.job.status == DONE, run.job.error
    assert path == f"/hooks/{SECRET}?key={SECRET}"
    assert payload["event"] == "training.finished" and payload["run"] == "fox" and payload["job_id"] == run.job.id
    assert payload["status"] == "done" and payload["error"] is None
    assert Path(payload["lora_path"]) == run.result.lora_path and run.result.lora_path.is_file()
    assert payload["duration_seconds"] > 0
    assert payload["final_loss"] == pytest.approx(run.losses[-1][1])


def test_a_failed_run_posts_the_error(trainer_for, receiver, tmp_path):
    training = trainer_for(fast_notifier(receiver.url))
    (tmp_path / "no_model").mkdir()
    run = training.submit(config(training, model=str(tmp_path / "no_model")))
    _, payload = receiver.next()
    assert run.job.status == ERROR
    assert payload["status"] == "error" and payload["error"] == run.job.error and payload["error"]
    assert payload["lora_path"] is None and payload["run"] == "fox"


def test_a_cancelled_run_posts_cancelled(trainer_for, receiver):
    training = trainer_for(fast_notifier(receiver.url))
    slow = config(training, epochs=50)
    run = training.submit(slow, on_progress=lambda p: training.cancel(run.job.id) if p.step == 1 else None)
    _, payload = receiver.next()
    assert run.job.status == CANCELLED and run.result.cancelled
    assert payload["status"] == "cancelled" and payload["lora_path"] is None and payload["error"] is None
    assert payload["final_loss"] == pytest.approx(run.losses[-1][1])


def test_a_run_cancelled_while_queued_is_notified_too(trainer_for, receiver):
    training = trainer_for(fast_notifier(receiver.url))
    gate = threading.Event()
    blocker = training.jobs.submit("hold", lambda job: gate.wait(WAIT))
    run = training.submit(config(training))
    training.cancel(run.job.id)
    gate.set()
    _, payload = receiver.next()
    assert blocker.wait(WAIT) and run.job.status == CANCELLED
    assert payload["status"] == "cancelled" and payload["duration_seconds"] is None and payload["final_loss"] is None


def test_a_held_webhook_blocks_neither_the_run_nor_the_queue(trainer_for, receiver):
    receiver.hold.clear()  # the receiver takes the POST and does not answer until released
    training = trainer_for(fast_notifier(receiver.url))
    run = training.submit(config(training))
    receiver.next()  # the run has ended and its notification is in flight, unanswered
    after = training.jobs.submit("next", lambda job: "ran")
    assert after.wait(WAIT) and after.result == "ran"  # the queue moved on while the webhook hangs
    assert run.job.status == DONE and run.result.lora_path.is_file()
    receiver.hold.set()
    assert training.close_notifications(WAIT)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_webhook_logs_one_warning_without_the_url(trainer_for, caplog):
    port = closed_port()
    url = f"http://user:{SECRET}@127.0.0.1:{port}/hooks/{SECRET}?key={SECRET}"
    training = trainer_for(fast_notifier(url))
    caplog.set_level(logging.DEBUG, logger="lorapg")
    run = training.submit(config(training))
    assert run.job.wait(WAIT) and run.job.status == DONE and run.result.lora_path.is_file()
    assert training.close_notifications(WAIT)
    warnings = [r for r in caplog.records if r.name == "lorapg.notifications" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"127.0.0.1:{port}" in warnings[0].getMessage() and "fox" in warnings[0].getMessage()
    assert SECRET not in caplog.text and "/hooks" not in caplog.text
    tries = [r for r in caplog.records if r.name == "lorapg.notifications" and "try" in r.getMessage()]
    assert len(tries) == 3  # it was retried before giving up


def test_retries_until_the_receiver_accepts(caplog):
    server = Receiver(codes=(500, 500, 200))
    try:
        notifier = fast_notifier(server.url)
        notifier.send({"event": "training.finished", "run": "fox"})
        assert notifier.close(WAIT)
        bodies = [server.next()[1] for _ in range(3)]
        assert bodies == [{"event": "training.finished", "run": "fox"}] * 3
        assert server.requests.empty()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        server.close()


def test_a_client_error_is_not_retried(caplog):
    server = Receiver(codes=(404, 200))
    try:
        notifier = fast_notifier(server.url)
        notifier.send({"event": "training.finished", "run": "fox"})
        assert notifier.close(WAIT)
        server.next()
        assert server.requests.empty()  # the 200 that a retry would have got was never asked for
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "HTTP 404" in warnings[0] and SECRET not in warnings[0]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/hook", "must be an http:// or https:// URL; it has ftp://"),
        ("file:///etc/passwd", "it has file://"),
        ("javascript:alert(1)", "must be an http"),
        ("example.com/hook", "no scheme"),
        ("https://", "has no host"),
        ("http://example.com:port/hook", "not a valid URL"),
        ("http://[::1/hook", "not a valid URL"),
    ],
)
def test_bad_urls_are_refused_naming_the_setting(url, message):
    with pytest.raises(UserError, match=message) as refused:
        check_webhook_url(url)
    assert "notify_webhook (--notify-webhook" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        f"https://h/ho ok?token={SECRET}",
        f"https://h/hook?token={SECRET}\tx",
        f"https://h/hook\r\nX-Injected: 1?token={SECRET}",
        f"https://h/hook\x00?token={SECRET}",
        f"https://h/hook\x7f?token={SECRET}",
        f"https://h/ho\u00a0ok?token={SECRET}",
        f"https://h/ho\x85ok?token={SECRET}",
    ],
)
def test_spaces_and_control_characters_are_refused_without_echoing_the_url(url):
    with pytest.raises(UserError, match="contains a space or control character; percent-encode it") as refused:
        check_webhook_url(url)
    message = str(refused.value)
    assert "notify_webhook (--notify-webhook" in message and SECRET not in message and "\n" not in message


def test_a_url_that_http_client_refuses_never_reaches_the_logs(caplog):
    """Past the start-up check (set afterwards, as a URL that slipped through would be): http.client's
    InvalidURL repeats the URL in its message; each try must catch it and log its type only."""
    caplog.set_level(logging.DEBUG, logger="lorapg")
    notifier = fast_notifier(f"http://127.0.0.1:{closed_port()}/hook")
    notifier.url = f"http://127.0.0.1:{closed_port()}/ho ok?token={SECRET}"
    notifier.send({"event": "training.finished", "run": "fox"})
    assert notifier.close(WAIT)
    assert SECRET not in caplog.text and "ho ok" not in caplog.text
    tries = [r.getMessage() for r in caplog.records if "try" in r.getMessage()]
    assert len(tries) == 3 and all("InvalidURL" in message for message in tries), tries
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "InvalidURL" in warnings[0] and "fox" in warnings[0]


class GarbageReceiver:
    """Reads each request and answers with a line that is not HTTP: http.client raises BadStatusLine."""

    def __init__(self):
        self.connections: queue.Queue[bytes] = queue.Queue()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks/{SECRET}?key={SECRET}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by the test
                return
            with conn:
                self.connections.put(conn.recv(65536))
                conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")


def test_an_http_client_error_is_caught_per_try_and_retried(caplog):
    caplog.set_level(logging.DEBUG, logger="lorapg")
    server = GarbageReceiver()
    try:
        notifier = fast_notifier(server.url)
        notifier.send({"event": "training.finished", "run": "fox"})
        assert notifier.close(WAIT)
        assert server.connections.qsize() == 3  # every try was made, none stopped the others
    finally:
        server.sock.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "BadStatusLine" in warnings[0].getMessage() and not warnings[0].exc_info
    assert SECRET not in caplog.text


def test_user_info_is_sent_as_basic_auth_and_never_logged(receiver, caplog):
    caplog.set_level(logging.DEBUG, logger="lorapg")
    url = receiver.url.replace("http://", f"http://bot%40ci:{SECRET}@")  # the user "bot@ci", percent-encoded
    notifier = fast_notifier(url)
    notifier.send({"event": "training.finished", "run": "fox"})
    assert notifier.close(WAIT)
    path, payload = receiver.requests.get_nowait()  # delivered before close returned
    assert path == f"/hooks/{SECRET}?key={SECRET}" and payload["run"] == "fox"
    assert receiver.headers[0]["Authorization"] == "Basic " + base64.b64encode(f"bot@ci:{SECRET}".encode()).decode()
    assert SECRET not in caplog.text and "bot" not in caplog.text
    assert any("sent to 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_redirect_is_not_followed_so_credentials_stay_with_their_host(caplog):
    server, elsewhere = Receiver(codes=(302,)), Receiver()
    server.location = elsewhere.url
    try:
        notifier = fast_notifier(server.url.replace("http://", f"http://bot:{SECRET}@"))
        notifier.send({"event": "training.finished", "run": "fox"})
        assert notifier.close(WAIT)
        server.requests.get_nowait()  # delivered before close returned
        assert elsewhere.requests.empty() and server.requests.empty()  # not followed, not retried
    finally:
        server.close()
        elsewhere.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HTTP 302" in warnings[0] and "redirects are not followed" in warnings[0]
    assert SECRET not in caplog.text


def test_a_bad_url_stops_start_up_before_any_model_loads(tmp_path):
    settings = Settings(outputs=tmp_path, notify_webhook=f"ftp://{SECRET}@example.com/x")
    with pytest.raises(UserError, match="notify_webhook") as refused:
        build_services(settings)
    assert SECRET not in str(refused.value)


def test_the_app_refuses_a_bad_url_at_start_up(tmp_path):
    env = process_factory.test_env(LORAPG_NOTIFY_WEBHOOK=f"gopher://{SECRET}@example.com/x")
    args = [str(ROOT / "app.py"), "--outputs", str(tmp_path), "--models-dir", str(tmp_path)]
    done = process_factory.run(args, cwd=ROOT, env=env, timeout=WAIT)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notify_webhook" in errors[0] and "gopher://" in errors[0], done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_the_setting_comes_from_toml_and_env(tmp_path):
    toml = tmp_path / "settings.toml"
    toml.write_text('notify_webhook = "https://example.com/from-toml"\n')
    assert load_settings(toml, environ={}).notify_webhook == "https://example.com/from-toml"
    env = {"LORAPG_NOTIFY_WEBHOOK": "https://example.com/from-env"}
    assert load_settings(toml, environ=env).notify_webhook == "https://example.com/from-env"
    assert Settings().notify_webhook == ""


def test_logs_name_the_host_only():
    assert url_host(f"https://me:{SECRET}@hooks.example.com:8443/x/{SECRET}?t={SECRET}") == "hooks.example.com:8443"
    assert url_host("http://[::1]:9000/x") == "[::1]:9000"


def test_cli_train_flag_posts_before_the_command_returns(tiny_models, tmp_path, receiver):
    images = tmp_path / "imgs"
    write_images(images, 3)
    args = ["train", "--model", str(tiny_models["sd15"]), "--images", str(images), "--trigger", "zqx"]
    args += ["--name", "cli_lora", "--epochs", "1", "--rank", "4", "--out", str(tmp_path / "loras")]
    args += ["--device", "cpu", "--threads", "1", "--notify-webhook", receiver.url]
    args += ["--models-dir", str(tmp_path / "models")]  # the run history goes there, not into the checkout
    run_config = tmp_path / "run.toml"
    run_config.write_text(
        f'sample_steps = 0\ngradient_checkpointing = false\nbatch_size = 3\nwork_dir = "{tmp_path / "work"}"\n'
    )
    assert cli_main([args[0], str(run_config), *args[1:]]) == 0
    # Delivered before main returned: the CLI waits for its notification (a daemon thread would be lost).
    _, payload = receiver.requests.get_nowait()
    assert payload["run"] == "cli_lora" and payload["status"] == "done"
    assert Path(payload["lora_path"]).resolve() == (tmp_path / "loras" / "cli_lora.safetensors").resolve()
