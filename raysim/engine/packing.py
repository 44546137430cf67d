"""A synchronous round's chunks packed into one call per worker, each worker's share sized to its measured speed.

A Ray call costs the server actor about a millisecond to submit and to collect, and its worker a wake-up;
on 2 cores a round of 50 clients in ten calls of 5 spent a quarter of its time on calls
(``scripts/bench_overhead.py``). So a round hands each worker that is up one call, a *pack* of consecutive
chunks. Packing changes no result: every chunk still folds alone into its own partial sum, and the server
adds the chunks in chunk order, so which worker trains which chunk, and with which others, is only a
matter of time (``ClientWorker.train_pack``).

What chunk-by-chunk dynamic load balancing did within a round (a slow or straggling worker takes fewer
chunks), ``PackPlanner`` does across rounds: a worker's pack holds local steps in proportion to its rate,
the local steps per second it trained in the previous rounds, from the submit of its call to its result
(exponentially smoothed, so a slow node, a delayed worker or a GPU worker beside CPU workers is sized
within a few rounds). A chunk's steps are known before it trains (each client's epochs times its batches
an epoch), so packs are cut where the steps, not the clients, are shared out: under a Dirichlet
partition one client may train twenty times as long as another. A pack whose worker is lost is re-run
whole on a worker that is up.

A pack's results wait in its worker until the call returns, so a pack holds at most ``PACK_BYTES`` of them;
a round of large models or per-client rows that would need more goes out in packs of that size, handed to
whichever worker is free (chunk-by-chunk balancing again, at one chunk per call in the limit).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raysim.client.messages import ChunkResult, ClientBatch

Pack = list[tuple[int, ClientBatch]]  # (chunk index, batch)

SMOOTHING = 0.5  # weight of the latest round's measured rate
PACK_BYTES = 256 * 2**20  # the most chunk results one call may hold


class PackPlanner:
    """One pack per worker that is up, sized by each worker's measured steps per second.

    ``chunk_bytes`` is what one chunk's result holds (its float64 sum, and its rows when kept per client).
    """

    def __init__(self, workers: int, chunk_bytes: int) -> None:
        self.rates = np.zeros(workers)  # local steps per second; 0 until measured
        self.max_chunks = max(1, PACK_BYTES // max(chunk_bytes, 1))

    def packs(self, batches: Sequence[ClientBatch], positions: Sequence[int],
              steps_per_epoch: np.ndarray | None = None) -> list[Pack]:
        """Consecutive chunks in one pack per position (the workers that are up, in the order their first
        calls go out), pack j holding about its worker's share of the round's local steps (of its clients,
        without ``steps_per_epoch``, each client's batches an epoch); every pack gets at least one chunk while
        chunks remain, so pack j goes to ``positions[j]``. Past ``max_chunks`` a pack, packs of ``max_chunks``."""
        if not batches or not positions:
            return []
        if len(batches) > self.max_chunks * len(positions):
            indexed = list(enumerate(batches))
            return [indexed[i : i + self.max_chunks] for i in range(0, len(indexed), self.max_chunks)]
        shares = self._shares(positions)
        sizes = np.array([len(b.client_ids) if steps_per_epoch is None else
                          np.dot(b.epochs, steps_per_epoch[b.client_ids]) for b in batches], dtype=np.float64)
        ends = np.cumsum(shares) / shares.sum() * sizes.sum()  # steps done at the end of each pack
        packs: list[Pack] = [[]]
        done = 0.0
        for index, (batch, size) in enumerate(zip(batches, sizes)):
            j, left = len(packs) - 1, len(batches) - index
            room = len(positions) - len(packs)  # packs still to open
            if packs[-1] and room > 0 and (done + size / 2 > ends[j] or left <= room):
                packs.append([])
            packs[-1].append((index, batch))
            done += size
        return packs

    def observe(self, results: Sequence[Sequence[ChunkResult]], where: dict[int, int], seconds: dict[int, float]) -> None:
        """Fold the round's measured rates in: pack p's chunks ``results[p]`` ran on worker ``where[p]`` for
        ``seconds[p]``. A rate counts local steps, not clients, since clients' sizes differ widely."""
        for p, chunks in enumerate(results):
            steps = sum(int(np.sum(chunk.steps)) for chunk in chunks)
            if p not in where or seconds.get(p, 0.0) <= 0 or steps == 0:
                continue
            position = where[p]
            rate = steps / seconds[p]
            old = self.rates[position]
            self.rates[position] = rate if old == 0 else (1 - SMOOTHING) * old + SMOOTHING * rate

    def _shares(self, positions: Sequence[int]) -> np.ndarray:
        rates = self.rates[list(positions)]
        measured = rates[rates > 0]
        return np.where(rates > 0, rates, measured.mean() if measured.size else 1.0)
