import numpy
import pytest

from specialize.data.dedup import LSHIndex, MinHasher, digest, lsh_bands, ngram_hashes


def test_ngram_hashes_depend_on_window_content_only() -> None:
    ids = numpy.array([5, 6, 7, 8, 5, 6, 7], dtype=numpy.int32)
    hashes = ngram_hashes(ids, 3)
    assert len(hashes) == 5
    assert hashes[0] == hashes[4]  # [5, 6, 7] twice
    assert len(set(hashes.tolist())) == 4
    assert len(ngram_hashes(ids, 8)) == 0


def _polynomial_hash(window: list[int]) -> int:
    """The definition, in Python integers: sum(id * base^(n-1-j)) mod 2^64, high bits mixed down."""
    value = 0
    for token in window:
        value = (value * 0x9E3779B97F4A7C15 + token) % (1 << 64)
    return value ^ (value >> 29)


@pytest.mark.parametrize("dtype", [numpy.int32, numpy.int64, numpy.uint64])
def test_ngram_hashes_are_the_polynomial_hash_of_each_window(dtype) -> None:
    rng = numpy.random.default_rng(0)
    for size in (0, 1, 12, 13, 200, 70_000):  # the last grows the table of powers
        ids = rng.integers(0, 151_936, size=size).astype(dtype)
        for n in (1, 5, 13):
            hashes = ngram_hashes(ids, n)
            assert hashes.dtype == numpy.uint64 and len(hashes) == max(size - n + 1, 0)
            checked = range(len(hashes)) if size < 1000 else rng.integers(0, len(hashes), 50)
            for i in checked:
                assert int(hashes[i]) == _polynomial_hash(ids[i : i + n].tolist()), (size, n, i)


def test_lsh_bands_follow_the_threshold() -> None:
    low, high = lsh_bands(0.5, 128), lsh_bands(0.9, 128)
    assert low[0] * low[1] <= 128 and high[0] * high[1] <= 128
    # A higher threshold needs more rows per band (each band harder to match).
    assert high[1] > low[1]
    with pytest.raises(ValueError):
        lsh_bands(1.0, 128)


def _jaccard(a: numpy.ndarray, b: numpy.ndarray, n: int) -> float:
    x, y = set(ngram_hashes(a, n).tolist()), set(ngram_hashes(b, n).tolist())
    return len(x & y) / len(x | y)


def test_minhash_estimates_jaccard() -> None:
    rng = numpy.random.default_rng(0)
    base = rng.integers(0, 50_000, size=2000)
    edited = base.copy()
    edited[rng.choice(2000, size=40, replace=False)] = rng.integers(0, 50_000, size=40)
    hasher = MinHasher()
    true = _jaccard(base, edited, hasher.shingle)
    estimate = float((hasher.signature(base) == hasher.signature(edited)).mean())
    assert abs(estimate - true) < 0.1
    other = rng.integers(0, 50_000, size=2000)
    assert (hasher.signature(base) == hasher.signature(other)).mean() < 0.05


def test_lsh_index_finds_near_duplicates_only() -> None:
    rng = numpy.random.default_rng(1)
    hasher = MinHasher(threshold=0.85)
    base = rng.integers(0, 50_000, size=3000)
    near = base.copy()
    near[:10] = 7  # ~98% of the shingles shared
    far = base.copy()
    far[::4] = rng.integers(0, 50_000, size=len(far[::4]))  # almost every 5-gram changed
    index = LSHIndex(hasher.bands)
    index.add(hasher.band_keys(base))
    assert index.seen(hasher.band_keys(near))
    assert not index.seen(hasher.band_keys(far))
    rebuilt = LSHIndex(hasher.bands)
    rebuilt.add_many(hasher.band_keys(base)[None, :])
    assert rebuilt.seen(hasher.band_keys(near))


def test_digest_is_content_addressed() -> None:
    assert digest(b"abc") == digest(b"abc") != digest(b"abd")
    assert len(digest(b"")) == 16
