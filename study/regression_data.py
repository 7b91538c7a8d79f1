"""The data of ``kind: kernel_regression`` studies: a pool of training candidates and a test
set (images, ring signals, or molecules as padded per-atom environments on the sphere).

Molecules (``source: molecules``, docs/study.md): the inputs are padded per-atom environments
``[N, A, C, 2L, 2L]`` with atomic numbers (0 = padding atom); the targets are energies (eV).
"""


from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from . import molecules as M
from .atomic import atomic_savez
from .config import RegressionStudy, StudyError
from .data import StudyData, _labelled, _normalize
from .seeds import derive_seed
from .sphere import dh_grid, isht, sht


class RegressionData:
    """The pool of training candidates and the test set. For molecules (``pool_z`` given) the
    inputs are padded per-atom signals ``[N, A, C, 2L, 2L]`` with atomic numbers ``z [N, A]``
    (0 = no atom) and the targets energies ``[N, 1]`` (eV)."""

    def __init__(self, pool_x, pool_y, test_x, test_y, pool_z=None, test_z=None, pool_pos=None, test_pos=None):
        self.pool_x, self.pool_y, self.test_x, self.test_y = pool_x, pool_y, test_x, test_y
        self.pool_z, self.test_z = pool_z, test_z
        # molecules: atom positions [N, A, 3] (Angstrom) for descriptor kernels such as the Coulomb matrix
        self.pool_pos, self.test_pos = pool_pos, test_pos

    @property
    def molecular(self) -> bool:
        return self.pool_z is not None

    @property
    def input_shape(self):
        """The shape of one model input: one atom's signal for molecules."""
        return tuple(self.pool_x.shape[2 if self.molecular else 1:])

    @property
    def n_out(self):
        return int(self.pool_y.shape[1])

    def digest(self) -> str:
        extra = {"pool_z": self.pool_z, "test_z": self.test_z} if self.molecular else {}
        return StudyData(self.pool_x, self.pool_y, {"test": self.test_x, "test_y": self.test_y, **extra}).digest()

    def baseline_features(self, kind: str):
        """``(F_pool, F_test)`` of a regression baseline: element counts (``per_element``), a
        constant (``mean``), or ``None`` (``none``)."""
        if kind == "none":
            return None
        if kind == "mean":
            return np.ones((len(self.pool_y), 1)), np.ones((len(self.test_y), 1))
        counts = lambda z: np.stack([(z == e).sum(axis=1) for e in M.ELEMENTS], axis=1).astype(np.float64)
        return counts(self.pool_z), counts(self.test_z)

    def save(self, path: Path) -> None:
        arrays = dict(train_x=self.pool_x, train_y=self.pool_y, eval__test=self.test_x, test_y=self.test_y)
        if self.molecular:
            arrays.update(train_z=self.pool_z, test_z=self.test_z)
            if self.pool_pos is not None:
                arrays.update(train_pos=self.pool_pos, test_pos=self.test_pos)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: Path) -> "RegressionData":
        with np.load(path) as z:
            mol = "train_z" in z.files
            pos = "train_pos" in z.files
            return cls(z["train_x"], z["train_y"], z["eval__test"], z["test_y"],
                       z["train_z"] if mol else None, z["test_z"] if mol else None,
                       z["train_pos"] if pos else None, z["test_pos"] if pos else None)


def build_regression_data(cfg: RegressionStudy, base: Path) -> RegressionData:
    d, r = cfg.data, cfg.regression
    if d.train.source == "molecules":
        return build_molecule_data(cfg, base)
    x, lab, c1 = _labelled(d.train, cfg.seed, base, cfg.group)
    xt, labt, c2 = _labelled(r.test, cfg.seed, base, cfg.group)
    if len(x) == 0:
        raise StudyError("data.train: the pool of training candidates is empty; give n > 0 or a file with images")
    if len(xt) == 0:
        raise StudyError("regression.test: the test set is empty; give n > 0 or a file with images")
    if xt.shape[1:] != x.shape[1:]:
        raise StudyError(
            f"regression.test: inputs have shape {xt.shape[1:]} but the training inputs {x.shape[1:]}; "
            "use the same image size (resize) and channels"
        )
    classes = max(c1, c2)
    y, yt = np.eye(classes)[lab], np.eye(classes)[labt]
    if d.targets == "one_hot_centred":
        y, yt = y - 1.0 / classes, yt - 1.0 / classes
    if d.normalize == "per_image":
        x, xt = _normalize(x), _normalize(xt)
    sizes = r.resolved_sizes
    if sizes[-1] > len(x):
        raise StudyError(
            f"regression.sizes: the largest size {sizes[-1]} exceeds the {len(x)} training candidates "
            "(data.train); lower it or give data.train more inputs"
        )
    return RegressionData(x, y, xt, yt)


