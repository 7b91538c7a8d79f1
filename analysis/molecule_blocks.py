"""Molecule kernels ``K(M, M') = sum_{i in M} sum_{j in M'} k(env_i, env_j)`` in blocks of
molecules, as Ray tasks, each block cached on disk as soon as it arrives.

Why blocks of molecules and not of atoms: a QM9 pool of 1,000 molecules has ~18,000 atoms,
and its atom kernel matrix (2.6 GB per kernel in float64) is never needed: each task
computes the atom kernel between the atoms of a block of molecules and those of another
block (``analysis.blocks.compute_block`` with the per-atom engine) and sums it over each
molecule's atoms at once (``analysis.regression.molecule_kernel``), returning an
``[n_a, n_b]`` molecule block. The pool x pool matrix computes only the blocks on and above
the diagonal. A block's size is chosen in atoms (``block_atoms``), so the tasks cost about
the same whatever the molecules' sizes.

Cache: ``<block_dir>/<part>_<i>_<j>.npz`` (``part`` ``pool`` or ``test``), written
atomically by the driver when the block arrives; a rerun (say after an interrupted run)
loads every block that is there and computes only the others. ``block_dir`` must be keyed
by everything the blocks depend on (the caller's kernel key and the block layout).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import ray
from scipy import sparse

from study.atomic import atomic_savez

from .blocks import compute_block, ensure_ray, gpu_share

__all__ = ["molecule_ranges", "molecule_block", "blocked_molecule_kernel"]


def molecule_ranges(mask: np.ndarray, block_atoms: int) -> list[tuple[int, int]]:
    """Consecutive molecule ranges ``[(m0, m1), ...]`` holding about ``block_atoms`` real atoms each."""
    if block_atoms < 1:
        raise ValueError(f"block_atoms: must be at least 1, got {block_atoms}")
    counts = np.asarray(mask, dtype=bool).sum(axis=1)
    out, start, atoms = [], 0, 0
    for m, c in enumerate(counts):
        atoms += int(c)
        if atoms >= block_atoms:
            out.append((start, m + 1))
            start, atoms = m + 1, 0
    if start < len(counts):
        out.append((start, len(counts)))
    return out


def _sum_over_molecules(k_atom: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
    # A_a k A_b^T with the sparse atom-to-molecule matrices (atoms in the order of x[mask])
    def members(mask):
        rows = np.nonzero(mask)[0]
        return sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(mask.shape[0], len(rows)))

    return np.asarray(members(mask_b) @ (members(mask_a) @ k_atom).T).T


def molecule_block(engine, spec, input_shape, n_out, xa, mask_a, xb, mask_b, get, device=None) -> dict[str, np.ndarray]:
    """One molecule block: ``xa [n_a, A, ...]`` padded atoms with ``mask_a [n_a, A]`` against
    ``xb``/``mask_b``; ``xb is None``: the block of ``xa`` with itself (a symmetric atom kernel).
    Also ``cpu_seconds``: the process CPU time the block took (on a shared machine the wall
    time also counts other people's jobs). ``device`` (when given) goes to the engine's call."""
    cpu0 = time.process_time()
    mask_a = np.asarray(mask_a, dtype=bool)
    atoms_a = np.asarray(xa)[mask_a]
    if xb is None:
        k = compute_block(engine, spec, input_shape, n_out, atoms_a, None, get, device)
        mask_b = mask_a
    else:
        mask_b = np.asarray(mask_b, dtype=bool)
        k = compute_block(engine, spec, input_shape, n_out, atoms_a, np.asarray(xb)[mask_b], get, device)
    out = {name: _sum_over_molecules(k[name], mask_a, mask_b) for name in get}
    return out | {"cpu_seconds": np.float64(time.process_time() - cpu0)}


def blocked_molecule_kernel(
    spec,
    input_shape: Sequence[int],
    n_out: int,
    pool_x: np.ndarray,
    pool_mask: np.ndarray,
    test_x: np.ndarray,
    test_mask: np.ndarray,
    *,
    engine: Callable,
    block_atoms: int = 1000,
    get: Sequence[str] = ("nngp", "ntk"),
    block_dir: Optional[Path] = None,
    use_ray: bool = True,
    address: Optional[str] = None,
    num_gpus: float = 0,
    log=print,
) -> tuple[dict[str, np.ndarray], dict]:
    """``({f"{name}_pool": [P, P], f"{name}_test": [T, P]}, info)`` of the molecule kernel.
    ``num_gpus``: the share of a GPU each block's task takes and computes on
    (``analysis.blocks.gpu_share``).

    ``info``: blocks computed and loaded from ``block_dir``, the atom pairs computed (the
    pool's symmetric blocks count once) and the CPU seconds of the computed blocks."""
    get = tuple(get)
    pool_mask, test_mask = np.asarray(pool_mask, dtype=bool), np.asarray(test_mask, dtype=bool)
    prow, trow = molecule_ranges(pool_mask, block_atoms), molecule_ranges(test_mask, block_atoms)
    tasks = [("pool", i, j) for i in range(len(prow)) for j in range(i, len(prow))]
    tasks += [("test", i, j) for i in range(len(trow)) for j in range(len(prow))]
    out = {f"{n}_pool": np.empty((len(pool_x), len(pool_x))) for n in get}
    out |= {f"{n}_test": np.empty((len(test_x), len(pool_x))) for n in get}
    pool_atoms = np.array([int(pool_mask[a:b].sum()) for a, b in prow])
    test_atoms = np.array([int(test_mask[a:b].sum()) for a, b in trow])

    def place(task, block):
        part, i, j = task
        (r0, r1), (c0, c1) = (prow if part == "pool" else trow)[i], prow[j]
        for n in get:
            out[f"{n}_{part}"][r0:r1, c0:c1] = block[n]
            if part == "pool" and i != j:
                out[f"{n}_pool"][c0:c1, r0:r1] = block[n].T

    def path(task):
        return None if block_dir is None else Path(block_dir) / f"{task[0]}_{task[1]}_{task[2]}.npz"

    def atom_pairs(task):
        part, i, j = task
        a = (pool_atoms if part == "pool" else test_atoms)[i]
        return int(a * (a + 1) // 2) if (part == "pool" and i == j) else int(a * pool_atoms[j])

    todo, loaded, cpu = [], 0, 0.0
    for task in tasks:
        p = path(task)
        if p is not None and p.is_file():
            try:
                with np.load(p) as z:
                    block = {n: z[n] for n in get}
                place(task, block)
                loaded += 1
                continue
            except (OSError, KeyError, ValueError):
                pass  # a damaged block is computed again
        todo.append(task)
    if block_dir is not None:
        Path(block_dir).mkdir(parents=True, exist_ok=True)
    total_pairs = sum(atom_pairs(t) for t in todo)
    t0, done_pairs, next_report = time.perf_counter(), 0, 0.1

    def arrived(task, block):
        nonlocal done_pairs, next_report, cpu
        place(task, block)
        cpu += float(block.get("cpu_seconds", np.nan))
        if path(task) is not None:
            atomic_savez(path(task), block)
        done_pairs += atom_pairs(task)
        if total_pairs and done_pairs / total_pairs >= next_report:
            el = time.perf_counter() - t0
            frac = done_pairs / total_pairs
            log(f"    {spec.name}: {100 * frac:.0f}% of {total_pairs:.2e} atom pairs in {el:.0f} s "
                f"(about {el / frac - el:.0f} s left)")
            next_report = frac + 0.1

    def inputs(part, i):
        a, b = (prow if part == "pool" else trow)[i]
        x, m = (pool_x, pool_mask) if part == "pool" else (test_x, test_mask)
        return x[a:b], m[a:b]

    if todo and not use_ray:
        _, device = gpu_share(num_gpus, use_ray=False)
        for task in todo:
            part, i, j = task
            xa, ma = inputs(part, i)
            xb, mb = (None, None) if (part == "pool" and i == j) else inputs("pool", j)
            arrived(task, molecule_block(engine, spec, tuple(input_shape), n_out, xa, ma, xb, mb, get, device))
    elif todo:
        ensure_ray(address)
        num_gpus, device = gpu_share(num_gpus, use_ray=True)
        remote = ray.remote(num_cpus=1, num_gpus=num_gpus)(molecule_block)
        refs = {("pool", i): [ray.put(a) for a in inputs("pool", i)] for i in range(len(prow))}
        refs |= {("test", i): [ray.put(a) for a in inputs("test", i)] for i in range(len(trow))}
        pending = {}
        for task in todo:
            part, i, j = task
            xa, ma = refs[(part, i)]
            xb, mb = (None, None) if (part == "pool" and i == j) else refs[("pool", j)]
            pending[remote.remote(engine, spec, tuple(input_shape), n_out, xa, ma, xb, mb, get, device)] = task
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                arrived(pending.pop(ref), ray.get(ref))
    info = {"blocks": len(tasks), "blocks_computed": len(todo), "blocks_loaded": loaded,
            "atom_pairs_computed": total_pairs, "block_atoms": block_atoms, "cpu_seconds": cpu}
    return out, info
