"""`iot-platform`: the operator's command line."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from iot_platform.broker_control import reload_broker
from iot_platform.pki import PKIError, device_paths, dp_crl_path
from iot_platform.pki_runs import ACTOR_TAG, ENROLL, REVOKE, PkiJob
from iot_platform.services.mosquitto import BrokerConfig
from iot_platform.services.process import ServiceError
from iot_platform.settings import (
    PlatformSettings,
    SettingsError,
    env_secret,
    env_str,
    exec_environment,
)

if TYPE_CHECKING:
    from iot_platform.enrollment import CertificateRow, RevocationReason
    from iot_platform.launcher import RunOutcome


def _cmd_up(settings: PlatformSettings, _args: argparse.Namespace) -> int:
    from iot_platform.health import HealthSettings
    from iot_platform.stack import run_embedded

    HealthSettings.from_env()  # a mistyped IOT_HEALTH_* is refused before anything starts
    return run_embedded(settings)


def _cmd_pki_init(settings: PlatformSettings, _args: argparse.Namespace) -> int:
    from iot_platform.stack import prepare_pki

    created = prepare_pki(settings)
    what = ", ".join(created) if created else "nothing (CA and certificates already present)"
    print(
        f"PKI in {settings.certs_dir}: created {what}; CRL re-signed for {settings.crl_days} days"
    )
    return 0


def _cmd_broker_config(settings: PlatformSettings, args: argparse.Namespace) -> int:
    if args.broker == "emqx":
        from iot_platform.services.emqx import EmqxConfig

        emqx = EmqxConfig(
            port=args.port or settings.broker_port,
            certs_dir=Path(args.certs_dir or settings.certs_dir),
            config_dir=Path(args.out_dir),
            bind_address=args.bind,
            max_inflight=settings.broker_max_inflight,
            max_queued=settings.broker_max_queued,
            crl_url=settings.crl_url,
        )
        print(f"wrote {emqx.write()} and {emqx.config_dir / 'acl.conf'}")
        if not settings.crl_url:
            print(_emqx_without_crl_warning(), file=sys.stderr)
        return 0
    if not args.data_dir:
        raise SettingsError("--data-dir is required for Mosquitto (its persistence directory)")
    config = BrokerConfig(
        port=args.port or settings.broker_port,
        certs_dir=Path(args.certs_dir or settings.certs_dir),
        config_dir=Path(args.out_dir),
        data_dir=Path(args.data_dir),
        bind_address=args.bind,
        max_inflight=settings.broker_max_inflight,
        max_queued=settings.broker_max_queued,
        run_as=args.run_as,
    )
    print(f"wrote {config.write()} and {config.config_dir / 'acl'}")
    return 0


def _cmd_crl_serve(settings: PlatformSettings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from iot_platform.crl_http import crl_path_of, listen_port, serve_crl

    if not settings.crl_url:
        raise SettingsError(
            "IOT_CRL_URL is not set: certificates name no CRL distribution point, so there "
            "is nothing to serve (README: Settings)"
        )
    # The URL's own port unless a Service or proxy in front of this server maps it.
    port = listen_port(settings.crl_url) if args.port is None else args.port
    url_path = crl_path_of(settings.crl_url)
    server = serve_crl(settings.certs_dir, url_path, args.bind, port)
    bound = server.server_address[1]
    print(
        f"serving {dp_crl_path(settings.certs_dir)} at http://{args.bind}:{bound}"
        f"{url_path} (and /healthz) for IOT_CRL_URL={settings.crl_url}",
        flush=True,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # PID 1 in a container: no default action
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def _emqx_without_crl_warning() -> str:
    return (
        "WARNING: IOT_CRL_URL is not set, so EMQX cannot check revocation: the platform's "
        "certificates name no CRL distribution point, and EMQX reads CRLs only from there. "
        "A revoked device still completes the TLS handshake with EMQX; only the ACL's deny "
        "rules stop it (once EMQX re-reads acl.conf). Set IOT_CRL_URL, run `iot-platform "
        "crl serve` there and re-issue the certificates (docs/kubernetes.md, 'EMQX')."
    )


def _cmd_broker_reload(settings: PlatformSettings, args: argparse.Namespace) -> int:
    pid_file = Path(args.pid_file or settings.home / "mosquitto" / "data" / "mosquitto.pid")
    print(f"sent SIGHUP to mosquitto (pid {reload_broker(pid_file)}): CRL reloaded")
    return 0


def _cmd_db_migrate(settings: PlatformSettings, _args: argparse.Namespace) -> int:
    import psycopg

    from iot_platform.stack import warehouse_conninfo
    from iot_platform.warehouse.migrations import migrate

    try:
        with psycopg.connect(warehouse_conninfo(settings)) as conn:
            dialect, applied = migrate(conn, settings.warehouse_dialect)
    except psycopg.OperationalError as exc:
        raise ServiceError(f"cannot reach the warehouse: {exc}") from exc
    print(
        f"warehouse {settings.pg_database} ({dialect.value}): "
        f"{'applied ' + ', '.join(applied) if applied else 'already up to date'}"
    )
    return 0


def _launch(settings: PlatformSettings, job: PkiJob, config: dict) -> RunOutcome:
    """Run a PKI job through the Dagster webserver, exactly as a Launchpad launch."""
    from iot_platform.launcher import JobLauncher

    launcher = JobLauncher.from_settings(settings)
    outcome = launcher.run(
        job.job,
        job.run_config(config),
        tags={ACTOR_TAG: f"cli:{getpass.getuser()}"},
        progress=lambda message: print(message, file=sys.stderr),
    )
    if not outcome.succeeded:
        for error in outcome.errors or [f"run {outcome.status.value}"]:
            print(f"iot-platform: {job.job} failed: {error}", file=sys.stderr)
    return outcome


def _registry(settings: PlatformSettings, device_id: str | None = None) -> list[CertificateRow]:
    import psycopg

    from iot_platform.enrollment import certificates
    from iot_platform.stack import warehouse_conninfo

    try:
        with psycopg.connect(warehouse_conninfo(settings)) as conn:
            return certificates(conn, device_id)
    except psycopg.OperationalError as exc:
        raise ServiceError(
            f"cannot read the registry at {settings.pg_host}:{settings.pg_port} "
            f"(IOT_PG_HOST/IOT_PG_PORT/IOT_PG_PASSWORD): {exc}"
        ) from None


def _print_certificates(rows: list[CertificateRow]) -> None:
    for row in rows:
        print(
            f"{row.device_id:<24} {row.serial_hex:<40} {row.status:<28} "
            f"{row.not_before:%Y-%m-%d} .. {row.not_after:%Y-%m-%d}"
        )


def _cmd_devices_enroll(settings: PlatformSettings, args: argparse.Namespace) -> int:
    config: dict[str, object] = {
        "device_id": args.device_id,
        "device_type": args.type,
        "csr_pem": _read_csr(args.csr) if args.csr else "",
        "metadata": dict(_key_value(item) for item in args.meta),
        "revoke_previous": args.revoke_previous,
    }
    if args.days is not None:
        config["validity_days"] = args.days
    outcome = _launch(settings, ENROLL, config)
    if not outcome.succeeded:
        return 1
    # What the run reports it issued and where it wrote it: no second source (registry,
    # local paths) that could disagree, or fail and turn a success into an error.
    issued = outcome.materializations[-1]
    key = issued.get("private_key_file")
    print(
        f"enrolled {args.device_id}: serial {issued['serial_hex']}, fingerprint "
        f"{issued['fingerprint_sha256']}, valid until {issued['not_after'][:10]}, "
        f"certificate {issued['certificate_pem']}" + (f", private key {key}" if key else "")
    )
    return 0


def _read_csr(path: str) -> str:
    """The CSR file's text; a private key is refused before it could reach run storage."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--csr {path}: {exc}") from None
    from iot_platform.enrollment import refuse_private_key

    refuse_private_key(text)  # before launching: run config is stored for good
    return text


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SettingsError(f"--meta {item!r}: use key=value")
    return key, value


