"""``BLOCKVAULT_ENVIRONMENT=production``: each unsafe setting refused, one line naming it; the
processes (api, worker, beat, storage-server) exit 2 on them before doing anything; a safe
production configuration starts; development starts on anything."""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.production import MIN_KEY_CHARS, Process, unsafe_settings
from shared.settings_model import Settings
from tests.conftest import Cli
from tests.storage_server_fixtures import free_port, make_self_signed

SAFE: dict[str, Any] = {
    "environment": "production",
    "database_url": "postgresql+psycopg2://blockvault@db.example/blockvault",
    "broker_url": "redis://redis.example:6379/0",
    "secret_key": secrets.token_hex(32),
    "admin_api_key": secrets.token_hex(32),
}
LONG = secrets.token_hex(24)  # 48 characters: long enough for a storage-server token


@pytest.fixture(autouse=True)
def no_settings_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BLOCKVAULT_", "AWS_")):
            monkeypatch.delenv(name)


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **{**SAFE, **overrides})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("process", "overrides", "refusal"),
    [
        ("api", {"database_url": None}, "BLOCKVAULT_DATABASE_URL: the embedded SQLite catalog is for development"),
        ("worker", {"database_url": "sqlite:////srv/catalog.db"}, "BLOCKVAULT_DATABASE_URL: the embedded SQLite"),
        ("beat", {"broker_url": None}, "BLOCKVAULT_BROKER_URL: the embedded filesystem broker is for development"),
        ("worker", {"broker_url": "filesystem://"}, "BLOCKVAULT_BROKER_URL: the embedded filesystem broker"),
        ("beat", {"secret_key": None}, "BLOCKVAULT_SECRET_KEY is not set: every process of a shared catalog"),
        ("worker", {"secret_key": "CHANGE_ME" * 4}, "BLOCKVAULT_SECRET_KEY is a placeholder: set a random one"),
        (
            "api",
            {"admin_api_key": None},
            f"BLOCKVAULT_ADMIN_API_KEY is not set: production needs one of {MIN_KEY_CHARS}+",
        ),
        ("api", {"admin_api_key": ""}, "BLOCKVAULT_ADMIN_API_KEY is not set"),
        (
            "api",
            {"admin_api_key": "a-short-key"},
            f"BLOCKVAULT_ADMIN_API_KEY has 11 characters: production needs at least {MIN_KEY_CHARS}",
        ),
        ("api", {"admin_api_key": "changeme-" + LONG}, "BLOCKVAULT_ADMIN_API_KEY is a placeholder"),
        ("api", {"metrics_public": True}, "BLOCKVAULT_METRICS_PUBLIC=true: /metrics without a key needs TLS in front"),
        ("worker", {"failpoints": "backup.chunk_stored=1:kill"}, "BLOCKVAULT_FAILPOINTS is set"),
        ("storage-server", {"failpoints": "put=1:raise"}, "BLOCKVAULT_FAILPOINTS is set"),
    ],
)
def test_each_unsafe_setting_is_refused_in_one_line_naming_it(
    process: Process, overrides: dict[str, Any], refusal: str
) -> None:
    facts: dict[str, Any] = {"tokens": {"--token": LONG}, "tls": True} if process == "storage-server" else {}
    problems = unsafe_settings(settings(**overrides), process, **facts)
    assert len(problems) == 1 and problems[0].startswith(refusal), problems
    assert "\n" not in problems[0]
    assert unsafe_settings(settings(**overrides, environment="development"), process, **facts) == []


@pytest.mark.parametrize(
    ("tokens", "tls", "refusal"),
    [
        ({"--token (BLOCKVAULT_STORAGE_TOKEN)": "short"}, True, "--token (BLOCKVAULT_STORAGE_TOKEN) has 5 characters"),
        ({"the token of site 'a'": "CHANGE_ME" + LONG}, True, "the token of site 'a' is a placeholder"),
        ({"--admin-token (BLOCKVAULT_STORAGE_ADMIN_TOKEN)": LONG}, False, "the storage-server would serve plain http"),
    ],
)
def test_the_storage_server_refuses_weak_tokens_and_plain_http(
    tokens: dict[str, str | None], tls: bool, refusal: str
) -> None:
    problems = unsafe_settings(settings(), "storage-server", tokens=tokens, tls=tls)
    assert len(problems) == 1 and problems[0].startswith(refusal), problems
    if not tls:  # a TLS-terminating proxy in front, said so, is TLS too
        assert unsafe_settings(settings(behind_tls_proxy=True), "storage-server", tokens=tokens) == []


