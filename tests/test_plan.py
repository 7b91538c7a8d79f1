"""``eqntk plan`` and the cost model (``eqntk.cost``): the plan of a study is printed with
per-model and total times, the prediction grows with every size, bad input is refused like
``validate`` does (exit 2, one line, within seconds), and the calibration is measured once
per machine and read back from its cache.

The fast tests price with a fixed, hand-made calibration (``fixed_calibration``) so that
they do not depend on how busy the machine is; one test runs the real benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace as dc_replace
from pathlib import Path

import pytest

from eqntk import cost, plan
from eqntk.cli import main
from eqntk.kinds.ensemble import Prepared
from study.config import load_study
from study.spec import ModelSpec
from test_config import CASES, GOOD, replace, write

ROOT = Path(__file__).resolve().parent.parent

# Rates of the order this 2-core machine measures (one thread), fixed for the tests.
RATES = dict(mm_flops=1e11, conv_flops=1e11, gconv_flops=1e11, memory=5e9, index=2e8, op_seconds=8e-6, pass_seconds=3e-4,
             worker_seconds=5.0, parallel_slowdown=1.0, part_bytes_per_row=85.0, write_seconds_per_row=2e-6, write_seconds_per_call=2e-3)


@pytest.fixture
def fixed_calibration(tmp_path, monkeypatch):
    """A calibration for this machine written into a private cache (nothing is measured),
    with the kernel pairs of every model priced at 0.1 ms."""
    monkeypatch.setenv("EQNTK_CACHE", str(tmp_path / "cache"))
    cal = cost.Calibration(machine=cost.machine_key(), **RATES)
    cal.save()
    monkeypatch.setattr(cost, "pair_seconds", lambda spec, x, n_out, mean, cal: (0.01, 1e-4, 1e-4))
    return cal


def study(tmp_path: Path, text: str = GOOD, name: str = "study.yaml") -> Path:
    return write(tmp_path, text, name)


def test_plan_prints_models_totals_and_dominant_units(tmp_path, fixed_calibration, capsys):
    path = study(tmp_path, replace(GOOD, "  - {name: gmlp, arch: group_mlp, depth: 1, support: identity}",
                                   "  - {name: gmlp, arch: group_mlp, depth: 1, support: identity}\n"
                                   "  - {name: gcnn, arch: gcnn, depth: 2, widths: [2, 4]}"))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    for model in ("mlp", "gmlp", "gcnn"):
        assert any(line.split()[:1] == [model] for line in out.splitlines()), out
    assert "wall time:" in out and "total" in out and "dominant units" in out and "results on disk" in out
    p = plan.plan_study(path, plan.Resources(cpus=2))
    assert len(p.units) == len(Prepared(path).units)
    assert all(u.seconds > 0 and u.memory_bytes > 0 and u.result_bytes > 0 for u in p.units)
    # the phases add up to the total, and training on 2 slots is at least half the unit time
    assert p.total_seconds == pytest.approx(sum(p.phases.values()))
    assert p.phases["training"] >= sum(u.seconds for u in p.units) / 2


def test_prediction_grows_with_every_size(tmp_path, fixed_calibration):
    """More width, members, steps, logs, training or eval inputs: never cheaper."""
    base = replace(GOOD, "ensemble_size: 4", "ensemble_size: 8\nmembers_per_unit: 8")

    def unit_seconds(text: str, model: str = "mlp") -> list[float]:
        p = plan.plan_study(study(tmp_path, text, f"s{abs(hash(text))}.yaml"), plan.Resources(cpus=1))
        return [u.seconds for u in p.units if u.model == model]

    widths = unit_seconds(replace(base, "widths: [8, 16]", "widths: [8, 64, 512, 4096]"))
    assert widths == sorted(widths) and widths[-1] > widths[0]
    one = unit_seconds(base)[0]
    bigger = [
        replace(base, "ensemble_size: 8\nmembers_per_unit: 8", "ensemble_size: 32\nmembers_per_unit: 32"),
        replace(base, "steps: 20", "steps: 200"),
        replace(base, "log_steps: [0, 5, 20]", "log_steps: [0, 1, 2, 5, 10, 20]"),
        replace(base, "train: {source: digits, n: 8}", "train: {source: digits, n: 64}"),
        replace(base, "{source: gaussian, n: 4}", "{source: gaussian, n: 64}"),
    ]
    for text in bigger:
        assert unit_seconds(text)[0] > one, text
    # more CPUs never make the study slower, and two slots at most halve the training
    path = study(tmp_path, base, "cpus.yaml")
    t = [plan.plan_study(path, plan.Resources(cpus=c)).phases["training"] for c in (1, 2, 4)]
    assert t[0] >= t[1] >= t[2] and t[1] >= t[0] / 2 - 1e-9


def test_gpu_slots_and_nodes(tmp_path, fixed_calibration, capsys):
    path = study(tmp_path)
    cpu = plan.plan_study(path, plan.Resources(cpus=2))
    gpu = plan.plan_study(path, plan.Resources(cpus=2, gpus=4))
    assert gpu.slot_kind == "GPU" and gpu.slots == 4
    assert sum(u.seconds for u in gpu.units) < sum(u.seconds for u in cpu.units)
    assert any("num_gpus" in n for n in gpu.notes)  # the study asks for none: said so
    assert main(["plan", str(path), "--gpus", "16", "--nodes", "2"]) == 0
    assert "16 GPUs on 2 nodes" in capsys.readouterr().out


def test_list_schedule():
    assert plan.list_schedule([], 4) == 0
    assert plan.list_schedule([3, 3, 3, 3], 2) == 6
    assert plan.list_schedule([10, 1, 1, 1], 2) == 10
    assert plan.list_schedule([1, 1], 2, start=5) == 6  # each slot starts its worker once
    assert plan.list_schedule([1] * 10, 1, start=5) == 15


def test_memory_and_result_size_follow_the_footprint(tmp_path, fixed_calibration):
    """Memory per unit: the members' parameter copies (workers.footprint) plus the worker; the
    result: rows = logs x (train + eval) inputs x |G| x outputs."""
    path = study(tmp_path)
    p = plan.plan_study(path, plan.Resources(cpus=2))
    prep = Prepared(path)
    n_rows = 3 * (8 + 4) * 4 * 10  # 3 logs, 8 training + 4 eval inputs, C4, 10 outputs
    for u in p.units:
        assert u.rows == n_rows
        assert u.result_bytes == pytest.approx(n_rows * RATES["part_bytes_per_row"])
        assert u.memory_bytes > cost.WORKER_BYTES
    assert len(p.units) == len(prep.units)


@pytest.mark.parametrize("case,text,files,words", CASES, ids=[c[0] for c in CASES])
def test_plan_refuses_bad_input_like_validate(tmp_path, fixed_calibration, capsys, case, text, files, words):
    path = study(tmp_path, text)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    t0 = time.perf_counter()
    code = main(["plan", str(path)])
    assert time.perf_counter() - t0 < 5, "plan must answer within seconds"
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("flag,value", [("--cpus", "0"), ("--nodes", "0"), ("--gpus", "-1"), ("--load", "-1")])
def test_plan_refuses_bad_resources(tmp_path, fixed_calibration, capsys, flag, value):
    assert main(["plan", str(study(tmp_path)), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1


def test_validate_unchanged(tmp_path, capsys):
    assert main(["validate", str(study(tmp_path))]) == 0
    assert "study tiny: valid" in capsys.readouterr().out


def test_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    """The real reference passes (the two subprocess measurements, a worker's start and the
    slowdown of units side by side, are replaced by constants here: they take 10-30 s): the
    fit reproduces the passes it was fitted to within 2x (a busy machine varies more than that
    between runs, but not within one fit), and a second call reads the cache; a damaged cache
    is measured again."""
    monkeypatch.setenv("EQNTK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost, "_worker_seconds", lambda: 2.0)
    monkeypatch.setattr(cost, "_parallel_slowdown", lambda processes, start: 1.25)
    t0 = time.perf_counter()
    cal = cost.load_calibration()
    assert time.perf_counter() - t0 < 60
    assert cal.machine == cost.machine_key() and cal.parallel_slowdown == 1.25
    path = cost.calibration_path(cal.machine)
    assert path.is_file() and path.parent == tmp_path / "cache"
    for name, measured, fitted in cal.references:
        assert 0.5 < measured / fitted < 2, (name, measured, fitted)
    again = cost.load_calibration()
    assert again.measured_at == cal.measured_at  # from the cache, not measured again
    other = dict(cal.machine, host="elsewhere")
    assert cost.calibration_path(other) != path  # another machine, another cache entry
    path.write_text("{not json")
    monkeypatch.setattr(cost, "calibrate", lambda: dc_replace(cal, measured_at=-1.0))
    assert cost.load_calibration().measured_at == -1.0
    assert json.loads(path.read_text())["measured_at"] == -1.0


def test_kernel_pair_cost_is_cached_per_model(tmp_path, fixed_calibration, monkeypatch):
    """The per-pair cost of a model's kernel is timed once and kept with the calibration."""
    private = fixed_calibration.path().parent
    monkeypatch.undo()  # the real pair_seconds, the private cache kept
    monkeypatch.setenv("EQNTK_CACHE", str(private))
    cal = cost.load_calibration()
    prep = Prepared(study(tmp_path))
    spec = prep.cfg.model_specs[0]
    setup, per_pair, per_diag = cost.pair_seconds(spec, prep.data.train_x, prep.data.n_out, False, cal)
    assert setup >= 0 and per_pair > 0 and per_diag >= 0
    stored = json.loads(cal.path().read_text())["pair_seconds"]
    assert list(stored.values()) == [[setup, per_pair, per_diag, cost.DIAG_PROBE, 3]]
    assert cost.pair_seconds(spec, prep.data.train_x, prep.data.n_out, False, cal) == (setup, per_pair, per_diag)


