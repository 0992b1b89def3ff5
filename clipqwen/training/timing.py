"""Where a run's wall-clock time goes: seconds and items/s per phase (data preparation, feature cache, training,
each evaluation, export, push), for the log, all_results.json and the model card."""

import time
from contextlib import contextmanager

from transformers.utils import logging


logger = logging.get_logger(__name__)


class PhaseTimer:
    def __init__(self):
        self.phases: dict[str, dict] = {}

    @contextmanager
    def phase(self, name: str, items: int | None = None, unit: str = "images"):
        """Times the block; set `record["items"]` inside it when the count is known only at the end. `unit` names
        the items (images, pairs) wherever the rate is shown."""
        record = {"items": items}
        start = time.perf_counter()
        yield record
        seconds = time.perf_counter() - start
        self.phases[name] = {"seconds": round(seconds, 2)}
        rate = ""
        if record["items"]:
            self.phases[name].update(per_second=round(record["items"] / seconds, 2), unit=unit)
            rate = f", {record['items']} {unit}, {record['items'] / seconds:.1f} {unit}/s"
        logger.info("Phase %s: %.1f s%s", name, seconds, rate)

    def metrics(self) -> dict[str, float]:
        """Flat, Trainer-style: time_<phase>_seconds and time_<phase>_per_second."""
        flat = {}
        for name, values in self.phases.items():
            key = name.replace(" ", "_")
            flat[f"time_{key}_seconds"] = values["seconds"]
            if "per_second" in values:
                flat[f"time_{key}_per_second"] = values["per_second"]
        return flat
