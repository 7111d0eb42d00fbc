"""A study's iteration budget over all its trials (``tune.max_iters``): Tune's stopper that ends the whole study
once its trials have trained that many iterations in total. Imported only where Ray Tune runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.stopper import Stopper


class StudyBudget(Stopper):
    """Counts each trial's latest reported ``iteration`` and stops every trial (and starts no more) once their
    sum reaches ``max_iters``; a running trial stops at the evaluation that crosses it, so a study overshoots by
    less than one evaluation interval per running trial. A resumed study first counts what its trials reported
    before (the ``result.json`` Tune keeps in each trial's folder of the study), because Tune restores this
    object as it was when the study started."""

    def __init__(self, study_dir: str | Path, max_iters: int) -> None:
        self.study_dir = str(study_dir)
        self.max_iters = max_iters
        self.latest: dict[str, int] = {}
        self._counted_saved = False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self._count_saved()
        self.latest[trial_id] = max(self.latest.get(trial_id, 0), int(result.get("iteration") or 0))
        return False

    def stop_all(self) -> bool:
        self._count_saved()
        return self.spent() >= self.max_iters

    def spent(self) -> int:
        return sum(self.latest.values())

    def _count_saved(self) -> None:
        if self._counted_saved:
            return
        self._counted_saved = True
        for path in Path(self.study_dir).glob("*/result.json"):
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    trial = str(row.get("trial_id", path.parent.name))
                    self.latest[trial] = max(self.latest.get(trial, 0), int(row.get("iteration") or 0))
