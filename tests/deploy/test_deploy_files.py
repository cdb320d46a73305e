"""The deploy files (``deploy/``) against the real product: every command line they run is
parsed by the real ``blockvault`` click CLI, every ``BLOCKVAULT_*`` variable they set is a real
setting (``shared.settings_model.Settings``, or one the storage-server reads), no secret is
written in them, and the structure each platform needs is there.

External validators run when they are installed and say so when they are not (a visible
skip, after the parse checks of the same files have run): ``kubectl kustomize`` (works
offline: no cluster) and ``systemd-analyze verify``. ``docker compose config`` needs a Docker
engine, which this machine does not have, so compose.yaml is checked by parsing only.
The monitoring files (``deploy/grafana/``, ``deploy/prometheus.yml``) are someone else's and
are not checked here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
UNITS = {
    "blockvault-api.service": "api",
    "blockvault-worker.service": "worker",
    "blockvault-beat.service": "beat",
    "blockvault-flower.service": "flower",
    "blockvault-storage-server.service": "storage-server",
}
INSTALLED_BLOCKVAULT = "/opt/blockvault/bin/blockvault"
HOST_UUID = re.compile(r"[0-9a-f]{32}")
# names whose value is a secret (a URL's password is checked separately)
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|BASIC_AUTH")
# documented by the postgres image
POSTGRES_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_INITDB_ARGS", "PGDATA"}
# monitoring (dashboards, Prometheus scrape config) is written and checked by others
OWNED_BY_OTHERS = {DEPLOY / "grafana", DEPLOY / "prometheus.yml"}


# -- the real product ------------------------------------------------------------------------------
@cache
def cli() -> click.Group:
    from api.cli import main

    return main


@cache
def help_text(*subcommand: str) -> str:
    """``blockvault <subcommand...> --help`` as the real CLI prints it."""
    result = CliRunner().invoke(cli(), [*subcommand, "--help"], prog_name="blockvault")
    assert result.exit_code == 0, result.output
    return result.output


def check_invocation(argv: list[str]) -> str:
    """Parse ``argv`` (``blockvault SUB ...``) with the real click commands, as running it
    would, without running it: an unknown subcommand or flag, a bad value or a missing required
    option raises. Every flag used must also be in the real ``--help`` of its command. Returns
    SUB (for a group, ``SUB VERB``)."""
    assert argv and Path(argv[0]).name == "blockvault", f"{argv} does not run blockvault"
    assert len(argv) >= 2, f"{argv} names no subcommand"
    command: click.Command = cli()
    path: list[str] = []
    rest = list(argv[1:])
    parent = click.Context(command, info_name="blockvault")
    while isinstance(command, click.Group):
        assert rest, f"{argv}: {' '.join(path) or 'blockvault'} needs a subcommand"
        name = rest.pop(0)
        sub = command.get_command(parent, name)
        assert sub is not None, f"{argv}: blockvault {' '.join(path)} has no subcommand {name!r}"
        path.append(name)
        if isinstance(sub, click.Group):
            parent = click.Context(sub, info_name=name, parent=parent)
        command = sub
    try:
        command.make_context(path[-1], rest, parent=parent)
    except click.ClickException as exc:
        pytest.fail(f"{shlex.join(argv)}: the real CLI refuses it: {exc.format_message()}")
    for arg in rest:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"(^|[\s,]){re.escape(flag)}(?=[\s,=]|$)", help_text(*path), re.M), (
                f"{flag} is not in `blockvault {' '.join(path)} --help`"
            )
    return " ".join(path)


@cache
def settings_env() -> frozenset[str]:
    """BLOCKVAULT_* variables of the settings model."""
    from shared.config import ENV_PREFIX
    from shared.settings_model import Settings

    return frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)


@cache
def storage_server_env() -> frozenset[str]:
    """BLOCKVAULT_* variables `blockvault storage-server` reads itself (its tokens), found in
    its source as it reads them: ``settings.text("name")`` (or ``setting("name")``)."""
    from shared.config import ENV_PREFIX

    source = (REPO / "api" / "cli" / "processes.py").read_text()
    start = source.index('@click.command("storage-server")')
    names = re.findall(r'\b(?:setting|settings\.text)\("(\w+)"\)', source[start:])
    assert names, "storage-server reads no setting: has its source moved?"
    return frozenset(ENV_PREFIX + name.upper() for name in names)


def valid_env_name(name: str) -> bool:
    if name.startswith("BLOCKVAULT_"):
        return name in settings_env() or name in storage_server_env()
    if name.startswith("FLOWER_"):
        from flower.command import is_flower_envvar

        return bool(is_flower_envvar(name))
    return False


def test_the_product_sources_this_file_relies_on_answer() -> None:
    """A guard for the helpers: the names they derive from the code are plausible."""
    assert {"BLOCKVAULT_DATABASE_URL", "BLOCKVAULT_BROKER_URL", "BLOCKVAULT_HOST_UUID"} <= settings_env()
    assert "BLOCKVAULT_STORAGE_TOKEN" in storage_server_env()
    assert valid_env_name("FLOWER_BASIC_AUTH")
    assert not valid_env_name("FLOWER_NO_SUCH_OPTION")
    assert not valid_env_name("BLOCKVAULT_NO_SUCH_SETTING")
    with pytest.raises(pytest.fail.Exception):
        check_invocation(["blockvault", "worker", "--no-such-flag"])
    with pytest.raises(pytest.fail.Exception):
        check_invocation(["blockvault", "api", "--port", "0"])
    with pytest.raises(AssertionError):
        check_invocation(["blockvault", "no-such-command"])


# -- every YAML file --------------------------------------------------------------------------------
def deploy_yaml_files() -> list[Path]:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    return sorted(f for f in files if not any(f.is_relative_to(d) for d in OWNED_BY_OTHERS))


@cache
def load_all(path: Path) -> list[Any]:
    """The YAML documents of ``path`` (parsed once; callers only read them)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_file_parses() -> None:
    files = deploy_yaml_files()
    assert COMPOSE in files and K8S / "kustomization.yaml" in files
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document is a mapping"


