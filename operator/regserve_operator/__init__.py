"""regserve's control plane: a kopf operator turning RegisteredModelServing resources into RayServices.

Pure modules (spec, crd, sizing, builders, plan, conditions, rbac) do no I/O; registry, targets and
main do the talking; reconcile ties them together behind small ports so local mode can reuse it.
"""
