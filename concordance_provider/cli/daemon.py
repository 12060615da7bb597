"""Running the daemon and building components: `up`, `provider`, `build`, `version`."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import SecretStr

from .. import __version__
from ..build import BuildError, build_component
from ..config import NatsOptions, SecretError, one_secret, redact
from ..daemon import Daemon, DaemonFailed
from ..logging import configure
from ..manifest import ManifestError, load_manifest
from ..links import LinkError
from ..manifest import Manifest
from ..nats_server import EmbeddedNatsServer, NatsServerError
from ..provider import HostData, HostDataError, ProviderEndpoint, read_host_data
from ..runtime.wasmtime_host import ComponentLoadError
from ..links import Role
from ..signing import Signer, SigningKeyError
from ..stateless_process import STATELESS_ROLES, StatelessProcess, parse_roles, stop_when_stdin_closes
from ..store.streams import IncompatibleStream
from .common import app, duration_seconds, fail


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def up(
    manifest: Optional[Path] = typer.Argument(None, help="wadm-style application YAML; without one, "
                                              "components are linked at run time (concordance deploy)"),
    nats_url: Optional[str] = typer.Option(None, envvar="NATS_URL",
                                           help="use this NATS server instead of starting one"),
    user: Optional[str] = typer.Option(None, envvar="NATS_USER"),
    password: Optional[str] = typer.Option(None, envvar="NATS_PASSWORD", help="visible to every local user in the "
                                           "process list: prefer --password-file, or NATS_PASSWORD"),
    password_file: Optional[Path] = typer.Option(None, envvar="NATS_PASSWORD_FILE",
                                                 help="file whose first line is the NATS password"),
    token: Optional[str] = typer.Option(None, envvar="NATS_TOKEN", help="visible to every local user in the "
                                        "process list: prefer --token-file, or NATS_TOKEN"),
    token_file: Optional[Path] = typer.Option(None, envvar="NATS_TOKEN_FILE",
                                              help="file whose first line is the NATS token"),
    creds: Optional[Path] = typer.Option(None, envvar="NATS_CREDS", help="NATS credentials file (JWT + nkey seed)"),
    tls_ca: Optional[Path] = typer.Option(None, envvar="NATS_CA", help="CA certificate to verify the NATS server"),
    js_domain: Optional[str] = typer.Option(None, help="JetStream domain"),
    state_dir: Path = typer.Option(Path(".concordance"), envvar="CONCORDANCE_STATE_DIR",
                                   help="where the embedded NATS server keeps its data"),
    port: int = typer.Option(4222, help="port of the embedded NATS server (loopback only)"),
    health_port: Optional[int] = typer.Option(None, help="serve GET /health and GET /metrics (Prometheus) on "
                                                          "this loopback port"),
    stuck_after: float = typer.Option(120.0, help="seconds a consumer may spend on one batch before health "
                                                   "reports it stuck"),
    lattice: Optional[str] = typer.Option(None, help="also take links at run time on this lattice's provider "
                                                     "subjects (concordance deploy sends them there)"),
    provider_id: str = typer.Option("concordance", help="provider id in wasmbus.rpc.{lattice}.{provider_id}.*"),
    component_dir: Optional[Path] = typer.Option(None, help="with --lattice: the only directory a link's "
                                                 "COMPONENT_FILE may name files in (without it, COMPONENT_FILE is refused)"),
    allow_lattice_replace: bool = typer.Option(False, help="with --lattice: let a lattice link replace or unlink a "
                                                           "component the manifest declares"),
    results_ttl: str = typer.Option("1d", envvar="CONCORDANCE_RESULTS_TTL",
                                    help="how long CC_RESULTS keeps each command's outcome, e.g. 90s, 30m, 12h, 7d"),
    signing_key_file: Optional[Path] = typer.Option(
        None, envvar="CONCORDANCE_SIGNING_KEY_FILE",
        help="a secret shared by the daemons (at least 32 bytes, readable by its owner only): events and "
             "state are signed with it, and what does not verify is never folded or handled"),
    stateless_process: bool = typer.Option(
        False, help="run the manifest's projectors, notifiers and process managers in a second process, "
                    "so that a second core works beside the aggregates (it has no --health-port of its own)"),
    roles: Optional[str] = typer.Option(None, help="link only the manifest's components of these roles, "
                                                   "e.g. aggregate or projector,notifier,process_manager"),
    stop_with_stdin: bool = typer.Option(False, hidden=True, help="stop when standard input closes"),
    log_level: str = typer.Option("info"),
    log_format: str = typer.Option("auto", help="auto, json or console"),
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    Without --nats-url (or NATS_URL) it starts its own NATS server on 127.0.0.1:--port, keeping
    its data in --state-dir; another daemon on the same port or directory is refused at once.
    With --lattice it also links any component sent to wasmbus.rpc.{lattice}.{provider_id}.linkdefs.put.
    """
    configure(log_level, log_format)
    linked_roles = _roles(roles, stateless_process, manifest is not None, lattice is not None)
    try:
        results_seconds = duration_seconds(results_ttl)
    except ValueError as exc:
        fail(f"--results-ttl: {exc}")
    if manifest is None and lattice is None:
        fail("nothing to run: give a manifest, or --lattice to take links at run time")
    signer = _signer(signing_key_file)
    app_manifest: Manifest | None = None
    if manifest is not None:
        try:
            app_manifest = load_manifest(manifest)
        except ManifestError as exc:
            fail(str(exc))
    try:
        password_secret = one_secret(password, password_file, "password")
        token_secret = one_secret(token, token_file, "token")
    except SecretError as exc:
        fail(str(exc))
    server = None
    if nats_url is None:
        server = EmbeddedNatsServer(state_dir.resolve(), port)
        try:
            server.start()
        except NatsServerError as exc:
            fail(str(exc))
        nats_url = server.url
    options = NatsOptions(url=nats_url, user=user, password=password_secret, token=token_secret,
                          creds_file=creds, tls_ca=tls_ca, js_domain=js_domain)
    endpoint = None if lattice is None else ProviderEndpoint(
        HostData(lattice_rpc_prefix=lattice, provider_key=provider_id, lattice_rpc_url=nats_url),
        component_dir=component_dir, allow_replace=allow_lattice_replace)
    daemon = Daemon(options, app_manifest, health_port=health_port, stuck_after=stuck_after,
                    results_ttl=results_seconds, signer=signer, roles=linked_roles,
                    on_connected=endpoint.start if endpoint else None, on_stopped=endpoint.finish if endpoint else None)
    second = None
    if stateless_process and app_manifest is not None and any(
            spec.interest.role in STATELESS_ROLES for spec in app_manifest.components):
        assert manifest is not None
        second = StatelessProcess(manifest, _second_arguments(
            options, stuck_after, results_ttl, signing_key_file, log_level, log_format),
            environment=_second_environment(options.url, password_secret, token_secret))
    try:
        asyncio.run(_serve(daemon, server, second, stop_with_stdin))
    except (ComponentLoadError, IncompatibleStream, DaemonFailed, LinkError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach NATS at {options.safe_url}: {redact(str(exc))}")
    finally:
        if server is not None:
            server.stop()


def _roles(text: str | None, stateless_process: bool, has_manifest: bool, has_lattice: bool) -> frozenset[Role] | None:
    """The roles this process links; exits saying why when the options do not go together."""
    if text is None and not stateless_process:
        return None
    option = "--roles" if text is not None else "--stateless-process"
    if text is not None and stateless_process:
        fail("--roles and --stateless-process do not go together: --stateless-process sets the roles "
             "of both processes")
    if not has_manifest or has_lattice:
        fail(f"{option} needs a manifest and no --lattice: links taken at run time may be of any role")
    if stateless_process:
        return frozenset({Role.AGGREGATE})
    try:
        return parse_roles(text or "")
    except ValueError as exc:
        fail(f"--roles: {exc}")


def _second_arguments(options: NatsOptions, stuck_after: float, results_ttl: str, signing_key_file: Path | None,
                      log_level: str, log_format: str) -> list[str]:
    """The second process's options: the same credentials and settings as this one (the server's URL,
    which may hold a password, goes in its environment)."""
    arguments = ["--stuck-after", str(stuck_after), "--results-ttl", results_ttl,
                 "--log-level", log_level, "--log-format", log_format]
    for flag, value in (("--user", options.user), ("--creds", options.creds_file), ("--tls-ca", options.tls_ca),
                        ("--js-domain", options.js_domain), ("--signing-key-file", signing_key_file)):
        if value is not None:
            arguments += [flag, str(value)]
    return arguments


def _second_environment(url: str, password: SecretStr | None, token: SecretStr | None) -> dict[str, str]:
    """What may hold a secret (a URL with a password in it, too) goes to the second process in its
    environment, readable by its owner only, never on its command line."""
    environment = {"NATS_URL": url}
    if password is not None:
        environment["NATS_PASSWORD"] = password.get_secret_value()
    if token is not None:
        environment["NATS_TOKEN"] = token.get_secret_value()
    return environment


def _signer(key_file: Path | None) -> Signer | None:
    """The signing key in ``key_file``, or None without one; exits with the reason if it is unusable."""
    if key_file is None:
        return None
    try:
        return Signer.from_file(key_file)
    except SigningKeyError as exc:
        fail(str(exc))


async def _serve(daemon: Daemon, server: EmbeddedNatsServer | None, second: StatelessProcess | None = None,
                 stop_with_stdin: bool = False) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stopping.set)
    background = [asyncio.create_task(server.supervise(daemon.stopping))] if server else []
    if stop_with_stdin:
        background.append(asyncio.create_task(stop_when_stdin_closes(daemon.stopping)))
    if second is not None:
        background.append(asyncio.create_task(_run_second(daemon, second)))
    background.append(asyncio.create_task(_freeze_startup_objects(daemon)))
    try:
        await daemon.run()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if second is not None:
            await second.stop()


