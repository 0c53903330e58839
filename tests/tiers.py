"""Which directory under tests/ a test may live in, by the parts it needs.

`make test-fast` selects by marker (no `k8s`, `ray`, `kuberay` or `slow`); people look for tests by
directory. The two agree only if the directory says what the tests in it need, so the rule is checked on
every collection (tests/conftest.py) and a test in the wrong place stops the run.
"""

from __future__ import annotations

from collections.abc import Iterable

# The parts a test can need, named by the marker that selects it.
PARTS = ("k8s", "kuberay", "ray")

# A fixture that brings a part with it: using it is needing the part, whatever the markers say.
FIXTURE_PARTS = {"kube_plane": "k8s", "local_ray": "ray"}
# Fixtures whose users tests/k8s/fixtures.py marks itself; users of the others carry the marker.
AUTO_MARKED = frozenset({"kube_plane"})

# The directories (first level under tests/) where a test needing each part may live; any other
# directory (operator, serving, deploy, ...) holds tests that need none of them.
HOMES = {
    "k8s": frozenset({"k8s", "install"}),
    "kuberay": frozenset({"k8s"}),
    "ray": frozenset({"local", "reliability", "serving_ray"}),
}

# Directories every test of which needs the part: the directory's name is the promise.
ONLY = {"k8s": "k8s", "serving_ray": "ray"}


def parts(markers: Iterable[str], fixtures: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The parts a test is marked as needing (its markers, and those it is marked with automatically),
    and the parts it needs (those, and the parts its fixtures bring)."""
    used = set(fixtures) & FIXTURE_PARTS.keys()
    marked = set(markers) & set(PARTS) | {FIXTURE_PARTS[name] for name in used & AUTO_MARKED}
    needed = marked | {FIXTURE_PARTS[name] for name in used}
    return frozenset(marked), frozenset(needed)


def misplaced(directory: str, marked: frozenset[str], needed: frozenset[str]) -> str | None:
    """Why a test in tests/<directory> with these markers and needs is in the wrong place (None: it is not).

    `directory` is the first level under tests/ ("" for a module directly in tests/).
    """
    unmarked = sorted(needed - marked)
    if unmarked:
        return f"needs {', '.join(unmarked)} but is not marked so (-m would not deselect it)"
    for part in sorted(needed):
        if directory not in HOMES[part]:
            homes = ", ".join(f"tests/{home}" for home in sorted(HOMES[part]))
            return f"needs {part}: it belongs in {homes}"
    required = ONLY.get(directory)
    if required is not None and required not in needed:
        return f"every test in tests/{directory} is marked {required}"
    return None
