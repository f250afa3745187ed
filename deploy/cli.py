"""`fedrec deploy`: certificates, store admission and revocation, and a local secured stack.

A thin layer over `deploy.certificates`, `deploy.registration` and `deploy.local_stack`;
``--json`` prints machine-readable output. Paths default to a deployment state directory
(``--state-dir``, default ``$FEDREC_DEPLOY_DIR`` or ``state/deploy``): ``pki/``, ``flwr/``
(the Flower home with the SuperLink connection) and ``stores.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from deploy.errors import DeployError

if TYPE_CHECKING:
    from deploy.local_stack import ComponentStatus

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Deploy fedrec: certificates, store admission/revocation, a local secured stack.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
pki_app = typer.Typer(
    help="Create the CA, the SuperLink certificate and store keys; inspect and rotate them.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
store_app = typer.Typer(
    help="Admit (register), revoke and list stores on a SuperLink.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)
app.add_typer(pki_app, name="pki")
app.add_typer(store_app, name="store")

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Deployment state directory (default: $FEDREC_DEPLOY_DIR or state/deploy).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
PkiDir = Annotated[
    Path | None, typer.Option("--dir", help="PKI directory (default: <state-dir>/pki).")
]
FlwrHome = Annotated[
    Path | None,
    typer.Option("--flwr-home", help="Flower home with config.toml (default: <state-dir>/flwr)."),
]
Connection = Annotated[
    str, typer.Option("--connection", "-c", help="SuperLink connection in config.toml.")
]
Registry = Annotated[
    Path | None,
    typer.Option("--registry", help="Store registry file (default: <state-dir>/stores.json)."),
]

console = Console()


def _state(state_dir: Path | None) -> Path:
    from deploy.local_stack import default_state_dir

    return (state_dir or default_state_dir()).resolve()


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- local stack
@app.command()
def local(
    sites: Annotated[int, typer.Option("--sites", "-n", min=1, help="Number of stores.")] = 3,
    state_dir: StateDir = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            "--base-port",
            help="SuperLink on this port, SuperNode i on +100+i, edge i on +200+i "
            "(default: free ports chosen by the OS).",
        ),
    ] = None,
    shoppers: Annotated[int, typer.Option(min=5, help="Synthetic shoppers per store.")] = 40,
    items: Annotated[int, typer.Option(min=10, help="Synthetic catalogue size.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    epsilon_budget: Annotated[
        float, typer.Option(help="Each store's total privacy budget (epsilon).")
    ] = 10.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every component to be healthy.")
    ] = 180.0,
    as_json: JsonFlag = False,
) -> None:
    """Start a SuperLink (TLS + SuperNode auth), N SuperNodes and N edge services here.

    Returns once all are healthy; they keep running until `fedrec deploy down`.

    Example: fedrec deploy local --sites 3
    """
    from deploy.local_stack import LocalStack, LocalStackConfig

    stack = LocalStack(state_dir and state_dir.resolve())
    config = LocalStackConfig(
        sites=sites,
        base_port=base_port,
        shoppers_per_site=shoppers,
        n_items=items,
        seed=seed,
        epsilon_budget=epsilon_budget,
        startup_timeout=timeout,
    )
    err_console = Console(stderr=True)
    statuses = stack.up(config, progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    if as_json:
        _print_json(_status_payload(stack.root, statuses))
        return
    _render_status(statuses, stack.root)
    console.print(
        f"run a federated round: fedrec coordinator run --state-dir {stack.root} -c fedrec -n 1 "
        f"--run-config 'min-sites={sites} quorum={sites}'\n"
        f"stop everything: fedrec deploy down --state-dir {stack.root}"
    )


def _status_payload(root: Path, statuses: list[ComponentStatus]) -> dict[str, Any]:
    return {
        "state_dir": str(root),
        "healthy": bool(statuses) and all(s.healthy for s in statuses),
        "components": [s.to_dict() for s in statuses],
    }


def _render_status(statuses: list[ComponentStatus], root: Path) -> None:
    table = Table(title=f"fedrec local stack in {root} (logs relative to it)")
    for col in ("component", "ports", "pid", "health", "detail", "log"):
        table.add_column(col, overflow="fold")
    for s in statuses:
        log = Path(s.log)
        shown = str(log.relative_to(root)) if log.is_relative_to(root) else s.log
        health = (
            "[green]healthy[/]"
            if s.healthy
            else ("[red]stopped[/]" if not s.running else "[yellow]unhealthy[/]")
        )
        ports = " ".join(f"{k}={v}" for k, v in s.ports.items())
        table.add_row(s.name, ports, str(s.pid), health, s.detail, shown)
    console.print(table)


@app.command()
def status(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Each component of the local stack with its ports, pid, health and log.

    Exit status 1 when a component is not healthy or nothing is running.

    Example: fedrec deploy status --json
    """
    from deploy.local_stack import LocalStack

    stack = LocalStack(_state(state_dir))
    statuses = stack.status()
    if as_json:
        _print_json(_status_payload(stack.root, statuses))
    elif statuses:
        _render_status(statuses, stack.root)
    else:
        console.print(f"no stack is running from {stack.root}")
    if not statuses or not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@app.command()