# -- compose ----------------------------------------------------------------------------------------
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def blockvault_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_has_every_process_and_one_worker_per_host() -> None:
    names = set(services())
    assert {"api", "beat", "flower", "postgres", "redis", "worker-host1", "worker-host2", "storage-server"} <= names
    assert services()["postgres"]["image"] == "postgres:15"
    assert services()["redis"]["image"] == "redis:7"
    assert services()["storage-server"].get("profiles"), "storage-server is optional: under a profile"
    for name, svc in services().items():
        if name != "storage-server":
            assert not svc.get("profiles"), f"{name} must start by default"


def test_compose_builds_one_image_from_the_dockerfile() -> None:
    roles = {"api", "beat", "flower", "worker-host1", "worker-host2", "storage-server"}
    assert set(blockvault_services()) == roles
    images = {svc["image"] for svc in blockvault_services().values()}
    builds = {(svc["build"]["context"], svc["build"]["dockerfile"]) for svc in blockvault_services().values()}
    assert len(images) == 1 and len(builds) == 1, (images, builds)
    context, dockerfile = builds.pop()
    assert (DEPLOY / context).resolve() == REPO, "the build context is the repository root"
    assert (DEPLOY / context / dockerfile).resolve() == DOCKERFILE


def test_compose_commands_are_real_cli_invocations() -> None:
    expected = {
        "api": "api",
        "beat": "beat",
        "flower": "flower",
        "worker-host1": "worker",
        "worker-host2": "worker",
        "storage-server": "storage-server",
    }
    for name, svc in blockvault_services().items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: exec form, so no shell splits it"
        # the image's ENTRYPOINT is blockvault: command is what follows it
        assert check_invocation(["blockvault", *map(str, command)]) == expected[name]
    assert services()["api"]["command"][services()["api"]["command"].index("--host") + 1] == "0.0.0.0"
    assert services()["flower"]["command"][services()["flower"]["command"].index("--address") + 1] == "0.0.0.0"