# ----- molecules (source: molecules) -------------------------------------------------------
def _molecule_set(src, base: Path):
    """The whole set a ``molecules`` source draws from, before the seeded order and ``start``/``n``."""
    if src.set == "builtin":
        return M.generate_conformers(n_conformers=src.n_conformers, method=src.method)
    if src.set == "qm9" and src.path is None:  # the installed qm9pack's CSVs
        return M.load_qm9_csv(None, target=src.target or M.DEFAULT_TARGET, limit=src.limit)
    path = Path(src.path)
    if not path.is_absolute():
        path = base / path
    if src.set == "qm9":
        if not path.exists():
            raise StudyError(f"data.path: {path} not found; download dsgdb9nsd.xyz.tar.bz2 (QM9, figshare) there or fix the path")
        if path.is_dir() and list(path.glob("qm9_part*.csv")):  # CSVs in the qm9pack layout
            return M.load_qm9_csv(path, target=src.target or M.DEFAULT_TARGET, limit=src.limit)
        if src.target not in (None, M.DEFAULT_TARGET):
            raise StudyError(f"data.target: {src.target} needs the qm9pack CSVs (the dsgdb9nsd reader reads U0 only); "
                             "leave path out or use target U0_atomisation")
        return M.load_qm9(path, limit=src.limit)
    return M.MoleculeSet.load(path)


def load_molecules(src, seed: int, base: Path):
    """The molecules of one source: the set in a fixed seeded order (the same for every source
    of that set, so ``start``/``n`` ranges of train and test are disjoint when they do not
    overlap), ``start`` skipped, ``n`` kept (default: the rest), with atom environments on
    the DH grid of bandwidth ``L``. Returns ``(MoleculeSet, order indices)``.

    With ``oversample > 1`` each environment is sampled on the finer DH grid of bandwidth
    ``oversample * L``, projected onto the harmonics of degree ``< L`` there (DH quadrature)
    and synthesised on the ``L`` grid: a band-limited signal, so a rotation of the molecule
    rotates it exactly and the SO(3) kernels see exactly rotated inputs. Sampled directly on
    the ``L`` grid (``oversample: 1``) the sharp ``r^-p`` peaks alias into the low degrees, and a
    rotated molecule's environments are not the rotated environments (measured: the
    SO(3) GCNN molecule kernel then changes by ~1e-2 of its largest entry under rotation,
    against ~1e-4, the relative-mode quadrature error, for ``oversample: 4``)."""
    mols = _molecule_set(src, base)
    order = np.random.default_rng(derive_seed("molecules-order", seed)).permutation(len(mols))
    stop = len(mols) if src.n is None else src.start + src.n
    if stop > len(mols) or src.start >= len(mols):
        raise StudyError(
            f"data: molecules start {src.start} + n {src.n} exceeds the {len(mols)} molecules of set {src.set}; "
            "lower n or start" + (" or raise n_conformers" if src.set == "builtin" else "")
        )
    idx = order[src.start : stop]
    sub = mols.subset(idx)
    if src.oversample == 1:
        return sub.with_environments(dh_grid(src.L), radius=src.radius), idx
    fine, coarse = dh_grid(src.oversample * src.L), dh_grid(src.L)
    env, settings = None, None
    for k in range(0, len(sub), 32):  # in chunks: the fine samples are oversample^2 times larger
        part = sub.subset(np.arange(k, min(k + 32, len(sub)))).with_environments(fine, radius=src.radius)
        if env is None:
            env = np.zeros((*sub.z.shape, part.env.shape[2], 2 * src.L, 2 * src.L))
        env[k : k + len(part)] = isht(sht(part.env, fine, src.L - 1), coarse) * part.mask[..., None, None, None]
        settings = part.env_settings
    settings = {**(settings or {}), "grid_shape": [2 * src.L, 2 * src.L], "grid_L": src.L,
                "oversample": src.oversample, "band_limit": src.L - 1}
    return replace(sub, env=env, env_settings=settings), idx


