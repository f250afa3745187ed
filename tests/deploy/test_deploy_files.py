"""The compose files, Dockerfiles, systemd units and scripts under deploy/ (no engine needed).

`docker compose config`, hadolint and shellcheck run where they are installed (skipped with
the reason otherwise); a structural check of every file runs everywhere: compose services,
volumes, secrets and configs consistent and every referenced file present, Flower flags that
exist in the installed flwr, node configs Flower parses, non-root images with healthchecks,
systemd units that `systemd-analyze verify` accepts without a warning.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.common.config import parse_config_args

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
SCRIPTS = DEPLOY / "scripts"
FEDREC = str(Path(sys.executable).parent / "fedrec")
STORES = ["store-01", "store-02", "store-03"]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What deploy/scripts/create-pki.sh makes for compose: CA, certificate, 3 stores."""
    root = tmp_path_factory.mktemp("compose") / "pki"
    out = subprocess.run(
        [str(SCRIPTS / "create-pki.sh"), str(root), "3"],
        env={**os.environ, "FEDREC": FEDREC},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return root


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name, "")
        if op in (":-", "-"):
            return current or arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return current

    return _VAR.sub(sub, value)


def merge(base: Any, overlay: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge, command replaces, lists add."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for k, v in overlay.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(overlay, list) and key not in ("command",):
        return base + [v for v in overlay if v not in base]
    return overlay


def load(*names: str, env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in names:
        doc = merge(doc, yaml.safe_load((COMPOSE / name).read_text()))
    return dict(interpolate(doc, env))


@cache
def flower_flags(binary: str) -> set[str]:
    """Every --option the installed Flower binary accepts (from its --help)."""
    from deploy.flower_processes import flower_bin

    out = subprocess.run(
        [flower_bin(binary), "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    return set(re.findall(r"(--[a-z0-9-]+)", out.stdout))


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount path -> secret name for a service's secrets."""
    out = {}
    for item in service.get("secrets", []):
        if isinstance(item, str):
            out[f"/run/secrets/{item}"] = item
        else:
            out[f"/run/secrets/{item.get('target', item['source'])}"] = item["source"]
    return out


def check_compose(doc: dict[str, Any], base_dir: Path) -> None:
    """Structural checks that hold for every compose file set of this project."""
    services = doc["services"]
    volumes = set(doc.get("volumes", {}))
    secrets = doc.get("secrets", {})
    configs = doc.get("configs", {})
    networks = set(doc.get("networks", {})) | {"default"}
    for name, svc in services.items():
        assert svc.get("image"), name
        assert svc.get("init") is True and svc.get("restart") == "unless-stopped", name
        if "build" in svc:
            assert (base_dir / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            assert source in volumes, (name, source)  # named volumes only: state persists
            assert target == "/var/lib/fedrec", (name, target)
        for net in svc.get("networks", []):
            assert net in networks, (name, net)
        for secret in secret_targets(svc).values():
            assert secret in secrets, (name, secret)
        for item in svc.get("configs", []):
            assert item["source"] in configs, (name, item)
        env = svc.get("environment", {})
        if svc.get("command"):  # not the image's default command: its own health URL
            assert env.get("FEDREC_HEALTHCHECK_URL", "").startswith(("http://", "https://")), name
        assert "FEDREC_EDGE_ADMIN_TOKEN" not in env and "FEDREC_EDGE_DEV" not in env, name
        if "FEDREC_ADMIN_TOKEN_FILE" in env:
            assert env["FEDREC_ADMIN_TOKEN_FILE"] in secret_targets(svc), name
        command = svc.get("command")
        if command:
            binary = command[0]
            flags = {a.split("=")[0] for a in command if a.startswith("--")}
            assert flags <= flower_flags(binary), (name, flags - flower_flags(binary))
            for arg in command:
                if arg.startswith("/run/secrets/"):
                    assert arg in secret_targets(svc), (name, arg)
            if "--node-config" in command:
                node_config = parse_config_args([command[command.index("--node-config") + 1]])
                assert node_config["site-dir"] == "/var/lib/fedrec/site", name
    for entries in (secrets, configs):
        for name, spec in entries.items():
            assert Path(base_dir, spec["file"]).is_file(), (name, spec["file"])


def stores_of(doc: dict[str, Any]) -> list[str]:
    return sorted({n.rsplit("-", 1)[0] for n in doc["services"] if n.startswith("store-")})


# ----------------------------------------------------------------------------- compose
def test_compose_with_tls_overlay_is_consistent_and_secured(pki: Path) -> None:
    env = {"FEDREC_PKI_DIR": str(pki)}
    base = load("compose.yml", env=env)
    tls = load("compose.yml", "compose.tls.yml", env=env)
    # Assert: both file sets are structurally sound, every referenced file exists
    check_compose(base, COMPOSE)
    check_compose(tls, COMPOSE)
    assert stores_of(tls) == STORES
    services = tls["services"]
    # the SuperLink: TLS, SuperNode authentication, persistent database, healthcheck over TLS
    link = services["superlink"]["command"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert flag in link
    assert link[link.index("--database") + 1].startswith("/var/lib/fedrec/")
    assert services["superlink"]["environment"]["FEDREC_HEALTHCHECK_URL"].startswith("https://")
    # each store: a SuperNode with its own key and the CA, an edge with its own token,
    # sharing one volume; only the edge publishes a port
    for store in STORES:
        node, edge = services[f"{store}-supernode"], services[f"{store}-edge"]
        cmd = node["command"]
        assert "--insecure" not in cmd
        assert cmd[cmd.index("--root-certificates") + 1] == "/run/secrets/ca.crt"
        key_mount = cmd[cmd.index("--auth-supernode-private-key") + 1]
        assert secret_targets(node)[key_mount] == f"{store}-key"
        config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
        assert config["site-name"] == store
        assert node["volumes"] == edge["volumes"] == [f"{store}-data:/var/lib/fedrec"]
        assert "ports" not in node and edge["ports"]
        assert set(secret_targets(edge).values()) == {f"{store}-admin-token"}
    # the base file alone is the insecure development variant (documented as such)
    assert "--insecure" in base["services"]["superlink"]["command"]
    # every store's public key reaches the SuperLink's admin tooling for registration
    mounted = {c["target"] for c in services["superlink"]["configs"]}
    assert mounted == {f"/etc/fedrec/stores/{s}.pub" for s in STORES}


def test_store_compose_for_one_box_of_many(pki: Path) -> None:
    env = {"FEDREC_PKI_DIR": str(pki), "STORE": "store-02", "FEDREC_SUPERLINK": "c.example:9091"}
    doc = load("store.yml", env=env)
    check_compose(doc, COMPOSE)
    assert doc["name"] == "fedrec-store-02"
    cmd = doc["services"]["supernode"]["command"]
    assert cmd[cmd.index("--superlink") + 1] == "c.example:9091"
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]])["site-name"] == "store-02"
    assert doc["secrets"]["store.key"]["file"].endswith("stores/store-02.key")
    with pytest.raises(AssertionError, match="STORE"):
        load("store.yml", env={"FEDREC_PKI_DIR": str(pki)})


def _compose_available() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "the docker client is not installed"
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        return False, f"docker compose is not available: {reason[0] if reason else 'no plugin'}"
    return True, ""


@pytest.mark.skipif(not _compose_available()[0], reason=_compose_available()[1])
@pytest.mark.parametrize(
    "files", [["compose.yml"], ["compose.yml", "compose.tls.yml"], ["store.yml"]]
)
def test_docker_compose_config_accepts_the_files(pki: Path, files: list[str]) -> None:
    env = {
        **os.environ,
        "FEDREC_PKI_DIR": str(pki),
        "STORE": "store-01",
        "FEDREC_SUPERLINK": "coordinator.example.com:9091",
    }
    argv = ["docker", "compose"] + [a for f in files for a in ("-f", str(COMPOSE / f))]
    out = subprocess.run(
        [*argv, "config", "--quiet"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- Dockerfiles
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.edge", "Dockerfile.coordinator"])
def test_dockerfile_builds_cpu_torch_first_and_runs_as_non_root(name: str) -> None:
    steps = instructions(DEPLOY / "docker" / name)
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) == 2  # build stage + slim runtime stage
    final = steps[froms[-1] :]
    runs = [arg for op, arg in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_step = next(i for i, r in enumerate(runs) if '".[all]"' in r)
    assert torch_step < project_step and "--index-url" in runs[torch_step]
    assert "torch.version.cuda" in runs[project_step]  # refuses a CUDA torch
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0") and users[-1] == "fedrec"
    assert any(op == "HEALTHCHECK" and "healthcheck" in arg for op, arg in final)
    assert any(op == "VOLUME" and "/var/lib/fedrec" in arg for op, arg in final)
    assert any(op == "EXPOSE" for op, _ in final)
    assert not any(op == "ADD" for op, _ in steps)
    env = " ".join(arg for op, arg in final if op == "ENV")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in env
    for op, arg in steps:
        if op == "COPY" and "--from=" not in arg:
            sources = [a for a in shlex.split(arg) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), (name, source)
    entrypoint = DEPLOY / "docker" / "entrypoint.sh"
    assert os.access(entrypoint, os.X_OK)
    assert subprocess.run(["sh", "-n", str(entrypoint)], check=False).returncode == 0


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("name", ["Dockerfile.edge", "Dockerfile.coordinator"])
def test_hadolint_accepts_the_dockerfiles(name: str) -> None:
    out = subprocess.run(
        ["hadolint", str(DEPLOY / "docker" / name)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_entrypoint_turns_the_token_file_into_the_edge_setting(tmp_path: Path) -> None:
    # Arrange: a token file as Docker/systemd mount it
    token = tmp_path / "admin-token"
    token.write_text("t" * 43 + "\n")
    site = tmp_path / "site"
    env = {"PATH": os.environ["PATH"], "FEDREC_ADMIN_TOKEN_FILE": str(token)}
    env["FEDREC_SITE_DIR"] = str(site)
    # Act
    out = subprocess.run(
        [str(DEPLOY / "docker" / "entrypoint.sh"), "sh", "-c", "env"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    # Assert: exported without the trailing newline, the file variable gone, site dir made
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"FEDREC_EDGE_ADMIN_TOKEN={'t' * 43}" in lines
    assert not any(line.startswith("FEDREC_ADMIN_TOKEN_FILE=") for line in lines)
    assert (site / "models").is_dir()
    missing = subprocess.run(
        [str(DEPLOY / "docker" / "entrypoint.sh"), "true"],
        env={**env, "FEDREC_ADMIN_TOKEN_FILE": str(tmp_path / "nope")},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 1 and "cannot read" in missing.stderr


# ----------------------------------------------------------------------------- systemd
UNITS = sorted(
    p for p in (DEPLOY / "systemd").iterdir() if p.suffix in (".service", ".timer", ".target")
)
# What /etc/fedrec/store.env sets on a store box (deploy/systemd/store.env.example).
STORE_ENV = {"FEDREC_STORE": "store-01", "FEDREC_SUPERLINK": "c.example:9091"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_units_verify_without_warnings(tmp_path: Path) -> None:
    # Arrange: the units with their install paths pointed at this checkout (verify checks
    # that every ExecStart program exists and is executable)
    venv_bin = str(Path(sys.executable).parent) + "/"
    for unit in UNITS:
        text = unit.read_text().replace("/opt/fedrec/venv/bin/", venv_bin)
        (tmp_path / unit.name).write_text(text.replace("/opt/fedrec/app/", f"{REPO}/"))
    # Act
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    # Assert: accepted, and not a single ignored line or unknown key
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def unit_settings(unit: Path) -> dict[str, list[str]]:
    text = re.sub(r"\\\n\s*", " ", unit.read_text())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize(
    "name", ["fedrec-supernode.service", "fedrec-edge.service", "fedrec-superlink.service"]
)
def test_long_running_units_restart_and_are_hardened(name: str) -> None:
    s = unit_settings(DEPLOY / "systemd" / name)
    assert s["User"] == ["fedrec"] and s["Restart"] == ["on-failure"]
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("StateDirectory", "fedrec"),
    ]:
        assert s[key] == [value], (name, key)
    credentials = " ".join(s.get("LoadCredential", []))
    assert "/etc/fedrec/" in credentials  # secrets never in the unit or the environment
    (command,) = s["ExecStart"]
    env = {**STORE_ENV, "CREDENTIALS_DIRECTORY": "/run/credentials/x"}
    for assignment in s.get("Environment", []):  # defaults the unit sets itself
        key, _, value = assignment.partition("=")
        env.setdefault(key, value)
    argv = [interpolate(a, env) for a in shlex.split(command)]
    if "flower-" in argv[0]:
        binary = Path(argv[0]).name
        flags = {a for a in argv if a.startswith("--")}
        assert flags <= flower_flags(binary), flags - flower_flags(binary)
        assert "--insecure" not in argv
    if "--node-config" in argv:
        config = parse_config_args([argv[argv.index("--node-config") + 1]])
        assert config["site-dir"] == "/var/lib/fedrec/site"


# ----------------------------------------------------------------------------- scripts
SCRIPT_FILES = sorted(SCRIPTS.glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPT_FILES, ids=lambda p: p.name)
def test_scripts_parse_and_explain_their_usage(script: Path) -> None:
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    if script.name != "create-pki.sh":  # every argument of create-pki.sh has a default
        out = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        assert out.returncode == 2 and "usage:" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_accepts_the_scripts() -> None:
    files = [str(p) for p in [*SCRIPT_FILES, DEPLOY / "docker" / "entrypoint.sh"]]
    out = subprocess.run(["shellcheck", *files], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_the_scripts_make_a_complete_pki(pki: Path) -> None:
    # (made by the fixture with create-pki.sh) -- the pieces the compose files need
    assert {p.name for p in pki.iterdir()} == {
        "ca.crt", "ca.key", "superlink.crt", "superlink.key", "stores",
    }  # fmt: skip
    from deploy.certificates import verify_server_certificate

    for host in ("superlink", "localhost"):
        verify_server_certificate(
            pki / "ca.crt", pki / "superlink.crt", pki / "superlink.key", host
        )
    names = sorted(p.name for p in (pki / "stores").iterdir())
    assert names == sorted(f"{s}.{ext}" for s in STORES for ext in ("admin-token", "key", "pub"))
