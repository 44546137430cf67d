"""The async worker: a ClientWorker that trains several (model version, client batch) tasks in one Ray call.

In async modes each batch must fold separately (its updates share a start version and a staleness),
and batches are often small, so the launcher packs whatever is waiting into one call per worker:
Ray's per-call cost is paid per call, not per batch. Each task is ``ClientWorker.train`` exactly as
it would run alone, so packing never changes a result.
"""

from __future__ import annotations

import numpy as np

from raysim.engine.worker import ChunkResult, ClientBatch, ClientWorker, RoundPlan


class AsyncClientWorker(ClientWorker):
    """The body of the worker actor in async modes."""

    def train_many(self, tasks: list[tuple[int, int, int, ClientBatch]], *versions: np.ndarray) -> list[ChunkResult]:
        """Run ``train`` for each task (version position, round index, chunk index, batch), in order.

        ``versions`` are the model versions the tasks start from, passed as top-level arguments so
        that Ray hands them over zero-copy from the object store.
        """
        self.chaos.before_call()
        return [self._train(versions[position], None, round_index, RoundPlan(), index, batch)
                for position, round_index, index, batch in tasks]