def down(
    state_dir: StateDir = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds each process gets after SIGTERM before SIGKILL.")
    ] = 15.0,
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the state directory (data, keys, logs).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Stop every process of the local stack (and anything they spawned).

    Example: fedrec deploy down
    """
    from deploy.local_stack import LocalStack

    stack = LocalStack(_state(state_dir))
    report = stack.down(timeout=timeout, purge=purge)
    if as_json:
        _print_json(report.to_dict())
        return
    console.print(
        f"stopped {len(report.stopped)} component(s)"
        + (f", SIGKILLed {len(report.killed_pids)}" if report.killed_pids else "")
        + (f", killed {len(report.stray_pids)} leftover process(es)" if report.stray_pids else "")
        + f"; nothing of the stack in {stack.root} is running"
        + (" (state deleted)" if purge else "")
    )


@app.command()
def healthcheck(
    url: Annotated[
        str,
        typer.Argument(
            help="URL to GET, e.g. https://localhost:9091/health.",
            envvar="FEDREC_HEALTHCHECK_URL",
        ),
    ],
    ca: Annotated[
        str,
        typer.Option(
            "--ca",
            help="CA certificate to verify an https URL with ('' = system CAs).",
            envvar="FEDREC_HEALTHCHECK_CA",
        ),
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds before giving up.")] = 5.0,
) -> None:
    """Exit 0 when URL answers 200 (and, for a JSON body with `ready`, ready is true).

    The container images' HEALTHCHECK runs it with FEDREC_HEALTHCHECK_URL/_CA.

    Example: fedrec deploy healthcheck http://127.0.0.1:8000/readyz
    """
    import ssl

    import httpx

    verify: ssl.SSLContext | bool = True
    if ca:
        verify = ssl.create_default_context(cafile=ca)
    try:
        response = httpx.get(url, verify=verify, timeout=timeout)
    except httpx.HTTPError as err:
        raise DeployError(f"{url}: {type(err).__name__}: {err}") from err
    if response.status_code != 200:
        raise DeployError(f"{url}: HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("ready") is False:
        raise DeployError(f"{url}: not ready: {body}")
    console.print(f"{url}: ok")


# ----------------------------------------------------------------------------- pki
def _pki_dir(pki_dir: Path | None, state_dir: Path | None) -> Path:
    return (pki_dir or _state(state_dir) / "pki").resolve()


@pki_app.command("init")
def pki_init(
    host: Annotated[
        list[str],
        typer.Option(
            "--host", help="DNS name or IP address of the SuperLink (repeatable; all used)."
        ),
    ],
    store: Annotated[
        list[str] | None, typer.Option("--store", help="Create a key pair for this store.")
    ] = None,
    pki_dir: PkiDir = None,
    state_dir: StateDir = None,
    ca_days: Annotated[int, typer.Option(help="CA validity in days.")] = 3650,
    server_days: Annotated[int, typer.Option(help="SuperLink certificate validity.")] = 397,
    as_json: JsonFlag = False,
) -> None:
    """Create what is missing: CA, SuperLink certificate for --host, one key pair per --store.

    Existing files are kept, so running it again only adds stores.

    Example: fedrec deploy pki init --dir pki --host coordinator.example.com --store store-01
    """
    from deploy.certificates import init_pki

    root = _pki_dir(pki_dir, state_dir)
    ca, server, keys = init_pki(
        root, hosts=host, stores=store or [], ca_days=ca_days, server_days=server_days
    )
    payload = {
        "dir": str(root),
        "ca": ca.to_dict(),
        "superlink": server.to_dict(),
        "stores": [
            {
                "name": k.name,
                "private_key": str(k.private_key),
                "public_key": str(k.public_key),
                "fingerprint": k.fingerprint,
            }
            for k in keys
        ],
    }
    if as_json:
        _print_json(payload)
        return
    _render_pki(payload)


def _render_pki(payload: dict[str, Any]) -> None:
    table = Table(title=f"PKI in {payload['dir']}")
    for col in ("file", "subject / fingerprint", "valid until", "days left", "names"):
        table.add_column(col, overflow="fold")
    for key in ("ca", "superlink"):
        info = payload.get(key)
        if info:
            names = ", ".join(info["dns_names"] + info["ip_addresses"])
            table.add_row(
                Path(info["path"]).name,
                info["subject"],
                info["not_after"][:10],
                str(info["days_left"]),
                names,
            )
    for k in payload.get("stores", []):
        table.add_row(Path(k["public_key"]).name, k["fingerprint"], "", "", k["name"])
    console.print(table)


@pki_app.command("ca")
def pki_ca(
    pki_dir: PkiDir = None,
    state_dir: StateDir = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
    common_name: Annotated[str, typer.Option(help="The CA's name.")] = "fedrec federation CA",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA (a CA rotation).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create the CA (ca.crt, ca.key 0600) that signs the SuperLink's certificate.

    Example: fedrec deploy pki ca --dir pki
    """
    from deploy.certificates import PkiLayout, create_ca

    layout = PkiLayout(_pki_dir(pki_dir, state_dir))
    info = create_ca(
        layout.ca_cert, layout.ca_key, common_name=common_name, days=days, overwrite=force
    )
    if as_json:
        _print_json(info.to_dict())
    else:
        console.print(
            f"CA {info.path}: {info.subject}, valid until {info.not_after[:10]}; "
            f"keep {layout.ca_key} offline"
        )


