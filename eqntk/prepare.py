"""Everything decided about a study before any work: ``eqntk validate`` and ``eqntk plan``.

``prepare(STUDY)`` reads and checks the study file, builds its data (shapes, files), refuses
what cannot run (bad input raises ``StudyError``: one line naming the field and the fix) and,
for an ensemble study, expands its work units: a ``Prepared`` or a ``PreparedRegression``,
which ``lines()`` describes as ``eqntk validate`` prints it.

Issue #16 asks validate and plan to answer within 5 s for any study file on a shared 2-core
machine, so this module imports only what checking needs: the study layer, the data and
``workers.footprint``. The work itself (``eqntk.kinds``: Ray, the analysis and its plots,
about 0.7 s more to import here, twice that under load) starts from these same objects.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from study.config import EnsembleStudy, RegressionStudy, StudyError, load_study
from study.data import build_data
from study.grid import expand
from study.regression_data import build_regression_data
from workers.footprint import machine_bytes, members_fitting, unit_bytes


@contextmanager
def refused_when_out_of_memory(path: Path):
    """A size the study's checks let through but whose arrays cannot be allocated (say an eval
    set of a billion inputs) is bad input too: one line, before any work, not a traceback."""
    try:
        yield
    except MemoryError as e:
        raise StudyError(f"{path}: the study's inputs do not fit in this machine's memory ({str(e).strip()}); "
                         "lower the sizes of its data sources (n) or models") from None


class Prepared:
    """A validated ensemble study with its arrays and units: everything decided before any work."""

    def __init__(self, path: Path, cfg: Optional[EnsembleStudy] = None):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self.cfg: EnsembleStudy = cfg if cfg is not None else load_study(path)
        with refused_when_out_of_memory(path):
            self.data = build_data(self.cfg.data, self.cfg.seed, base=path.parent, group=self.cfg.group)
            self.cfg.check_inputs(self.data.input_shape, str(path), n_train=len(self.data.train_x))
            check_unit_memory(self.cfg, self.data.input_shape, self.data.n_out, str(path))
        self.digest = self.data.digest()
        self.units = expand(self.cfg, self.digest)

    @property
    def resolved(self) -> dict:
        return resolved_study(self.cfg, self.digest)

    def lines(self) -> list[str]:
        """What ``eqntk validate`` prints: the data, the logged steps and every unit."""
        cfg, data = self.cfg, self.data
        out = [f"study {cfg.name}: valid",
               f"  data: {len(data.train_x)} training inputs of shape {data.input_shape}, {data.n_out} outputs; "
               + ", ".join(f"{k} ({len(v)})" for k, v in data.eval_sets.items()),
               f"  log steps ({len(cfg.resolved_log_steps)}): {cfg.resolved_log_steps}",
               f"  {len(self.units)} units:",
               f"  {'unit id':16}  {'model':18} {'arch':9} {'group':5} {'width':>6} {'lr':>8} members"]
        for u in self.units:
            out.append(f"  {u.unit_id:16}  {u.model.name:18} {u.model.arch:9} {u.model.group:5} {u.width:6d} "
                       f"{u.lr:8.3g} {u.member_start}..{u.member_stop - 1}")
        return out


def check_unit_memory(cfg: EnsembleStudy, input_shape: tuple, n_out: int, origin: str) -> None:
    """Refuse, before any work, a unit whose predicted memory (``workers.footprint``) exceeds
    this machine's: its largest width and largest member range are checked for every model."""
    ram = machine_bytes()
    gb = lambda b: f"{b / 2**30:.3g}"
    for i, spec in enumerate(cfg.model_specs):
        width = max(cfg.widths_of(spec.name))
        members = min(cfg.unit_size, cfg.ensemble_size_of(spec.name))
        need = unit_bytes(spec, width, members, input_shape, n_out, cfg.dtype)
        if need <= ram:
            continue
        fit = members_fitting(spec, width, input_shape, n_out, cfg.dtype, ram)
        if fit < 1:
            one = unit_bytes(spec, width, 1, input_shape, n_out, cfg.dtype)
            raise StudyError(
                f"{origin}: widths: one member of {spec.name} (models.{i}) at width {width} needs about {gb(one)} GB, "
                f"more than this machine's {gb(ram)} GB; use smaller widths"
            )
        fit -= fit % 2 if spec.pairing == "antithetic" else 0
        raise StudyError(
            f"{origin}: members_per_unit: a unit of {members} members of {spec.name} (models.{i}) at width {width} "
            f"needs about {gb(need)} GB, more than this machine's {gb(ram)} GB; set members_per_unit: {max(fit, 1)} or less"
        )


def resolved_study(cfg: EnsembleStudy, digest: str) -> dict:
    """What study.json records: the study with every default filled in, and its data's digest."""
    return {
        "config": cfg.model_dump(mode="json"),
        "models": [m.model_dump(mode="json") for m in cfg.model_specs],
        "log_steps": cfg.resolved_log_steps,
        "data_digest": digest,
    }


class PreparedRegression:
    """A validated kernel-regression study with its pool and test arrays: everything decided before any kernel."""

    def __init__(self, path: Path, cfg: Optional[RegressionStudy] = None):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self.cfg: RegressionStudy = cfg if cfg is not None else load_study(path)
        with refused_when_out_of_memory(path):
            self.data = build_regression_data(self.cfg, path.parent)
            self.cfg.check_inputs(self.data.input_shape, str(path))
        self.digest = self.data.digest()

    @property
    def resolved(self) -> dict:
        r = self.cfg.regression
        return {
            "config": self.cfg.model_dump(mode="json"),
            "models": [m.model_dump(mode="json") for m in self.cfg.model_specs],
            "sizes": r.resolved_sizes,
            "times": [str(t) for t in r.resolved_times],
            "data_digest": self.digest,
        }

    def lines(self) -> list[str]:
        """What ``eqntk validate`` prints: the pool, the test set, the sizes and the models."""
        cfg, r, d = self.cfg, self.cfg.regression, self.data
        out = [f"study {cfg.name}: valid (kernel regression)"]
        if d.molecular:
            out.append(f"  data: pool of {len(d.pool_x)} molecules ({int((d.pool_z > 0).sum())} atoms), test set "
                       f"{len(d.test_x)} molecules ({int((d.test_z > 0).sum())} atoms); atom signals of shape "
                       f"{d.input_shape}; energies in eV, baseline {r.resolved_baseline(True)}")
        else:
            out.append(f"  data: pool of {len(d.pool_x)} training candidates of shape {d.input_shape}, "
                       f"{d.n_out} outputs; test set {len(d.test_x)}")
        out.append(f"  sizes: {r.resolved_sizes}; {r.draws} draws each; kernels {r.kernels}; times {r.times}; "
                   f"diag_reg {r.diag_reg:g}")
        out.append("  models: " + ", ".join(f"{m.name} ({m.arch}, {m.group}, {m.basis}, {m.augmentation})"
                                            for m in cfg.model_specs))
        return out


# Each kind's preparation, by the ``kind`` a study file names (study.config.KIND_SCHEMAS).
PREPARED = {"ensemble": Prepared, "kernel_regression": PreparedRegression}


def prepare(path: Union[str, Path]) -> Union[Prepared, PreparedRegression]:
    """The study file ``path`` checked and prepared as its kind (bad input raises StudyError)."""
    path = Path(path)
    cfg = load_study(path)  # read once: a large file takes a while to parse
    return PREPARED[cfg.kind](path, cfg)
