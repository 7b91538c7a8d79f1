"""Bad input is refused before any work: exit code 2, one line naming the field and the fix,
and nothing written to the output directory. Each kind of study file has its schema and its commands."""

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eqntk.cli import main
from eqntk.kinds import KINDS
from study.config import KIND_SCHEMAS, parse_study, study_from_dict

GOOD = """
name: tiny
seed: 0
data:
  train: {source: digits, n: 8}
  eval:
    - {name: noise, data: {source: gaussian, n: 4}}
group: C4
models:
  - {name: mlp, arch: mlp, depth: 1}
  - {name: gmlp, arch: group_mlp, depth: 1, support: identity}
widths: [8, 16]
ensemble_size: 4
lr: 0.5
steps: 20
log_steps: [0, 5, 20]
"""


def write(tmp_path: Path, text: str, name="study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


NPZ_STUDY = replace(GOOD, "train: {source: digits, n: 8}", "train: {source: npz, path: data.npz, n: 8}")

# (case id, study text, extra files, words the message must contain)
CASES = [
    # absurd sizes are refused from arithmetic, before anything of that size is built
    ("a billion members in one unit", replace(GOOD, "ensemble_size: 4", "ensemble_size: 1000000000"), {},
     ["members_per_unit", "GB", "set members_per_unit:"]),
    ("tens of millions of units",
     replace(GOOD, "ensemble_size: 4", "ensemble_size: 1000000000\nmembers_per_unit: 32"), {},
     ["members_per_unit", "work units", "raise members_per_unit"]),
    ("a hundred million logs", replace(replace(GOOD, "steps: 20", "steps: 1000000000"), "log_steps: [0, 5, 20]",
                                       "log_steps: {count: 100000000}"), {}, ["log_steps", "logs", "count: 16"]),
    ("a width no machine holds", replace(GOOD, "widths: [8, 16]", "widths: [100000000]"), {},
     ["widths", "GB", "smaller widths"]),
    # a file's size and its count of models bound what reading and pricing it takes
    ("a study file of a megabyte", GOOD + "# " + "x" * 2**20 + "\n", {}, ["study file is", "more than 128 kB", ".npz"]),
    # sizes whose arrays no machine holds, met while the data or a model's fields are built
    ("an eval set of a hundred billion inputs", replace(GOOD, "{source: gaussian, n: 4}", "{source: gaussian, n: 100000000000}"),
     {}, ["do not fit in this machine's memory", "Unable to allocate", "lower the sizes"]),
    ("a kernel of a billion taps a side", replace(GOOD, "{name: mlp, arch: mlp, depth: 1}",
                                                  "{name: mlp, arch: cnn, kernel_size: 1000000001}"), {},
     ["more memory than this machine has", "Unable to allocate", "lower its sizes"]),
    ("a million layers", replace(GOOD, "{name: mlp, arch: mlp, depth: 1}", "{name: mlp, arch: mlp, depth: 1000000}"), {},
     ["models.0.depth", "more than 1000", "at most"]),
    ("a hundred and one models", replace(GOOD, "  - {name: gmlp, arch: group_mlp, depth: 1, support: identity}\n",
                                         "".join(f"  - {{name: m{i}, arch: mlp}}\n" for i in range(100))), {},
     ["models", "101 models", "more than 100", "split the study"]),
    ("antithetic pairs of an odd ensemble", replace(GOOD, "ensemble_size: 4", "ensemble_size: 5\npairing: antithetic"), {},
     ["ensemble_size", "antithetic pairs", "even"]),
    ("antithetic pairs split between units",
     replace(GOOD, "ensemble_size: 4", "ensemble_size: 4\nmembers_per_unit: 3\npairing: antithetic"), {},
     ["members_per_unit", "split antithetic pairs", "even"]),
    ("unknown pairing", replace(GOOD, "{name: mlp, arch: mlp, depth: 1}", "{name: mlp, arch: mlp, depth: 1, pairing: paired}"),
     {}, ["pairing", "antithetic"]),
    ("unknown group", replace(GOOD, "group: C4", "group: Q4"), {}, ["group", "C<n> or D<n>"]),
    ("group order below 1", replace(GOOD, "group: C4", "group: C0"), {}, ["group", "at least 1"]),
    ("zero width", replace(GOOD, "widths: [8, 16]", "widths: [0, 16]"), {}, ["widths", "positive"]),
    ("negative width", replace(GOOD, "widths: [8, 16]", "widths: [-8]"), {}, ["widths", "positive"]),
    ("kernel larger than image",
     replace(GOOD, "{name: mlp, arch: mlp, depth: 1}", "{name: mlp, arch: cnn, kernel_size: 9}"), {},
     ["kernel_size", "at most 8"]),
    ("unsupported padding", replace(GOOD, "{name: mlp, arch: mlp, depth: 1}", "{name: mlp, arch: cnn, padding: reflect}"), {},
     ["models.0.padding", "reflect", "circular"]),
    ("unsupported nonlinearity", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, nonlinearity: gelu"), {},
     ["models.0.nonlinearity", "relu"]),
    ("learning rate not positive", replace(GOOD, "lr: 0.5", "lr: -0.1"), {}, ["lr", "positive"]),
    ("logging steps beyond the run", replace(GOOD, "log_steps: [0, 5, 20]", "log_steps: [0, 5, 50]"), {},
     ["log_steps", "raise steps"]),
    ("ensemble size below 2", replace(GOOD, "ensemble_size: 4", "ensemble_size: 1"), {}, ["ensemble_size", "at least 2"]),
    ("missing data file", NPZ_STUDY, {}, ["data.path", "not found"]),
    ("corrupt npz", NPZ_STUDY, {"data.npz": b"PK\x03\x04 this is not a zip"}, ["data.path", "not a readable"]),
    ("wrongly shaped npz", NPZ_STUDY,
     {"data.npz": npz_bytes(train_images=np.zeros((8, 8, 8, 1, 1), np.uint8), train_labels=np.zeros((8, 1)))},
     ["data.path", "shape"]),
    ("npz without the split", NPZ_STUDY,
     {"data.npz": npz_bytes(val_images=np.zeros((8, 8, 8), np.uint8), val_labels=np.zeros((8, 1)))},
     ["data.split", "train_images"]),
    ("wrong input shape for the model",
     replace(replace(GOOD, "train: {source: digits, n: 8}", "train: {source: ring, n: 8, m: 12}"),
             "- {name: noise, data: {source: gaussian, n: 4}}", "[]").replace("eval:\n    []", "eval: []")
     .replace("{name: mlp, arch: mlp, depth: 1}", "{name: mlp, arch: cnn}"), {},
     ["arch", "needs images"]),
    ("invalid YAML", "name: [unclosed\nseed: 0\n", {}, ["not valid YAML"]),
    ("unknown key", replace(GOOD, "ensemble_size: 4", "ensemble_size: 4\nensemble_sise: 4"), {},
     ["ensemble_sise", "unknown key"]),
    ("unknown model key", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, dept: 1"), {}, ["models.0.dept", "unknown key"]),
    ("eval set with no inputs", replace(GOOD, "{source: gaussian, n: 4}", "{source: gaussian, n: 0}"), {},
     ["data.eval", "greater than 0", "out of range"]),
    ("photo patches larger than the photographs",
     replace(GOOD, "{source: gaussian, n: 4}", "{source: sample_images, n: 4, patch: 1000000000}"), {},
     ["data.eval", "patch", "427"]),
    ("a ring of a billion points",
     replace(replace(GOOD, "train: {source: digits, n: 8}", "train: {source: ring, n: 8, m: 1000000000}"),
             "- {name: noise, data: {source: gaussian, n: 4}}", "[]").replace("eval:\n    []", "eval: []"), {},
     ["data.train", "m", "65536"]),
    ("canonical basis where the group is not exact on the grid",
     replace(GOOD, "{name: gmlp, arch: group_mlp, depth: 1, support: identity}",
             "{name: g, arch: gcnn, group: C8, basis: canonical}"), {}, ["basis", "C8", "basis: escnn"]),
    ("augmentation on an equivariant model",
     replace(GOOD, "support: identity}", "support: identity, augmentation: full_orbit}"), {}, ["augmentation", "none"]),
    ("not a mapping", "- just\n- a list\n", {}, ["YAML mapping"]),
    ("sgd without a batch size", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, optimizer: sgd"), {},
     ["models.0.batch_size", "optimizer: sgd", "add batch_size"]),
    ("batch size with full-batch gd", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, batch_size: 4"), {},
     ["models.0.batch_size", "remove batch_size", "optimizer: sgd"]),
    ("batch larger than the training set",
     replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, optimizer: sgd, batch_size: 9"), {},
     ["models.0.batch_size", "8 training samples", "at most 8"]),
    ("batch larger than the full orbit",
     replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, augmentation: full_orbit, optimizer: sgd, batch_size: 33"), {},
     ["models.0.batch_size", "8 x 4 = 32", "at most 32"]),
    ("batch size not positive", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, optimizer: sgd, batch_size: 0"), {},
     ["models.0.batch_size", "out of range"]),
    ("unsupported loss", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, loss: hinge"), {},
     ["models.0.loss", "hinge", "cross_entropy"]),
    ("unsupported optimizer", replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, optimizer: adam"), {},
     ["models.0.optimizer", "adam", "sgd"]),
    ("training fields in a kernel-regression study",
     "name: r\nkind: kernel_regression\ndata: {train: {source: digits, n: 8}}\n"
     "regression: {test: {source: digits, n: 4, start: 100}, sizes: [4]}\n"
     "models:\n  - {name: mlp, arch: mlp, loss: cross_entropy}\n", {},
     ["models.0.loss", "kernel_regression", "remove loss"]),
]


@pytest.mark.parametrize("case,text,files,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_refused(tmp_path, refused, case, text, files, words):
    study = write(tmp_path, text)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refused(study, tmp_path / "out", words)


@pytest.mark.parametrize("case,text,files,words", CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_what_run_refuses(tmp_path, capsys, refused, case, text, files, words):
    """``eqntk validate`` gives the same one line as ``eqntk run``, fast: it checks before any work too."""
    study = write(tmp_path, text)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    by_run = refused(study, tmp_path / "out", words)
    t0 = time.perf_counter()
    code = main(["validate", str(study)])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert code == 2 and captured.err.strip() == by_run and not captured.out
    assert seconds < 5, f"validate took {seconds:.1f} s to refuse"


def test_validate_prints_grid(tmp_path, capsys):
    study = write(tmp_path, GOOD)
    assert main(["validate", str(study)]) == 0
    out = capsys.readouterr().out
    assert "4 units" in out and "gmlp" in out and "[0, 5, 20]" in out


def test_console_script_exit_code(tmp_path):
    study = write(tmp_path, replace(GOOD, "group: C4", "group: Q4"))
    exe = Path(sys.executable).with_name("eqntk")
    r = subprocess.run([str(exe), "validate", str(study)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("eqntk: error:")


def test_unit_ids_stable_and_sensitive(tmp_path):
    from eqntk.kinds.ensemble import Prepared

    a = Prepared(write(tmp_path, GOOD, "a.yaml"))
    b = Prepared(write(tmp_path, GOOD, "b.yaml"))
    c = Prepared(write(tmp_path, replace(GOOD, "lr: 0.5", "lr: 0.25"), "c.yaml"))
    assert [u.unit_id for u in a.units] == [u.unit_id for u in b.units]
    assert not {u.unit_id for u in a.units} & {u.unit_id for u in c.units}


def test_training_fields_change_unit_ids_only_when_set(tmp_path):
    """Defaults are left out of the spec's dump, so studies written before the fields existed keep their ids."""
    from eqntk.kinds.ensemble import Prepared
    from study.spec import ModelSpec

    plain = ModelSpec(name="m", arch="mlp")
    assert not {"loss", "optimizer", "batch_size"} & set(plain.model_dump(mode="json"))
    sgd = ModelSpec(name="m", arch="mlp", loss="cross_entropy", optimizer="sgd", batch_size=4)
    assert ModelSpec(**sgd.model_dump()) == sgd and sgd.model_dump()["batch_size"] == 4
    a = Prepared(write(tmp_path, GOOD, "a.yaml"))
    b = Prepared(write(tmp_path, replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, depth: 1, loss: mse, optimizer: gd"), "b.yaml"))
    c = Prepared(write(tmp_path, replace(GOOD, "arch: mlp, depth: 1", "arch: mlp, depth: 1, optimizer: sgd, batch_size: 8"),
                       "c.yaml"))
    assert [u.unit_id for u in a.units] == [u.unit_id for u in b.units]
    changed = {u.unit_id for u in a.units} ^ {u.unit_id for u in c.units}
    assert len(changed) == 4  # the mlp's two units, old and new


REGRESSION = """
name: r
kind: kernel_regression
data: {train: {source: digits, n: 8}}
regression: {test: {source: digits, n: 4, start: 100}, sizes: [4]}
models:
  - {name: mlp, arch: mlp}
"""


def test_every_kind_of_study_file_has_its_commands():
    assert set(KINDS) == set(KIND_SCHEMAS)
    assert all(kind.name == name for name, kind in KINDS.items())
    assert type(parse_study(GOOD)) is KIND_SCHEMAS["ensemble"]
    assert type(parse_study(REGRESSION)) is KIND_SCHEMAS["kernel_regression"]


def test_study_json_written_with_both_kinds_fields_still_reads(tmp_path):
    """Before each kind had its own schema, study.json listed the other kind's fields as null
    (and a kernel-regression study's ``data.eval`` as []): such a directory still resumes and reads."""
    from eqntk.kinds.ensemble import Prepared, same_study

    p = Prepared(write(tmp_path, GOOD))
    old = {**p.resolved, "config": {**p.resolved["config"], "regression": None}}
    assert same_study(old, p.resolved)
    assert not same_study({**old, "data_digest": "other"}, p.resolved)
    assert not same_study({**old, "config": {**old["config"], "lr": 0.25}}, p.resolved)
    reg = parse_study(REGRESSION)
    dump = reg.model_dump(mode="json")
    old = {**dump, **dict.fromkeys(["widths", "ensemble_size", "members_per_unit", "lr", "steps", "log_steps"]),
           "data": {**dump["data"], "eval": []}}
    assert study_from_dict(old) == reg


def test_unknown_kind_in_a_results_directory(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps({"config": {"kind": "other"}}))
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kind 'other'" in err


@pytest.mark.parametrize("resources,words", [
    ("{num_gpus: 1}", ["resources.num_gpus", "this machine has 0", "num_gpus: 0", "--address"]),
    ("{num_cpus: 100000}", ["resources.num_cpus", "CPUs but this machine has", "or fewer", "--address"]),
])
def test_units_larger_than_this_machine_are_refused_when_ray_is_local(tmp_path, refused, resources, words):
    """Local Ray would hold such units back forever; on a cluster (--address) Ray places them."""
    if "gpus" in resources and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    study = write(tmp_path, GOOD + f"resources: {resources}\n")
    refused(study, tmp_path / "out", words)
