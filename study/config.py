"""The study file: what to run, validated with pydantic before any work starts.

A study is a YAML file (see ``study/builtin/builtin.yaml``). Its ``kind`` selects its
schema (``Study``, a union discriminated by ``kind``; default ``ensemble``): the fields
every kind has (``StudyBase``) and those of the kind (``EnsembleStudy``, ``RegressionStudy``).
A field of another kind is refused by name. Every field is checked here or in ``study.data``
(which needs the arrays: shapes, files) before Ray starts; an error names the field and says
how to fix it. ``study_from_dict`` rebuilds a study from the ``config`` of a study.json.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .groups import SO3_NAME, Group, group_name
from .spec import ModelSpec, Pairing, check_model_input, kernel_jointly_invariant


class StudyError(ValueError):
    """Bad input: a one-line message naming the field and the fix (exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DigitsSource(_Strict):
    """scikit-learn's 8x8 digits (shipped with the package), in a fixed seeded order."""

    source: Literal["digits"]
    n: int = Field(gt=0)
    start: int = Field(0, ge=0)


class NpzSource(_Strict):
    """Images and labels from a ``.npz`` in the MedMNIST layout (``<split>_images``, ``<split>_labels``)."""

    source: Literal["npz"]
    path: str
    split: Literal["train", "val", "test"] = "train"
    n: Optional[int] = Field(None, gt=0)
    start: int = Field(0, ge=0)
    resize: Optional[int] = Field(None, gt=0)
    grayscale: bool = False


class RotatedDigitsSource(_Strict):
    """scikit-learn's digits (same seeded order as ``digits``), each turned by a random element
    of ``group`` (default: the study's group), drawn once per digit from the study seed: the
    task is invariant under the group."""

    source: Literal["rotated_digits"]
    n: int = Field(gt=0)
    start: int = Field(0, ge=0)
    group: Optional[str] = None

    @field_validator("group")
    @classmethod
    def _group(cls, v):
        return None if v is None else Group.parse(v).name


class GaussianSource(_Strict):
    """i.i.d. N(0, 1) inputs of the training inputs' shape: off the data manifold."""

    source: Literal["gaussian"]
    n: int = Field(gt=0)


# scikit-learn's two sample photographs are 427 x 640 pixels: no larger square patch exists.
MAX_PHOTO_PATCH = 427


class PhotoPatchSource(_Strict):
    """Patches of scikit-learn's sample photographs, averaged down to the training image size."""

    source: Literal["sample_images"]
    n: int = Field(gt=0)
    patch: int = Field(32, gt=0, le=MAX_PHOTO_PATCH)


class RingSource(_Strict):
    """Synthetic signals on a ring of ``m`` points: sums of random bumps, labelled by their count."""

    source: Literal["ring"]
    n: int = Field(gt=0)
    # A ring CNN's kernel holds m x m position pairs per pair of inputs: 65,536 points already
    # take 34 GB a pair, and drawing the signals costs n x m per bump.
    m: int = Field(gt=0, le=65536)
    classes: int = Field(3, ge=2)
    start: int = Field(0, ge=0)


class SphericalDigitsSource(_Strict):
    """scikit-learn's digits (the ``digits`` order) projected onto the sphere (as the Spherical
    CNNs MNIST-on-sphere benchmark does), sampled on the DH grid of bandwidth ``L``
    (``2L x 2L``) and band-limited to degrees ``< L``, so every rotation acts exactly.
    ``rotate``: each digit turned by a Haar rotation drawn once per digit from the study seed.
    ``L`` may be left out in an eval set (then that of the training data)."""

    source: Literal["spherical_digits"]
    n: int = Field(gt=0)
    start: int = Field(0, ge=0)
    L: Optional[int] = Field(None, ge=1)
    rotate: bool = False


class SphereNoiseSource(_Strict):
    """White noise band-limited to degrees ``< L`` (i.i.d. N(0, 1) SH coefficients) on the DH grid: off the data manifold."""

    source: Literal["sphere_noise"]
    n: int = Field(gt=0)
    L: Optional[int] = Field(None, ge=1)


class SpherePhotoSource(_Strict):
    """Grey patches of scikit-learn's sample photographs projected onto the sphere as ``spherical_digits``."""

    source: Literal["sphere_photos"]
    n: int = Field(gt=0)
    patch: int = Field(32, gt=0, le=MAX_PHOTO_PATCH)
    L: Optional[int] = Field(None, ge=1)


class MoleculesSource(_Strict):
    """Molecules with atomisation energies (eV; ``study.molecules``, docs/molecules.md), each
    atom's environment a multi-channel signal on the DH grid of bandwidth ``L``. Kernel-regression
    studies only (``data.train`` and ``regression.test``). ``set``: ``builtin`` (the PySCF
    conformer set made and cached on this machine; ``n_conformers``, ``method``), ``qm9`` (the
    CSVs of the installed ``qm9pack`` package when ``path`` is left out, a folder of such
    ``qm9_part*.csv`` files, or the dsgdb9nsd release at ``path``; ``limit`` reads the first
    molecules in gdb order; ``target``: ``U0_atomisation`` (default) or, from the CSVs, any
    numeric column by name) or ``npz`` (a saved ``MoleculeSet`` at ``path``). The set is taken in a fixed seeded order; ``start`` skips
    into it and ``n`` keeps that many (default: the rest). ``oversample``: environments are
    sampled on the DH grid of bandwidth ``oversample * L`` and projected onto degrees ``< L``
    (then rotations act exactly on them); 1 samples them directly on the ``L`` grid (aliased)."""

    source: Literal["molecules"]
    set: Literal["builtin", "qm9", "npz"] = "builtin"
    path: Optional[str] = None
    n: Optional[int] = Field(None, gt=0)
    start: int = Field(0, ge=0)
    L: int = Field(4, ge=1)
    radius: float = Field(0.5, gt=0)
    oversample: int = Field(4, ge=1)
    n_conformers: int = Field(16, gt=0)
    method: str = "HF/6-31G"
    limit: Optional[int] = Field(None, gt=0)
    target: Optional[str] = None

    @model_validator(mode="after")
    def _fields_of_set(self) -> "MoleculesSource":
        # compared with the defaults, not with the fields given: a resolved study (study.json) gives all
        defaults = {f: type(self).model_fields[f].default for f in ("n_conformers", "method")}
        if self.set == "builtin" and self.path is not None:
            raise ValueError("path: set builtin is made on this machine and reads no file; remove path or use set: qm9 | npz")
        if self.set == "npz" and self.path is None:
            raise ValueError(f"path: set {self.set} reads a file; add path: <file> (relative to the study file)")
        if self.set != "qm9" and self.target is not None:
            raise ValueError("target: only set qm9 has it; remove it")
        for f, default in defaults.items():
            if self.set != "builtin" and getattr(self, f) != default:
                raise ValueError(f"{f}: only set builtin has it; remove it")
        if self.set != "qm9" and self.limit is not None:
            raise ValueError("limit: only set qm9 has it; remove it")
        return self


# Sources of signals on the sphere (DH grids); SO3 models train on the first.
SPHERE_TRAIN_SOURCES = ("spherical_digits",)
SPHERE_SOURCES = ("spherical_digits", "sphere_noise", "sphere_photos")
UNLABELLED_SOURCES = ("gaussian", "sample_images", "sphere_noise", "sphere_photos")

Source = Annotated[
    Union[DigitsSource, RotatedDigitsSource, NpzSource, GaussianSource, PhotoPatchSource, RingSource,
          SphericalDigitsSource, SphereNoiseSource, SpherePhotoSource, MoleculesSource],
    Field(discriminator="source"),
]


class EvalSet(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: Source

    @field_validator("name")
    @classmethod
    def _not_train(cls, v: str) -> str:
        if v == "train":
            raise ValueError("'train' is reserved for the training inputs; choose another eval set name")
        return v


class TrainDataConfig(_Strict):
    """The training data (for ``kind: kernel_regression`` the pool of training candidates)."""

    train: Source
    normalize: Literal["per_image", "none"] = "per_image"
    targets: Literal["one_hot_centred", "one_hot"] = "one_hot_centred"

    @field_validator("train")
    @classmethod
    def _labelled(cls, v):
        if v.source in UNLABELLED_SOURCES:
            raise ValueError(
                f"source {v.source} has no labels; train on digits, rotated_digits, npz, ring or spherical_digits data"
            )
        if v.source in SPHERE_SOURCES and v.L is None:
            raise ValueError(f"L: the training source {v.source} needs its DH grid bandwidth; add L: <bandwidth>, e.g. L: 4")
        return v


class DataConfig(TrainDataConfig):
    """An ensemble study's data: the training data and the eval sets logged beside it."""

    eval: list[EvalSet] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [e.name for e in self.eval]
        dup = {n for n, k in Counter(names).items() if k > 1}
        if dup:
            raise ValueError(f"eval set names must be unique, repeated: {sorted(dup)}")
        sphere = self.train.source in SPHERE_SOURCES
        for e in self.eval:
            if (e.data.source in SPHERE_SOURCES) != sphere:
                want = "spherical_digits, sphere_noise or sphere_photos" if sphere else "a source of images or rings"
                what = "signals on the sphere" if sphere else f"images or rings ({self.train.source})"
                raise ValueError(
                    f"eval.{e.name}: source {e.data.source} does not match the training data, which are {what}; use {want}"
                )
        return self


# Bounds that keep a study file's sizes from turning validation itself into the work: each
# log evaluates every member on every orbit point and writes a row per point, and each unit
# is a Ray task and a Parquet part. Larger studies are split into several study files.
MAX_LOGS = 10_000
MAX_UNITS = 100_000
MAX_MODELS = 100
MAX_DEPTH = 1000  # validate builds each model at three widths: 3.7 s at depth 1000 here, 6.6 s at 10,000


class LogSpaced(_Strict):
    """``count`` steps spaced logarithmically from 1 to ``steps``, plus step 0."""

    count: int = Field(ge=2)


class LogSpacedSizes(_Strict):
    """``count`` training-set sizes spaced logarithmically from ``min`` to ``max`` (rounded, unique)."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> "LogSpacedSizes":
        if self.max < self.min:
            raise ValueError(f"sizes: max {self.max} is below min {self.min}; swap them")
        return self


class DescriptorKernel(_Strict):
    """A molecule-level kernel on a descriptor from chemistry, fitted beside the models
    (``source: molecules`` only; docs/molecules.md). ``kind: coulomb_laplacian``: the sorted
    Coulomb matrix (rows and columns ordered by decreasing row norm, padded to the largest
    molecule) with the Laplacian kernel ``exp(-|x - x'|_1 / sigma)``. ``sigma``: the L1 length
    scale, or ``median`` (the median L1 distance between pool molecules; no targets used)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["coulomb_laplacian"] = "coulomb_laplacian"
    sigma: Union[Literal["median"], float] = "median"

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v):
        if v != "median" and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"sigma {v} must be a positive length scale or median")
        return v


class RegressionConfig(_Strict):
    """Infinite-width kernel regression (``kind: kernel_regression``): learning curves of NTK
    and NNGP predictors over training-set sizes, several seeded draws per size."""

    test: Source
    sizes: Union[list[int], LogSpacedSizes]
    draws: int = Field(10, ge=1)
    kernels: list[Literal["ntk", "nngp"]] = Field(default_factory=lambda: ["ntk", "nngp"], min_length=1)
    times: list[Union[Literal["inf"], float]] = Field(default_factory=lambda: ["inf"], min_length=1)
    diag_reg: float = Field(1e-4, ge=0)
    block_size: int = Field(100, ge=1)
    # Molecules only: a baseline fitted on each draw's training subset, the kernel regresses
    # the rest: per_element (energy linear in the element counts; the default), mean, none.
    baseline: Optional[Literal["per_element", "mean", "none"]] = None
    # Molecules only: descriptor kernels from chemistry compared with the models on the same draws.
    descriptors: list[DescriptorKernel] = Field(default_factory=list)

    @field_validator("test")
    @classmethod
    def _labelled(cls, v):
        if v.source in UNLABELLED_SOURCES:
            raise ValueError(f"source {v.source} has no labels; test on digits, rotated_digits, npz or ring data")
        return v

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if isinstance(v, list):
            if not v or any(n < 1 for n in v):
                raise ValueError(f"sizes {v} must be positive integers, e.g. [10, 50, 200] or {{min: 10, max: 500, count: 8}}")
            if len(set(v)) != len(v):
                raise ValueError("sizes must not repeat")
        return v

    @field_validator("times")
    @classmethod
    def _times(cls, v):
        for t in v:
            if t != "inf" and not (t > 0):
                raise ValueError(f"time {t} must be positive (or inf for kernel regression)")
        return v

    @field_validator("kernels")
    @classmethod
    def _kernels(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("kernels must not repeat")
        return v

    @property
    def resolved_sizes(self) -> list[int]:
        if isinstance(self.sizes, list):
            return sorted(self.sizes)

        return sorted({int(round(s)) for s in np.geomspace(self.sizes.min, self.sizes.max, self.sizes.count)})

    def resolved_baseline(self, molecular: bool) -> Optional[str]:
        return (self.baseline or "per_element") if molecular else None

    @property
    def resolved_times(self) -> list[float]:
        return [math.inf if t == "inf" else float(t) for t in self.times]


class Resources(_Strict):
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class StudyBase(_Strict):
    """What a study of every kind has: its name, seed, data, models and how to run them.

    Each kind subclasses it with its own fields and checks (``EnsembleStudy``,
    ``RegressionStudy``); the file's ``kind`` picks the subclass (``Study``). A field of
    another kind is refused by name with the fix (``FOREIGN``); one given as null counts as
    left out, as before the kinds had a schema each (their study.json lists both kinds' fields).
    """

    # The refusal of a field that only kind ``owner`` has: {field}, {owner}, {kind} (this one).
    FOREIGN: ClassVar[str]

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: TrainDataConfig
    group: str = "C4"
    models: list[dict] = Field(min_length=1)
    # Group SO3: the number K of seeded rotations (identity first) on which every SO3 model's
    # eval inputs are logged; default 8 (study.groups.SO3Group). A model may override it.
    rotations: Optional[int] = Field(None, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resources: Resources = Resources()
    store_members: bool = False
    max_retries: int = Field(3, ge=0)

    @classmethod
    def kind_name(cls) -> str:
        return cls.model_fields["kind"].default

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Left out unset, so the resolved study (study.json) of studies that do not use them is unchanged.
        out = handler(self)
        for k in ("rotations", "pairing"):
            if k in out and out[k] is None:
                del out[k]
        return out

    @model_validator(mode="before")
    @classmethod
    def _fields_of_other_kinds(cls, raw):
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key in list(raw):
            owner = next((k for k, m in KIND_SCHEMAS.items() if key in m.model_fields and key not in cls.model_fields), None)
            if owner is None:
                continue
            if raw[key] is not None:
                raise ValueError(cls.FOREIGN.format(field=key, owner=owner, kind=cls.kind_name()))
            del raw[key]
        return cls._given(raw)

    @classmethod
    def _given(cls, raw: dict) -> dict:
        """The kind's own look at the raw fields, before they are parsed."""
        return raw

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        return group_name(v)

    @model_validator(mode="after")
    def _check(self) -> "StudyBase":
        if len(self.models) > MAX_MODELS:
            raise ValueError(f"models: {len(self.models)} models is more than {MAX_MODELS} (each is built and priced "
                             "before any work); split the study into several files")
        self._check_fields()
        specs = self.model_specs  # validates every model
        for i, spec in enumerate(specs):
            if spec.depth > MAX_DEPTH:
                raise ValueError(f"models.{i}.depth: {spec.depth} layers is more than {MAX_DEPTH} (each model is built "
                                 "three times to size its units before any work); use at most that")
        self._check_specs(specs)
        for i, m in enumerate(self.models):
            ws = m.get("widths")
            if ws is not None and (
                not isinstance(ws, list) or not ws or any(not isinstance(w, int) or w <= 0 for w in ws)
            ):
                raise ValueError(f"models.{i}.widths: {ws} must be a list of positive integers, e.g. [16, 64, 256]")
            lr = m.get("lr")
            if lr is not None:
                for x in lr if isinstance(lr, list) else [lr]:
                    if not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)):
                        raise ValueError(f"models.{i}.lr: learning rate {x} must be positive and finite")
            m_size = m.get("ensemble_size")
            if m_size is not None and (not isinstance(m_size, int) or m_size < 2):
                raise ValueError(f"models.{i}.ensemble_size: {m_size} is below 2; a variance needs at least 2 members")
        names = [m.name for m in specs]
        dup = {n for n, k in Counter(names).items() if k > 1}
        if dup:
            raise ValueError(f"model names must be unique, repeated: {sorted(dup)}")
        if self.rotations is not None and not any(s.so3 for s in specs):
            raise ValueError("rotations: only models with group SO3 log a sample of rotations; remove it")
        self._check_data(specs)
        return self

    def _check_fields(self) -> None:
        """The kind's fields among themselves (before the models are checked)."""

    def _check_specs(self, specs: list[ModelSpec]) -> None:
        """The models, as this kind uses them."""

    def _check_data(self, specs: list[ModelSpec]) -> None:
        """The data sources, as this kind and its models use them."""

    @property
    def model_specs(self) -> list[ModelSpec]:
        out = []
        for i, m in enumerate(self.models):
            m = dict(m)
            m.pop("widths", None)
            m.pop("lr", None)
            m.pop("ensemble_size", None)
            for k, v in self._model_defaults().items():
                m.setdefault(k, v)
            if self.rotations is not None and _is_so3(m["group"]):
                m.setdefault("rotations", self.rotations)
            try:
                out.append(ModelSpec(**m))
            except ValidationError as e:
                raise ValueError(_first_error(e, prefix=f"models.{i}")) from None
        return out

    def _model_defaults(self) -> dict:
        """Study-level values of model fields, for the models that do not set them."""
        return {"group": self.group}

    def check_inputs(self, input_shape: tuple, origin: str, n_train: Optional[int] = None) -> None:
        """Raise StudyError when a model cannot take inputs of ``input_shape`` (no batch axis),
        or (given ``n_train``, the number of training samples) its SGD batch is larger than its training set."""
        for i, spec in enumerate(self.model_specs):
            try:
                check_model_input(spec, input_shape, n_train)
            except ValueError as e:
                raise StudyError(f"{origin}: models.{i}.{e}") from None

    def _override(self, model_name: str, key: str):
        for m in self.models:
            if m.get("name") == model_name and key in m:
                return m[key]
        return None


class EnsembleStudy(StudyBase):
    """``kind: ensemble`` (the default): finite ensembles of every model at every width and
    learning rate, trained and logged against the analytic predictions."""

    FOREIGN: ClassVar[str] = "{field}: only used by kind: {owner}; remove it or set kind: {owner}"

    kind: Literal["ensemble"] = "ensemble"
    data: DataConfig
    widths: list[int] = Field(min_length=1)
    ensemble_size: int
    members_per_unit: Optional[int] = None
    lr: Union[float, list[float]]
    steps: int = Field(ge=1)
    log_steps: Union[list[int], LogSpaced]
    # Every model's ``pairing`` unless it sets its own (study.spec: independent | antithetic).
    pairing: Optional[Pairing] = None

    @field_validator("widths")
    @classmethod
    def _widths(cls, v):
        for w in v:
            if w <= 0:
                raise ValueError(f"width {w} must be a positive integer, e.g. widths: [64, 256, 1024]")
        if len(set(v)) != len(v):
            raise ValueError("widths must not repeat")
        return sorted(v)

    @field_validator("ensemble_size")
    @classmethod
    def _ensemble(cls, v):
        if v < 2:
            raise ValueError(f"ensemble_size {v} is below 2: a variance needs at least 2 members")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v):
        for x in v if isinstance(v, list) else [v]:
            if not (x > 0 and math.isfinite(x)):
                raise ValueError(f"learning rate {x} must be positive and finite")
        return v

    def _check_fields(self) -> None:
        if self.members_per_unit is not None and not (1 <= self.members_per_unit <= self.ensemble_size):
            raise ValueError(
                f"members_per_unit {self.members_per_unit} must be between 1 and ensemble_size {self.ensemble_size}"
            )
        logs = self.log_steps.count if isinstance(self.log_steps, LogSpaced) else len(self.log_steps)
        if logs > MAX_LOGS:
            raise ValueError(
                f"log_steps: {logs} logs is more than {MAX_LOGS} (each evaluates every member on every eval point); "
                "log fewer steps, e.g. log_steps: {count: 16}"
            )
        if isinstance(self.log_steps, list):
            bad = [s for s in self.log_steps if s < 0 or s > self.steps]
            if bad:
                raise ValueError(
                    f"log_steps {bad} lie outside the run (0..{self.steps}); drop them or raise steps"
                )

    def _model_defaults(self) -> dict:
        return {**super()._model_defaults(), **({"pairing": self.pairing} if self.pairing else {})}

    def _check_specs(self, specs: list[ModelSpec]) -> None:
        units = sum(len(self.widths_of(s.name)) * len(self.lrs_of(s.name))
                    * -(-self.ensemble_size_of(s.name) // min(self.unit_size, self.ensemble_size_of(s.name)))
                    for s in specs)
        if units > MAX_UNITS:
            raise ValueError(
                f"members_per_unit: the study expands to {units} work units, more than {MAX_UNITS}; "
                "raise members_per_unit, or lower ensemble_size or the number of widths and learning rates"
            )
        # antithetic pairs are members (2k, 2k + 1): whole pairs in the ensemble and in every unit
        for i, spec in enumerate(specs):
            if spec.pairing != "antithetic":
                continue
            size = self.ensemble_size_of(spec.name)
            if size % 2:
                raise ValueError(
                    f"models.{i}.ensemble_size: {size} members of {spec.name} do not form antithetic pairs; "
                    f"use an even size such as {size + 1}"
                )
            if self.unit_size < size and self.unit_size % 2:
                raise ValueError(
                    f"members_per_unit: {self.unit_size} would split antithetic pairs of {spec.name} between units; "
                    f"use an even number such as {self.unit_size + 1}"
                )

    def _check_data(self, specs: list[ModelSpec]) -> None:
        so3 = [s for s in specs if s.so3]
        if so3 and self.data.train.source not in SPHERE_TRAIN_SOURCES:
            raise ValueError(
                f"data.train: model {so3[0].name} ({so3[0].arch}) needs signals on the sphere; "
                f"use source {' or '.join(SPHERE_TRAIN_SOURCES)}"
            )
        # source molecules (energies, per-atom models) is only the pool and test set of kernel regression
        for e in self.data.eval:
            if e.data.source == "molecules":
                raise ValueError(f"data.eval.{e.name}: source molecules is only for kind: kernel_regression (data.train, regression.test)")
        if self.data.train.source == "molecules":
            raise ValueError("data.train: source molecules is only for kind: kernel_regression; set kind: kernel_regression")

    def widths_of(self, model_name: str) -> list[int]:
        """A model's own ``widths`` (when its entry gives them), else the study's."""
        own = self._override(model_name, "widths")
        return sorted(own) if own is not None else self.widths

    def lrs_of(self, model_name: str) -> list[float]:
        """A model's own ``lr`` (a number or a list, when its entry gives one), else the study's."""
        own = self._override(model_name, "lr")
        if own is None:
            return self.lrs
        return [float(x) for x in (own if isinstance(own, list) else [own])]

    def ensemble_size_of(self, model_name: str) -> int:
        """A model's own ``ensemble_size`` (when its entry gives one), else the study's."""
        own = self._override(model_name, "ensemble_size")
        return int(own) if own is not None else self.ensemble_size

    @property
    def lrs(self) -> list[float]:
        return list(self.lr) if isinstance(self.lr, list) else [self.lr]

    @property
    def resolved_log_steps(self) -> list[int]:
        if isinstance(self.log_steps, list):
            steps = set(self.log_steps)
        else:
            steps = {int(round(s)) for s in np.geomspace(1, self.steps, self.log_steps.count)}
        steps.add(0)
        return sorted(steps)

    @property
    def unit_size(self) -> int:
        return self.members_per_unit or self.ensemble_size


class RegressionStudy(StudyBase):
    """``kind: kernel_regression``: learning curves of the infinite-width NTK and NNGP
    predictors (``regression``); no network is trained, so no widths, steps or eval sets."""

    FOREIGN: ClassVar[str] = "{field}: not used by kind: {kind}; remove it (training-set sizes go in regression.sizes)"

    kind: Literal["kernel_regression"] = "kernel_regression"
    regression: RegressionConfig

    @classmethod
    def _given(cls, raw: dict) -> dict:
        if raw.get("regression") is None:
            raise ValueError("regression: required for kind: kernel_regression; add it (test, sizes, draws; see docs/study.md)")
        data = raw.get("data")
        if isinstance(data, dict) and "eval" in data:
            if data["eval"]:
                raise ValueError("data.eval: not used by kind: kernel_regression; remove it (the test set is regression.test)")
            raw["data"] = {k: v for k, v in data.items() if k != "eval"}  # empty: as if left out
        return raw

    def _check_specs(self, specs: list[ModelSpec]) -> None:
        for i in range(len(specs)):
            for f in ("loss", "optimizer", "batch_size", "pairing"):
                if f in self.models[i]:
                    raise ValueError(
                        f"models.{i}.{f}: kernel_regression studies fit kernels, they train no network; remove {f}"
                    )
            spec = specs[i]
            if spec.augmentation != "none" and not kernel_jointly_invariant(spec):
                raise ValueError(
                    f"models.{i}.tap_variance: kernel regression of the augmented {spec.name} uses the orbit-averaged "
                    "kernel, its mean only when the kernel is jointly invariant (docs/theory.md §3.4); give it a "
                    "filter_support and tap_variance the group maps onto themselves"
                )

    def _check_data(self, specs: list[ModelSpec]) -> None:
        """``source: molecules`` (energies, per-atom models) for both the pool and the test set, or neither."""
        mol_train = self.data.train.source == "molecules"
        if mol_train != (self.regression.test.source == "molecules"):
            raise ValueError(
                f"regression.test: source {self.regression.test.source} does not match data.train "
                f"({self.data.train.source}); use source molecules for both or for neither"
            )
        if mol_train:
            for f in ("normalize", "targets"):
                if getattr(self.data, f) != type(self.data).model_fields[f].default:
                    raise ValueError(f"data.{f}: not used with source molecules (channels are standardised "
                                     "by the pool's atoms, targets are energies); remove it")
        elif self.regression.baseline is not None:
            raise ValueError("regression.baseline: only for source molecules (energies); remove it")
        elif self.regression.descriptors:
            raise ValueError("regression.descriptors: only for source molecules; remove them")
        names = [s.name for s in specs] + [d.name for d in self.regression.descriptors]
        dup = sorted({n for n, k in Counter(names).items() if k > 1})
        if dup:
            raise ValueError(f"regression.descriptors: name {dup[0]} is taken by a model or another descriptor; rename it")


# Each kind's schema, by the ``kind`` that selects it.
KIND_SCHEMAS: dict[str, type[StudyBase]] = {m.kind_name(): m for m in (EnsembleStudy, RegressionStudy)}


def _kind_of(raw) -> str:
    kind = raw.get("kind", "ensemble") if isinstance(raw, dict) else getattr(raw, "kind", "ensemble")
    return kind if isinstance(kind, str) else repr(kind)


# A study of any kind: ``kind`` (default ensemble) selects its schema.
Study = Annotated[
    Union[Annotated[EnsembleStudy, Tag("ensemble")], Annotated[RegressionStudy, Tag("kernel_regression")]],
    Discriminator(_kind_of),
]
_STUDY = TypeAdapter(Study)

# The ensemble study under its former name, which code that handles only ensembles uses.
StudyConfig = EnsembleStudy


def study_from_dict(raw: dict) -> Study:
    """The study of a mapping of fields (a parsed file, or the ``config`` of a study.json),
    as its kind's schema; raises pydantic's ValidationError."""
    return _STUDY.validate_python(raw)


def _is_so3(group) -> bool:
    try:
        return group_name(group) == SO3_NAME
    except ValueError:
        return False  # ModelSpec names the bad group


def _first_error(e: ValidationError, prefix: str = "") -> str:
    err = e.errors()[0]
    path = err["loc"]
    if path and path[0] in KIND_SCHEMAS and not prefix:  # a study's error is located under its kind's tag
        path = path[1:]
    loc = ".".join(str(p) for p in (prefix, *path) if p != "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":  # the study's kind
        kinds = [repr(k) for k in KIND_SCHEMAS]
        loc = "kind"
        msg = f"{err['input'].get('kind')!r} is not supported; use {', '.join(kinds[:-1])} or {kinds[-1]}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key (a typo?); remove it or check the spelling against docs/study.md"
    elif err["type"] == "missing":
        msg = "required field is missing; add it"
    elif err["type"] in ("literal_error", "enum"):
        msg = f"{err.get('input')!r} is not supported; {msg.replace('Input should be', 'use')}"
    elif err["type"] in ("greater_than", "greater_than_equal", "less_than_equal", "too_short"):
        msg = f"{err.get('input')!r} is out of range; {msg.replace('Input should', 'it must')}"
    elif err["type"].endswith("_type") or err["type"].endswith("_parsing"):
        msg = f"{err.get('input')!r} has the wrong type; {msg.replace('Input should', 'it must')}"
    return f"{loc}: {msg}" if loc else msg


def parse_study(text: str, origin: str = "study") -> Study:
    """Parse and validate YAML text as the schema of its ``kind``; raise StudyError with a one-line message."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise StudyError(f"{origin}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{origin}: a study file must be a YAML mapping of fields (name, data, models, ...)")
    try:
        return study_from_dict(raw)
    except ValidationError as e:
        raise StudyError(f"{origin}: {_first_error(e)}") from None
    except ValueError as e:  # raised by model_specs inside a validator
        raise StudyError(f"{origin}: {e}") from None
    except MemoryError as e:  # a size a validator builds an array of (say a kernel_size of a billion)
        raise StudyError(f"{origin}: checking the study needs more memory than this machine has ({str(e).strip()}); "
                         "lower its sizes") from None


# A study file names fields; its inputs live in data files. Parsing YAML takes about 5 s per
# MB here (PyYAML; measured on a file of 20,000 eval sets), so the size is checked first.
MAX_STUDY_BYTES = 128 * 1024


def load_study(path: Union[str, Path]) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study: file {path} not found; give the path of a study YAML file")
    size = path.stat().st_size
    if size > MAX_STUDY_BYTES:
        raise StudyError(f"{path}: the study file is {size // 1024} kB, more than {MAX_STUDY_BYTES // 1024} kB; a study "
                         "file lists fields, not data: put inputs in an .npz (data.train: {source: npz, path: ...})")
    return parse_study(path.read_text(), origin=str(path))


def builtin_study_path(quick: bool = False) -> Path:
    return Path(__file__).parent / "builtin" / ("quick.yaml" if quick else "builtin.yaml")
