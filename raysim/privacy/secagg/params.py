"""The parameters of one secure-aggregation round and the checks that make them runnable.

Follows the constraints of Bonawitz et al. (CCS 2017) and, for the sparse graph, Bell et al.
(CCS 2020), as summarised in A2 of the reference vectors: t ≤ n, k ≤ n − 1, and the overflow
guard n · 2^q < 2^b so that the sum of n quantized inputs never wraps around the modulus 2^b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.errors import ScenarioError
from raysim.privacy.secagg.graph import derive_degree_and_threshold

MAX_MODULUS_BITS = 64


def modulus_bits_of(modulus: int) -> int:
    """b for a modulus R = 2^b; anything else is rejected, since masks wrap mod 2^32 or 2^64."""
    if modulus < 2 or modulus & (modulus - 1) or modulus > 2**MAX_MODULUS_BITS:
        raise ScenarioError(
            f"secure_aggregation.modulus: must be a power of two between 2 and 2^64 (got {modulus}); "
            f"use e.g. 4294967296 (2^32) or set modulus_bits instead"
        )
    return modulus.bit_length() - 1


def word_dtype(modulus_bits: int) -> np.dtype:
    """The unsigned word whose wraparound arithmetic contains Z_(2^b): uint32 up to b = 32, else uint64."""
    return np.dtype(np.uint32) if modulus_bits <= 32 else np.dtype(np.uint64)


def malicious_threshold(num_clients: int, corrupt_clients: int = 0) -> int:
    """The smallest t with t > (n + n_C)/2: two disjoint views can never both gather t signatures."""
    return (num_clients + corrupt_clients) // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """One round's secure aggregation settings (the scenario's ``secure_aggregation:`` block).

    - ``num_clients`` n: clients that start the round.
    - ``threshold`` t: shares needed to rebuild a secret, and the fewest clients that may survive
      any phase; 1 ≤ t ≤ n, and t ≤ k + 1 with the sparse graph (a client and its k neighbours
      hold its shares). Use :meth:`derive` to pick it from the expected dropout.
    - ``neighbours`` k: None for the complete graph of Bonawitz et al.; otherwise the degree of
      the SecAgg+ Harary graph, 1 ≤ k ≤ n − 1.
    - ``modulus_bits`` b: sums live in Z_(2^b), 1 ≤ b ≤ 64; 32 is the fast default.
    - ``quant_bits`` q: each coordinate is rounded to one of 2^q levels; n · 2^q < 2^b.
    - ``clip_range`` c: coordinates (and the weight) are clipped to [−c, c] before quantizing.
    - ``consistency_check``: run the ConsistencyCheck round (Ed25519 signatures on U3). It defends
      against a malicious server only when t > (n + n_C)/2 (A2): otherwise the server can show two
      disjoint halves different survivor sets, collect ≥ t signatures from each, and ask one half
      for v's mask-key shares and the other for v's self-mask shares, which together unmask v.
    - ``corrupt_clients`` n_C: clients assumed to collude with the server (they sign both views).
    """

    num_clients: int
    threshold: int
    neighbours: int | None = None
    modulus_bits: int = 32
    quant_bits: int = 16
    clip_range: float = 1.0
    consistency_check: bool = False
    corrupt_clients: int = 0

    @classmethod
    def derive(
        cls, num_clients: int, *, expected_dropout: float, corrupt_fraction: float = 0.05, sparse: bool = True, **settings
    ) -> SecAggParams:
        """Parameters whose k and t come from the rule in :func:`graph.derive_degree_and_threshold`."""
        try:
            degree, threshold = derive_degree_and_threshold(
                num_clients, dropout=expected_dropout, corrupt=corrupt_fraction, sparse=sparse
            )
        except ValueError as exc:
            raise ScenarioError(
                f"secure_aggregation.expected_dropout: cannot derive a threshold ({exc}); "
                f"set threshold explicitly or assume less dropout"
            ) from exc
        if settings.get("consistency_check"):  # the malicious-server bound comes first (A2)
            threshold = max(threshold, malicious_threshold(num_clients, settings.get("corrupt_clients", 0)))
            if degree is not None:
                degree = max(degree, threshold - 1)
                degree = None if degree >= num_clients - 1 else degree
        return cls(num_clients=num_clients, threshold=threshold, neighbours=degree, **settings).validate()

    @property
    def dtype(self) -> np.dtype:
        """Word type of masked vectors."""
        return word_dtype(self.modulus_bits)

    @property
    def modulus_mask(self) -> int:
        """2^b − 1: reduces a word mod 2^b."""
        return (1 << self.modulus_bits) - 1

    def validate(self) -> SecAggParams:
        """Raise ScenarioError naming the offending ``secure_aggregation.<field>``; return self if runnable."""
        n, t, k = self.num_clients, self.threshold, self.neighbours
        if n < 1:
            raise ScenarioError(f"secure_aggregation.num_clients: must be ≥ 1 (got {n}); sample at least one client per round")
        if not 1 <= t <= n:
            raise ScenarioError(
                f"secure_aggregation.threshold: must be between 1 and num_clients={n} (got {t}); "
                f"use e.g. {max(1, n // 2 + 1)}, or leave it unset to derive it from the expected dropout"
            )
        if self.consistency_check and 2 * t <= n + self.corrupt_clients:
            raise ScenarioError(
                f"secure_aggregation.threshold: with consistency_check (a malicious server) t must exceed "
                f"(n + n_C)/2 = {(n + self.corrupt_clients) / 2:g} (got {t}), or the server can show two halves "
                f"different survivor sets and unmask a client; use threshold ≥ {malicious_threshold(n, self.corrupt_clients)}"
            )
        if k is not None:
            if not 1 <= k <= n - 1:
                raise ScenarioError(
                    f"secure_aggregation.neighbours: must be between 1 and num_clients − 1 = {n - 1} (got {k}); "
                    f"use a smaller degree, or null for the complete graph"
                )
            if t > k + 1:
                raise ScenarioError(
                    f"secure_aggregation.threshold: must be ≤ neighbours + 1 = {k + 1} with the sparse graph (got {t}); "
                    f"lower the threshold or raise neighbours"
                )
        if not 1 <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ScenarioError(
                f"secure_aggregation.modulus_bits: must be between 1 and 64 (got {self.modulus_bits}); use 32"
            )
        if self.quant_bits < 1:
            raise ScenarioError(f"secure_aggregation.quant_bits: must be ≥ 1 (got {self.quant_bits}); use e.g. 16")
        if not self.clip_range > 0:
            raise ScenarioError(f"secure_aggregation.clip_range: must be > 0 (got {self.clip_range}); use e.g. 1.0")
        # Overflow guard (A2): n_max · 2^q < 2^b, so the exact sum of n inputs fits in Z_(2^b).
        needed = (n << self.quant_bits).bit_length()
        if self.modulus_bits < needed:
            raise ScenarioError(
                f"secure_aggregation.modulus_bits: {self.modulus_bits} bits overflow the sum of {n} inputs of "
                f"{self.quant_bits} bits (need num_clients·2^quant_bits < 2^modulus_bits); use modulus_bits ≥ {needed} "
                f"or fewer quant_bits"
            )
        return self
