"""Errors of the molecule readers and PySCF quoted inside the one-line messages of ``StudyError``."""


def one_line(e: BaseException, n: int = 80) -> str:
    """An exception as one short line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"
