"""The analytic kernels on another device than the CPU (a GPU where torch has one).

This machine has no GPU, so the device path is checked on torch's ``meta`` device: meta
tensors carry shapes and devices but no values. Torch refuses some operations that mix a
meta tensor with a CPU one (elementwise ones, ``out=`` buffers) but not all (a matrix
product or an index with a CPU operand goes through), so every operation runs under
``SameDevice``, which refuses any operation whose tensors are on two devices (a CPU
number aside). Running every model of every built-in study on meta this way shows that no
step of the engine touches the CPU between the inputs' transfer and the results' copy back
(on a GPU such a step would fail or copy to and from the host every time). What meta cannot show (the values
on a real GPU) is checked by the GPU-only test at the end and by ``benchmarks/gpu.py``,
which prints the largest difference between the two devices' kernels.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import analysis.kernels as kernels
from analysis import blocks, devices, kernel_ops, molecule_blocks, regression, stax, theory
from analysis.blocks import compute_block
from study.config import load_study
from study.data import StudyData
from study.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 8, 8)


def _builtin_specs() -> list[ModelSpec]:
    """Every distinct model (up to its name) of the built-in studies, with the SO(3) GCNN's
    other kernel mode."""
    seen: dict[str, ModelSpec] = {}
    for path in sorted(glob.glob(str(ROOT / "study" / "builtin" / "*.yaml"))):
        study = load_study(path)
        for spec in getattr(study, "model_specs", []):
            seen.setdefault(spec.model_dump_json(exclude={"name"}), spec)
    relative = ModelSpec(name="so3_relative", arch="so3_gcnn", depth=2, bands=[3, 2], so3_grid=3, kernel_mode="relative",
                         group="SO3")
    return list(seen.values()) + [relative]


SPECS = _builtin_specs()
# SHAPE: 8 x 8 images, and for SO(3) models one channel on the 8 x 8 Driscoll-Healy grid


class SameDevice(TorchDispatchMode):
    """Refuses every operation whose tensor operands are on two devices (0-dim CPU numbers
    aside, which torch moves for free)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        devices = {t.device for t in flat if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise RuntimeError(f"{func} mixes the devices {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def shapes_only(monkeypatch):
    """Results copied back from meta are zeros of the right shape (meta holds no values), and
    every operation runs under ``SameDevice``."""
    monkeypatch.setattr(devices, "to_host", lambda t: np.zeros(tuple(t.shape)))
    with SameDevice():
        yield


def _every_call(kf, x, device):
    kf(x, x[:3], device=device)  # a matrix between two sets
    kf(x, device=device)  # the symmetric matrix
    kf(x, diag=True, device=device)  # the diagonal
    kf(x, x[::-1].copy(), diag=True, device=device)  # paired inputs


def test_the_builtin_studies_have_models_of_every_kind():
    archs = {(s.arch, s.augmentation != "none", s.basis if s.arch == "gcnn" else "") for s in SPECS}
    assert {"mlp", "cnn", "gcnn", "group_mlp", "so3_gcnn", "sphere_mlp"} <= {a for a, _, _ in archs}
    assert ("sphere_mlp", True, "") in archs  # the SO(3) orbit average
    assert ("mlp", True, "") in archs and ("cnn", True, "") in archs  # orbit-averaged kernels
    assert any(a == "gcnn" and b not in ("", "canonical") for a, _, b in archs)  # an escnn basis


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_builtin_model_computes_on_the_device_alone(spec, shapes_only):
    x = np.random.default_rng(0).normal(size=(5, *SHAPE))
    _every_call(kernels.mean_kernel_fn(spec, SHAPE), x, "meta")


@pytest.mark.parametrize("route", ["basis", "basis_full"])
def test_the_basis_routes_compute_on_the_device_alone(route, shapes_only):
    x = np.random.default_rng(0).normal(size=(4, *SHAPE))
    for support in ("identity", "full"):
        spec = ModelSpec(name="g", arch="gcnn", depth=2, support=support, nonlinearity="relu")
        _every_call(kernels.kernel_fn(spec, SHAPE, route=route), x, "meta")


def test_the_check_catches_a_constant_left_on_the_cpu(shapes_only, monkeypatch):
    """Teeth: a filter spectrum (used in a batched matrix product, which torch itself lets
    through on meta) or an index map that stays on the CPU makes the meta run fail."""
    x = np.random.default_rng(0).normal(size=(3, *SHAPE))
    spec = ModelSpec(name="g", arch="gcnn", depth=2, support="full")
    kf = kernels.kernel_fn(spec, SHAPE, route="basis")
    with monkeypatch.context() as m:
        m.setattr(kernel_ops.TorusCorrelation, "to", lambda self, device: self)
        with pytest.raises(RuntimeError, match="mixes the devices"):
            kf(x, device="meta")
    kernels.kernel_fn(spec, SHAPE, route="basis")(x, device="meta")  # moved, it passes
    kf = kernels.kernel_fn(ModelSpec(name="g", arch="gcnn", depth=2), SHAPE)
    with monkeypatch.context() as m:
        m.setattr(stax, "_to_device", lambda value, device: value)
        with pytest.raises(RuntimeError, match="mixes the devices"):
            kf(x, device="meta")


def test_the_cpu_device_is_the_default():
    spec = ModelSpec(name="c", arch="cnn", depth=2, nonlinearity="erf", augmentation="full_orbit")
    kf = kernels.mean_kernel_fn(spec, SHAPE)
    x = np.random.default_rng(1).normal(size=(6, *SHAPE))
    default, cpu = kf(x, x[:4]), kf(x, x[:4], device="cpu")
    for name in default:
        assert np.array_equal(default[name], cpu[name])


def test_the_gpus_large_blocks_give_the_same_kernels():
    """A GPU takes blocks of up to 8192 inputs a side where a CPU takes cache-sized ones; the
    same large blocks on the CPU give the same kernels up to rounding (the same sums grouped
    differently: 1e-12 relative is a thousand times float64's round-off on these sums)."""
    spec = ModelSpec(name="g", arch="gcnn", depth=2, support="full", nonlinearity="erf", sigma_w=3.0)
    kf = kernels.kernel_fn(spec, SHAPE)
    assert kf.default_block_size("meta") > kf.default_block_size("cpu")
    x = np.random.default_rng(2).normal(size=(40, *SHAPE))
    small = kf(x, block_size=3)
    large = kf(x, block_size=kf.default_block_size("meta"))
    for name in small:
        assert np.abs(large[name] - small[name]).max() <= 1e-12 * np.abs(small[name]).max()


def test_resolve_device():
    assert devices.resolve_device(None) == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("meta") == torch.device("meta")
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="device: cuda .* use auto or cpu"):
            devices.resolve_device("cuda")


def test_theory_device_follows_the_study_and_the_machine(monkeypatch):
    assert theory.theory_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for asked in ("auto", "cuda"):  # trained on GPUs, analysed on a laptop: its CPU
        assert theory.theory_device(asked) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert theory.theory_device("auto") == torch.device("cuda", 0)
    assert theory.theory_device("cpu") == torch.device("cpu")


def test_compute_theory_sends_every_kernel_call_to_its_device(monkeypatch):
    """The device reaches every kernel the prediction asks for (own, orbit-averaged, training
    and test kernels), and the numbers are those of the default CPU run."""
    asked = []
    resolve = devices.resolve_device

    def recording(device):
        asked.append(str(device))
        return resolve("cpu")  # a stand-in device that computes on the CPU

    rng = np.random.default_rng(3)
    data = StudyData(train_x=rng.normal(size=(4, *SHAPE)), train_y=rng.normal(size=(4, 2)),
                     eval_sets={"noise": rng.normal(size=(3, *SHAPE))})
    for spec in (ModelSpec(name="cnn_aug", arch="cnn", depth=2, nonlinearity="erf", augmentation="full_orbit"),
                 ModelSpec(name="gcnn", arch="gcnn", depth=2, support="full")):
        plain = theory.compute_theory(spec, data, 0.5, [0, 5, 20])
        asked.clear()
        monkeypatch.setattr(devices, "resolve_device", recording)
        moved = theory.compute_theory(spec, data, 0.5, [0, 5, 20], device="stand-in")
        monkeypatch.setattr(devices, "resolve_device", resolve)
        assert plain.ok and moved.ok, (plain.error, moved.error)
        assert asked and set(asked) == {"stand-in"}, asked
        for name in plain.mean:
            assert np.array_equal(plain.mean[name], moved.mean[name])
            assert np.array_equal(plain.var[name], moved.var[name])


def test_a_kernel_block_task_passes_its_device(shapes_only):
    spec = ModelSpec(name="m", arch="mlp", depth=2)
    x = np.random.default_rng(4).normal(size=(3, *SHAPE))
    out = compute_block(None, spec, SHAPE, 1, x, None, ("ntk",), "meta")
    assert out["ntk"].shape == (3, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_gpu_kernels_equal_the_cpu_kernels(spec):
    """On a GPU the kernels are the CPU's up to rounding (float64 on both; 1e-10 relative
    allows for the different summation order of GPU reductions and FFTs)."""
    kf = kernels.mean_kernel_fn(spec, SHAPE)
    x = np.random.default_rng(5).normal(size=(12, *SHAPE))
    cpu, gpu = kf(x, x[:5], device="cpu"), kf(x, x[:5], device="cuda")
    for name in cpu:
        assert np.abs(gpu[name] - cpu[name]).max() <= 1e-10 * np.abs(cpu[name]).max()


def test_gpu_share():
    assert blocks.gpu_share(0, use_ray=False) == (0.0, None)
    assert blocks.gpu_share(0.5, use_ray=False) == (0.5, "cuda")  # this process's GPU, asked for


def test_a_molecule_block_task_passes_its_device(monkeypatch):
    """Molecule blocks hand their device to the per-atom SO(3) kernel."""
    asked = []

    def recording(sspec, x1, x2=None, mode="grid", device=None):
        asked.append(device)
        n2 = len(x1) if x2 is None else len(x2)
        return torch.zeros(len(x1), n2, dtype=torch.float64), torch.zeros(len(x1), n2, dtype=torch.float64)

    monkeypatch.setattr(regression, "so3_kernel_fn", recording)
    spec = ModelSpec(name="so3", arch="so3_gcnn", group="SO3", depth=2, bands=[3, 3], so3_grid=3, kernel_mode="relative")
    x = np.zeros((2, 3, *SHAPE))
    mask = np.array([[True, True, False], [True, False, False]])
    out = molecule_blocks.molecule_block(regression.atom_engine, spec, SHAPE, 1, x, mask, None, None, ("ntk",), "meta")
    assert out["ntk"].shape == (2, 2) and asked == [torch.device("meta")]