@pki_app.command("server")
def pki_server(
    host: Annotated[list[str], typer.Option("--host", help="DNS name or IP address (repeatable).")],
    pki_dir: PkiDir = None,
    state_dir: StateDir = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 397,
    as_json: JsonFlag = False,
) -> None:
    """Issue (or rotate) the SuperLink's TLS certificate from the CA for every --host.

    Stores trust the CA, not this certificate: rotating it needs no change on any store,
    only a SuperLink restart.

    Example: fedrec deploy pki server --dir pki --host coordinator.example.com --host 10.0.0.5
    """
    from deploy.certificates import PkiLayout, issue_server_certificate

    layout = PkiLayout(_pki_dir(pki_dir, state_dir))
    info = issue_server_certificate(
        layout.ca_cert,
        layout.ca_key,
        layout.superlink_cert,
        layout.superlink_key,
        hosts=host,
        days=days,
    )
    if as_json:
        _print_json(info.to_dict())
    else:
        console.print(
            f"SuperLink certificate {info.path}: serial {info.serial}, valid until "
            f"{info.not_after[:10]}, names {', '.join(info.dns_names + info.ip_addresses)}"
        )


@pki_app.command("store-key")
def pki_store_key(
    name: Annotated[str, typer.Argument(help="Store name, e.g. store-04.")],
    pki_dir: PkiDir = None,
    state_dir: StateDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key (e.g. after revocation).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a store's SuperNode key pair and edge admin token under stores/.

    NAME.key (0600, goes to the store box), NAME.pub (registered on the SuperLink),
    NAME.admin-token (0600, the store's FEDREC_EDGE_ADMIN_TOKEN; kept if it exists).

    Example: fedrec deploy pki store-key store-04 --dir pki
    """
    from deploy.certificates import PkiLayout, create_store_key, ensure_token

    layout = PkiLayout(_pki_dir(pki_dir, state_dir))
    layout.ensure_stores_dir()
    key = create_store_key(
        layout.store_private_key(name), layout.store_public_key(name), name=name, overwrite=force
    )
    ensure_token(layout.store_token(name))
    payload = {
        "name": key.name,
        "private_key": str(key.private_key),
        "public_key": str(key.public_key),
        "admin_token": str(layout.store_token(name)),
        "fingerprint": key.fingerprint,
    }
    if as_json:
        _print_json(payload)
    else:
        console.print(
            f"{key.name}: private key {key.private_key} (to the store box, mode 0600), "
            f"public key {key.public_key} ({key.fingerprint}), admin token "
            f"{layout.store_token(name)}"
        )


@pki_app.command("ca-bundle")
def pki_ca_bundle(
    certs: Annotated[list[Path], typer.Argument(help="CA certificates, old and new.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle to write.")],
) -> None:
    """Write a CA bundle (several CA certificates) that stores trust during a CA rotation.

    Example: fedrec deploy pki ca-bundle old/ca.crt new/ca.crt -o ca-bundle.crt
    """
    from deploy.certificates import ca_bundle

    console.print(f"wrote {ca_bundle(certs, out)} with {len(certs)} CA certificate(s)")


@pki_app.command("show")
def pki_show(
    pki_dir: PkiDir = None,
    state_dir: StateDir = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Also check the certificate names this host.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The CA, the SuperLink certificate (checked against the CA) and the store keys.

    Example: fedrec deploy pki show --dir pki --host coordinator.example.com
    """
    from deploy.certificates import (
        PkiLayout,
        certificate_info,
        public_key_fingerprint,
        verify_server_certificate,
    )

    layout = PkiLayout(_pki_dir(pki_dir, state_dir))
    payload: dict[str, Any] = {"dir": str(layout.root)}
    payload["ca"] = certificate_info(layout.ca_cert).to_dict()
    if layout.superlink_cert.exists():
        key = layout.superlink_key if layout.superlink_key.exists() else None
        payload["superlink"] = verify_server_certificate(
            layout.ca_cert, layout.superlink_cert, key, host
        ).to_dict()
    payload["stores"] = [
        {
            "name": name,
            "public_key": str(layout.store_public_key(name)),
            "private_key": str(layout.store_private_key(name)),
            "fingerprint": public_key_fingerprint(layout.store_public_key(name)),
        }
        for name in layout.store_names()
    ]
    if as_json:
        _print_json(payload)
    else:
        _render_pki(payload)


# ----------------------------------------------------------------------------- stores
def _admin_and_registry(
    state_dir: Path | None, flwr_home: Path | None, connection: str, registry: Path | None
) -> tuple[Any, Any]:
    from deploy.registration import FlowerAdmin, StoreRegistry

    root = _state(state_dir)
    admin = FlowerAdmin((flwr_home or root / "flwr").resolve(), connection)
    return admin, StoreRegistry((registry or root / "stores.json").resolve())


@store_app.command("register")
def store_register(
    name: Annotated[str, typer.Argument(help="Store name, e.g. store-04.")],
    key: Annotated[Path, typer.Option("--key", help="The store's OpenSSH public key (.pub).")],
    state_dir: StateDir = None,
    flwr_home: FlwrHome = None,
    connection: Connection = "fedrec",
    registry: Registry = None,
    as_json: JsonFlag = False,
) -> None:
    """Admit a store: register its public key on the SuperLink and record its node id.

    Example: fedrec deploy store register store-04 --key pki/stores/store-04.pub -c fedrec
    """
    from deploy.registration import register_store

    admin, reg = _admin_and_registry(state_dir, flwr_home, connection, registry)
    record = register_store(admin, reg, name, key)
    if as_json:
        _print_json(record.__dict__)
    else:
        console.print(f"registered {name}: node {record.node_id}, key {record.fingerprint}")


@store_app.command("revoke")
def store_revoke(
    name: Annotated[str, typer.Argument(help="Store name.")],
    state_dir: StateDir = None,
    flwr_home: FlwrHome = None,
    connection: Connection = "fedrec",
    registry: Registry = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a store: its SuperNode is refused from its next request on and cannot rejoin.

    Its key can never be registered again; a store that comes back gets a new key.

    Example: fedrec deploy store revoke store-02 -c fedrec
    """
    from deploy.registration import revoke_store

    admin, reg = _admin_and_registry(state_dir, flwr_home, connection, registry)
    record = revoke_store(admin, reg, name)
    if as_json:
        _print_json(record.__dict__)
    else:
        console.print(f"revoked {name} (node {record.node_id}) at {record.revoked_at}")


@store_app.command("list")
def store_list(
    state_dir: StateDir = None,
    flwr_home: FlwrHome = None,
    connection: Connection = "fedrec",
    registry: Registry = None,
    as_json: JsonFlag = False,
) -> None:
    """Every recorded store with its node id, key fingerprint and status on the SuperLink.

    Example: fedrec deploy store list --json
    """
    from deploy.registration import store_statuses

    admin, reg = _admin_and_registry(state_dir, flwr_home, connection, registry)
    rows = store_statuses(admin, reg)
    if as_json:
        _print_json(rows)
        return
    table = Table(title="stores")
    for col in ("store", "node id", "status", "key", "registered", "revoked"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["store"],
            str(r["node_id"]),
            r["status"],
            r["fingerprint"],
            r["registered_at"],
            r["revoked_at"] or "",
        )
    console.print(table)


@app.command()
def connection(
    name: Annotated[str, typer.Argument(help="Connection name, e.g. fedrec.")],
    address: Annotated[str, typer.Option("--address", help="SuperLink host:port.")],
    ca: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate (or bundle) to trust.")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP (development only).")
    ] = False,
    state_dir: StateDir = None,
    flwr_home: FlwrHome = None,
) -> None:
    """Write a SuperLink connection into the Flower home's config.toml (others kept).

    Example: fedrec deploy connection fedrec --address coordinator.example.com:9091 --ca ca.crt
    """
    from deploy.registration import write_connection

    home = (flwr_home or _state(state_dir) / "flwr").resolve()
    if (ca is None) == (not insecure):
        raise DeployError("give exactly one of --ca (TLS) and --insecure")
    if ca is not None and not ca.exists():
        raise DeployError(f"CA certificate {ca} does not exist")
    path = write_connection(home, name, address, root_certificates=ca)
    console.print(f"wrote connection {name} -> {address} into {path}")


@app.command()
def backup(
    databases: Annotated[
        list[Path], typer.Argument(help="SQLite files: site.db, coordinator.db, superlink.db.")
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Directory for the copies.")],
    keep: Annotated[
        int, typer.Option(min=1, help="Keep this many newest backups of each database.")
    ] = 14,
    as_json: JsonFlag = False,
) -> None:
    """Online, WAL-safe backup of live SQLite files (services keep running).

    Each copy is a consistent snapshot, integrity-checked, named
    <dir>-<name>-<UTC time>.db; older copies beyond --keep are deleted.

    Example: fedrec deploy backup /var/lib/fedrec/site/site.db -o /var/backups/fedrec
    """
    from deploy.backup import backup_name, backup_sqlite, prune_backups

    results = [backup_sqlite(db, out_dir / backup_name(db)) for db in databases]
    removed = prune_backups(out_dir, keep)
    if as_json:
        _print_json(
            {"backups": [r.to_dict() for r in results], "removed": [str(p) for p in removed]}
        )
        return
    for r in results:
        console.print(
            f"{r.source} -> {r.destination}: {r.bytes} bytes, {r.pages} pages, "
            f"integrity {r.integrity}, {r.seconds:.2f} s"
        )
    if removed:
        console.print(f"deleted {len(removed)} older backup(s)")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write into.")],
    stores: Annotated[int, typer.Option("--stores", min=1, help="Number of stores.")] = 3,
    shoppers: Annotated[int, typer.Option(min=5, help="Shoppers per store.")] = 200,
    items: Annotated[int, typer.Option(min=10, help="Catalogue size.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
) -> None:
    """Synthetic catalogue.json and one events file per store (store-01.csv, ...).

    Load each file into its store with POST /v1/admin/import or `fedrec edge import`; give
    the coordinator's first run the catalogue.

    Example: fedrec deploy demo-data --stores 3 -o state/compose/demo
    """
    from deploy.demo_data import write_demo_data

    names = [f"store-{i:02d}" for i in range(1, stores + 1)]
    written = write_demo_data(
        out, stores=names, shoppers_per_store=shoppers, n_items=items, seed=seed
    )
    for name, path in written.items():
        console.print(f"{name}: {path}")
