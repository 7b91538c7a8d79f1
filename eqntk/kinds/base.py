"""What a kind of study does for each ``eqntk`` command: the ``StudyKind`` interface.

The study file's ``kind`` (``study.config.Study``) picks its schema there and its kind here
(``eqntk.kinds.KINDS``); a results directory's kind is the ``kind`` its study.json records.
The command line parses its arguments and hands each command to that one object.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from study.config import StudyError


@dataclass(frozen=True)
class RunOptions:
    """The flags of ``eqntk run``."""

    out: Optional[Path] = None  # results directory (default results/<study name>)
    address: Optional[str] = None  # Ray cluster address; local Ray when None
    resume: bool = False  # reuse a directory that already holds this finished study
    analysis: bool = True  # analyse and report after the run
    progress: bool = True  # a progress bar
    compact: bool = True  # compact the result store's parts at the end (eqntk.compact)


class StudyKind(ABC):
    """One kind of study, from its validated file to its report.

    Bad input raises ``StudyError`` (one line naming the field and the fix; exit code 2)
    before anything is written.
    """

    name: str  # the study file's ``kind``

    @abstractmethod
    def validate(self, study: Path) -> int:
        """Check the study and its data and print the plan of work (``eqntk validate``); the exit code."""

    @abstractmethod
    def run(self, study: Path, options: RunOptions) -> int:
        """Do the study's work into ``options.out``, then analyse it (``eqntk run``); the exit code.

        Rerunning the same command resumes: work already in the directory is kept. What a
        kind refuses follows from what its directory holds: an ensemble directory holds one
        study, so a different study is refused and a finished one needs ``--resume``; a
        kernel-regression directory caches kernels, so a study with more sizes, draws or times
        may be run into it. Every kind refuses a directory of another kind or one that is not
        a results directory."""

    @abstractmethod
    def status(self, out: Union[str, Path], verbose: bool = False) -> int:
        """Print how far the work in results directory ``out`` (named as given) has got (``eqntk status``)."""

    @abstractmethod
    def analyze(self, out: Path) -> None:
        """Write the tables of results directory ``out`` (``eqntk analyze``)."""

    @abstractmethod
    def report(self, out: Path) -> None:
        """Write the tables and the report, ``out/report/index.html`` (``eqntk report``)."""

    # ----- shared by the kinds ---------------------------------------------------------
    @staticmethod
    def out_dir(options: RunOptions, study_name: str) -> Path:
        return Path(options.out) if options.out else Path("results") / study_name

    @staticmethod
    def refuse_other_directory(out: Path) -> None:
        """Refuse an ``--out`` that exists, holds files and is not a results directory."""
        if (out.exists() and not (out / "study.json").is_file()
                and any(p for p in out.iterdir() if p.name != ".lock")):
            raise StudyError(f"--out: {out} exists and is not an eqntk results directory; choose another --out")


def kind_name_of_dir(out: Path) -> str:
    """The ``kind`` recorded in a results directory's study.json (ensemble when it names none)."""
    try:
        return json.loads((Path(out) / "study.json").read_text())["config"].get("kind", "ensemble")
    except (OSError, ValueError, KeyError, AttributeError):
        return "ensemble"  # the ensemble commands name what is wrong with the directory
