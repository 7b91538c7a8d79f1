import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

# escnn warns at import that py3nj is missing (only SO(3) Clebsch-Gordan speed); not ours to fix.
warnings.filterwarnings("ignore", message=".*py3nj.*")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# One torch thread for the in-process tests: their models are small, and torch's own
# thread pool stalls badly on 2 shared cores (measured: a finite-model kernel test file took
# 150 s with two threads under load, 22 s with one). Ray workers set their own count.
import torch  # noqa: E402

from analysis import theory  # noqa: E402
from eqntk.store import PartWriter, ResultStore  # noqa: E402
from study.config import parse_study  # noqa: E402
from study.data import build_data  # noqa: E402
from study.grid import expand  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread in every test too, whatever an earlier test or library call left set."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_running():
    """Each test module leaves no Ray running in this process, whatever it started."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def refused(capsys):
    """``refused(study_path, out, words)``: ``eqntk run`` must refuse the study:
    exit code 2, one line on stderr naming every word in ``words``, nothing written at ``out``."""

    def check(study, out, words):
        from eqntk.cli import main

        code = main(["run", str(study), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        for w in words:
            assert w in err, (w, err)
        assert not os.path.exists(out), "nothing may be written for a refused study"
        return err

    return check


STUDIES = Path(__file__).parent / "studies"


@pytest.fixture(scope="session")
def regression_small_study() -> str:
    """A small kernel-regression study (C4, rotated digits, cnn / cnn_aug / gcnn) as YAML text."""
    return (STUDIES / "regression_small.yaml").read_text()


# ----- the tiny C4 digits study and its variations ------------------------------------------
def tiny_c4_study(noise_n: int = 3, **fields) -> str:
    """A tiny ensemble study (C4, 6 digits to train on, ``noise_n`` Gaussian inputs to evaluate
    on, an augmented MLP and a group MLP, widths 8 and 16) as YAML text, with the top-level
    ``fields`` given replaced; a field given as None is left out."""
    study = dict(
        name="tiny", seed=3,
        data={"train": {"source": "digits", "n": 6}, "eval": [{"name": "noise", "data": {"source": "gaussian", "n": noise_n}}]},
        group="C4",
        models=[dict(name="mlp_aug", arch="mlp", depth=1, augmentation="full_orbit"),
                dict(name="gmlp", arch="group_mlp", depth=1, support="identity")],
        widths=[8, 16], ensemble_size=4, members_per_unit=2, lr=0.5, steps=20, log_steps=[0, 1, 5, 20],
    )
    study.update(fields)
    study = {k: v for k, v in study.items() if v is not None}
    return yaml.safe_dump(study, sort_keys=False, default_flow_style=None, width=200)


@pytest.fixture(scope="session")
def tiny_study():
    """``tiny_study(noise_n=3, **fields) -> str``: the tiny C4 digits study's YAML text, top-level
    ``fields`` replaced (None leaves one out)."""
    return tiny_c4_study


# ----- a synthetic results directory whose every number is known in advance ----------------
# The analytic predictions come from closed-form kernels (one-hidden-layer ReLU MLP in NTK
# parameterisation, docs/theory.md §2, and its orbit average for the identity-support group
# MLP, §3); each ensemble's members sit at chosen offsets around a chosen mean. One unit is
# recorded as diverged (its part holds garbage) and one as failed, as the runner records them.
@dataclass(frozen=True)
class SyntheticStudy:
    text: str  # the study file
    pattern: np.ndarray  # member offsets around the ensemble mean: mean 0, sample variance 4/3 (M - 1 = 3)
    noise: float  # the members' standard deviation is noise * sqrt(4/3)
    bias: dict  # model -> b: the ensemble mean is mu (1 + b / width)
    diverged: tuple  # (model, width, member_start) of the unit recorded as diverged
    failed: tuple  # (model, width, member_start) of the unit recorded as failed


SYNTHETIC = SyntheticStudy(
    text=tiny_c4_study(
        name="tiny-analysis", seed=1, widths=[8, 32],
        models=[dict(name="mlp_aug", arch="mlp", depth=1, augmentation="full_orbit"),
                dict(name="group_mlp", arch="group_mlp", depth=1, support="identity"),
                dict(name="group_mlp_full", arch="group_mlp", depth=1, support="full"),
                dict(name="mlp_plain", arch="mlp", depth=1),
                dict(name="mlp_random", arch="mlp", depth=1, augmentation="random")]),
    pattern=np.array([1.0, -1.0, 1.0, -1.0]),
    noise=0.05,
    bias={"mlp_aug": 0.4, "group_mlp": 0.2, "group_mlp_full": 0.3, "mlp_plain": 0.8, "mlp_random": 0.5},
    diverged=("group_mlp", 8, 2),
    failed=("mlp_plain", 32, 0),
)


def relu_mlp_kernels(x1, x2=None, diag=False):
    """NNGP and NTK of ``v.relu(W x / sqrt(d)) / sqrt(n)`` at infinite width (sigma_w = 1, sigma_b = 0)."""
    a = np.asarray(x1, np.float64).reshape(len(x1), -1)
    d = a.shape[1]
    na = np.einsum("ij,ij->i", a, a) / d
    if diag:
        return {"nngp": na / 2, "ntk": na}
    b = a if x2 is None else np.asarray(x2, np.float64).reshape(len(x2), -1)
    nb = np.einsum("ij,ij->i", b, b) / d
    k0 = a @ b.T / d
    norm = np.sqrt(np.outer(na, nb))
    t = np.arccos(np.clip(k0 / norm, -1, 1))
    nngp = norm * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi)
    return {"nngp": nngp, "ntk": nngp + k0 * (np.pi - t) / (2 * np.pi)}


def closed_form_kernels(spec, input_shape, n_out):
    """A stand-in for ``analysis.kernels.kernel_fn`` for depth-1 mlp / group_mlp specs.
    Module level so that it pickles for worker processes."""
    assert spec.depth == 1 and spec.arch in ("mlp", "group_mlp")
    grp = spec.group_obj

    def kf(x1, x2=None, get=("nngp", "ntk"), diag=False):
        if spec.arch == "mlp":
            k = relu_mlp_kernels(x1, x2, diag)
        else:  # (1/|G|) sum_g K(x, L_g x'): the kernel of the identity-support symmetrised net
            x2_ = x1 if x2 is None else x2
            if diag:
                parts = [relu_mlp_kernels(x1, grp.orbit_image(x1)[:, g]) for g in range(grp.order)]
                k = {n: np.mean([np.diag(p[n]) for p in parts], axis=0) for n in ("nngp", "ntk")}
            else:
                parts = [relu_mlp_kernels(x1, grp.orbit_image(x2_)[:, g]) for g in range(grp.order)]
                k = {n: np.mean([p[n] for p in parts], axis=0) for n in ("nngp", "ntk")}
        return {n: k[n] for n in get}

    return kf


def write_synthetic_results(root: Path) -> Path:
    """Write a results directory for the synthetic study whose ensembles sit at known offsets from theory."""
    # deferred: eqntk loads Ray and escnn, which most test files never need
    from eqntk.kinds.ensemble import resolved_study

    s = SYNTHETIC
    cfg = parse_study(s.text)
    data = build_data(cfg.data, cfg.seed)
    digest = data.digest()
    store = ResultStore(root)
    store.initialise(s.text, resolved_study(cfg, digest), data)
    steps = cfg.resolved_log_steps
    specs = {m.name: m for m in cfg.model_specs}
    ths = {name: theory.compute_theory(m, data, cfg.lr, steps, kernel_fn=closed_form_kernels) for name, m in specs.items()}
    rng = np.random.default_rng(0)
    for u in expand(cfg, digest):
        key = (u.model.name, u.width, u.member_start)
        rec = {"unit_id": u.unit_id, "model": u.model.name, "width": u.width, "lr": u.lr, "status": "done",
               "steps_reached": cfg.steps, "seconds": 0.1, "device": "cpu"}
        if key == s.failed:
            store.record_failure(u, {**rec, "status": "failed", "error": "RuntimeError: synthetic failure"})
            continue
        writer = PartWriter(u)
        th = ths[u.model.name]
        for k, step in enumerate(steps):
            if key == s.diverged and step > 1:
                break
            for ev in th.mean:
                mu = th.mean[ev][k]  # [n, G, n_out]
                centre = mu * (1 + s.bias[u.model.name] / u.width)
                members = centre[None] + s.noise * s.pattern[u.member_start:u.member_stop, None, None, None]
                if key == s.diverged:
                    members = members + 1e6 * rng.standard_normal(members.shape)
                writer.log(step, ev, members)
        if key == s.diverged:
            rec.update(status="diverged", steps_reached=1)
        store.commit(u, writer.finish(rec), rec)
    return root


@pytest.fixture(scope="session")
def synthetic_study() -> SyntheticStudy:
    """The synthetic study: its text and the offsets ``make_results`` places its members at."""
    return SYNTHETIC


@pytest.fixture(scope="session")
def closed_form_kernel_fn():
    """``kernel_fn(spec, input_shape, n_out)`` from closed forms, for depth-1 mlp / group_mlp specs."""
    return closed_form_kernels


@pytest.fixture(scope="session")
def make_results():
    """``make_results(root) -> root``: writes the synthetic study's results directory at ``root``."""
    return write_synthetic_results


# ----- the synthetic study with quiet ensembles ------------------------------------------------
from dataclasses import replace as _replace  # noqa: E402


@pytest.fixture(scope="session")
def make_quiet_results():
    """``make_quiet_results(root, noise=1e-4) -> root``: the synthetic study's results directory
    (same offsets and biases as ``make_results``) with members only ``noise`` apart, so that
    every bias and gap it was built with is resolved by the analysis."""

    def make(root: Path, noise: float = 1e-4) -> Path:
        global SYNTHETIC
        saved = SYNTHETIC
        SYNTHETIC = _replace(saved, noise=noise)
        try:
            return write_synthetic_results(root)
        finally:
            SYNTHETIC = saved

    return make