def test_theory_pairs():
    """Pairs of the analytic prediction: symmetric training kernel, new test rows, diagonal."""
    mlp = ModelSpec(name="m", arch="mlp")
    aug = ModelSpec(name="a", arch="mlp", augmentation="full_orbit")
    gcnn = ModelSpec(name="g", arch="gcnn")
    sets = [8, 4]
    assert cost.theory_pairs(mlp, 8, sets) == dict(train=8, test=48, pairs=36 + 40 * 8, diag=48)
    assert cost.theory_pairs(aug, 8, sets) == dict(train=32, test=48, pairs=32 * 33 // 2 + 16 * 32, diag=48)
    assert cost.theory_pairs(gcnn, 8, sets) == dict(train=8, test=20, pairs=36 + 12 * 8, diag=20)


def test_plan_of_the_builtin_studies_answers(fixed_calibration, capsys):
    root = ROOT / "study" / "builtin"
    for name in ("builtin.yaml", "regression.yaml"):
        assert main(["plan", str(root / name)]) == 0
    out = capsys.readouterr().out
    assert out.count("wall time:") == 2



def test_gpu_benchmark_runs_without_a_gpu():
    """benchmarks/gpu.py falls back to the CPU with a line saying so (its --quick sizes)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("device: no GPU visible")
    assert sum("speed-up over the per-member loop" in l for l in lines) == 2
    assert any("kernel engine" in l for l in lines) and lines[-1].startswith("benchmark time")


def test_paper_slice_is_paper_at_its_smallest_widths():
    paper = load_study(ROOT / "study" / "builtin" / "paper.yaml")
    part = load_study(ROOT / "study" / "builtin" / "paper_slice.yaml")
    assert [m.name for m in paper.model_specs] == [m.name for m in part.model_specs]
    for m in paper.model_specs:
        assert part.widths_of(m.name) == [min(paper.widths_of(m.name))]
        assert part.ensemble_size_of(m.name) == paper.ensemble_size_of(m.name)
        assert part.lrs_of(m.name) == paper.lrs_of(m.name)
    assert part.model_specs == paper.model_specs
    same = {k: v for k, v in paper.model_dump().items() if k not in ("name", "widths", "models")}
    assert {k: v for k, v in part.model_dump().items() if k in same} == same
    assert max(max(paper.widths_of(m.name)) for m in paper.model_specs if m.arch in ("cnn", "gcnn")) >= 128
    assert min(paper.ensemble_size_of(m.name) for m in paper.model_specs) >= 256


# ----- README blocks (scripts/readme.py) ----------------------------------------------------------
def readme_module():
    spec = importlib.util.spec_from_file_location("readme_script_plan", ROOT / "scripts" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_cost_blocks(tmp_path, fixed_calibration):
    readme = readme_module()
    out = tmp_path / "builtin"
    out.mkdir()
    (out / "readme_run.json").write_text(json.dumps(dict(study="study/builtin/builtin.yaml", wall_seconds=300.0,
                                                         predicted_seconds=200.0, predicted_at_load_seconds=250.0,
                                                         load_average=[1.5, 2.0, 2.5], machine=dict(cpus=2))))
    table = readme.cost_table({"builtin": out, "so3": tmp_path / "missing"})
    assert ("| `study/builtin/builtin.yaml` | 2 CPUs | 3 min 20 s | 4 min 10 s (load 1.5) | 5 min 0 s | 1.50 | 1.20 | "
            "before the run |") in table
    # a --run of other studies keeps this row; a --run of this one replaces it
    assert readme.cost_table({"so3": tmp_path / "missing"}, table) == table
    rec = json.loads((out / "readme_run.json").read_text())
    (out / "readme_run.json").write_text(json.dumps(dict(rec, load_now=0.5)))
    assert "4 min 10 s (load 0.5)" in readme.cost_table({"builtin": out})
    assert readme.cost_table({}) is None
    scale = tmp_path / "scale.json"
    row = dict(units=200, cluster="local", slots=2, load_average=1.0, run_wall_seconds=40.0, training_seconds=30.0,
               overhead_ms_per_unit=250.0, unit_seconds_mean=0.05, driver_peak_rss_bytes=5e8, part_files=200,
               part_bytes=7e6, nodes=1, analyze_read_seconds=1.0, analyze_seconds=2.0, analyze_wall_seconds=9.0,
               analyze_peak_rss_bytes=5e8)
    big = dict(row, units=2000, training_seconds=210.0, part_files=2000, part_bytes=7e7)
    scale.write_text(json.dumps(dict(machine=dict(cpus=2, memory_gib=24), command="python benchmarks/scale.py",
                                     rows=[row, big])))
    text = readme.scale_table(scale)
    # growth: (210 - 30) s x 2 slots / 1800 units - 50 ms = 150 ms
    assert "| local | 2000 | 3 min 30 s | 250 | 150 | 50 |" in text
    monkey = {"scale": scale, "paper": tmp_path / "none.json"}
    readme.BENCHMARK_RECORDS.update(monkey)
    page = "<!-- generated: scale -->\n<!-- end generated: scale -->\n"
    assert list(readme.cost_blocks(page, {"builtin": out})) == ["scale"]  # only the blocks the page has markers for
    page += "<!-- generated: cost-measured -->\n<!-- end generated: cost-measured -->\n"
    assert sorted(readme.cost_blocks(page, {"builtin": out})) == ["cost-measured", "scale"]
    assert readme.cost_blocks("no markers", {"builtin": out}) == {}


@pytest.mark.parametrize("case,old,new", [
    ("a billion steps", "steps: 20", "steps: 1000000000"),
    ("a thousand logs of a billion steps", "steps: 20\nlog_steps: [0, 5, 20]", "steps: 1000000000\nlog_steps: {count: 1000}"),
    ("a million members in units of 1000", "ensemble_size: 4", "ensemble_size: 1000000\nmembers_per_unit: 1000"),
    ("a width of 30,000", "widths: [8, 16]", "widths: [30000]"),
])
def test_absurd_but_valid_studies_are_planned_within_seconds(tmp_path, fixed_calibration, capsys, case, old, new):
    """Sizes that fit the machine but would run for ages are priced, not run: within 5 s."""
    path = study(tmp_path, replace(GOOD, old, new))
    t0 = time.perf_counter()
    assert main(["plan", str(path)]) == 0, capsys.readouterr().err
    assert time.perf_counter() - t0 < 5
    assert "total" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_slowdown_is_measured(tmp_path):
    """Units side by side are never faster than one alone (the subprocess measurement)."""
    assert cost._parallel_slowdown(2, cost._worker_seconds()) >= 1.0


def test_load_of_other_jobs_slows_the_plan(tmp_path, fixed_calibration):
    """Other jobs' load: two units on two CPUs beside a load of 2 take twice as long."""
    path = study(tmp_path)
    alone = plan.plan_study(path, plan.Resources(cpus=2))
    shared = plan.plan_study(path, plan.Resources(cpus=2, load=2.0))
    assert plan.Resources(cpus=2, load=2.0).crowding(2) == 2.0 and plan.Resources(cpus=4, load=1).crowding(2) == 1.0
    assert shared.phases["training"] > alone.phases["training"] and shared.total_seconds > alone.total_seconds


def test_readme_paper_blocks(tmp_path):
    readme = readme_module()
    rec = dict(paper_here=dict(study="study/builtin/paper.yaml", text="study paper: ..."),
               paper_cluster=dict(study="study/builtin/paper.yaml", text="study paper: ... 16 GPUs"),
               slice_plan=dict(study="study/builtin/paper_slice.yaml", total_seconds=200.0),
               slice_run=dict(wall_seconds=300.0, predicted_seconds=200.0, predicted_at_load_seconds=250.0, units=160,
                              unit_seconds=500.0, part_bytes=2e8, load_average_before=[1.5, 1.0, 1.0],
                              load_average_after=[2.0, 1.0, 1.0]))
    path = tmp_path / "paper_plan.json"
    path.write_text(json.dumps(rec))
    blocks = readme.paper_blocks(path)
    assert sorted(blocks) == ["paper-slice", "plan-paper", "plan-paper-cluster"]
    assert "--gpus 16 --nodes 2 --cpus 64" in blocks["plan-paper-cluster"]
    assert "predicted 3 min 20 s with the machine to itself, 4 min 10 s at other jobs' load just before the run (1.5)" \
        in blocks["paper-slice"]
    assert "(measured / predicted at that load 1.20)" in blocks["paper-slice"]


def test_current_load_counts_other_runnable_processes():
    load = plan.current_load(samples=3, every=0.01)
    assert 0 <= load < 1000


def test_model_profiles_are_counted_once_per_machine(tmp_path, fixed_calibration, monkeypatch):
    """A model's operation counts are kept in the cache: read back equal to a fresh count, and
    not counted again (counting a CNN takes seconds, and the first training pass counted
    imports torch._dynamo)."""
    spec = ModelSpec(name="m", arch="cnn", depth=1)
    cost.model_profile.cache_clear()
    first = cost.model_profile(spec, (1, 8, 8), 10)
    stored = list((tmp_path / "cache" / "profiles").glob("*.json"))
    assert len(stored) == 1
    assert cost.ModelProfile.from_json(json.loads(stored[0].read_text())) == first == cost.count_profile(spec, (1, 8, 8), 10)
    cost.model_profile.cache_clear()
    monkeypatch.setattr(cost, "count_profile", lambda *a: pytest.fail("counted again"))
    assert cost.model_profile(spec, (1, 8, 8), 10) == first
    stored[0].write_text("{damaged")
    monkeypatch.undo()
    monkeypatch.setenv("EQNTK_CACHE", str(tmp_path / "cache"))
    cost.model_profile.cache_clear()
    assert cost.model_profile(spec, (1, 8, 8), 10) == first  # a damaged entry is counted again
    assert cost.ModelProfile.from_json(json.loads(stored[0].read_text())) == first
    cost.model_profile.cache_clear()


def test_validate_and_plan_load_no_run_modules(tmp_path):
    """validate and plan import what checking and pricing need, not Ray, the analysis or its
    plots (eqntk.kinds): those took 0.7 s of the 5 s issue #16 allows them."""
    path = study(tmp_path)
    heavy = ("ray", "matplotlib", "eqntk.kinds", "eqntk.runner", "eqntk.pipeline", "analysis.report")
    code = (f"import sys, io, contextlib\nfrom eqntk.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['validate', {str(path)!r}]) == 0\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def large_study(units_per_ensemble: int) -> str:
    """Two models at five widths, ``units_per_ensemble`` units of 1,000 members each."""
    return replace(replace(GOOD, "widths: [8, 16]", "widths: [8, 16, 32, 64, 128]"), "ensemble_size: 4",
                   f"ensemble_size: {units_per_ensemble * 1000}\nmembers_per_unit: 1000")


def test_large_grids_answer_within_5_s_as_a_user_runs_them(tmp_path, fixed_calibration):
    """``eqntk validate`` and ``eqntk plan`` in a fresh process each, imports included, on the
    largest grid a study may have (100,000 units: 2 models x 5 widths x 10,000 units) and
    on one twice as large (refused). Issue #16 asks for an answer within 5 s; that is what
    is asserted of each command's CPU time (user + system). The wall time is not: on this
    2-core machine other jobs' share of the cores lengthens it (measured 3-4.5 s at load
    average 2 for 100,000 units); it is bounded at 60 s only to catch a hang. The model
    counts and kernel pair costs are in the cache first (a first plan of a new model counts
    it once, 0.1-3 s; benchmarks/bounded.py measures the same files)."""
    env = dict(os.environ, EQNTK_CACHE=str(tmp_path / "cache"))
    exe = str(Path(sys.executable).with_name("eqntk"))
    subprocess.run([exe, "plan", str(study(tmp_path))], env=env, check=True, capture_output=True, timeout=300)
    for units, refused in ((10000, False), (20000, True)):
        path = study(tmp_path, large_study(units), f"units{units}.yaml")
        for command in ("validate", "plan"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([exe, command, str(path)], env=env, capture_output=True, text=True, timeout=60)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            assert r.returncode == (2 if refused else 0), r.stderr
            if refused:
                assert f"{10 * units} work units" in r.stderr and len(r.stderr.strip().splitlines()) == 1
            else:
                assert (f"  {10 * units} units:" if command == "validate" else "; total ") in r.stdout
            assert cpu < 5, f"{command} of {10 * units} units: {cpu:.1f} s of CPU"


def test_readme_refused_inputs_block(tmp_path):
    """benchmarks/bounded.py's record becomes README's table of refused inputs: both commands'
    exit code, wall and CPU seconds, and the one-line answer (the plan's total for a valid file)."""
    readme = readme_module()
    took = lambda code, wall, cpu, answer: dict(exit=code, wall_seconds=wall, cpu_seconds=cpu, answer=answer,  # noqa: E731
                                                error_lines=1 if code else 0)
    rec = dict(command="python benchmarks/bounded.py", machine=dict(cpus=2, host="h"), load_average_before=[2.0, 1.5, 1.0],
               load_average_after=[2.0, 1.5, 1.0], rows=[
                   dict(case="a width no machine holds", expected="refused", load=2.0,
                        validate=took(2, 3.1, 2.9, "eqntk: error: STUDY: widths: one member needs 85.8 GB; use smaller widths"),
                        plan=took(2, 3.0, 2.9, "eqntk: error: STUDY: widths: one member needs 85.8 GB; use smaller widths")),
                   dict(case="100,000 units", expected="valid", load=2.0, validate=took(0, 3.7, 3.9, "100000 units:"),
                        plan=took(0, 3.6, 3.8, "wall time: training 18 h 19 min; total 18 h 24 min"))])
    path = tmp_path / "bounded.json"
    path.write_text(json.dumps(rec))
    table = readme.refused_table(path)
    assert "load average 2.00, 1.50, 1.00 before; the slowest answer 3.7 s" in table
    assert ("| a width no machine holds | exit 2, 3.1 s (2.9 s CPU) | exit 2, 3.0 s (2.9 s CPU) | widths: one member needs "
            "85.8 GB; use smaller widths |") in table
    assert "| 100,000 units | exit 0, 3.7 s (3.9 s CPU) | exit 0, 3.6 s (3.8 s CPU) | training 18 h 19 min; total 18 h 24 min |" \
        in table
    readme.BENCHMARK_RECORDS["bounded"] = path
    page = "<!-- generated: refused-inputs -->\n<!-- end generated: refused-inputs -->\n"
    assert list(readme.cost_blocks(page, {})) == ["refused-inputs"]


def test_counts_are_linear_in_members_and_exact_at_a_wider_width():
    """What a vmap block of a CNN counts grows in proportion to its members (torch's flop
    formula counted the grouped weight gradient m times over, m^2 in all), and the profile
    counted at widths 2-4 gives the counts of width 16 exactly (from width 1 it did not)."""
    from workers.models import build_model

    spec = ModelSpec(name="c", arch="cnn", depth=2)
    module = build_model(spec, 16, (1, 8, 8), 10)
    counts = {m: cost._count(module, (1, 8, 8), 8, True, True, m) for m in (2, 3, 8)}
    assert counts[8][2] > 0  # grouped convolutions are counted as such
    for i in range(len(cost.COUNTS)):
        assert counts[8][i] - counts[3][i] == pytest.approx(5 * (counts[3][i] - counts[2][i]), rel=1e-9)
    profile = cost.count_profile(spec, (1, 8, 8), 10).pass_cost("train", 16, 8, True)
    for i in range(len(cost.COUNTS)):
        assert 8 * profile.member[i] + profile.block[i] == pytest.approx(counts[8][i], rel=1e-6), cost.COUNTS[i]


@pytest.mark.parametrize("arch,extra", [("mlp", {}), ("group_mlp", {"support": "identity"}), ("cnn", {})])
def test_deep_models_are_priced_from_depths_2_and_3(arch, extra):
    """Counts are linear in the depth from 2 on (hidden layers after the first are alike):
    the profile of a depth-5 model from depths 2 and 3 equals its own count."""
    spec = ModelSpec(name="d", arch=arch, depth=5, **extra)
    assert cost.depth_profile(spec, (1, 8, 8), 10) == cost.count_profile(spec, (1, 8, 8), 10)


def test_a_gpu_scales_every_throughput_rate():
    """Every rate a pass's work is divided by (PassCost.seconds) is a GPU's GPU_THROUGHPUT_FACTOR
    times this machine's; the fixed costs per operation and per pass are not (launch overheads)."""
    cal = cost.Calibration(machine=cost.machine_key(), **RATES)
    gpu = cost._gpu_rates(cal)
    throughputs = {"mm_flops", "conv_flops", "gconv_flops", "memory", "index"}
    assert set(cost.GPU_SCALED_RATES) == throughputs
    for name in throughputs:
        assert getattr(gpu, name) == pytest.approx(cost.GPU_THROUGHPUT_FACTOR * getattr(cal, name))
    assert gpu.op_seconds == cal.op_seconds and gpu.pass_seconds == cal.pass_seconds