def test_compose_env_vars_are_real_settings() -> None:
    for name, svc in blockvault_services().items():
        for var in environment(svc):
            assert valid_env_name(var), f"{name}: {var} is not a blockvault setting (shared/settings_model.py)"
        if name == "storage-server":
            assert set(environment(svc)) <= storage_server_env()
    assert set(environment(services()["postgres"])) <= POSTGRES_ENV
    for name in ("api", "beat", "worker-host1", "worker-host2"):
        env = environment(services()[name])
        assert re.fullmatch(
            r"postgresql\+psycopg2://blockvault:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres:5432/blockvault",
            env["BLOCKVAULT_DATABASE_URL"],
        ), f"{name}: BLOCKVAULT_DATABASE_URL"
        assert env["BLOCKVAULT_BROKER_URL"] == "redis://redis:6379/0", name


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML tree (keys and values; not comments)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def compose_values() -> Iterator[tuple[str, str, str]]:
    """(service, variable, value) of every environment entry."""
    for name, svc in services().items():
        for var, value in environment(svc).items():
            yield name, var, value


def test_compose_holds_no_secret() -> None:
    """Secrets are ${VAR:?} from deploy/.env (or ${VAR:-} under the storage-server profile,
    which compose interpolates even when it is off); a URL's password likewise."""
    for service, var, value in compose_values():
        if SECRETISH.search(var):
            match = INTERPOLATION.fullmatch(value)
            assert match, f"{service}: {var} must be ${{VAR:?...}} from the env file, not {value!r}"
            _, op, default = match.groups()
            if service == "storage-server":
                assert op == ":-" and default == "", f"{service}: {var}"
            else:
                assert op == ":?", f"{service}: {var} must be required (${{VAR:?...}})"
        for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
            assert INTERPOLATION.fullmatch(password), f"{service}: {var} has a literal password"
    text = COMPOSE.read_text()
    assert "CHANGE_ME" not in text and "REPLACE" not in text


