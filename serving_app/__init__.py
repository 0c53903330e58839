"""regserve's data plane: a Ray Serve application serving one MLflow registered model.

Importing the package is cheap and pulls in neither Ray nor FastAPI: the operator imports
`serving_app.compat` from here.
"""
