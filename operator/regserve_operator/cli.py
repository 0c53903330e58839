"""The `regserve` command.

regserve run                 the operator (kopf), watching RegisteredModelServing resources
regserve crd                 print the CRD YAML (what crds/ holds)
regserve rbac                print the operator's RBAC manifests (what deploy/rbac/ holds)
regserve webhook register    create the MLflow webhook that pushes registry events to the operator
regserve dev [-f rms.yaml]   local mode (regserve_operator.local); -f repeats; resources also come at runtime
regserve demo                the whole loop on this machine (regserve_operator.demo)
regserve status [NAME]       one line per deployment: versions, rollout phase and weight (-t TARGET)
regserve promote NAME VER    move the alias (or stage) in MLflow to VER and follow the rollout
regserve rollback NAME       return to the version that served before and follow it
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


def _cmd_crd(_: argparse.Namespace) -> int:
    from regserve_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cmd_rbac(args: argparse.Namespace) -> int:
    from regserve_operator.rbac import rbac_yaml

    sys.stdout.write(rbac_yaml(namespace=args.namespace))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from regserve_operator.main import run

    return run(namespaces=args.namespace, all_namespaces=args.all_namespaces, standalone=args.standalone)


def _cmd_webhook_register(args: argparse.Namespace) -> int:
    from regserve_operator.webhook import register_webhook

    webhook_id = register_webhook(
        tracking_uri=args.tracking_uri, url=args.url, name=args.name, secret_env=args.secret_env
    )
    print(webhook_id)
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    # Modules owned elsewhere (local mode, demo) parse their own arguments; imported lazily because
    # they pull in Ray.
    mod = importlib.import_module(module)
    return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regserve", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    run.add_argument("-n", "--namespace", action="append", default=[], help="namespace to watch (repeatable)")
    run.add_argument("-A", "--all-namespaces", action="store_true")
    run.add_argument("--standalone", action="store_true", help="no peering (single operator instance)")
    run.set_defaults(func=_cmd_run)

    crd = sub.add_parser("crd", help="print the CRD YAML")
    crd.set_defaults(func=_cmd_crd)

    rbac = sub.add_parser("rbac", help="print the operator's RBAC manifests")
    rbac.add_argument("--namespace", default="regserve-system", help="namespace of the operator")
    rbac.set_defaults(func=_cmd_rbac)

    webhook = sub.add_parser("webhook", help="MLflow webhook management")
    webhook_sub = webhook.add_subparsers(dest="webhook_command", required=True)
    register = webhook_sub.add_parser("register", help="create the MLflow webhook")
    register.add_argument("--tracking-uri", required=True)
    register.add_argument(
        "--url", required=True, help="the operator's receiver, e.g. http://regserve:8080/webhook"
    )
    register.add_argument("--name", default="regserve")
    register.add_argument(
        "--secret-env", default="REGSERVE_WEBHOOK_SECRET", help="env var holding the shared signing secret"
    )
    register.set_defaults(func=_cmd_webhook_register)

    from regserve_operator.deploy.verbs import add_parsers

    add_parsers(sub)
    sub.add_parser("dev", help="local mode: run the reconcile against a local Ray cluster", add_help=False)
    sub.add_parser("demo", help="the whole loop on this machine", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dev":
        return _delegate("regserve_operator.local", argv[1:])
    if argv and argv[0] == "demo":
        return _delegate("regserve_operator.demo", argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("status", "promote", "rollback"):
        from regserve_operator.deploy.verbs import run

        return run(args.func, args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
