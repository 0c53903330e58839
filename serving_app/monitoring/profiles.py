"""Each version's reference profile on a replica: read once, in the background, the first time the
version answers — the training dataset logged on its run, else its input example
(`monitoring.reference`) — and the model's own answers for those rows, so predictions drift too.

Every replica computes it from the same rows and gets the same profile (same fingerprint), which is
what lets their histograms be summed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from serving_app.monitoring.drift import profile_from_frame
from serving_app.monitoring.reference import NoReference, ReferenceUnavailable, load_reference
from serving_app.monitoring.window import ProfileState

logger = logging.getLogger("ray.serve")

MAX_REFERENCE_ROWS = 5_000  # profiled (and predicted) rows: quantiles settle long before this
RETRY_UNAVAILABLE_S = 60.0
KIND_LABELS = {"training": "training", "inputExample": "inputExample"}


class VersionProfiles:
    def __init__(
        self, tracking_uri: str | None, model_name: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._states: dict[str, ProfileState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._clock = clock

    def state(self, version: str) -> ProfileState:
        return self._states.get(version, ProfileState())

    def want(self, version: str, model: Any) -> None:
        """Start reading `version`'s reference unless it is known, being read, or failed moments ago."""
        if version in self._tasks or self._states.get(version, ProfileState()).kind not in (
            "loading",
            "unavailable",
        ):
            return
        if self._clock() < self._retry_at.get(version, 0.0):
            return
        self._tasks[version] = asyncio.get_running_loop().create_task(self._read(version, model))

    async def _read(self, version: str, model: Any) -> None:
        try:
            self._states[version] = await asyncio.to_thread(self._profile, version, model)
        except ReferenceUnavailable:
            self._states[version] = ProfileState(None, "unavailable", "the registry did not answer")
            self._retry_at[version] = self._clock() + RETRY_UNAVAILABLE_S
        except Exception as error:  # a model that cannot predict its own reference: no drift, said so
            logger.warning("no drift reference for version %s: %s", version, type(error).__name__)
            self._states[version] = ProfileState(None, "none", f"profiling failed ({type(error).__name__})")
        finally:
            self._tasks.pop(version, None)

    def _profile(self, version: str, model: Any) -> ProfileState:
        if not self.tracking_uri:
            return ProfileState(None, "none", "no tracking URI")
        found = load_reference(self.tracking_uri, self.model_name, version)
        if isinstance(found, NoReference):
            return ProfileState(None, "none", found.reason)
        frame = found.frame
        if len(frame) > MAX_REFERENCE_ROWS:
            frame = frame.sample(MAX_REFERENCE_ROWS, random_state=0).reset_index(drop=True)
        predictions = None
        if model is not None:
            predictions = model.predict(frame)
            if isinstance(predictions, pd.DataFrame | pd.Series):
                predictions = predictions.reset_index(drop=True)
        profile = profile_from_frame(frame, predictions)
        return ProfileState(profile, found.kind, found.detail)
