"""regserve from MLflow's side: the `mlflow deployments` target plugin and the CLI verbs that share it.

`uris` reads target and model URIs, `settings` turns flat `-C key=value` config into a spec, `verdict`
judges a status against what was asked, `stores` reach resources on Kubernetes or in a running
`regserve dev`, `follow` waits for a verdict, `plugin` is what MLflow loads.
"""