def test_safe_settings_start_and_each_process_checks_its_own() -> None:
    for process in ("api", "worker", "beat"):
        assert unsafe_settings(settings(), process) == []
    assert (
        unsafe_settings(settings(), "storage-server", tokens={"--token": LONG, "--admin-token": None}, tls=True) == []
    )
    # what only the API serves is only the API's business; a storage-server has no catalog
    assert unsafe_settings(settings(admin_api_key=None, metrics_public=True), "worker") == []
    assert unsafe_settings(settings(database_url=None, broker_url=None), "storage-server", tls=True) == []
    assert unsafe_settings(settings(metrics_public=True, behind_tls_proxy=True), "api") == []
    everything = settings(database_url=None, broker_url=None, secret_key=None, admin_api_key=None, metrics_public=True)
    assert len(unsafe_settings(everything, "api")) == 4  # every refusal at once, not the first only
    assert unsafe_settings(everything.model_copy(update={"environment": "development"}), "api") == []


# -- the processes ------------------------------------------------------------------------------------
def refused(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The refusal lines of a process that must have exited 2 on them."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and all(line.startswith("blockvault: error: ") for line in lines), proc.stderr
    return [line.removeprefix("blockvault: error: ") for line in lines]


@pytest.mark.parametrize("process", ["api", "worker", "beat"])
def test_catalog_processes_exit_2_on_the_embedded_defaults(cli: Cli, process: str) -> None:
    done = cli.run(process, env={"BLOCKVAULT_ENVIRONMENT": "production", "BLOCKVAULT_ADMIN_API_KEY": "short"})
    lines = refused(done)
    expected = ["BLOCKVAULT_DATABASE_URL:", "BLOCKVAULT_BROKER_URL:"]
    expected += ["BLOCKVAULT_ADMIN_API_KEY has 5 characters"] if process == "api" else []
    assert [line[: len(start)] for line, start in zip(lines, expected, strict=True)] == expected


def test_the_storage_server_exits_2_on_a_weak_token_over_plain_http(cli: Cli, tmp_path: Path) -> None:
    env = {"BLOCKVAULT_ENVIRONMENT": "production", "BLOCKVAULT_STORAGE_TOKEN": "short-token"}
    done = cli.run("storage-server", "--root", str(tmp_path), "--port", str(free_port()), env=env)
    assert refused(done) == [
        f"--token (BLOCKVAULT_STORAGE_TOKEN) has 11 characters: production needs at least {MIN_KEY_CHARS} "
        "(openssl rand -hex 32)",
        "the storage-server would serve plain http, tokens and data in the clear: give --tls-cert and --tls-key, "
        "or set BLOCKVAULT_BEHIND_TLS_PROXY=true when a TLS-terminating proxy is in front",
    ]
    assert "short-token" not in done.stderr


@contextlib.contextmanager
def running(cli: Cli, url: str, *args: str, env: dict[str, str], verify: Any = True) -> Iterator[None]:
    """The process started by ``args``, answering ``url`` (the test fails if it exits first)."""
    proc = cli.popen(*args, env=env)
    try:
        deadline = time.monotonic() + 180  # an API migrating an empty catalog on a loaded machine: a minute or more
        with httpx.Client(verify=verify, timeout=2) as http:  # one CA bundle load, not one per poll
            while True:
                assert proc.poll() is None, proc.communicate()[1]
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"{args[0]} did not answer {url}"
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_safe_production_storage_server_starts(cli: Cli, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "tls")
    env = {"BLOCKVAULT_ENVIRONMENT": "production", "BLOCKVAULT_STORAGE_TOKEN": LONG}
    port = free_port()
    args = ("storage-server", "--root", str(tmp_path), "--port", str(port))
    with running(
        cli,
        f"https://127.0.0.1:{port}/v1/health",
        *args,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        env=env,
        verify=ssl.create_default_context(cafile=str(cert)),
    ):
        pass
    port = free_port()
    env["BLOCKVAULT_BEHIND_TLS_PROXY"] = "true"
    with running(
        cli,
        f"http://127.0.0.1:{port}/v1/health",
        "storage-server",
        "--root",
        str(tmp_path),
        "--port",
        str(port),
        env=env,
    ):
        pass


def test_a_safe_production_api_starts(cli: Cli, make_pg_database: Any, redis_url: str) -> None:
    env = {
        "BLOCKVAULT_ENVIRONMENT": "production",
        "BLOCKVAULT_DATABASE_URL": make_pg_database(migrate=False),
        "BLOCKVAULT_BROKER_URL": redis_url,
        "BLOCKVAULT_SECRET_KEY": secrets.token_hex(32),
        "BLOCKVAULT_ADMIN_API_KEY": secrets.token_hex(32),
        "BLOCKVAULT_METRICS_PUBLIC": "true",
        "BLOCKVAULT_BEHIND_TLS_PROXY": "true",
    }
    port = free_port()
    with running(cli, f"http://127.0.0.1:{port}/v1/health", "api", "--port", str(port), env=env):
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
