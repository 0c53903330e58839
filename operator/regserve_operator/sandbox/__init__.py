"""Local stand-ins for production services, used by `regserve demo`, local mode and the tests:
a real `mlflow server` on sqlite and helpers to run processes in their own process groups."""
