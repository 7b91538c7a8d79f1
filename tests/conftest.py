import os
import warnings

import pytest

# escnn warns at import that py3nj is missing (only SO(3) Clebsch-Gordan speed); not ours to fix.
warnings.filterwarnings("ignore", message=".*py3nj.*")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# One torch thread for the in-process tests: their models are small, and torch's own
# thread pool stalls badly on 2 shared cores (measured: a finite-model kernel test file took
# 150 s with two threads under load, 22 s with one). Ray workers set their own count.
import torch  # noqa: E402

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
    """``refused(study_path, out, words)``: ``eqntk run`` must refuse the study as the brief asks:
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