def standardize_channels(pool_env: np.ndarray, pool_mask: np.ndarray, *others, weights: np.ndarray):
    """Per channel: subtract the mean and divide by the standard deviation over the pool's real
    atoms and the sphere (DH quadrature weights), padding atoms left at 0. A constant shift and
    a scale per channel commute with rotations, so every model keeps its symmetry.
    Returns the standardised pool and ``others`` (each ``(env, mask)``) and ``(mean, std)``."""
    atoms = pool_env[pool_mask]  # [n, C, 2L, 2L]
    n = max(len(atoms), 1)
    mean = np.einsum("ncjk,jk->c", atoms, weights) / n
    var = np.einsum("ncjk,jk->c", (atoms - mean[:, None, None]) ** 2, weights) / n
    std = np.where(var > 0, np.sqrt(var), 1.0)

    def apply(env, mask):
        out = (env - mean[:, None, None]) / std[:, None, None]
        return np.where(mask[(...,) + (None,) * (env.ndim - 2)], out, 0.0)

    return (apply(pool_env, pool_mask), *[apply(e, m) for e, m in others]), (mean, std)


def _pad_atoms(a: np.ndarray, atoms: int) -> np.ndarray:
    if a.shape[1] == atoms:
        return a
    pad = np.zeros((a.shape[0], atoms - a.shape[1], *a.shape[2:]), dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def build_molecule_data(cfg: RegressionStudy, base: Path) -> RegressionData:
    """Pool and test molecules: per-atom environments standardised by the pool's atoms, padded
    to one atom count, energies ``[N, 1]`` in eV."""
    d, r = cfg.data, cfg.regression
    if r.test.source != "molecules":
        raise StudyError(f"regression.test: source {r.test.source} does not match data.train (molecules); use source: molecules")
    train, test = d.train, r.test
    pool, pidx = load_molecules(train, cfg.seed, base)
    tst, tidx = load_molecules(test, cfg.seed, base)
    if (train.L, train.radius, train.oversample) != (test.L, test.radius, test.oversample):
        raise StudyError(
            f"regression.test: L {test.L}, radius {test.radius} and oversample {test.oversample} must match "
            f"data.train's L {train.L}, radius {train.radius} and oversample {train.oversample}"
        )
    same = (train.set, train.path, train.n_conformers, train.method, train.limit) == (test.set, test.path, test.n_conformers, test.method, test.limit)
    if same and len(np.intersect1d(pidx, tidx)):
        raise StudyError(
            f"regression.test: molecules {test.start}..{test.start + len(tidx) - 1} overlap the pool "
            f"{train.start}..{train.start + len(pidx) - 1} of the same set; give the test set a start past the pool"
        )
    sizes = r.resolved_sizes
    if sizes[-1] > len(pool):
        raise StudyError(
            f"regression.sizes: the largest size {sizes[-1]} exceeds the {len(pool)} training candidates "
            "(data.train); lower it or give data.train more molecules"
        )
    atoms = max(pool.z.shape[1], tst.z.shape[1])
    penv, tenv = _pad_atoms(pool.env, atoms), _pad_atoms(tst.env, atoms)
    pz, tz = _pad_atoms(pool.z, atoms), _pad_atoms(tst.z, atoms)
    (penv, tenv), _ = standardize_channels(penv, pz > 0, (tenv, tz > 0), weights=dh_grid(train.L).weights)
    return RegressionData(penv, pool.energy[:, None], tenv, tst.energy[:, None], pz, tz,
                          _pad_atoms(pool.pos, atoms), _pad_atoms(tst.pos, atoms))


