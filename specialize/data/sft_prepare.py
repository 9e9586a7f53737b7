"""``specialize data prepare-sft``: chat records -> token ids + loss masks, optionally packed.

Output, a directory::

    OUT/tokens.bin, .idx      megatron-core indexed dataset, int32: one *document* per training
                              sequence, one *sequence* per chat sample in it
    OUT/loss_mask.bin, .idx   the same structure, uint8: 1 where a token is learned
    OUT/manifest.json         counts, tokens learned vs masked, padding, options, input hashes

Each sample keeps all its tokens; the training side shifts them into inputs and labels per sample,
so a sample of n tokens takes n - 1 of a sequence's ``seq_length`` positions. Without ``--pack``
every sample is its own sequence (padded when read); with it, samples are packed first-fit
decreasing into sequences, and the training side keeps attention inside each sample.

Files are written as ``NAME.tmpPID`` and renamed when complete; one run at a time holds
``OUT/.lock``, so the temporaries a killed run left are removed by the next.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy

from base.tokenizer import QwenTokenizer
from specialize.data.chat import DEFAULT_SYSTEM, MASK_POLICIES, ChatError, conversation, render
from specialize.data.output import locked, writing
from specialize.data.prepare import FORMAT as PRETRAIN_FORMAT
from specialize.data.prepare import MAX_EXAMPLES, tool_version
from specialize.data.sources import RowError, Source, iter_rows

logger = logging.getLogger(__name__)

FORMAT = "sft-1"
TOKENS, LOSS_MASK, MANIFEST = "tokens", "loss_mask", "manifest.json"
OVERLONG = ("drop", "truncate")
ON_ERROR = ("skip", "fail")


class SFTDataError(ValueError):
    """A bad record under ``on_error: fail``; names the file and line."""


@dataclass(frozen=True)
class SFTOptions:
    seq_length: int
    """Positions per training sequence; a sample of n tokens needs n - 1."""
    pack: bool = False
    """Pack several samples per sequence (attention stays inside each sample)."""
    mask_policy: str = "assistant"
    """Which tokens are learned: ``assistant`` or ``qwen-repo`` (see ``chat.py``)."""
    system: str = DEFAULT_SYSTEM
    """System prompt for conversations without one."""
    overlong: str = "drop"
    """Samples longer than a sequence: ``drop`` them or ``truncate`` them (both counted)."""
    on_error: str = "skip"
    """Bad records: ``skip`` (counted, with file:line examples in the manifest) or ``fail``."""

    def check(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"--seq-len {self.seq_length}: must be at least 2")
        for name, value, choices in (
            ("mask policy", self.mask_policy, MASK_POLICIES),
            ("over-long policy", self.overlong, OVERLONG),
            ("error policy", self.on_error, ON_ERROR),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: expected one of {', '.join(choices)}")


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per bin: first-fit decreasing, deterministic (ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        # The fullest bin that still fits (best fit over first fit: fewer, fuller sequences).
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            remaining, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (remaining - lengths[i], b))
    return [sorted(b) for b in bins]


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_sft(
    sources: list[Source], out_dir: str | os.PathLike, tokenizer: QwenTokenizer, options: SFTOptions
) -> dict:
    """Render, mask, filter and (optionally) pack every record; write ``out_dir``."""
    options.check()
    if not sources:
        raise ValueError("no sources given")
    out = Path(out_dir).expanduser().resolve()
    with locked(out, "data prepare-sft"):
        with writing(out):
            _remove_temporaries(out)
        return _prepare_sft(sources, out, tokenizer, options)


def _temporaries(out: Path, pid: Optional[int] = None) -> list[Path]:
    """The files a run (any run, or the one with ``pid``) writes before publishing them."""
    names = [f"{n}{suffix}" for n in (TOKENS, LOSS_MASK) for suffix in (".bin", ".idx")]
    names.append(MANIFEST)
    found = []
    for path in out.iterdir():
        base, dot_tmp, number = path.name.rpartition(".tmp")
        if base in names and dot_tmp and number.isdigit():
            if pid is None or int(number) == pid:
                found.append(path)
    return found


def _remove_temporaries(out: Path) -> None:
    # Left by a run that was killed; the lock shows that none is writing here now.
    for path in _temporaries(out):
        logger.info("removing %s, left by an interrupted run", path)
        path.unlink(missing_ok=True)


def _prepare_sft(
    sources: list[Source], out: Path, tokenizer: QwenTokenizer, options: SFTOptions
) -> dict:
    samples: list[tuple[numpy.ndarray, numpy.ndarray]] = []
    skipped: collections.Counter = collections.Counter()
    examples: dict[str, list] = collections.defaultdict(list)
    records = truncated = 0

    def skip(where: str, reason: str, detail: str) -> None:
        if options.on_error == "fail":
            raise SFTDataError(f"{where}: {detail}")
        skipped[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLES:
            examples[reason].append({"record": where, "detail": detail})

    for source in sources:
        for where, row in iter_rows(source):
            records += 1
            name = f"{source.location}:{where}"
            if isinstance(row, RowError):
                skip(name, row.reason, str(row))
                continue
            try:
                messages = conversation(row)
            except ChatError as e:
                skip(name, e.reason, str(e))
                continue
            ids, mask = render(messages, tokenizer, options.mask_policy, options.system)
            if len(ids) - 1 > options.seq_length:
                if options.overlong == "drop":
                    skip(name, "too_long", f"{len(ids) - 1} positions > {options.seq_length}")
                    continue
                ids, mask = ids[: options.seq_length + 1], mask[: options.seq_length + 1]
                if not any(mask[1:]):
                    skip(name, "nothing_learned", "nothing learned is left after truncation")
                    continue
                truncated += 1
            samples.append(
                (numpy.asarray(ids, dtype=numpy.int32), numpy.asarray(mask, dtype=numpy.uint8))
            )
    if not samples:
        raise ValueError(f"no usable samples in {records} records; skipped: {dict(skipped)}")

    positions = [len(ids) - 1 for ids, _ in samples]
    if options.pack:
        bins = pack_first_fit(positions, options.seq_length)
    else:
        bins = [[i] for i in range(len(samples))]
    learned = int(sum(int(mask[1:].sum()) for _, mask in samples))
    used = sum(positions)
    manifest = {
        "format": FORMAT,
        "sequences": len(bins),
        "samples": len(samples),
        "records": records,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "truncated": truncated,
        "tokens": {
            "positions": used,
            "learned": learned,
            "masked": used - learned,
            "padding": len(bins) * options.seq_length - used,
            "learned_fraction": learned / used,
        },
        "options": asdict(options),
        "inputs": [
            {**s.to_dict(), **({"sha256": _file_sha256(s.location)} if s.kind != "hub" else {})}
            for s in sources
        ],
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        },
        "tool": {"name": "qwen-specialize", "version": tool_version()},
    }
    tmp = f".tmp{os.getpid()}"
    try:
        with writing(out):
            _write_sequences(out, samples, bins, tmp)
            _publish(out, manifest, tmp)
    except BaseException:
        for path in _temporaries(out, os.getpid()):
            path.unlink(missing_ok=True)
        raise
    if skipped:
        logger.warning(
            "skipped %d of %d records (%s); examples in %s",
            sum(skipped.values()),
            records,
            ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())),
            out / MANIFEST,
        )
    return manifest


def _write_sequences(
    out: Path, samples: list[tuple[numpy.ndarray, numpy.ndarray]], bins: list[list[int]], tmp: str
) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builders = {
        TOKENS: IndexedDatasetBuilder(str(out / f"{TOKENS}.bin{tmp}"), dtype=numpy.int32),
        LOSS_MASK: IndexedDatasetBuilder(str(out / f"{LOSS_MASK}.bin{tmp}"), dtype=numpy.uint8),
    }
    for members in bins:
        lengths = [len(samples[i][0]) for i in members]
        builders[TOKENS].add_document(numpy.concatenate([samples[i][0] for i in members]), lengths)
        builders[LOSS_MASK].add_document(
            numpy.concatenate([samples[i][1] for i in members]), lengths
        )
    for name, builder in builders.items():
        builder.finalize(str(out / f"{name}.idx{tmp}"))
        builder.data_file.close()


def _publish(out: Path, manifest: dict, tmp: str) -> None:
    # The manifest goes last, so a directory with one has complete data files.
    (out / MANIFEST).unlink(missing_ok=True)
    for name in (TOKENS, LOSS_MASK):
        for suffix in (".bin", ".idx"):
            os.replace(out / f"{name}{suffix}{tmp}", out / f"{name}{suffix}")
    (out / f"{MANIFEST}{tmp}").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(out / f"{MANIFEST}{tmp}", out / MANIFEST)


def read_sft_manifest(path: str | os.PathLike) -> dict:
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"{path}: no {MANIFEST}; write it with `specialize data prepare-sft`"
        )
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") == PRETRAIN_FORMAT:
        raise ValueError(
            f"{path}: pretraining data (written by `data prepare`; data.format=pretrain reads "
            "it), not SFT data from `data prepare-sft`"
        )
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a `data prepare-sft` output (format {manifest.get('format')})"
        )
    return manifest


def inspect_samples(path: str | os.PathLike, tokenizer: QwenTokenizer, count: int) -> list:
    """The first ``count`` samples as [(text piece, learned)] runs, for ``data inspect-sft``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    read_sft_manifest(path)
    tokens = IndexedDataset(str(Path(path) / TOKENS))
    masks = IndexedDataset(str(Path(path) / LOSS_MASK))
    out = []
    for i in range(min(count, len(tokens))):
        ids, mask = tokens[i].tolist(), masks[i].tolist()
        runs: list[tuple[list[int], bool]] = []
        for position, (token, learned) in enumerate(zip(ids, mask)):
            learned = bool(learned) and position > 0  # the first token has nothing to learn from
            if runs and runs[-1][1] == learned:
                runs[-1][0].append(token)
            else:
                runs.append(([token], learned))
        out.append([(tokenizer.decode(run), learned) for run, learned in runs])
    return out
