"""The PASS/FAIL comparisons of ``specialize gpu-check``, as pure functions of measured figures.

Every tolerance is a constant here, so the README, the checks and the tests agree on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

SPEC_LOSS_TOLERANCE = 1e-2
"""|te - local| of the first packed-SFT loss (bf16; THD attention against a dense mask)."""
AUTO_TOLERANCE = 1e-6
"""|auto - te|: ``auto`` must resolve to the te spec and its THD data, i.e. the same kernels."""
ISOLATION_TOLERANCE = 1e-2
"""Max |Δ logits| of a sample packed with other neighbours, as a fraction of its max |logit|."""
FALL_FRACTION = 0.95
"""Falling losses: the mean of the last quarter at most this fraction of the first quarter's."""
RESUME_TOLERANCE = 0.10
"""First loss after a resume at another layout vs the last saved one, relative."""
FP8_TOLERANCE = 0.01
"""FP8 vs BF16 loss after the same steps on the same batches, relative."""
VARIANT_TOLERANCE = 0.01
"""Perplexity of each long-context variant at the training length vs ``none``, relative (every
option is the identity up to the training length)."""
MEMORY_TOLERANCE = 0.25
"""Measured peak memory vs ``specialize plan``'s, relative."""
THROUGHPUT_FLOOR = 0.5
"""Measured tokens/s/GPU at least this fraction of the plan's (its default MFU)."""


def finite(values: Iterable[float]) -> bool:
    values = list(values)
    return bool(values) and all(math.isfinite(v) for v in values)


def relative_gap(value: float, reference: float) -> float:
    """|value - reference| / |reference| (inf for a zero or non-finite reference)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.inf
    return abs(value - reference) / abs(reference)


def losses_agree(a: float, b: float, tolerance: float = SPEC_LOSS_TOLERANCE) -> bool:
    return finite((a, b)) and abs(a - b) <= tolerance


def auto_equals_te(auto: float, te: float, tolerance: float = AUTO_TOLERANCE) -> bool:
    return losses_agree(auto, te, tolerance)


def falling(losses: Sequence[float], fraction: float = FALL_FRACTION) -> bool:
    """Finite, and the last quarter's mean at most ``fraction`` of the first quarter's."""
    if len(losses) < 2 or not finite(losses):
        return False
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last <= fraction * first


def resume_continues(
    saved: Sequence[float], resumed: Sequence[float], tolerance: float = RESUME_TOLERANCE
) -> bool:
    """The first loss after the resume is within ``tolerance`` of the last loss before the save
    (a resume that lost the weights starts over near ln(vocabulary))."""
    return finite(saved) and finite(resumed) and relative_gap(resumed[0], saved[-1]) <= tolerance


def isolated(
    same: float, neighbours: float, scale: float, tolerance: float = ISOLATION_TOLERANCE
) -> bool:
    """A sample's logits moved by ``same`` when its neighbours changed, which moved theirs by
    ``neighbours``; ``scale`` is the sample's max |logit|. Isolated: the first is within the
    tolerance and the second is not (otherwise the comparison proved nothing)."""
    if not finite((same, neighbours, scale)) or scale <= 0:
        return False
    return same <= tolerance * scale < neighbours


def within(value: float, reference: float, tolerance: float) -> bool:
    return relative_gap(value, reference) <= tolerance


def fp8_close(fp8: float, bf16: float, tolerance: float = FP8_TOLERANCE) -> bool:
    return within(fp8, bf16, tolerance)


def te_version_ok(version: str | None, specifier: str | None) -> bool:
    """Transformer Engine ``version`` inside megatron-core's requirement (pre-releases count,
    as megatron-core's own lower bound ``2.9.0a0`` does)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not version or not specifier:
        return False
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def te_specifier(requirements: Iterable[str]) -> str | None:
    """The version range megatron-core declares for ``transformer-engine`` (any extra), from its
    ``Requires-Dist`` lines."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) == "transformer-engine" and requirement.specifier:
            return str(requirement.specifier)
    return None


_PYTEST_COUNT = re.compile(
    r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b"
)


def pytest_counts(output: str) -> dict[str, int]:
    """Outcome counts of pytest's final summary line (``3 passed, 2 skipped in 4.1s``)."""
    for line in reversed(output.splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found and re.search(r"\bin [\d.]+s", line):
            counts: dict[str, int] = {}
            for number, word in found:
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {}


def pytest_ok(returncode: int, counts: Mapping[str, int]) -> bool:
    """Exit 0, something passed, nothing failed or errored."""
    bad = counts.get("failed", 0) + counts.get("errors", 0)
    return returncode == 0 and counts.get("passed", 0) > 0 and bad == 0


def variants_agree(perplexities: Mapping[str, float], tolerance: float = VARIANT_TOLERANCE) -> bool:
    """Every variant's perplexity at the training length within ``tolerance`` of ``none``'s."""
    if "none" not in perplexities or not finite(perplexities.values()):
        return False
    return all(within(v, perplexities["none"], tolerance) for v in perplexities.values())


def samples_vary(completions: Mapping[str, Sequence[str]]) -> bool:
    """Sampled generation drew different completions for at least one problem."""
    return any(len(set(texts)) > 1 for texts in completions.values())


def memory_ok(measured: float, predicted: float, tolerance: float = MEMORY_TOLERANCE) -> bool:
    return measured > 0 and within(measured, predicted, tolerance)


def throughput_ok(measured: float, predicted: float, floor: float = THROUGHPUT_FLOOR) -> bool:
    return finite((measured, predicted)) and predicted > 0 and measured >= floor * predicted


def failure_line(log: str) -> str:
    """The line of a failed command's output that says why: the last one naming an error, else
    the last non-empty one."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|stopped|FAILED", line):
            return line
    return lines[-1] if lines else "no output"
