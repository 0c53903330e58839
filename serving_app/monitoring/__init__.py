"""What each version receives and answers, sent back to MLflow or to a CloudEvents receiver."""
