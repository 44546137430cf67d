"""The encryption parameters of the homomorphic backend, chosen from the scenario and checked for security.

Security follows the Homomorphic Encryption Standard (Albrecht et al., 2018), the table SEAL enforces
(``hestdparms.h``): for a ring of degree N and a ternary secret, the total bit length of the
coefficient modulus may not exceed ``MAX_COEFF_BITS[level][N]`` for ``level`` bits of security.

The backend only adds ciphertexts, so the coefficient modulus only has to hold the plaintext and the
noise of a sum of n fresh encryptions:
  * BFV (Brakerski 2012; Fan, Vercauteren 2012) encrypts the same integers that masking's ring carries.
    Its plain modulus is the smallest batching prime t ≡ 1 (mod 2N) above 2^b, b being
    ``secure_aggregation.modulus_bits``, so masking's overflow guard n·2^q < 2^b also keeps the sum
    below t and the decrypted sum is exact. Decryption is correct while the noise stays under
    q/(2t); a fresh public-key encryption's noise is at most 6σ·(2N + 1) < 2^6·N in the infinity norm
    (σ = 3.2, |e| ≤ 6σ, ‖e·u‖ ≤ N·6σ), n of them add up, so the data level gets log2(t) + log2(N) + log2(n) + 7
    bits: the worst case, not the average.
  * CKKS (Cheon, Kim, Kim, Song, ASIACRYPT 2017) encodes floats at scale Δ = 2^s; the data level holds
    the sum's magnitude n·c above the scale, and its sign. Its error is the sum's encryption noise over Δ
    (``ckks_error_bound``).
The last prime of the chain is SEAL's special (key-switching) prime, as large as the largest data prime.
Among the degrees {8192, 16384} whose bound admits that modulus, the choice is the one that costs the
fewest bytes for an update of m words: ⌈m / slots⌉ ciphertexts of 2·N·(data primes) words each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysim.errors import ScenarioError

DEGREES = (8192, 16384)
# Max total coefficient-modulus bits per ring degree, at 128, 192 and 256 bits of security (HE Standard).
MAX_COEFF_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
MAX_PRIME_BITS = 60  # SEAL's largest coefficient prime
MAX_PLAIN_BITS = 60  # SEAL's largest plain modulus
NOISE_MARGIN_BITS = 7  # fresh noise < 2^6·N, and decryption needs the sum's below q/(2t): one bit more


@dataclass(frozen=True)
class HEParams:
    """One run's encryption parameters: what the key authority builds its TenSEAL context from."""

    scheme: str  # "bfv" or "ckks"
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]  # the data primes, then the special prime
    security_bits: int
    plain_modulus: int | None = None  # BFV
    scale_bits: int | None = None  # CKKS

    @property
    def slots(self) -> int:
        """Values per ciphertext: N for BFV's batching, N/2 for CKKS."""
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    def ciphertexts(self, words: int) -> int:
        """Ciphertexts one update of ``words`` values is packed into."""
        return -(-words // self.slots)

    def describe(self, words: int) -> str:
        """The line a run prints once: scheme, degree, modulus, security, packing."""
        modulus = "+".join(str(b) for b in self.coeff_mod_bit_sizes)
        plain = f", plain modulus {self.plain_modulus} ({self.plain_modulus.bit_length()} bits)" \
            if self.plain_modulus is not None else f", scale 2^{self.scale_bits}"
        return (f"{self.scheme.upper()}, poly_modulus_degree {self.poly_modulus_degree}, coefficient modulus "
                f"{sum(self.coeff_mod_bit_sizes)} bits ({modulus}), {self.security_bits}-bit security (HE Standard, "
                f"at most {MAX_COEFF_BITS[self.security_bits][self.poly_modulus_degree]} bits){plain}; "
                f"{self.ciphertexts(words)} ciphertext(s) of {self.slots} slots per update of {words} words")


def _is_prime(n: int) -> bool:
    """Miller-Rabin with the first 12 prime bases: deterministic below 3.3·10^24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(above: int, degree: int) -> int:
    """The smallest prime t > ``above`` with t ≡ 1 (mod 2N), which BFV's slot batching needs."""
    step = 2 * degree
    t = (above // step + 1) * step + 1
    while not _is_prime(t):
        t += step
    return t


def _chain(data_bits: int) -> tuple[int, ...]:
    """Data primes of equal size (at most 60 bits each) summing to ≥ ``data_bits``, then the special prime."""
    count = -(-data_bits // MAX_PRIME_BITS)
    size = max(-(-data_bits // count), 20)
    return (size,) * count + (size,)


def choose_params(config: object, num_clients: int, words: int) -> HEParams:
    """The parameters for ``secure_aggregation`` ``config`` (its ``he`` block) with cohorts of at most
    ``num_clients`` and updates of ``words`` values; raises ScenarioError naming the field to change."""
    he = config.he
    level = he.security_bits
    if level not in MAX_COEFF_BITS:
        raise ScenarioError(
            f"secure_aggregation.he.security_bits: {level} bits is not a level of the HE Standard; "
            f"use 128, 192 or 256 (below 128 is refused)")
    noise = NOISE_MARGIN_BITS + max(num_clients, 1).bit_length()
    choices = []
    for degree in (DEGREES if he.poly_modulus_degree is None else (he.poly_modulus_degree,)):
        if he.scheme == "bfv":
            if config.modulus_bits >= MAX_PLAIN_BITS:
                raise ScenarioError(
                    f"secure_aggregation.modulus_bits: the he backend's BFV plain modulus is a prime above 2^b of at "
                    f"most {MAX_PLAIN_BITS} bits (got b = {config.modulus_bits}); use modulus_bits ≤ {MAX_PLAIN_BITS - 1}")
            plain = batching_prime(1 << config.modulus_bits, degree)
            chain = _chain(plain.bit_length() + degree.bit_length() - 1 + noise)
            params = HEParams("bfv", degree, chain, level, plain_modulus=plain)
        else:
            # The sum of n values clipped to [−c, c], at scale 2^s, and its sign: log2(n·c) + s + 2 bits.
            magnitude = max(math.ceil(math.log2(max(num_clients, 1) * config.clip_range)), 0)
            chain = _chain(he.scale_bits + magnitude + 2)
            params = HEParams("ckks", degree, chain, level, scale_bits=he.scale_bits)
        if sum(params.coeff_mod_bit_sizes) <= MAX_COEFF_BITS[level][degree]:
            choices.append(params)
    if not choices:
        pinned = "" if he.poly_modulus_degree is None else f"poly_modulus_degree {he.poly_modulus_degree} and "
        raise ScenarioError(
            f"secure_aggregation.he.security_bits: no ring in {pinned}{list(DEGREES)} holds the modulus a sum of "
            f"{num_clients} updates needs at {level}-bit security; lower security_bits (≥ 128), unpin "
            f"poly_modulus_degree, lower he.scale_bits or modulus_bits, or sample fewer clients")
    best = min(choices, key=lambda p: (p.ciphertexts(words) * p.poly_modulus_degree * (len(p.coeff_mod_bit_sizes) - 1),
                                       p.poly_modulus_degree))
    if best.ciphertexts(words) > he.max_ciphertexts:
        raise ScenarioError(
            f"secure_aggregation.he.max_ciphertexts: an update of {words} words needs {best.ciphertexts(words)} "
            f"ciphertexts of {best.slots} slots, more than {he.max_ciphertexts}; raise max_ciphertexts, or send "
            f"fewer words (compression.kind: random_mask)")
    return best


def security_of(degree: int, coeff_bits: int) -> int:
    """The highest HE-Standard level (128, 192, 256) a ring of ``degree`` with ``coeff_bits`` reaches; 0 below 128."""
    levels = [level for level, table in MAX_COEFF_BITS.items() if coeff_bits <= table.get(degree, -1)]
    return max(levels, default=0)