def _cmd_devices_revoke(settings: PlatformSettings, args: argparse.Namespace) -> int:
    config = {
        "serial": args.serial or "",
        "device_id": args.device or "",
        "reason": args.reason.value,
    }
    outcome = _launch(settings, REVOKE, config)
    if not outcome.succeeded:
        return 1
    from iot_platform.enrollment import normalise_serial

    try:
        rows = _registry(settings, args.device)
    except (SettingsError, ServiceError) as exc:  # the revocation stands: say so, exit 0
        print(f"revoked ({outcome.url}); cannot list the result: {exc}", file=sys.stderr)
        return 0
    if args.serial:
        rows = [r for r in rows if r.serial_hex == normalise_serial(args.serial)]
    _print_certificates(rows)
    return 0


def _revocation_reason(text: str) -> RevocationReason:
    from iot_platform.enrollment import RevocationReason

    try:
        return RevocationReason(text)
    except ValueError:
        names = ", ".join(r.value for r in RevocationReason)
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {names}") from None


def _cmd_devices_list(settings: PlatformSettings, _args: argparse.Namespace) -> int:
    _print_certificates(_registry(settings))
    return 0


def _cmd_devices_cert(settings: PlatformSettings, args: argparse.Namespace) -> int:
    rows = _registry(settings, args.device_id)
    if not rows:
        print(f"iot-platform: no certificate for {args.device_id}", file=sys.stderr)
        return 1
    _print_certificates(rows)
    pem, _key = device_paths(settings.certs_dir, args.device_id)
    try:
        print(pem.read_text(), end="")
    except OSError as exc:
        print(
            f"iot-platform: the certificate file {pem} cannot be read ({exc.strerror}): "
            "is IOT_CERTS_DIR the platform's certificate directory?",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_simulate(settings: PlatformSettings, args: argparse.Namespace) -> int:
    from iot_platform.simulate import parse_faults, simulate
    from iot_platform.stack import warehouse_conninfo

    count = args.devices if args.devices is not None else settings.simulator_devices
    try:
        if args.fault is not None:
            faults = parse_faults(args.fault)
        else:  # the default faults apply to the devices the fleet has
            faults = {i: f for i, f in parse_faults(settings.simulator_faults).items() if i < count}
        if any(index >= count for index in faults):
            raise ValueError(f"--fault names a device index >= the fleet size {count}")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    simulate(
        settings,
        warehouse_conninfo(settings),
        count=count,
        interval_s=args.interval if args.interval is not None else settings.simulator_interval_s,
        hello_interval_s=args.hello_interval,
        duration_s=args.duration,
        faults=faults,
        prefix=args.prefix,
    )
    return 0


def _cmd_dashboards_import(settings: PlatformSettings, args: argparse.Namespace) -> int:
    """Grafana for the embedded stack: give the warehouse's read-only role a login (the
    generated ``$IOT_HOME/secrets/grafana_db_password`` unless IOT_GRAFANA_DB_PASSWORD is
    set), then import the folder, datasources and dashboards of deploy/grafana/."""
    import psycopg

    from iot_platform.grafana import Grafana, GrafanaError, Targets, dashboards_present, import_all
    from iot_platform.stack import local_secret, warehouse_conninfo
    from iot_platform.warehouse.migrations import grant_grafana_login, migrate

    if not dashboards_present():
        raise SettingsError("deploy/grafana/ is not here: run from the source checkout")
    reader = local_secret(settings, "IOT_GRAFANA_DB_PASSWORD", "grafana_db_password")
    with psycopg.connect(warehouse_conninfo(settings)) as conn:
        migrate(conn, settings.warehouse_dialect)
        grant_grafana_login(conn, reader)
    grafana = Grafana(
        args.grafana_url,
        token=env_secret("IOT_GRAFANA_TOKEN"),
        user=env_str("IOT_GRAFANA_USER", ""),
        password=env_secret("IOT_GRAFANA_PASSWORD"),
    )
    targets = Targets(
        settings.pg_host, settings.pg_port, settings.pg_database, reader, args.prometheus_url
    )
    try:
        urls = import_all(grafana, targets)
    except GrafanaError as exc:
        print(f"iot-platform: Grafana refused the import: {exc}", file=sys.stderr)
        return 1
    print("imported into Grafana (folder 'IoT platform'):")
    for url in urls:
        print(f"  {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iot-platform", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    exec_cmd = commands.add_parser(
        "exec",
        help="run a command with secrets read from their *_FILE paths (containers)",
        description="Replace this process with COMMAND, each secret setting given as "
        "NAME_FILE (a mounted Docker/Kubernetes secret) read into NAME first: Dagster's "
        "own config (dagster.yaml, dg.EnvVar) reads NAME only.",
    )
    exec_cmd.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    exec_cmd.set_defaults(handler=None)
    up = commands.add_parser("up", help="run the embedded stack until Ctrl-C")
    up.set_defaults(handler=_cmd_up)

    pki = commands.add_parser("pki", help="platform CA and certificates").add_subparsers(
        dest="pki_command", required=True
    )
    pki.add_parser(
        "init", help="create the CA, broker and service certificates and the CRL if missing"
    ).set_defaults(handler=_cmd_pki_init)

    broker = commands.add_parser("broker", help="Mosquitto configuration").add_subparsers(
        dest="broker_command", required=True
    )
    config = broker.add_parser(
        "config", help="render the broker's config and ACL (Mosquitto or EMQX) from the templates"
    )
    config.add_argument(
        "--broker",
        choices=("mosquitto", "emqx"),
        default="mosquitto",
        help="mosquitto (mosquitto.conf, acl) or the scale-out emqx (emqx.conf, acl.conf)",
    )
    config.add_argument("--out-dir", required=True, help="where the config and the ACL go")
    config.add_argument("--data-dir", help="Mosquitto's persistence directory (mosquitto only)")
    config.add_argument("--certs-dir", help="where the broker reads ca.crt, broker.*, crl.pem")
    config.add_argument("--port", type=int, help="listener port (default IOT_BROKER_PORT)")
    config.add_argument("--bind", default="0.0.0.0", help="listener address")  # noqa: S104
    config.add_argument("--run-as", help="`user` Mosquitto drops privileges to (mosquitto only)")
    config.set_defaults(handler=_cmd_broker_config)
    reload_cmd = broker.add_parser("reload", help="SIGHUP the broker so it re-reads the CRL")
    reload_cmd.add_argument("--pid-file", help="default: IOT_HOME/mosquitto/data/mosquitto.pid")
    reload_cmd.set_defaults(handler=_cmd_broker_reload)

    crl = commands.add_parser("crl", help="the CRL distribution point").add_subparsers(
        dest="crl_command", required=True
    )
    crl_serve = crl.add_parser(
        "serve",
        help="serve crl.der at IOT_CRL_URL's path over HTTP (EMQX fetches it), until SIGTERM",
    )
    crl_serve.add_argument("--bind", default="127.0.0.1", help="listen address")
    crl_serve.add_argument(
        "--port", type=int, help="listen port (default: IOT_CRL_URL's port, 80 or 443)"
    )
    crl_serve.set_defaults(handler=_cmd_crl_serve)

    db = commands.add_parser("db", help="the warehouse database").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser(
        "migrate", help="create or upgrade the warehouse schema (idempotent)"
    ).set_defaults(handler=_cmd_db_migrate)

    from iot_platform.enrollment import RevocationReason

    devices = commands.add_parser(
        "devices", help="enroll, revoke and inspect devices (runs the Dagster jobs)"
    ).add_subparsers(dest="devices_command", required=True)
    enroll = devices.add_parser("enroll", help="launch enroll_device and wait for it")
    enroll.add_argument("device_id")
    enroll.add_argument("--type", help="device type (default: keep it; generic when new)")
    enroll.add_argument("--csr", help="PEM CSR file (CN = device id); omit to generate a key")
    enroll.add_argument("--days", type=int, help="validity (default IOT_DEVICE_CERT_DAYS)")
    enroll.add_argument("--meta", action="append", default=[], help="key=value, repeatable")
    enroll.add_argument("--revoke-previous", action="store_true", help="revoke older certs")
    enroll.set_defaults(handler=_cmd_devices_enroll)
    revoke = devices.add_parser("revoke", help="launch revoke_certificate and wait for it")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", help="certificate serial (hex)")
    target.add_argument("--device", help="revoke every active certificate of this device")
    revoke.add_argument(
        "--reason",
        default=RevocationReason.unspecified,
        type=_revocation_reason,
        help="RFC 5280 reason, as key_compromise or keyCompromise: "
        + ", ".join(r.value for r in RevocationReason),
    )
    revoke.set_defaults(handler=_cmd_devices_revoke)
    devices.add_parser("list", help="every certificate and its status").set_defaults(
        handler=_cmd_devices_list
    )
    cert = devices.add_parser("cert", help="a device's certificates and its current PEM")
    cert.add_argument("device_id")
    cert.set_defaults(handler=_cmd_devices_cert)

    simulate = commands.add_parser(
        "simulate", help="enroll a simulated fleet via enroll_device and publish until Ctrl-C"
    )
    simulate.add_argument("--devices", type=int, help="fleet size (IOT_SIMULATOR_DEVICES)")
    simulate.add_argument("--interval", type=float, help="seconds between telemetry messages")
    simulate.add_argument(
        "--hello-interval", type=float, default=30.0, help="seconds between hello messages"
    )
    simulate.add_argument("--duration", type=float, help="stop after this many seconds")
    simulate.add_argument(
        "--fault",
        action="append",
        help="INDEX=FAULT[,FAULT] (gap, duplicate, malformed, skew, silence); repeatable; "
        "default IOT_SIMULATOR_FAULTS",
    )
    simulate.add_argument("--prefix", default="sim", help="device id prefix (default sim)")
    simulate.set_defaults(handler=_cmd_simulate)

    dashboards = commands.add_parser(
        "dashboards", help="Grafana dashboards (deploy/grafana/)"
    ).add_subparsers(dest="dashboards_command", required=True)
    grafana_import = dashboards.add_parser(
        "import",
        help="create or replace the platform's folder, datasources and dashboards in a Grafana "
        "(auth: IOT_GRAFANA_TOKEN, or IOT_GRAFANA_USER + IOT_GRAFANA_PASSWORD)",
    )
    grafana_import.add_argument("--grafana-url", required=True, help="e.g. http://127.0.0.1:3001")
    grafana_import.add_argument(
        "--prometheus-url",
        default="http://127.0.0.1:9090",
        help="the Prometheus the Pipeline dashboard reads (default http://127.0.0.1:9090)",
    )
    grafana_import.set_defaults(handler=_cmd_dashboards_import)
    return parser


def _exec(command: list[str]) -> int:
    """``iot-platform exec -- CMD...``: replace this process with CMD, secrets read from
    their ``*_FILE`` paths into the environment (``settings.exec_environment``)."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise SettingsError("exec: give the command to run, e.g. exec -- dagster-webserver ...")
    env = exec_environment(dict(os.environ))
    os.execvpe(command[0], command, env)  # noqa: S606 - the operator's own command line
    return 127  # not reached: execvpe replaces the process or raises


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler is None:  # `exec`: no settings needed, nothing logged
        try:
            return _exec(args.argv)
        except SettingsError as exc:
            print(f"iot-platform: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = PlatformSettings.from_env()
        return int(args.handler(settings, args))
    except (SettingsError, PKIError, ServiceError) as exc:
        print(f"iot-platform: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
