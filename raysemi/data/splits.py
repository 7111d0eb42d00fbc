"""Labelled/unlabelled split protocols. A split is data: written to list files, hashed, logged with the run.

Protocols (``DataConfig.labeled``):
- ``"1/8"`` (or ``"0.125"``): a fraction of the training set, ``k = round(n * fraction)`` labelled;
- ``"92"``: a count of labelled samples;
- ``"all"``: every sample is labelled, and the unlabelled set *is* the labelled set (the supervised
  all-labels baseline; methods still receive an unlabelled stream, with hidden labels);
- a list file of labelled sample names (the rest is unlabelled);
- a folder holding ``labeled.txt`` and optionally ``unlabeled.txt`` (otherwise the rest).

Generated splits (fraction, count) follow the CamVid README's rule: sort the sample names,
``rng = numpy.random.default_rng(seed)``, draw ``rng.permutation(n)`` and take the first ``k`` until every class
appears in the labelled part (at most ``MAX_ATTEMPTS`` draws; if none covers every class, the first draw with
the most classes wins). A dataset may publish fixed split folders (``SegDataset.fixed_split``): CamVid's
``splits/1_8`` and ``splits/1_4`` are used for protocols ``1/8`` and ``1/4`` with seed 0.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from raysemi.data.datasets import SegDataset, read_text_lines
from raysemi.errors import DataError

MAX_ATTEMPTS = 100
FRACTION = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$|^\s*0?\.\d+\s*$")
COUNT = re.compile(r"^\s*\d+\s*$")


@dataclass
class Split:
    """Indices into a dataset. ``names`` are the dataset's sample names (all of them)."""

    labeled: list[int]
    unlabeled: list[int]
    names: list[str]
    protocol: str
    seed: int

    @property
    def labeled_names(self) -> list[str]:
        return sorted(self.names[i] for i in self.labeled)

    @property
    def unlabeled_names(self) -> list[str]:
        return sorted(self.names[i] for i in self.unlabeled)

    def digest(self) -> str:
        """sha256 of the sorted labelled and unlabelled names: equal for equal splits, whatever their order."""
        text = "labeled\n" + "\n".join(self.labeled_names) + "\nunlabeled\n" + "\n".join(self.unlabeled_names)
        return hashlib.sha256(text.encode()).hexdigest()

    def write(self, folder: str | Path) -> Path:
        """Write ``labeled.txt`` and ``unlabeled.txt`` (sorted names, one per line); readable back as a protocol."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "labeled.txt").write_text("".join(f"{n}\n" for n in self.labeled_names))
        (out / "unlabeled.txt").write_text("".join(f"{n}\n" for n in self.unlabeled_names))
        return out


def make_split(dataset: SegDataset, protocol: str, seed: int = 0) -> Split:
    names = dataset.sample_names()
    n = len(names)
    protocol = str(protocol).strip()
    if n == 0:
        raise DataError(f"dataset split {dataset.split!r} is empty")
    fixed = dataset.fixed_split(protocol, seed)
    if fixed is not None:
        labeled, unlabeled = _from_folder(fixed, names)
    elif protocol == "all":
        labeled, unlabeled = list(range(n)), list(range(n))
    elif FRACTION.match(protocol) or COUNT.match(protocol):
        k = _labeled_count(protocol, n)
        if k < 1:
            raise DataError(f"labeled {protocol!r}: gives no labelled sample out of {n}")
        if k >= n:
            raise DataError(f"labeled {protocol!r}: leaves no unlabelled sample out of {n} (use 'all')")
        labeled = _draw_covering(dataset, k, seed)
        chosen = set(labeled)
        unlabeled = [i for i in range(n) if i not in chosen]
    else:
        path = Path(protocol)
        if path.is_dir():
            labeled, unlabeled = _from_folder(path, names)
        elif path.is_file():
            labeled = _read_names(path, names)
            chosen = set(labeled)
            unlabeled = [i for i in range(n) if i not in chosen]
        else:
            raise DataError(f"{protocol}: not a fraction, count, 'all', list file or split folder")
        if not labeled:
            raise DataError(f"{protocol}: lists no labelled sample")
    return Split(sorted(labeled), sorted(unlabeled), names, protocol, seed)


def _labeled_count(protocol: str, n: int) -> int:
    if COUNT.match(protocol):
        return int(protocol)
    try:
        fraction = Fraction(protocol.replace(" ", ""))
    except ZeroDivisionError:
        raise DataError(f"labeled {protocol!r}: a fraction must be in (0, 1], its denominator is 0") from None
    if not 0 < fraction <= 1:
        raise DataError(f"labeled {protocol!r}: a fraction must be in (0, 1]")
    return round(n * fraction)


def _draw_covering(dataset: SegDataset, k: int, seed: int) -> list[int]:
    """Sorted-name order, then seeded permutations until the first ``k`` hold every class."""
    names = dataset.sample_names()
    by_name = sorted(range(len(names)), key=names.__getitem__)
    rng = np.random.default_rng(seed)
    wanted = set(range(dataset.num_classes))
    present: dict[int, frozenset[int]] = {}
    best, best_covered = None, -1
    for _ in range(MAX_ATTEMPTS if dataset.has_labels else 1):
        chosen = [by_name[i] for i in rng.permutation(len(names))[:k]]
        if not dataset.has_labels:
            return chosen
        covered: set[int] = set()
        for index in chosen:
            if index not in present:
                present[index] = dataset.label_classes(index)
            covered |= present[index]
        if covered >= wanted:
            return chosen
        if len(covered) > best_covered:
            best, best_covered = chosen, len(covered)
    return best


def _lookup(names: list[str]) -> dict[str, int]:
    """Accept bare names, paths ending in a name (``train/X.png trainannot/X.png`` lines) and stems."""
    table: dict[str, int] = {}
    for i, name in enumerate(names):
        table.setdefault(Path(name).stem, i)
    table.update({name: i for i, name in enumerate(names)})
    return table


def _read_names(path: Path, names: list[str]) -> list[int]:
    table = _lookup(names)
    indices: list[int] = []
    seen: set[int] = set()
    for line in read_text_lines(path):
        if not line.strip():
            continue
        token = line.split()[0]
        index = next(
            (table[c] for c in (token, Path(token).name, Path(token).stem, Path(token).stem.removesuffix("_leftImg8bit"))
             if c in table),
            None,
        )  # fmt: skip
        if index is None:
            raise DataError(f"{path}: sample {token!r} is not in the dataset")
        if index not in seen:
            seen.add(index)
            indices.append(index)
    return indices


def _from_folder(folder: Path, names: list[str]) -> tuple[list[int], list[int]]:
    labeled_file = folder / "labeled.txt"
    if not labeled_file.is_file():
        raise DataError(f"{labeled_file}: split list not found")
    labeled = _read_names(labeled_file, names)
    if not labeled:
        raise DataError(f"{labeled_file}: lists no labelled sample")
    unlabeled_file = folder / "unlabeled.txt"
    if unlabeled_file.is_file():
        unlabeled = _read_names(unlabeled_file, names)
        both = set(labeled) & set(unlabeled)
        if both:
            raise DataError(f"{unlabeled_file}: sample {names[min(both)]!r} is also in labeled.txt")
    else:
        chosen = set(labeled)
        unlabeled = [i for i in range(len(names)) if i not in chosen]
    return labeled, unlabeled
