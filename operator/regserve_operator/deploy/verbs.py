"""`regserve status | promote | rollback`: the rollout verbs, with the plugin's target URIs.

Exit codes: 0 the rollout succeeded (or status was shown), 1 it failed or the request was refused,
3 no verdict within --timeout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from regserve_operator.deploy import ops
from regserve_operator.deploy.flatconfig import DEFAULT_TIMEOUT_S
from regserve_operator.deploy.stores import ResourceStore
from regserve_operator.deploy.uris import KUBE_TARGET, UriError, parse_target
from regserve_operator.deploy.verdict import progress_line
from regserve_operator.spec import parse_status

EXIT_FAILED = 1
EXIT_TIMED_OUT = 3
_COLUMNS = ("NAME", "SERVING", "CANDIDATE", "PHASE", "WEIGHT", "READY")


@dataclass
class LiveLine:
    """Progress as it happens: one line rewritten in place on a terminal, a new line per change elsewhere."""

    out: TextIO
    last: str = ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.out.isatty():
            self.out.write("\r\x1b[2K" + text[:200])
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.last and self.out.isatty():
            self.out.write("\n")
            self.out.flush()


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    target_help = f"{KUBE_TARGET} (current context), {KUBE_TARGET}:/<namespace> or regserve-local"

    status = sub.add_parser("status", help="one line per deployment: versions, rollout phase and weight")
    status.add_argument("name", nargs="?")
    status.add_argument("-t", "--target", default=KUBE_TARGET, help=target_help)
    status.set_defaults(func=cmd_status)

    promote = sub.add_parser("promote", help="move the selector to VERSION in MLflow and follow the rollout")
    promote.add_argument("name")
    promote.add_argument("version")
    rollback = sub.add_parser("rollback", help="return to the version that served before, following it")
    rollback.add_argument("name")
    rollback.add_argument("--to", dest="version", help="the version to return to (default: the previous one)")
    for verb, func in ((promote, cmd_promote), (rollback, cmd_rollback)):
        verb.add_argument("-t", "--target", default=KUBE_TARGET, help=target_help)
        verb.add_argument(
            "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for a verdict"
        )
        verb.add_argument(
            "--tracking-uri", help="where to move the alias or stage (default: the resource's trackingUri)"
        )
        verb.set_defaults(func=func)


def _store(args: argparse.Namespace) -> ResourceStore:
    try:
        return ops.open_store(parse_target(args.target))
    except UriError as error:
        raise ops.DeployError(str(error)) from None


def status_rows(resources: list[dict[str, object]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [_COLUMNS]
    for resource in resources:
        shown = ops.view(resource)
        weight = shown["weight"]
        rows.append(
            (
                str(shown["name"]),
                str(shown["serving_version"] or "-"),
                str(shown["candidate_version"] or "-"),
                str(shown["phase"]),
                f"{weight}%" if weight is not None else "-",
                "True" if shown["ready"] else "False",
            )
        )
    return rows


def cmd_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    store = _store(args)
    resources = [ops.resource(store, args.name)] if args.name else store.list()
    rows = status_rows(resources)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    if args.name:
        out.write(progress_line(parse_status(resources[0].get("status"))) + "\n")
    return 0


def cmd_promote(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return _follow_verb(args, out, args.version)


def cmd_rollback(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    store = _store(args)
    status = parse_status(ops.resource(store, args.name).get("status"))
    version = args.version or ops.previous_version(status)
    if version is None:
        raise ops.DeployError(f"{args.name}: no earlier version served; name one with --to")
    out.write(f"{args.name}: rolling back to version {version}\n")
    return _follow_verb(args, out, version, store)


def _follow_verb(
    args: argparse.Namespace, out: TextIO, version: str, store: ResourceStore | None = None
) -> int:
    line = LiveLine(out)
    try:
        done = ops.promote(
            store or _store(args),
            args.name,
            version,
            tracking_uri=args.tracking_uri,
            timeout_s=args.timeout,
            on_progress=line.show,
        )
    except ops.DeployError as error:
        line.end()
        out.write(f"{error}\n")
        return EXIT_TIMED_OUT if error.timed_out else EXIT_FAILED
    line.end()
    served = done.verdict.version if done.verdict else version
    out.write(f"{args.name}: version {served} is serving\n")
    return 0


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """A verb, with refusals said in one line and exit code 1."""
    try:
        return func(args)
    except ops.DeployError as error:
        sys.stderr.write(f"regserve: {error}\n")
        return EXIT_TIMED_OUT if error.timed_out else EXIT_FAILED
