"""The Open Inference Protocol (KServe v2 REST) for the serving app: `routing` (which route a path
names), `infer_request` (request tensors → the scoring protocol's input), `answers` (predictions →
output tensors, signatures → metadata, errors), `datatypes` (shared); all pure. `handlers` is the
replica's side: versions, MLflow's parser, predicting."""