def test_compose_env_example_lists_every_required_variable_empty() -> None:
    required = {m.group(1) for text in strings(compose()) for m in INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    assert {"POSTGRES_PASSWORD", "BLOCKVAULT_ADMIN_API_KEY", "BLOCKVAULT_SECRET_KEY"} <= required
    example = DEPLOY / "compose.env.example"
    assigned = dict(
        line.split("=", 1) for line in example.read_text().splitlines() if line and not line.startswith("#")
    )
    assert required <= set(assigned), f"compose.env.example lacks {required - set(assigned)}"
    for var in required:
        assert assigned[var] == "", f"compose.env.example: {var} must be empty (a placeholder would start)"


def test_compose_health_dependencies_and_restarts() -> None:
    svcs = services()
    api_test = " ".join(map(str, svcs["api"]["healthcheck"]["test"]))
    assert "/v1/health" in api_test and ":8080/" in api_test
    assert "pg_isready" in svcs["postgres"]["healthcheck"]["test"]
    assert {"redis-cli", "ping"} <= set(svcs["redis"]["healthcheck"]["test"])
    for name, svc in svcs.items():
        assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, f"{name}: restart policy"
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on with conditions"
        for dep, how in depends.items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in svcs[dep], f"{name} waits for {dep}, which has no healthcheck"
    for name in ("api", "beat", "worker-host1", "worker-host2"):
        assert {"postgres", "redis"} <= set(svcs[name]["depends_on"]), name
    assert set(svcs["flower"]["depends_on"]) == {"redis"}


def duration_seconds(text: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


def test_compose_workers_each_have_a_host_identity_and_their_volumes_at_host_paths() -> None:
    workers = {name: svc for name, svc in services().items() if name.startswith("worker-")}
    assert len(workers) >= 2
    uuids, folders = [], []
    for name, svc in workers.items():
        env = environment(svc)
        assert HOST_UUID.fullmatch(env["BLOCKVAULT_HOST_UUID"]), f"{name}: 32 lowercase hex digits"
        uuids.append(env["BLOCKVAULT_HOST_UUID"])
        binds = [str(v).split(":") for v in svc["volumes"]]
        assert binds, name
        for parts in binds:
            source, target = parts[0], parts[1]
            assert source.startswith("/") and source == target, f"{name}: {source} must be at its host path"
        own = [source for source, *_ in binds if "volumes" in source]
        assert own, f"{name} mounts no volume folder"
        folders.extend(own)
        assert env["BLOCKVAULT_DATA_DIR"] in {source for source, *_ in binds}, f"{name}: data dir at its host path"
        assert str(svc.get("user")) in {"0", "0:0", "root"}, f"{name}: reads volumes whoever owns them"
        assert duration_seconds(str(svc["stop_grace_period"])) >= 300, f"{name}: room for a warm shutdown"
    assert len(set(uuids)) == len(uuids), "every host its own uuid"
    assert len(set(folders)) == len(folders), "every host its own volume folder"


# -- Dockerfile -------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    froms = [arg for word, arg in instructions if word == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"]
    runs = " ".join(arg for word, arg in instructions if word == "RUN")
    assert re.search(r"apt-get install[^&]*\bqemu-utils\b", runs)
    assert re.search(r"apt-get install[^&]*\bqemu-system-common\b", runs), "qemu-storage-daemon: --bitmap backups"
    assert "qemu-system-x86" not in runs, "VMs run on the hosts, not in the image"
    assert re.search(r"pip install [^&]*\.(\s|$)", runs), "pip install . of the repository"
    entrypoints = [arg for word, arg in instructions if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = yaml.safe_load(entrypoints[0])  # exec form: a JSON array
    assert isinstance(entrypoint, list) and entrypoint[-1] == "blockvault", entrypoint
    # every COPY source exists, and the packages pyproject.toml installs are all copied
    copied = set()
    for word, arg in instructions:
        if word == "COPY":
            *sources, _dest = arg.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source.rstrip("/"))
    packages = set(re.findall(r'"(\w+)\*"', (REPO / "pyproject.toml").read_text()))
    assert packages and packages <= copied, f"not copied: {packages - copied}"
    assert {"pyproject.toml", "README.md"} <= copied
    # the per-Dockerfile ignore file lets every copied path in
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"Dockerfile.dockerignore excludes {source}"
    for word, arg in instructions:
        if word == "ENV":
            for var in re.findall(r"(\w+)=", arg):
                assert not var.startswith("BLOCKVAULT_") or valid_env_name(var), var


# -- Kubernetes -------------------------------------------------------------------------------------
def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_all(path)
    ]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in k8s_docs():
        if doc["kind"] in {"Deployment", "DaemonSet", "StatefulSet", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def test_kubernetes_docs_have_identity_and_the_required_kinds() -> None:
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), f"{path}: metadata.name"
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs()}
    assert {
        ("Namespace", "blockvault"),
        ("Secret", "blockvault-secrets"),
        ("ConfigMap", "blockvault-config"),
        ("Deployment", "blockvault-api"),
        ("Service", "blockvault-api"),
        ("Deployment", "blockvault-beat"),
        ("Deployment", "blockvault-flower"),
        ("Service", "blockvault-flower"),
        ("DaemonSet", "blockvault-worker"),
    } <= kinds
    api = k8s_object("Deployment", "blockvault-api")
    assert api["spec"]["replicas"] == 2
    beat = k8s_object("Deployment", "blockvault-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    beat_text = (K8S / "beat.yaml").read_text()
    assert "deterministic" in beat_text and "twice" in beat_text, "beat.yaml says why two beats are safe"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {name for name in manifests if name.endswith(".example.yaml")}
    assert examples == {"secret.example.yaml"}
    assert len(listed) == len(set(listed))
    assert set(listed) == manifests - examples
    assert kustomization["namespace"] == "blockvault"
    assert [image["name"] for image in kustomization["images"]] == ["blockvault"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for container in spec.get("initContainers") or []:
        yield "init", container
    for container in spec["containers"]:
        yield "main", container


def test_kubernetes_containers_run_real_cli_invocations_of_one_image() -> None:
    roles = {
        "blockvault-api": "api",
        "blockvault-beat": "beat",
        "blockvault-flower": "flower",
        "blockvault-worker": "worker",
    }
    for workload, spec in pod_specs():
        for kind, container in containers(spec):
            assert container["image"] == "blockvault", f"{workload}: the image kustomization.yaml names"
            if kind == "init":
                continue  # checked by running it: test_worker_init_container_*
            assert "command" not in container, f"{workload}: keep the image's ENTRYPOINT (tini, blockvault)"
            assert check_invocation(["blockvault", *map(str, container["args"])]) == roles[workload]
    api = k8s_object("Deployment", "blockvault-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][api["args"].index("--host") + 1] == "0.0.0.0"
    flower = k8s_object("Deployment", "blockvault-flower")["spec"]["template"]["spec"]["containers"][0]
    assert flower["args"][flower["args"].index("--address") + 1] == "0.0.0.0"


def test_kubernetes_env_is_real_settings_and_secrets_come_from_the_secret() -> None:
    config = k8s_object("ConfigMap", "blockvault-config")
    secret = k8s_object("Secret", "blockvault-secrets")
    for key in config["data"]:
        assert valid_env_name(key), f"ConfigMap: {key} is not a setting"
        assert not SECRETISH.search(key) and "DATABASE_URL" not in key, f"ConfigMap holds a secret: {key}"
    assert "BLOCKVAULT_HOST_UUID" not in config["data"], "one value would make every node the same host"
    for key, value in secret["stringData"].items():
        assert valid_env_name(key), f"Secret: {key} is not a setting"
        assert "CHANGE_ME" in value, f"Secret example: {key} must be a placeholder"
    for workload, spec in pod_specs():
        for _, container in containers(spec):
            for source in container.get("envFrom") or []:
                assert source == {"configMapRef": {"name": "blockvault-config"}}, workload
            for entry in container.get("env") or []:
                name = entry["name"]
                assert valid_env_name(name), f"{workload}: {name} is not a setting"
                assert name != "BLOCKVAULT_HOST_UUID", f"{workload}: the host uuid comes from the node"
                if SECRETISH.search(name) or name == "BLOCKVAULT_DATABASE_URL":
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in entry, f"{workload}: {name} must come from the Secret"
                    assert ref["name"] == "blockvault-secrets" and ref["key"] in secret["stringData"]


def test_kubernetes_services_select_their_pods_and_the_api_has_probes() -> None:
    for _, service in [(p, d) for p, d in k8s_docs() if d["kind"] == "Service"]:
        name = service["metadata"]["name"]
        deployment = k8s_object("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        port_names = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{name}: targetPort {port['targetPort']}"
    api = k8s_object("Deployment", "blockvault-api")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/v1/health", probe
        assert api[probe]["httpGet"]["port"] in {p["name"] for p in api["ports"]} | {8080}


def test_worker_daemonset_mounts_host_paths_at_the_same_path_unprivileged() -> None:
    worker = k8s_object("DaemonSet", "blockvault-worker")
    spec = worker["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork"), "no hostNetwork needed"
    assert spec.get("terminationGracePeriodSeconds", 30) >= 300, "room for Celery's warm shutdown"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    main = spec["containers"][0]
    assert not main.get("securityContext", {}).get("privileged"), "file and qcow2 volumes need no privileges"
    assert main["securityContext"].get("allowPrivilegeEscalation") is False
    mounted = {}
    for mount in main["volumeMounts"]:
        if mount["name"] in host_paths:
            assert mount["mountPath"] == host_paths[mount["name"]], f"{mount['name']}: not at its host path"
            mounted[mount["mountPath"]] = mount
    assert "/var/lib/libvirt/images" in mounted
    assert any("/var/lib/blockvault/volumes".startswith(path.rstrip("/") + "/") for path in mounted)
    config = k8s_object("ConfigMap", "blockvault-config")["data"]
    assert config["BLOCKVAULT_DATA_DIR"] in mounted, "the data dir (host-uuid) is the node's"


def worker_init_script() -> str:
    spec = k8s_object("DaemonSet", "blockvault-worker")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"][:2] == ["/bin/sh", "-c"]
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {"/var/lib/blockvault", "/host/etc/machine-id"} <= mounts
    return str(init["command"][2])


def run_init(script: str, data: Path, machine_id: Path) -> subprocess.CompletedProcess[str]:
    local = script.replace("/host/etc/machine-id", str(machine_id)).replace("/var/lib/blockvault", str(data))
    return subprocess.run(["/bin/sh", "-c", local], capture_output=True, text=True, timeout=10, check=False)


def worker_host_uuid(data: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `blockvault worker` takes as its host uuid with this data dir (the real code)."""
    from shared.config import get_settings
    from shared.hosts import local_host_uuid

    with monkeypatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("BLOCKVAULT_")]:
            patch.delenv(name)
        patch.setenv("BLOCKVAULT_DATA_DIR", str(data))
        patch.chdir(data)  # no stray .env
        get_settings.cache_clear()
        try:
            return local_host_uuid()
        finally:
            get_settings.cache_clear()


def test_worker_init_container_gives_the_worker_the_nodes_machine_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the init container's script on a fake node; then the real worker code reads it."""
    script = worker_init_script()
    data, machine_id = tmp_path / "data", tmp_path / "machine-id"
    data.mkdir()
    machine_id.write_text("4c4c4544004a5a10804cb4c04f4a4d32\n")
    done = run_init(script, data, machine_id)
    assert done.returncode == 0, done.stderr
    assert worker_host_uuid(data, monkeypatch) == "4c4c4544004a5a10804cb4c04f4a4d32"
    # a second start (or a new machine-id) keeps the identity the host was registered with
    machine_id.write_text("ffffffffffffffffffffffffffffffff\n")
    assert run_init(script, data, machine_id).returncode == 0
    assert worker_host_uuid(data, monkeypatch) == "4c4c4544004a5a10804cb4c04f4a4d32"
    # a machine-id that is no host uuid stops the pod instead of registering nonsense
    (data / "host-uuid").unlink()
    machine_id.write_text("uninitialized\n")
    bad = run_init(script, data, machine_id)
    assert bad.returncode != 0 and "machine-id" in bad.stderr
    assert not (data / "host-uuid").exists()


def test_kubectl_kustomize_builds_the_manifests_when_kubectl_is_available() -> None:
    """`kubectl kustomize` works offline (`kubectl apply --dry-run=client` asks a server)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the parse checks of deploy/kubernetes ran, kustomize did not")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    want = f"{image['newName']}:{image['newTag']}"
    expected = sum(len(load_all(K8S / name)) for name in kustomization["resources"])
    assert len(built) == expected
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "blockvault", doc["metadata"]["name"]
        if "template" in doc.get("spec", {}):
            for _, container in containers(doc["spec"]["template"]["spec"]):
                assert container["image"] == want, doc["metadata"]["name"]
    assert sum(doc["kind"] in {"Deployment", "DaemonSet"} for doc in built) == 4


# -- systemd ----------------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}} (keys may repeat; ``\\`` continues a line)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: {raw!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= missing"
    return values[-1]


def systemd_seconds(text: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    if re.fullmatch(r"\d+", text):
        return float(text)
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(us|ms|sec|s|min|m|hr|h)\b", text):
        total += int(number) * units[unit]
    return total


def test_systemd_units_run_real_subcommands() -> None:
    present = {p.name for p in SYSTEMD.glob("*.service")}
    assert set(UNITS) <= present
    for name in present:
        unit = parse_unit(SYSTEMD / name)
        assert {"Unit", "Service", "Install"} <= set(unit), name
        argv = shlex.split(one(unit, "Service", "ExecStart"))
        assert argv[0] == INSTALLED_BLOCKVAULT, f"{name}: {argv[0]}"
        assert check_invocation(argv) == UNITS[name], name
        assert one(unit, "Service", "Restart") == "on-failure", name
        assert one(unit, "Service", "EnvironmentFile").startswith("/etc/blockvault/"), name
        assert one(unit, "Service", "NoNewPrivileges") == "yes", name
        assert one(unit, "Install", "WantedBy") == "multi-user.target", name
        for assignment in unit["Service"].get("Environment", []):
            for var in re.findall(r"(\w+)=", assignment):
                assert valid_env_name(var), f"{name}: {var}"
        for arg in argv:
            assert not re.fullmatch(r"--(token|admin-token|site-token)(=.*)?", arg), f"{name}: secret on argv"


def test_systemd_worker_can_reach_volumes_and_qemu_and_stops_warmly() -> None:
    unit = parse_unit(SYSTEMD / "blockvault-worker.service")
    service = unit["Service"]
    assert one(unit, "Service", "EnvironmentFile") == "/etc/blockvault/blockvault.env"
    assert shlex.split(one(unit, "Service", "ExecStart")) == [INSTALLED_BLOCKVAULT, "worker"]
    assert one(unit, "Service", "KillMode") == "mixed"
    assert systemd_seconds(one(unit, "Service", "TimeoutStopSec")) >= 300
    protect = one(unit, "Service", "ProtectSystem")
    data_dir = next(v.split("=", 1)[1] for v in service.get("Environment", []) if "BLOCKVAULT_DATA_DIR=" in v)
    if protect == "strict":
        assert any(data_dir in v for v in service.get("ReadWritePaths", [])), "strict hides the data dir"
    assert protect in {"full", "strict", "yes"}
    assert service.get("PrivateTmp", ["no"])[-1] in {"no", "false"}, "QEMU's NBD socket is in /tmp"
    assert service.get("PrivateDevices", ["no"])[-1] in {"no", "false"}, "volumes may be block devices"
    assert "User" not in service, "root: reads every VM volume"


def test_systemd_storage_server_takes_its_tokens_from_the_environment_file() -> None:
    unit = parse_unit(SYSTEMD / "blockvault-storage-server.service")
    env_file = one(unit, "Service", "EnvironmentFile")
    example = SYSTEMD / (Path(env_file).stem + ".env.example")
    assert example.exists(), f"no example of {env_file}"
    names = set(re.findall(r"^#?\s*(BLOCKVAULT_\w+)=", example.read_text(), re.M))
    assert names and names <= storage_server_env(), names - storage_server_env()
    assert "BLOCKVAULT_STORAGE_TOKEN" in names
    root = shlex.split(one(unit, "Service", "ExecStart"))
    root_dir = root[root.index("--root") + 1]
    if one(unit, "Service", "ProtectSystem") == "strict":
        assert root_dir in unit["Service"].get("ReadWritePaths", []), "strict must leave --root writable"


def test_systemd_env_examples_name_real_settings_and_hold_no_secret() -> None:
    examples = sorted(SYSTEMD.glob("*.env.example"))
    assert SYSTEMD / "blockvault.env.example" in examples
    units_env_files = {one(parse_unit(SYSTEMD / u), "Service", "EnvironmentFile") for u in UNITS}
    assert {f"/etc/blockvault/{e.name.removesuffix('.example')}" for e in examples} == units_env_files
    for example in examples:
        for line in example.read_text().splitlines():
            match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
            if not match:
                continue
            var, value = match.groups()
            assert valid_env_name(var), f"{example.name}: {var} is not a setting"
            if SECRETISH.search(var) and value:
                assert all(part.endswith("CHANGE_ME") for part in value.split(",")), f"{example.name}: {var}"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", value):
                assert password == "CHANGE_ME", f"{example.name}: {var} has a literal password"


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_units_pass_systemd_analyze_verify_when_available(tmp_path: Path) -> None:
    """`systemd-analyze verify` on copies whose ExecStart is this venv's real blockvault (verify
    wants the binary to exist); it must say nothing. A copy broken on purpose must make it
    complain, or this check would prove nothing here. The parse checks above run either way."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed: the unit files were parsed, not verified")
    real = Path(sys.executable).parent / "blockvault"
    assert real.exists(), real
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED_BLOCKVAULT in text
        copy = tmp_path / name
        copy.write_text(text.replace(INSTALLED_BLOCKVAULT, str(real)))
        copies.append(copy)
    done = verify(copies)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    broken = tmp_path / "blockvault-broken.service"
    broken.write_text(
        (tmp_path / "blockvault-worker.service").read_text().replace("KillMode=mixed", "KillMode=sometimes")
    )
    assert "KillMode=sometimes" in broken.read_text()
    complaint = verify([broken])
    assert "sometimes" in complaint.stderr, "systemd-analyze verify reports nothing here: the check is void"


# -- the server secret, everywhere the catalog is ----------------------------------------------------
CATALOG_PROCESSES = {"api", "worker", "beat"}  # they open the storage credentials sealed in the catalog


def test_every_process_of_the_catalog_gets_the_one_server_secret() -> None:
    """API, beat and every worker get BLOCKVAULT_SECRET_KEY, from the one place each deploy
    method keeps it: a worker with another secret could not open any storage."""
    compose_envs = {name: environment(svc) for name, svc in blockvault_services().items()}
    with_catalog = {name: env for name, env in compose_envs.items() if "BLOCKVAULT_DATABASE_URL" in env}
    assert {"api", "beat", "worker-host1", "worker-host2"} <= set(with_catalog)
    secrets = {env.get("BLOCKVAULT_SECRET_KEY") for env in with_catalog.values()}
    assert len(secrets) == 1, f"compose: one BLOCKVAULT_SECRET_KEY for all of {sorted(with_catalog)}: {secrets}"
    (value,) = secrets
    match = INTERPOLATION.fullmatch(str(value))
    assert match and match.group(1) == "BLOCKVAULT_SECRET_KEY" and match.group(2) == ":?", value

    roles = {}
    for workload, spec in pod_specs():
        for kind, container in containers(spec):
            if kind == "init":
                continue
            roles[workload] = str(container["args"][0])
            refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env") or []}
            if roles[workload] in CATALOG_PROCESSES:
                assert refs.get("BLOCKVAULT_SECRET_KEY") == {
                    "name": "blockvault-secrets",
                    "key": "BLOCKVAULT_SECRET_KEY",
                }, f"{workload}: the server secret from the Secret"
    assert set(roles.values()) >= CATALOG_PROCESSES

    env_file = "/etc/blockvault/blockvault.env"
    readers = {
        role
        for name, role in UNITS.items()
        if one(parse_unit(SYSTEMD / name), "Service", "EnvironmentFile") == env_file
    }
    assert readers >= CATALOG_PROCESSES, "the units of the catalog's processes share one environment file"
    example = (SYSTEMD / "blockvault.env.example").read_text()
    assert re.search(r"^BLOCKVAULT_SECRET_KEY=CHANGE_ME$", example, re.M), "set for every host, not commented out"
    before = example[: example.index("BLOCKVAULT_SECRET_KEY=CHANGE_ME")]
    assert "API hosts only" not in before, "the server secret is not an API-only setting"


# -- deploy/README.md -------------------------------------------------------------------------------
def test_deploy_readme_names_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_dir() or path.name in {"README.md", ".gitignore"}:
            continue
        if any(path.is_relative_to(d) for d in OWNED_BY_OTHERS):
            continue
        assert path.name in readme, f"deploy/README.md does not mention {path.relative_to(DEPLOY)}"


def readme_commands() -> Iterator[list[str]]:
    """Every ``blockvault ...`` command line of deploy/README.md (code blocks and inline code),
    without leading VAR=value assignments."""
    text = (DEPLOY / "README.md").read_text()
    snippets = re.findall(r"```\w*\n(.*?)```", text, re.S)
    snippets += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
    for snippet in snippets:
        for raw in snippet.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(raw.split("  #", 1)[0].strip())
            except ValueError:
                continue
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            if words and words[0] == "blockvault" and len(words) > 1:
                yield words


def test_deploy_readme_commands_are_real_cli_invocations() -> None:
    commands = list(readme_commands())
    assert len(commands) >= 3
    for argv in commands:
        check_invocation(argv)
