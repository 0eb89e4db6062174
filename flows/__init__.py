"""Prefect flows over the DVC pipeline: ``vae-pipeline`` (:mod:`flows.pipeline`) and
``scheduled-retraining`` (:mod:`flows.retraining`). Deployments: ``prefect.yaml``.
Command line: ``python -m flows --help``."""
