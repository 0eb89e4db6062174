"""Which knobs re-run which stages: ``dvc.yaml``'s ``params:`` lists against the knobs of
``params.yaml`` (:class:`vae.config.Params`), checked with DVC itself.

Every knob is either listed under the ``params:`` of each stage whose outputs it changes, or
operational (:data:`vae.config.OPERATIONAL`: it changes no output of any stage) and listed
nowhere. In a temporary git copy of the repository every stage output is a placeholder file that
``dvc commit --force`` records in ``dvc.lock`` with the current knobs (no stage runs); then
changing every operational knob must leave ``dvc status`` clean, and changing a knob that changes
results must make ``dvc status`` name the stages that read it (``dvc repro`` re-runs those and,
their outputs changed, the stages after them). The knobs under ``paths`` are structural: they
move outputs, which DVC sees in the stages' ``outs`` and ``deps`` themselves, so they are left out.

And the claim behind ``train.checkpoint_interval`` being operational: checkpoints after every
pass or never train the same parameters and curves, bit for bit. (``evaluate.memory_budget_mb``
changes estimates by float rounding only: tests/test_evaluate.py and tests/test_objectives.py
check chunking against unchunked estimates.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import typing
from pathlib import Path

import pytest
import torch
import yaml

from support import Pipeline, binary_split, grey_split, one_thread, small_model
from vae.config import (DATASETS, OPERATIONAL, SWEEP_FIXED, SWEEP_SECTIONS, Params, SweepConfig, member_params,
                        members, operational_knobs, params_from_dict)
from vae.errors import ConfigError
from vae.loop import ResumableState
from vae.train import train_model

_SECTIONS = {name: type(getattr(Params(), name)) for name in Params.model_fields if name != "profile"}


# --------------------------------------------------------------------------------------------
# The knobs, and what dvc.yaml lists
# --------------------------------------------------------------------------------------------


def knobs() -> list[str]:
    """Every knob of params.yaml as a dotted key (``train.epochs``), ``paths`` left out (structural);
    the sweep's per-dataset settings down to each knob a member's settings may set."""
    names = ["profile"]
    for section, cls in _SECTIONS.items():
        if section != "paths":
            names += [f"{section}.{key}" for key in cls.model_fields]
    for dataset in DATASETS:
        for section in SWEEP_SECTIONS:
            settable = set(_SECTIONS[section].model_fields) - set(SWEEP_FIXED.get(section, ())) \
                - set(operational_knobs(_SECTIONS[section]))
            names += [f"sweep.settings.{dataset}.{section}.{key}" for key in sorted(settable)]
    return names


def lists(entry: str, knob: str) -> bool:
    """Whether the ``params:`` entry ``entry`` tracks ``knob`` (the knob itself or a section above it)."""
    return knob == entry or knob.startswith(entry + ".")


@contextlib.contextmanager
def dvc_repo(root: Path):
    """DVC's ``Repo`` of ``root``, in-process (its stage cache works relative to the current folder)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def stage_params(root: Path) -> dict[str, list[str]]:
    """Each stage of ``root``'s dvc.yaml (foreach and matrix stages expanded) -> its ``params:`` keys."""
    from dvc.dependency.param import ParamsDependency

    with dvc_repo(root) as repo:
        return {stage.addressing: [key for dep in stage.deps if isinstance(dep, ParamsDependency)
                                   for key in dep.params]
                for stage in repo.index.stages}


