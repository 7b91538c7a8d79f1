"""Molecules for the kernel-regression study (docs/theory.md §7): geometries and energies,
and each atom's environment as a multi-channel signal on the sphere (docs/molecules.md).

Three sources of molecules, all returned as a :class:`MoleculeSet` (``molecule_set``):

- :func:`load_qm9_csv` (``qm9_csv``): QM9 from the CSV files of the ``qm9pack`` package
  (all 130,831 molecules, read offline), target U0 atomisation energy or any property column;
- :func:`load_qm9` (``qm9``): the standard QM9 release (``dsgdb9nsd.xyz.tar.bz2`` from
  figshare, or a directory of its ``dsgdb9nsd_NNNNNN.xyz`` files), target the atomisation
  energy ``U0 - sum of the atomic U0`` (QM9's own atomic references);
- :func:`generate_conformers` (``conformer_set``): a small data set made on this machine, so
  the built-in study needs no download: randomly displaced and rotated conformers of a dozen
  small molecules (``geometries``), energies from PySCF (``pyscf_energies``; Hartree-Fock or
  DFT), atomisation energy against the same method's isolated atoms; cached as ``.npz``
  after the first run;
- :meth:`MoleculeSet.load` of a set saved with :meth:`MoleculeSet.save`.

Units: positions in Angstrom, energies in eV (``HARTREE_EV`` eV per Hartree). Atomisation
energies keep QM9's sign: molecule minus atoms, negative for a bound molecule.

:func:`atom_environments` (``environments``) turns one molecule into per-atom spherical
signals; :meth:`MoleculeSet.with_environments` stores them for a whole set, padded to the
largest molecule with an atom mask, so per-atom networks can be summed over the real atoms.
"""

from .conformer_set import default_cache_dir, generate_conformers
from .elements import ELEMENTS, HARTREE_EV, NUMBERS, SYMBOLS
from .environments import atom_environments, channel_names
from .geometries import DEFAULT_MOLECULES, DEFAULT_SIGMA, GEOMETRIES, conformer, molecule_geometry
from .molecule_set import MoleculeSet
from .pyscf_energies import ATOM_SPIN, DEFAULT_METHOD, atom_energies, qc_energy
from .qm9 import QM9_ATOMREF_U0, QM9_SOURCE, load_qm9, parse_qm9_xyz, qm9_atomisation_ev
from .qm9_csv import DEFAULT_TARGET, QM9PACK_PIN, load_qm9_csv, qm9pack_data_dir

__all__ = [
    "ATOM_SPIN", "DEFAULT_METHOD", "DEFAULT_TARGET", "QM9PACK_PIN", "load_qm9_csv", "qm9pack_data_dir", "DEFAULT_MOLECULES", "DEFAULT_SIGMA", "ELEMENTS", "GEOMETRIES", "HARTREE_EV",
    "NUMBERS", "QM9_ATOMREF_U0", "QM9_SOURCE", "SYMBOLS", "MoleculeSet", "atom_energies", "atom_environments",
    "channel_names", "conformer", "default_cache_dir", "generate_conformers", "load_qm9", "molecule_geometry",
    "parse_qm9_xyz", "qc_energy", "qm9_atomisation_ev",
]
