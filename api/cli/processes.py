"""``blockvault api | worker | flower | beat | up | storage-server``: the processes of docs/api.md
"Processes, settings, ports". With ``BLOCKVAULT_ENVIRONMENT=production`` the api, worker, beat
and storage-server first refuse unsafe settings (:func:`refuse_unsafe`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from api.cli import fail, freeze_start_heap

if TYPE_CHECKING:
    from shared.production import Process


def refuse_unsafe(process: Process, *, tokens: dict[str, str | None] | None = None, tls: bool = False) -> None:
    """With ``BLOCKVAULT_ENVIRONMENT=production``, print every unsafe setting of ``process``
    (:func:`shared.production.unsafe_settings`), one line each, and exit 2 when there is one;
    the same for settings that do not parse, in any environment."""
    from pydantic import ValidationError

    from shared.config import get_settings
    from shared.envnames import ENV_PREFIX
    from shared.production import unsafe_settings

    try:
        problems = unsafe_settings(get_settings(), process, tokens=tokens, tls=tls)
    except ValidationError as exc:
        problems = [
            f"{ENV_PREFIX}{str(error['loc'][0]).upper().removeprefix(ENV_PREFIX)}: {error['msg']}"
            for error in exc.errors()
        ]
    for problem in problems[:-1]:
        click.echo(f"blockvault: error: {problem}", err=True)
    if problems:
        fail(problems[-1], 2)


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
def api_command(host: str, port: int) -> None:
    """Run the REST API."""
    refuse_unsafe("api")
    import uvicorn

    from api.app import create_app

    app = create_app()
    freeze_start_heap()  # the app is built: its routes, models and imports live until exit
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )


@click.command("worker")
@click.option("--host-uuid", help="This host's identity (default BLOCKVAULT_HOST_UUID or one kept in the data dir).")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--database-url", help="The catalog (default BLOCKVAULT_DATABASE_URL): how a new host joins.")
@click.option("--broker-url", help="The broker (default BLOCKVAULT_BROKER_URL).")
def worker_command(
    host_uuid: str | None, concurrency: int, loglevel: str, database_url: str | None, broker_url: str | None
) -> None:
    """Run a Celery worker for this host's queue and the shared queues. Adding a host is this
    one command on it, with the catalog's and the broker's URLs."""
    from shared.config import get_settings

    for name, value in (("BLOCKVAULT_DATABASE_URL", database_url), ("BLOCKVAULT_BROKER_URL", broker_url)):
        if value:
            os.environ[name] = value  # the settings, and the processes the worker forks, see it
    get_settings.cache_clear()
    refuse_unsafe("worker")
    from workers.main import run_worker

    code = run_worker(host_uuid, concurrency, loglevel)
    if code:
        raise SystemExit(code)


@click.command("beat")
@click.option("--loglevel", default="INFO", show_default=True)
def beat_command(loglevel: str) -> None:
    """Run the scheduler: fires job groups' triggers from the catalog (safe to run two)."""
    refuse_unsafe("beat")
    from beat.scheduler import run_beat

    run_beat(loglevel)


@click.command("flower")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default="127.0.0.1", show_default=True)
def flower_command(port: int, address: str) -> None:
    """Run Flower on the same broker (monitoring: workers, tasks, queues)."""
    from shared.celery_app import celery_app

    celery_app().start(["flower", f"--port={port}", f"--address={address}"])


@click.command("up")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
def up_command(port: int) -> None:
    """api + one worker + beat in one terminal: the embedded default."""
    me = [sys.executable, "-m", "api.cli"]
    children = [
        subprocess.Popen([*me, "api", "--port", str(port)]),
        subprocess.Popen([*me, "worker", "--concurrency", "1"]),
        subprocess.Popen([*me, "beat"]),
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [str(c.args) for c in children if c.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stopping:
        raise click.ClickException(f"a process stopped unexpectedly: {failed[0]}")
    sys.exit(0)


@click.command("storage-server")
@click.option("--root", required=True, type=click.Path(path_type=Path), help="Folder holding the repositories.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token", help="A token for every repository (default BLOCKVAULT_STORAGE_TOKEN, which ps does not show)."
)
@click.option("--append-only", is_flag=True, help="--token may add objects, never overwrite or delete them.")
@click.option(
    "--site-token",
    "site_token",
    multiple=True,
    metavar="NAME=TOKEN",
    help="A token for the repository /NAME only, always append-only; repeatable "
    "(default BLOCKVAULT_STORAGE_SITE_TOKENS=name=token,name2=token2, which ps does not show).",
)
@click.option(
    "--admin-token", help="A token that may do everything everywhere (default BLOCKVAULT_STORAGE_ADMIN_TOKEN)."
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate (chain): serve https.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--max-object-size", default=256 * 1024 * 1024, show_default=True, type=click.IntRange(1))
@click.option(
    "--auth-max-failures",
    default=10,
    show_default=True,
    type=click.IntRange(1),
    help="Wrong or missing tokens from one address within --auth-failure-window before its requests "
    "without a valid token get 429; valid tokens are always served.",
)
@click.option(
    "--auth-failure-window",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    metavar="SECONDS",
    help="The sliding window of --auth-max-failures.",
)
def storage_server_command(
    root: Path,
    host: str,
    port: int,
    token: str | None,
    append_only: bool,
    site_token: tuple[str, ...],
    admin_token: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_object_size: int,
    auth_max_failures: int,
    auth_failure_window: float,
) -> None:
    """Serve repositories over HTTP(S): remote backup storage in another data center."""
    from shared.config import get_settings
    from shared.errors import UsageError
    from shared.repository.backends.http_server import (
        check_tokens,
        parse_site_tokens,
        run,
        site_tokens_from_env,
        usable_root,
    )

    settings = get_settings()
    token = token or settings.text("storage_token")
    admin_token = admin_token or settings.text("storage_admin_token")
    if site_token:  # the options replace the variable, as --token replaces its variable
        site_tokens = parse_site_tokens(site_token, "--site-token")
    else:
        site_tokens = site_tokens_from_env(settings.text("storage_site_tokens"))
    check_tokens(token, site_tokens, admin_token)
    named = {"--token (BLOCKVAULT_STORAGE_TOKEN)": token, "--admin-token (BLOCKVAULT_STORAGE_ADMIN_TOKEN)": admin_token}
    named |= {f"the token of site {name!r}": value for name, value in site_tokens.items()}
    refuse_unsafe("storage-server", tokens=named, tls=bool(tls_cert))
    if append_only and not token:
        raise UsageError(detail="--append-only applies to --token, which is not given (site tokens always are)")
    problem = usable_root(root)
    if problem:
        raise UsageError(detail=problem)
    if bool(tls_cert) != bool(tls_key):
        raise UsageError(detail="give both --tls-cert and --tls-key, or neither")
    for name, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and not os.access(path, os.R_OK):
            raise UsageError(detail=f"{name} {path} is not a readable file")
    run(
        root,
        token,
        host=host,
        port=port,
        append_only=append_only,
        admin_token=admin_token,
        site_tokens=site_tokens,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_object_size=max_object_size,
        auth_max_failures=auth_max_failures,
        auth_failure_window=auth_failure_window,
    )