def status(root: Path) -> dict:
    """``dvc status`` of ``root``: {stage: what changed}, {} when every stage is up to date."""
    with dvc_repo(root) as repo:
        return repo.status()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A git copy of the repository whose dvc.lock records placeholder outputs of every stage at the
    committed params.yaml (``dvc commit --force``: nothing runs), ``dvc status`` clean."""
    from dvc.dependency.param import ParamsDependency

    pipe = Pipeline.copy_of_repository(tmp_path_factory)
    root = pipe.root
    with dvc_repo(root) as repo:
        stages = list(repo.index.stages)
        outs = {os.path.relpath(out.fs_path, root) for stage in stages for out in stage.outs}
        deps = {os.path.relpath(dep.fs_path, root) for stage in stages for dep in stage.deps
                if not isinstance(dep, ParamsDependency)}
    for out in sorted(outs):  # a folder where another stage's file lies inside it, else a file
        path = root / out
        if any(other.startswith(out + "/") for other in outs | deps):
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"placeholder of {out}\n")
    for dep in sorted(deps):  # files inside an output folder (data/processed/mnist/test.pt)
        if not (root / dep).exists():
            (root / dep).write_text(f"placeholder of {dep}\n")
    with dvc_repo(root) as repo:
        repo.commit(force=True)
    assert status(root) == {}
    pipe.params_text = (root / "params.yaml").read_text()
    pipe.stage_params = stage_params(root)
    return pipe


@contextlib.contextmanager
def changed_params(pipe: Pipeline, raw: dict):
    """``params.yaml`` of ``pipe`` as ``raw`` (validated first) for the block, then as committed."""
    params_from_dict(raw)  # a valid file: the change is one a user could make
    path = pipe.root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(pipe.params_text)


def committed(pipe: Pipeline) -> dict:
    return yaml.safe_load(pipe.params_text)


def set_knob(raw: dict, knob: str, value: typing.Any) -> None:
    *sections, key = knob.split(".")
    for section in sections:
        raw = raw.setdefault(section, {})
    raw[key] = value


# --------------------------------------------------------------------------------------------
# Every knob is tracked where it changes results, or operational and tracked nowhere
# --------------------------------------------------------------------------------------------


def test_every_knob_is_listed_by_a_stage_or_operational(tracked: Pipeline) -> None:
    entries = {entry for listed in tracked.stage_params.values() for entry in listed}
    for knob in knobs():
        listed = any(lists(entry, knob) for entry in entries)
        operational = any(lists(name, knob) for name in OPERATIONAL)
        assert listed != operational, (f"{knob}: listed under a stage's params in dvc.yaml" if listed else
                                       f"{knob}: neither listed under a stage's params in dvc.yaml nor operational")


def test_no_stage_lists_an_operational_knob(tracked: Pipeline) -> None:
    assert set(OPERATIONAL) >= {"train.checkpoint_interval", "evaluate.memory_budget_mb", "sweep.operational"}
    for stage, listed in tracked.stage_params.items():
        for entry in listed:
            touched = [name for name in OPERATIONAL if lists(entry, name) or lists(name, entry)]
            assert not touched, f"dvc.yaml: stage {stage} lists {entry}, which holds operational {touched}"


def test_the_schema_marks_the_operational_knobs() -> None:
    schema = Params.model_json_schema()
    for knob, reason in OPERATIONAL.items():
        section, key = knob.split(".")
        assert schema["$defs"][type(getattr(Params(), section)).__name__]["properties"][key]["x-operational"] == reason
        assert "operational" in Params.model_fields[section].annotation.model_fields[key].description.lower()
    assert set(Params().result_dict()["train"]) == set(Params().train.to_dict()) - {"checkpoint_interval"}
    assert "operational" not in Params().result_dict()["sweep"]


@pytest.mark.parametrize(("section", "key"), [(section, key) for section in SWEEP_SECTIONS
                                              for key in operational_knobs(_SECTIONS[section])])
def test_members_take_operational_knobs_from_sweep_operational_only(section: str, key: str) -> None:
    """DVC tracks each dataset's settings whole, so an operational knob there would re-run members."""
    value = changed(getattr(getattr(Params(), section), key))
    where = rf"sweep\.settings\.mnist\.{section}\.{key} = .*sweep\.operational\.{section}"
    with pytest.raises(ConfigError, match=where):
        params_from_dict({"sweep": {"settings": {**SweepConfig().settings,
                                                 "mnist": {"data": {}, section: {key: value}}}}})
    sweep = params_from_dict({"sweep": {"operational": {section: {key: value}}}}).sweep
    assert all(getattr(getattr(member_params(sweep, member), section), key) == value for member in members(sweep))
    with pytest.raises(ConfigError, match=r"sweep\.operational\.train\.epochs = 3: changes results"):
        params_from_dict({"sweep": {"operational": {"train": {"epochs": 3}}}})


# --------------------------------------------------------------------------------------------
# dvc status after changes
# --------------------------------------------------------------------------------------------


