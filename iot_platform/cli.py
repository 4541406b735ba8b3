"""`iot-platform`: the operator's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from iot_platform.pki import PKIError
from iot_platform.services.mosquitto import BrokerConfig, reload_broker
from iot_platform.services.process import ServiceError
from iot_platform.settings import PlatformSettings, SettingsError


def _cmd_up(settings: PlatformSettings, _args: argparse.Namespace) -> int:
    from iot_platform.stack import run_embedded

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
            dialect, applied = migrate(conn)
    except psycopg.OperationalError as exc:
        raise ServiceError(f"cannot reach the warehouse: {exc}") from exc
    print(
        f"warehouse {settings.pg_database} ({dialect.value}): "
        f"{'applied ' + ', '.join(applied) if applied else 'already up to date'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iot-platform", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

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
    config = broker.add_parser("config", help="render mosquitto.conf and acl from the templates")
    config.add_argument("--out-dir", required=True, help="where mosquitto.conf and acl go")
    config.add_argument("--data-dir", required=True, help="broker persistence directory")
    config.add_argument("--certs-dir", help="where the broker reads ca.crt, broker.*, crl.pem")
    config.add_argument("--port", type=int, help="listener port (default IOT_BROKER_PORT)")
    config.add_argument("--bind", default="0.0.0.0", help="listener address")  # noqa: S104
    config.add_argument("--run-as", help="`user` Mosquitto drops privileges to")
    config.set_defaults(handler=_cmd_broker_config)
    reload_cmd = broker.add_parser("reload", help="SIGHUP the broker so it re-reads the CRL")
    reload_cmd.add_argument("--pid-file", help="default: IOT_HOME/mosquitto/data/mosquitto.pid")
    reload_cmd.set_defaults(handler=_cmd_broker_reload)

    db = commands.add_parser("db", help="the warehouse database").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser(
        "migrate", help="create or upgrade the warehouse schema (idempotent)"
    ).set_defaults(handler=_cmd_db_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
