"""Where a desired RayService goes: the Kubernetes API server (`kube`) or a local Ray cluster (`local`)."""