def changed(value: typing.Any) -> typing.Any:
    """Another valid value of an operational knob's type (extend for a new kind of knob)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    raise TypeError(f"no other value for {value!r}: teach changed() this operational knob's type")


def test_changing_every_operational_knob_leaves_dvc_status_clean(tracked: Pipeline) -> None:
    raw = committed(tracked)
    for knob in OPERATIONAL:
        section, key = knob.split(".")
        if knob == "sweep.operational":  # every member's operational knobs, each to another value
            current = Params().sweep.operational
            value = {name: {k: changed(current.get(name, {}).get(k, getattr(getattr(Params(), name), k)))
                            for k in operational_knobs(_SECTIONS[name])}
                     for name in SWEEP_SECTIONS if operational_knobs(_SECTIONS[name])}
        else:
            value = changed(raw[section][key])
        assert value != raw[section][key]
        raw[section][key] = value
    with changed_params(tracked, raw):
        assert status(tracked.root) == {}


MNIST_MEMBERS, FREY_MEMBERS = "sweep-mnist@*", "sweep-frey@*"


@pytest.mark.parametrize(("knob", "value", "stages"), [
    ("profile", "aevb-mnist", {"report"}),  # a label: only the report shows it
    ("data.binarization", "static", {"download", "binarize", "train", "report"}),
    ("data.split_seed", 1, {"binarize", "report"}),
    ("model.hidden_dim", 400, {"train", "report"}),
    ("train.epochs", 31, {"train", "report"}),
    ("train.log_interval", 25, {"train", "visualize", "report"}),
    ("evaluate.importance_samples", 200, {"evaluate", "report"}),
    ("evaluate.ais_temperatures", 100, {"evaluate", "report"}),
    ("visualize.seed", 1, {"visualize", "report"}),
    ("sweep.size", "full", {"report"}),  # a label: only the report shows it
    ("sweep.threads", 2, {MNIST_MEMBERS, FREY_MEMBERS, "report"}),
    # Which members there are: the figures that show them, never the main run or the other members.
    ("sweep.latent_dims.mnist", [3], {"visualize", "sweep-report", "report"}),
    ("sweep.settings.frey.train.curve_points", 30, {FREY_MEMBERS, "report"}),
    ("sweep.settings.mnist.data.eval_subset", 500,
     {"sweep-data@mnist", MNIST_MEMBERS, "sweep-report", "report"}),
])
def test_changing_a_result_knob_changes_the_stages_that_read_it(tracked: Pipeline, knob: str, value: typing.Any,
                                                                 stages: set[str]) -> None:
    raw = committed(tracked)
    set_knob(raw, knob, value)
    expected = {stage for stage in tracked.stage_params if any(fnmatch.fnmatchcase(stage, p) for p in stages)}
    with changed_params(tracked, raw):
        assert set(status(tracked.root)) == expected


# --------------------------------------------------------------------------------------------
# Checkpoints change no result
# --------------------------------------------------------------------------------------------


def test_checkpointing_after_every_pass_or_never_trains_the_same_model(tmp_path: Path) -> None:
    """A checkpoint draws no random number and changes no parameter: the same weights, curves and
    per-step bounds, bit for bit, with a resumable state written after every pass and with none."""
    splits = grey_split(200, 64, seed=21), binary_split(50, 64, seed=22)
    config = {"batch_size": 50, "epochs": 4, "elbo_eval_size": 100, "device": "cpu", "seed": 3}
    results = []
    for interval, state in ((0, ResumableState(tmp_path / "train_state.pt", "fingerprint")), (10**6, None)):
        with one_thread():
            model = small_model(seed=5)
            result = train_model(model, *splits, Params().train.replace(**config, checkpoint_interval=interval),
                                 torch.device("cpu"), progress=False, state=state)
        results.append(result)
    assert (tmp_path / "train_state.pt").is_file()  # the first run did write checkpoints
    every_pass, never = results
    for key, value in every_pass.model.state_dict().items():
        assert torch.equal(value, never.model.state_dict()[key]), key
    assert every_pass.epochs.drop(columns="seconds").equals(never.epochs.drop(columns="seconds"))
    assert every_pass.steps.equals(never.steps)