async def _freeze_startup_objects(daemon: Daemon) -> None:
    """Once ready, everything loaded so far (modules, components, schemas) is left out of the cyclic
    garbage collector's full passes: each of those stalled the event loop, and every command in
    flight, for 25-30 ms, a few times a minute under load."""
    await daemon.ready.wait()
    gc.collect()
    gc.freeze()


async def _run_second(daemon: Daemon, second: StatelessProcess) -> None:
    """Start the second process once this one is ready (the streams exist); if it ends on its own,
    stop this one too, saying so."""
    await daemon.ready.wait()
    await second.start()
    code = await second.ended()
    if not daemon.stopping.is_set():
        daemon.fail(f"the stateless process (projectors, notifiers, process managers) exited with code {code}")


@app.command()
def provider() -> None:
    """Run as a wasmCloud host starts a capability provider.

    Reads HostData on stdin, then serves the provider subjects until its host asks for shutdown:
    it answers within the host's 300 ms, then drains until the host kills it (or exits 0).
    COMPONENT_DIR in the provider config names the directory COMPONENT_FILE may load from.
    """
    try:
        host = read_host_data(sys.stdin.readline())
    except HostDataError as exc:
        configure("info", "json")
        fail(str(exc))
    configure(host.python_log_level, "json" if host.structured_logging else "console")
    config = {k.strip().lower(): v for k, v in host.config.items()}
    options = NatsOptions(url=host.lattice_rpc_url, user_jwt=host.lattice_rpc_user_jwt or None,
                          user_seed=host.lattice_rpc_user_seed or None, js_domain=config.get("js_domain") or None)
    endpoint = ProviderEndpoint(host)
    key_file = config.get("signing_key_file")
    daemon = Daemon(options, on_connected=endpoint.start, on_stopped=endpoint.finish,
                    signer=_signer(Path(key_file) if key_file else None))
    try:
        asyncio.run(_serve(daemon, None))
    except (IncompatibleStream, DaemonFailed) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach the lattice at {redact(host.lattice_rpc_url)}: {redact(str(exc))}")


@app.command()
def build(
    source_dir: Path = typer.Argument(..., help="folder holding the component's app.py"),
    world: str = typer.Option(..., help="aggregate, process-manager or stateless-handler"),
    output: Path = typer.Option(..., "-o", "--output", help="the .wasm file to write"),
    module: str = typer.Option("app", help="the Python module that defines WitWorld"),
    target: str = typer.Option("embedded", help="embedded (run in-process by the daemon) or lattice "
                                                "(wasmCloud messaging-handler, run by a wasmCloud host)"),
) -> None:
    """Build a Python component against interface/ with componentize-py."""
    try:
        built = build_component(source_dir, world, output, module, target=target)
    except BuildError as exc:
        fail(str(exc))
    typer.echo(f"{output}: {'built' if built else 'up to date'}")


