"""Exact and near deduplication for the prepare pipeline.

Exact: a 128-bit BLAKE2b digest of the document's bytes; the first occurrence is kept.

Near: MinHash signatures of token n-gram shingles, indexed with locality-sensitive hashing (bands
of rows). Written here rather than taken from ``datasketch`` because the shingles are already
integer token ids: hashing them is a few vectorized numpy passes, where datasketch hashes each
shingle's bytes in Python, and the band keys are plain integers a finished shard can store, so an
interrupted run rebuilds the index from its shards instead of pickling it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy

_MERSENNE = numpy.uint64((1 << 61) - 1)
_MAX_HASH = numpy.uint64((1 << 32) - 1)
_MIX = numpy.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for polynomial rolling hashes
_CHUNK = 4096  # shingles per step, bounding the (shingles x permutations) temporary


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def ngram_hashes(ids: numpy.ndarray, n: int) -> numpy.ndarray:
    """The polynomial hash ``sum(ids[i + j] * base^(n - 1 - j)) mod 2^64`` (base ``_MIX``) of
    every window of ``n`` consecutive ids, its high bits mixed down.

    From prefix sums, in a fixed number of vectorized passes whatever ``n``: with
    ``S[k] = sum(ids[j] * base^-j for j < k)`` (``base`` is odd, so it has an inverse mod 2^64),
    the window at ``i`` is ``(S[i + n] - S[i]) * base^(i + n - 1)``. uint64 arithmetic wraps mod
    2^64, so this is the same number as the direct sum.
    """
    size = len(ids)
    count = size - n + 1
    if count <= 0 or n < 1:
        return numpy.empty(0, dtype=numpy.uint64)
    powers, inverse_powers = _powers(size)
    prefix = numpy.empty(size + 1, dtype=numpy.uint64)
    prefix[0] = 0
    numpy.multiply(ids, inverse_powers[:size], out=prefix[1:], dtype=numpy.uint64, casting="unsafe")
    numpy.cumsum(prefix[1:], out=prefix[1:])
    windows = numpy.subtract(prefix[n:], prefix[:count])
    windows *= powers[n - 1 : size]
    windows ^= windows >> numpy.uint64(29)  # mix the high bits down: callers take low bits
    return windows


_POWERS = (numpy.ones(1, dtype=numpy.uint64), numpy.ones(1, dtype=numpy.uint64))
_MIX_INVERSE = numpy.uint64(pow(int(_MIX), -1, 1 << 64))


def _powers(size: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``base^k`` and ``base^-k`` mod 2^64 for k < at least ``size`` (grown by doubling, shared
    by all threads: a new pair replaces the old one whole)."""
    global _POWERS
    powers, inverse = _POWERS
    if len(powers) < size:
        length = max(size, 2 * len(powers), 1 << 16)
        powers = numpy.full(length, _MIX, dtype=numpy.uint64)
        powers[0] = 1
        inverse = numpy.full(length, _MIX_INVERSE, dtype=numpy.uint64)
        inverse[0] = 1
        numpy.cumprod(powers, out=powers)
        numpy.cumprod(inverse, out=inverse)
        _POWERS = (powers, inverse)
    return powers, inverse


@functools.lru_cache(maxsize=16)  # 1,290 integrals: 16 ms, on every run's setup
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the false positive + negative mass.

    The same criterion as datasketch's ``MinHashLSH``: integrate the probability of becoming a
    candidate, 1 - (1 - s^r)^b, below the threshold (false positives) and its complement above.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"near-dedup threshold {threshold} must be in (0, 1)")
    best, best_error = (1, num_perm), float("inf")
    below = numpy.linspace(0.0, threshold, 200)
    above = numpy.linspace(threshold, 1.0, 200)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = numpy.trapezoid(1 - (1 - below**rows) ** bands, below)
            fn = numpy.trapezoid((1 - above**rows) ** bands, above)
            if fp + fn < best_error:
                best, best_error = (bands, rows), fp + fn
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures of token-id shingles, reduced to one key per LSH band."""

    num_perm: int = 128
    shingle: int = 5
    threshold: float = 0.85
    seed: int = 1

    def __post_init__(self) -> None:
        bands, rows = lsh_bands(self.threshold, self.num_perm)
        rng = numpy.random.RandomState(self.seed)  # fixed permutations: keys are comparable
        a = rng.randint(1, int(_MERSENNE), size=self.num_perm, dtype=numpy.uint64)
        b = rng.randint(0, int(_MERSENNE), size=self.num_perm, dtype=numpy.uint64)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    def signature(self, ids: numpy.ndarray) -> numpy.ndarray:
        shingles = numpy.unique(ngram_hashes(ids, min(self.shingle, len(ids))) & _MAX_HASH)
        signature = numpy.full(self.num_perm, _MAX_HASH, dtype=numpy.uint64)
        for start in range(0, len(shingles), _CHUNK):
            part = shingles[start : start + _CHUNK, None]
            hashed = (part * self._a + self._b) % _MERSENNE & _MAX_HASH
            numpy.minimum(signature, hashed.min(axis=0), out=signature)
        return signature

    def band_keys(self, ids: numpy.ndarray) -> numpy.ndarray:
        """One uint64 per band; two documents share a key with probability ~ s^rows."""
        signature = self.signature(ids)[: self.bands * self.rows]
        return ngram_hashes_rows(signature.reshape(self.bands, self.rows))


def ngram_hashes_rows(matrix: numpy.ndarray) -> numpy.ndarray:
    """Hash each row of a uint64 matrix to one uint64."""
    out = numpy.zeros(matrix.shape[0], dtype=numpy.uint64)
    for column in matrix.T:
        out *= _MIX
        out += column
    return out


class LSHIndex:
    """Band keys of the documents kept so far; a document sharing any band is a near-duplicate."""

    def __init__(self, bands: int) -> None:
        self._bands: list[set[int]] = [set() for _ in range(bands)]

    def seen(self, keys: numpy.ndarray) -> bool:
        return any(int(key) in band for key, band in zip(keys, self._bands))

    def add(self, keys: numpy.ndarray) -> None:
        for key, band in zip(keys, self._bands):
            band.add(int(key))

    def add_many(self, matrix: numpy.ndarray) -> None:
        for band, column in zip(self._bands, matrix.T):
            band.update(column.tolist())
