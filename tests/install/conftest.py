"""The control-plane fixtures of tests/k8s, made available to the install tests.

Imported, not redefined: the same fixture functions, so they behave as documented in
``tests/k8s/conftest.py``. Note that pytest keys session fixtures by the conftest that declares them, so a
run collecting both tests/k8s and tests/install starts the control plane once per directory (sequentially);
moving these fixtures into a plugin loaded from the root conftest would share one plane.
"""

from __future__ import annotations

from tests.k8s.conftest import (
    admin_kubeconfig,
    helm_binary,
    kube_api,
    kube_namespace,
    kube_plane,
    kube_tools,
    kuberay_namespace,
    mint_kubeconfig,
)

__all__ = [
    "admin_kubeconfig",
    "helm_binary",
    "kube_api",
    "kube_namespace",
    "kube_plane",
    "kube_tools",
    "kuberay_namespace",
    "mint_kubeconfig",
]
