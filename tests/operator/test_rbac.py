from __future__ import annotations

from pathlib import Path

from regserve_operator import rbac

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_rbac_matches_the_rules() -> None:
    path = ROOT / "deploy" / "rbac" / "regserve-operator.yaml"
    assert path.read_text() == rbac.rbac_yaml(), "deploy/rbac is stale: run `regserve rbac > deploy/rbac/...`"


def test_secrets_are_get_only() -> None:
    rules = rbac.cluster_role()["rules"]
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


def test_no_wildcards_and_no_deletes() -> None:
    for r in rbac.cluster_role()["rules"]:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        assert "delete" not in r["verbs"]  # RayServices go by garbage collection
