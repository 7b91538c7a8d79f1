"""Energies from PySCF: Hartree-Fock or Kohn-Sham DFT total energies of a molecule and of
isolated atoms in their ground spin states. PySCF is an optional extra, loaded on first use."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import numpy as np

from ..config import StudyError
from .elements import SYMBOLS
from .errors import one_line

DEFAULT_METHOD = "HF/6-31G"
# ground-state spin (2S) of the isolated atoms
ATOM_SPIN = {1: 1, 6: 2, 7: 3, 8: 2, 9: 1}


def parse_method(method: str) -> tuple[str, str]:
    """A method ``'<level of theory>/<basis>'`` (``'HF/6-31G'``) as ``(level upper-cased, basis)``."""
    parts = method.split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise StudyError(f"molecules: method {method!r} must be 'THEORY/BASIS', e.g. 'HF/6-31G' or 'B3LYP/6-31G'")
    return parts[0].upper(), parts[1]


def pyscf_modules():
    """``(PySCF version, gto, scf, dft)``, or a one-line error when PySCF is not installed."""
    # deferred: PySCF is an optional extra (only the built-in conformer set needs it)
    try:
        import pyscf  # noqa: F401
        from pyscf import dft, gto, scf
    except ImportError:
        raise StudyError(
            "molecules: PySCF is not installed; run `.venv/bin/pip install pyscf==2.14.0` (scripts/bootstrap.sh does) "
            "or use QM9 files"
        ) from None
    return pyscf.__version__, gto, scf, dft


def qc_energy(z, pos, method: str = DEFAULT_METHOD, spin: int = 0) -> float:
    """Total energy (Hartree) of atoms ``z`` at ``pos`` (Angstrom) with PySCF.

    ``method`` 'HF/<basis>' runs Hartree-Fock, '<xc>/<basis>' Kohn-Sham DFT with that
    functional; restricted for closed shells (``spin`` 0), unrestricted otherwise. An SCF
    that does not converge is retried with second-order (Newton) SCF, then an error."""
    _, gto, scf, dft = pyscf_modules()
    theory, basis = parse_method(method)
    atoms = [(SYMBOLS[int(a)], tuple(map(float, p))) for a, p in zip(z, pos)]
    try:
        mol = gto.M(atom=atoms, basis=basis, spin=spin, unit="Angstrom", verbose=0)
    except Exception as e:  # pyscf raises plain errors for unknown basis names
        raise StudyError(f"molecules: PySCF cannot build basis {basis!r} for {method!r} ({one_line(e)})") from None
    if theory == "HF":
        mf = scf.RHF(mol) if spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = theory
    try:
        e = mf.kernel()
        if not mf.converged:
            mf = mf.newton()
            e = mf.kernel()
    except StudyError:
        raise
    except Exception as ex:
        raise StudyError(f"molecules: PySCF failed for {method!r} ({one_line(ex)})") from None
    if not mf.converged:
        raise StudyError(f"molecules: the {method} SCF did not converge for {''.join(SYMBOLS[int(a)] for a in z)}")
    return float(e)


def atom_energies(elements: Iterable[int], method: str = DEFAULT_METHOD) -> dict[int, float]:
    """Isolated-atom energies (Hartree) in their ground spin states with ``method``."""
    return {int(a): qc_energy([a], np.zeros((1, 3)), method, spin=ATOM_SPIN[int(a)]) for a in sorted(set(int(e) for e in elements))}


@contextlib.contextmanager
def limited_threads(n: Optional[int]):
    """OpenMP (PySCF) and BLAS (numpy, scipy) thread counts limited to ``n`` inside the block
    (``None``: unchanged). Molecules this small gain nothing from threads, and on a busy
    2-core machine two threads made the default set several times slower."""
    if n is None:
        yield
        return
    # deferred: PySCF is an optional extra; loading it brings its OpenMP runtime, so the limit reaches it
    import pyscf.lib  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield
