"""Deployment state written back to MLflow, pure: which tag each model version should carry for one
RegisteredModelServing, and the writes that take the registry from what we last wrote to that.

Key `regserve.io/<namespace>/<name>`; the value starts with the version's state, then the detail:

    serving <url>                         the default version
    canary <weight>% <url>                a candidate answering a share of unpinned requests
    shadow <weight>% <url>                a candidate shadowing a share of unpinned requests
    held <reason>: <message>              Incompatible, Unreadable, SmokeTestFailed, ShadowReported
    rolled-back <cause>: <message>        CanaryFailed, ShadowDisagreement, LoadFailed, Timeout, ...
    superseded by <version>               the version the last promotion replaced

A tag that no longer applies (the held version once the selector moved on, the version superseded
before the last one) is removed. Decided here, written by `reconcile.act`; our own writes are ignored by
the webhook receiver (`is_own_tag_event`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from regserve_operator.spec import RegisteredModelServingStatus

PREFIX = "regserve.io/"
MAX_VALUE = 500  # MLflow allows 5000 characters; the UI shows the start


@dataclass(frozen=True)
class TagWrite:
    version: str
    value: str | None  # None: delete the tag


def tag_key(namespace: str, name: str) -> str:
    return f"{PREFIX}{namespace}/{name}"


def desired_tags(status: RegisteredModelServingStatus, url: str | None) -> dict[str, str]:
    """version → tag value, from the status decided for this pass."""
    tags: dict[str, str] = {}
    where = f" {url}" if url else ""
    serving = status.last_good_version
    if serving:
        tags[serving] = f"serving{where}"
        superseded = _superseded_by(status, serving)
        if superseded is not None:
            tags.setdefault(superseded, f"superseded by {serving}")
    candidate, phase = status.rollout_version, status.rollout_phase
    if candidate and phase in ("Canary", "Shadow"):
        tags[candidate] = f"{phase.lower()} {status.rollout_weight or 0}%{where}"
    rejected = status.rejected
    if rejected is not None:
        if rejected.reason == "RolledBack":
            state = f"rolled-back {rejected.cause or 'RolledBack'}"
        else:
            state = f"held {rejected.reason}"
        tags[rejected.version] = f"{state}: {rejected.message}" if rejected.message else state
    return {version: value[:MAX_VALUE] for version, value in tags.items()}


def _superseded_by(status: RegisteredModelServingStatus, serving: str) -> str | None:
    """The version the promotion of `serving` replaced (history: `Superseded`, "replaced by <serving>")."""
    for entry in reversed(status.history or []):
        if entry.outcome == "Superseded" and entry.message == f"replaced by {serving}":
            return entry.version if entry.version != serving else None
    return None


def tag_writes(written: Mapping[str, str], desired: Mapping[str, str]) -> list[TagWrite]:
    """Set what differs, delete what no longer applies; ordered by version for stable plans."""
    writes = [TagWrite(v, value) for v, value in desired.items() if written.get(v) != value]
    writes += [TagWrite(v, None) for v in written if v not in desired]
    return sorted(writes, key=lambda w: (int(w.version) if w.version.isdigit() else 0, w.version))


def is_own_tag_event(event: str | None, key: object) -> bool:
    """A `model_version_tag.set`/`.deleted` delivery for one of our keys: our own write, not news."""
    return bool(event and event.startswith("model_version_tag.")) and str(key or "").startswith(PREFIX)
