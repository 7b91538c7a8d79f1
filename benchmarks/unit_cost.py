"""Per-unit check of the cost model (``eqntk.cost.unit_cost``): units of a study run alone on
one thread, each phase timed and set beside its price.

    OMP_NUM_THREADS=1 flock /tmp/eqntk-heavy.lock python benchmarks/unit_cost.py STUDY [--models A B] [--per-model 2]

For each model (or those named), its units at the smallest and largest width (``--per-model``
of them, spread over the widths) run through ``workers.unit.run_unit`` as a Ray worker runs
them, with a real ``PartWriter``; then, on the same unit, the phases are timed apart:

- set-up: building the module and initialising the members (``Ensemble.from_seeds``);
- a training step: ``Ensemble.gd_step`` on the unit's batch (best of a few, CPU time);
- a log: ``Ensemble.predict`` over the orbits of the training and eval inputs.

and printed beside the plan's price of each (``PassCost.seconds``; set-up is not priced).
The unit's own ``seconds`` is wall time of one process on one thread; the load average is
printed with it. Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eqntk import cost  # noqa: E402
from eqntk.prepare import Prepared  # noqa: E402
from eqntk.store import PartWriter  # noqa: E402
from workers.augment import Minibatches, make_augmentation  # noqa: E402
from workers.ensemble import Ensemble, member_seeds  # noqa: E402
from workers.models import build_model, init_parameters  # noqa: E402
from workers.train import orbit_inputs  # noqa: E402
from workers.unit import reproducible, run_unit  # noqa: E402


def best_cpu(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def phases(unit, data) -> dict:
    """Set-up, one training step and one log of ``unit``, timed apart (CPU seconds)."""
    spec = unit.model
    with reproducible():
        c0 = time.process_time()
        module = build_model(spec, unit.width, tuple(data.input_shape), data.n_out)
        seeds = member_seeds(unit.study_seed, spec.name, unit.width, unit.member_start, unit.member_stop, "init",
                             antithetic=spec.pairing == "antithetic")
        ens = Ensemble.from_seeds(module, seeds, init_parameters, "cpu", torch.float32,
                                  antithetic=spec.pairing == "antithetic")
        setup = time.process_time() - c0
        x, y = torch.tensor(data.train_x, dtype=torch.float32), torch.tensor(data.train_y, dtype=torch.float32)
        aug_seeds = member_seeds(unit.study_seed, spec.name, unit.width, unit.member_start, unit.member_stop,
                                 "augment", antithetic=spec.pairing == "antithetic")
        aug = make_augmentation(spec.augmentation, spec.group_obj, x, y, aug_seeds)
        if spec.optimizer == "sgd":
            aug = Minibatches(aug, spec.batch_size, aug_seeds)
        batch = aug.next_batch()
        step = best_cpu(lambda: ens.gd_step(batch.x, batch.y, 1e-9, batch.per_member, loss=spec.loss))
        sets = [orbit_inputs(spec.group_obj, x)] + [orbit_inputs(spec.group_obj, torch.tensor(v, dtype=torch.float32))
                                                    for v in data.eval_sets.values()]
        log = best_cpu(lambda: [ens.predict(s.x) for s in sets])
        draw = best_cpu(aug.next_batch)
    return dict(setup=setup, step=step, log=log, draw=draw)


def priced(unit, data, cal) -> dict:
    """The plan's price of one training step and one log of ``unit`` (one thread)."""
    spec, members = unit.model, unit.members
    prof = cost.model_profile(spec, tuple(data.input_shape), int(data.n_out))
    n_train = len(data.train_x)
    batch = cost.training_batch(spec, n_train)
    rows = (n_train + sum(len(v) for v in data.eval_sets.values())) * spec.group_obj.order
    tb = cost.ensemble_blocks(prof, unit.width, members, batch, 4, True)
    eb = cost.ensemble_blocks(prof, unit.width, members, rows, 4, False)
    step = prof.pass_cost("train", unit.width, batch, cost._vectorised(tb, members, "cpu"))
    log = prof.pass_cost("fwd", unit.width, rows, cost._vectorised(eb, members, "cpu"))
    return dict(step=step.seconds(cal, members, tb), log=log.seconds(cal, members, eb), train_blocks=tb, log_blocks=eb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--models", nargs="*", help="only these models (default: all)")
    ap.add_argument("--per-model", type=int, default=2, help="units per model, spread over its widths (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = Prepared(Path(args.study))
    cal = cost.load_calibration()
    print(f"{args.study}: one thread; calibration measured at load average {cal.load_average:.1f}; "
          f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'model':15} {'width':>5} {'M':>4} {'unit s':>7} {'priced':>7} {'ratio':>5} | {'set-up':>6} | "
          f"{'step':>8} {'priced':>8} {'ratio':>5} {'blocks':>6} | {'log':>7} {'priced':>7} {'ratio':>5} | draw")
    names = args.models or [s.name for s in p.cfg.model_specs]
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            mine = [u for u in p.units if u.model.name == name]
            widths = sorted({u.width for u in mine})
            pick = sorted({widths[round(i * (len(widths) - 1) / max(args.per_model - 1, 1))]
                           for i in range(args.per_model)})
            for w in pick:
                unit = next(u for u in mine if u.width == w)
                price = cost.unit_cost(unit, tuple(p.data.input_shape), p.data.n_out, len(p.data.train_x),
                                       [len(v) for v in p.data.eval_sets.values()], cal,
                                       batch_s=cost.batch_seconds(unit.model, p.data.train_x, p.data.train_y,
                                                                  unit.members, p.cfg.dtype))
                writer = PartWriter(unit, tmpdir=d)
                t0 = time.perf_counter()
                outcome = run_unit(unit, p.data, writer)
                writer.finish({})
                wall = time.perf_counter() - t0
                ph, pr = phases(unit, p.data), priced(unit, p.data, cal)
                print(f"{name:15} {w:5d} {unit.members:4d} {wall:7.2f} {price.seconds:7.2f} {wall / price.seconds:5.2f} | "
                      f"{ph['setup']:6.2f} | {ph['step'] * 1e3:6.1f}ms {pr['step'] * 1e3:6.1f}ms "
                      f"{ph['step'] / pr['step']:5.2f} {pr['train_blocks']:6d} | {ph['log']:7.3f} {pr['log']:7.3f} "
                      f"{ph['log'] / pr['log']:5.2f} | {ph['draw'] * 1e3:.1f}ms ({outcome.status}, {unit.steps} steps, "
                      f"{len(unit.log_steps)} logs)", flush=True)
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
