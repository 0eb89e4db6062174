"""``vae.sweep`` and ``params.yaml``'s ``sweep`` section: validation, members against ``dvc.yaml``'s
matrix, each member's parameters, ``sweep-report`` on member folders written here, the sweep's MLflow run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vae import sweep, tracking
from vae.config import Member, Params, PathsConfig, find_member, load_params, params_from_dict
from vae.errors import ConfigError, DataError
from vae.io import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]


def with_sweep(**changes) -> dict:
    """``Params().to_dict()`` with the sweep section's keys replaced by ``changes``."""
    raw = Params().to_dict()
    raw["sweep"].update(changes)
    return raw


def with_settings(dataset: str, section: str, **values) -> dict:
    raw = Params().to_dict()
    raw["sweep"]["settings"][dataset].setdefault(section, {}).update(values)
    return raw


def sweep_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        params_from_dict(raw)
    return str(caught.value)


def sweep_params(**changes) -> Params:
    return params_from_dict(with_sweep(**changes))


# --------------------------------------------------------------------------- validation


def test_unknown_algorithm_is_rejected_naming_it_and_the_algorithms():
    message = sweep_error(with_sweep(algorithms=["aevb", "gibbs"]))
    assert "sweep.algorithms" in message
    assert "'gibbs'" in message
    assert "aevb, wake-sleep" in message


def test_duplicate_seeds_are_rejected():
    message = sweep_error(with_sweep(seeds=[0, 1, 0]))
    assert "sweep.seeds = [0, 1, 0]" in message
    assert "each value once" in message


def test_negative_seed_is_rejected():
    message = sweep_error(with_sweep(seeds=[0, -1]))
    assert "sweep.seeds = [0, -1]" in message
    assert ">= 0" in message


def test_empty_algorithms_are_rejected():
    message = sweep_error(with_sweep(algorithms=[]))
    assert "sweep.algorithms = []" in message
    assert "non-empty list" in message


def test_latent_dims_missing_a_dataset_is_rejected():
    message = sweep_error(with_sweep(latent_dims={"mnist": [3]}))
    assert "sweep.latent_dims = {'mnist': [3]}" in message
    assert "one entry per dataset (mnist, frey)" in message


def test_latent_dims_with_an_unknown_dataset_is_rejected():
    message = sweep_error(with_sweep(latent_dims={"mnist": [3], "frey": [2], "cifar": [4]}))
    assert "sweep.latent_dims" in message
    assert "'cifar': [4]" in message
    assert "one entry per dataset (mnist, frey)" in message


def test_latent_size_zero_is_rejected_as_a_latent_dims_value():
    message = sweep_error(with_sweep(latent_dims={"mnist": [0, 3], "frey": [2]}))
    assert "sweep.latent_dims = {mnist: [0, 3]}" in message
    assert "distinct integers > 0" in message
    # The matrix's latent size, not a setting (settings may not set model.latent_dim at all).
    assert "settings.mnist.model.latent_dim" not in message


def test_a_sweep_without_member_is_rejected():
    message = sweep_error(with_sweep(latent_dims={"mnist": [], "frey": []}))
    assert "sweep.latent_dims = {'mnist': [], 'frey': []}" in message
    assert "no member" in message


def test_an_empty_latent_list_leaves_only_that_dataset_out():
    params = sweep_params(latent_dims={"mnist": [3], "frey": []})
    assert {member.dataset for member in sweep.members(params.sweep)} == {"mnist"}


def test_invalid_member_setting_names_its_full_key_value_and_range():
    message = sweep_error(with_settings("mnist", "train", learning_rate=-1))
    assert "sweep.settings.mnist.train.learning_rate = -1" in message
    assert "> 0" in message
    # Invalid whatever the algorithm: no "(with algorithm aevb)" suggesting wake-sleep would take it.
    assert "with algorithm" not in message


def test_member_setting_invalid_for_one_algorithm_names_that_algorithm():
    message = sweep_error(with_settings("mnist", "train", objective="iwae", samples=5))
    assert "sweep.settings.mnist.train.algorithm = 'wake-sleep'" in message
    assert "objective = 'iwae'" in message
    assert "expected objective: elbo" in message
    assert "(with algorithm wake-sleep)" in message


def test_iwae_setting_is_accepted_when_the_sweep_is_aevb_only():
    raw = with_settings("mnist", "train", objective="iwae", samples=5)
    raw["sweep"]["algorithms"] = ["aevb"]
    params = params_from_dict(raw)
    assert sweep.member_params(params.sweep, sweep.members(params.sweep)[0]).train.objective == "iwae"


def test_latent_dim_in_settings_is_rejected_as_fixed_by_the_matrix():
    message = sweep_error(with_settings("mnist", "model", latent_dim=5))
    assert "sweep.settings.mnist.model.latent_dim = 5" in message
    assert "set by the sweep" in message
    assert "remove it here" in message


def test_setting_problems_of_both_datasets_are_reported_together():
    raw = with_settings("mnist", "model", latent_dim=5)
    raw["sweep"]["settings"]["frey"]["train"]["learning_rate"] = -1
    message = sweep_error(raw)
    assert "sweep.settings.mnist.model.latent_dim = 5" in message
    assert "sweep.settings.frey.train.learning_rate = -1" in message


def test_unknown_section_under_settings_is_rejected():
    message = sweep_error(with_settings("frey", "visualize", seed=1))
    assert "sweep.settings.frey.visualize = {'seed': 1}" in message
    assert "unknown section" in message
    assert "data, model, train, evaluate" in message


def test_unknown_key_in_sweep_suggests_the_closest():
    raw = Params().to_dict()
    raw["sweep"]["algorithm"] = raw["sweep"].pop("algorithms")
    message = sweep_error(raw)
    assert "sweep.algorithm: unknown key" in message
    assert "did you mean 'algorithms'?" in message


def test_repository_params_sweep_is_the_default_quick_sweep():
    loaded = load_params(REPO_ROOT / "params.yaml")
    assert loaded.sweep == Params().sweep
    assert loaded.sweep.size == "quick"


def test_default_sections_are_valid():
    assert params_from_dict(Params().to_dict()) == Params()
    for member in sweep.members(Params().sweep):  # every default member's parameters validate
        assert sweep.member_params(Params().sweep, member).model.latent_dim == member.latent_dim


# --------------------------------------------------------------------------- members and dvc.yaml


def dvc_stages(root: Path) -> list:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return list(repo.index.stages)


def member_stage_names(stages: list) -> list[str]:
    return [stage.name for stage in stages if stage.name.startswith(("sweep-mnist@", "sweep-frey@"))]


def test_members_are_the_repository_dvc_matrix_stages_in_order():
    stages = dvc_stages(REPO_ROOT)
    assert [member.stage for member in sweep.members(load_params(REPO_ROOT / "params.yaml").sweep)] \
        == member_stage_names(stages)


def test_members_follow_dvc_matrix_order_for_seeds_and_a_left_out_dataset(tmp_path: Path):
    from dvc.repo import Repo

    raw = with_sweep(seeds=[1, 0], latent_dims={"mnist": [20, 3], "frey": []})
    params = params_from_dict(raw)
    Repo.init(str(tmp_path), no_scm=True).close()
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    names = member_stage_names(dvc_stages(tmp_path))
    assert len(names) == 8
    assert [member.stage for member in sweep.members(params.sweep)] == names


def test_member_stage_outputs_are_the_member_folders():
    stages = {stage.name: stage for stage in dvc_stages(REPO_ROOT)}
    for member in sweep.members(Params().sweep):
        chosen = sweep.member_params(Params().sweep, member)
        stage = stages[member.stage]
        assert {str(out.def_path) for out in stage.outs} == {str(chosen.paths.checkpoint), chosen.paths.reports}
        assert str(chosen.paths.processed_dir(member.dataset)) in {str(dep.def_path) for dep in stage.deps}


def test_find_member_returns_a_declared_member():
    assert find_member(Params().sweep, "frey", 10, "wake-sleep", 0) == Member("frey", 10, "wake-sleep", 0)


def test_find_member_rejects_an_undeclared_member():
    with pytest.raises(ConfigError) as caught:
        find_member(Params().sweep, "mnist", 5, "aevb", 0)
    message = str(caught.value)
    assert "mnist-z5-aevb-s0" in message
    assert "not declared" in message
    assert "{'mnist': [3, 20], 'frey': [2, 10]}" in message


# --------------------------------------------------------------------------- member parameters


MEMBER = Member("mnist", 3, "wake-sleep", 2)


def test_member_params_are_defaults_with_settings_and_member_values():
    config = sweep_params(seeds=[0, 2]).sweep
    chosen = sweep.member_params(config, MEMBER).to_dict()
    expected = Params().to_dict()
    expected["evaluate"].update(ais_test_examples=0, ais_train_examples=0, bdmc_examples=0)  # off unless asked
    for section, values in [*config.settings["mnist"].items(), *config.operational.items()]:
        expected[section].update(values)
    expected["data"]["dataset"] = "mnist"
    expected["model"]["latent_dim"] = 3
    expected["train"].update(algorithm="wake-sleep", seed=2)
    for section in ("data", "model", "train", "evaluate", "visualize"):
        assert chosen[section] == expected[section], section
    assert chosen["profile"] == "sweep-quick"


def test_a_member_runs_ais_only_where_its_settings_ask():
    config = params_from_dict(with_settings("mnist", "evaluate", ais_test_examples=4, ais_temperatures=50)).sweep
    chosen = sweep.member_params(config, MEMBER).evaluate
    assert (chosen.ais_test_examples, chosen.ais_temperatures, chosen.bdmc_examples) == (4, 50, 0)


def test_member_paths_are_under_the_sweep_folders():
    paths = PathsConfig(raw="r", processed="p", models="m", reports="out")
    chosen = sweep.member_params(Params().sweep, MEMBER, paths).paths
    assert chosen == PathsConfig(raw="r/sweep", processed="p/sweep", models="m/sweep/mnist-z3-wake-sleep-s2",
                                 reports="out/sweep/members/mnist-z3-wake-sleep-s2")
    assert chosen.processed_dir("mnist") == Path("p/sweep/mnist")


def test_member_model_and_report_folders_are_distinct():
    all_members = sweep.members(sweep_params(seeds=[0, 1]).sweep)
    chosen = [sweep.member_params(Params().sweep, member).paths for member in all_members]
    assert len({paths.models for paths in chosen}) == len({paths.reports for paths in chosen}) == len(all_members)


def test_member_params_do_not_depend_on_the_main_sections():
    main = Params().to_dict()
    main["train"]["learning_rate"] = 0.5
    main["model"]["hidden_dim"] = 17
    main["data"].update(dataset="frey", binarization="none")
    changed = params_from_dict(main)
    member = Member("mnist", 3, "aevb", 0)
    assert sweep.member_params(changed.sweep, member, changed.paths) == sweep.member_params(Params().sweep, member)


def test_sweep_id_changes_with_the_sweep_section_only():
    main = Params().to_dict()
    main["train"]["learning_rate"] = 0.5
    assert sweep.sweep_id(params_from_dict(main).sweep) == sweep.sweep_id(Params().sweep)
    assert sweep.sweep_id(sweep_params(seeds=[0, 1]).sweep) != sweep.sweep_id(Params().sweep)
    assert sweep.sweep_id(params_from_dict(with_settings("frey", "train", learning_rate=0.01)).sweep) \
        != sweep.sweep_id(Params().sweep)
    assert len(sweep.sweep_id(Params().sweep)) == 12


# --------------------------------------------------------------------------- sweep-report


def report_params(tmp_path: Path) -> Params:
    params = sweep_params(latent_dims={"mnist": [3], "frey": [2]}, seeds=[0, 1])
    return params.replace(paths=PathsConfig(reports=str(tmp_path / "reports")))


def member_values(member: Member) -> dict:
    """Numbers that tell members apart: the seed shifts ELBO by 2, the algorithm by 10."""
    base = -100.0 - 10 * (member.algorithm == "wake-sleep") - member.latent_dim
    return {"train_elbo": base - 2 * member.seed, "test_elbo": base - 2 * member.seed - 1}


def write_member(params: Params, member: Member) -> Path:
    """The member's folder as its stage writes it: metrics.json (the numbers only, as vae.evaluate
    writes them: no wall time, no run id), train_summary.json, member.json, elbo_curve.csv."""
    folder = Path(sweep.sweep_paths(params.paths, member).reports)
    folder.mkdir(parents=True)
    values = member_values(member)
    (folder / "metrics.json").write_text(json.dumps({
        "dataset": member.dataset, "latent_dim": member.latent_dim, "algorithm": member.algorithm,
        "examples_seen": 2000, **values, "importance_samples": 100,
        "test_log_likelihood": values["test_elbo"] + 3, "test_log_likelihood_stderr": 0.25 + member.seed,
        "active_units": member.latent_dim}))
    (folder / "train_summary.json").write_text(json.dumps({"dataset": member.dataset}))
    (folder / "member.json").write_text(json.dumps({"member": member.name, "threads": 1}))
    pd.DataFrame({"examples_seen": [1000, 2000],
                  "train_elbo": [values["train_elbo"] - 5, values["train_elbo"]],
                  "valid_elbo": [0.0, 0.0],
                  "test_elbo": [values["test_elbo"] - 5, values["test_elbo"]]}).to_csv(folder / "elbo_curve.csv",
                                                                                        index=False)
    return folder


@pytest.fixture
def report_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.setenv(tracking.TRACKING_ENV, "off")
    params = report_params(tmp_path)
    for member in sweep.members(params.sweep):
        write_member(params, member)
    return params


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The arguments each call of vae.visualize.lower_bound_sweep got (no figure drawn)."""
    import vae.visualize

    calls = []
    monkeypatch.setattr(vae.visualize, "lower_bound_sweep", lambda runs, path, seeds=1: calls.append((runs, seeds)))
    return calls


def test_report_table_has_one_row_per_member_in_member_order(report_setup: Params, drawn: list):
    outputs = sweep.run_report(report_setup, progress=False)
    table = pd.read_csv(outputs["table"])
    assert Path(outputs["table"]) == Path(report_setup.paths.reports) / "sweep" / "sweep_results.csv"
    assert list(table.columns) == sweep.RESULT_COLUMNS
    assert list(table["member"]) == [member.name for member in sweep.members(report_setup.sweep)]
    assert list(table["member"])[:2] == ["mnist-z3-aevb-s0", "mnist-z3-aevb-s1"]
    assert len(table) == 8


def test_report_table_copies_each_members_files(report_setup: Params, drawn: list):
    table = pd.read_csv(sweep.run_report(report_setup, progress=False)["table"]).set_index("member")
    row = table.loc["frey-z2-wake-sleep-s1"]
    member = Member("frey", 2, "wake-sleep", 1)
    values = member_values(member)
    assert (row["dataset"], row["latent_dim"], row["algorithm"], row["seed"]) == ("frey", 2, "wake-sleep", 1)
    assert row["train_elbo"] == values["train_elbo"]
    assert row["test_elbo"] == values["test_elbo"]
    assert row["test_log_likelihood"] == values["test_elbo"] + 3
    assert row["test_log_likelihood_stderr"] == 1.25
    assert (row["examples_seen"], row["importance_samples"], row["active_units"]) == (2000, 100, 2)


def test_report_table_holds_no_time_host_or_run_id(report_setup: Params, drawn: list):
    """sweep_results.csv is a DVC output: what varies between two identical sweeps (when, where,
    which MLflow run) is in MLflow only, so the table's bytes are the same for the same members."""
    first = Path(sweep.run_report(report_setup, progress=False)["table"]).read_bytes()
    header = first.decode().splitlines()[0].split(",")
    assert not {"train_seconds", "evaluate_seconds", "started", "finished", "host", "mlflow_run_id"} & set(header)
    assert Path(sweep.run_report(report_setup, progress=False)["table"]).read_bytes() == first


def test_report_averages_the_seeds_of_each_group(report_setup: Params, drawn: list):
    sweep.run_report(report_setup, progress=False)
    (runs, seeds), = drawn
    assert seeds == 2
    assert [(run.dataset, run.latent_dim, run.algorithm) for run in runs] == [
        ("mnist", 3, "aevb"), ("mnist", 3, "wake-sleep"), ("frey", 2, "aevb"), ("frey", 2, "wake-sleep")]
    run = runs[1]
    seed0, seed1 = (member_values(Member("mnist", 3, "wake-sleep", seed)) for seed in (0, 1))
    assert list(run.curves["examples_seen"]) == [1000, 2000]
    assert list(run.curves["train_elbo"]) == pytest.approx(
        [(seed0["train_elbo"] + seed1["train_elbo"]) / 2 - 5, (seed0["train_elbo"] + seed1["train_elbo"]) / 2])
    assert list(run.curves["test_elbo"]) == pytest.approx(
        [(seed0["test_elbo"] + seed1["test_elbo"]) / 2 - 5, (seed0["test_elbo"] + seed1["test_elbo"]) / 2])
    assert (run.binarization, runs[2].binarization, run.name) == ("dynamic", "none", "mnist-z3-wake-sleep")


def test_report_draws_the_figure(report_setup: Params):
    outputs = sweep.run_report(report_setup, progress=False)
    figure = Path(outputs["figure"])
    assert figure == Path(report_setup.paths.reports) / "sweep" / "lower_bound_sweep.png"
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("name", ["metrics.json", "train_summary.json", "member.json", "elbo_curve.csv"])
def test_report_names_a_missing_member_file_and_its_stage(report_setup: Params, drawn: list, name: str):
    member = Member("frey", 2, "wake-sleep", 1)
    missing = Path(sweep.sweep_paths(report_setup.paths, member).reports) / name
    missing.unlink()
    with pytest.raises(DataError) as caught:
        sweep.run_report(report_setup, progress=False)
    message = str(caught.value)
    assert str(missing) in message
    assert "dvc repro sweep-frey@2-wake-sleep-1" in message
    assert drawn == []


def test_lower_bound_sweep_rejects_no_runs(tmp_path: Path):
    from vae.visualize import lower_bound_sweep

    with pytest.raises(ValueError, match="no runs"):
        lower_bound_sweep([], tmp_path / "figure.png")
    assert not (tmp_path / "figure.png").exists()


def test_lower_bound_sweep_rejects_a_run_without_rows(tmp_path: Path):
    from vae.visualize import SweepCurves, lower_bound_sweep

    empty = SweepCurves(name="mnist-z3-aevb", dataset="mnist", binarization="dynamic", latent_dim=3,
                        curves=pd.DataFrame(columns=["examples_seen", "train_elbo", "test_elbo"]))
    with pytest.raises(ValueError, match=r"lower_bound_sweep: mnist-z3-aevb has no evaluated pass"):
        lower_bound_sweep([empty], tmp_path / "figure.png")


# --------------------------------------------------------------------------- MLflow (the conftest's store)


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.store_uri())


def runs_tagged(identity: str) -> list:
    client = mlflow_client()
    experiment = client.get_experiment_by_name(sweep.EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{sweep.SWEEP_TAG}` = '{identity}'")


def test_sweep_run_is_created_once_per_sweep_declaration():
    params = sweep_params(seeds=[11])  # a sweep no other test declares
    identity = sweep.sweep_id(params.sweep)
    assert runs_tagged(identity) == []
    run_id = sweep.sweep_run(params)
    assert [run.info.run_id for run in runs_tagged(identity)] == [run_id]
    assert sweep.sweep_run(params) == run_id
    assert len(runs_tagged(identity)) == 1
    assert mlflow_client().get_run(run_id).data.tags["members"] == "8"


def test_sweep_run_is_none_with_tracking_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(tracking.TRACKING_ENV, "off")
    assert sweep.sweep_run(sweep_params(seeds=[12])) is None


def test_complete_parent_run_adopts_children_and_finishes_the_parent(tmp_path: Path):
    parent = sweep.sweep_run(sweep_params(seeds=[13]))
    client = mlflow_client()
    experiment_id = client.get_run(parent).info.experiment_id
    children = [client.create_run(experiment_id, run_name=f"member-{i}").info.run_id for i in range(2)]
    artifact = tmp_path / "sweep_results.csv"
    artifact.write_text("member\n", encoding="utf-8")
    assert client.get_run(parent).info.status == "RUNNING"
    tracking.complete_parent_run(parent, children, artifacts=[artifact], artifact_path="sweep")
    for child in children:
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    assert [item.path for item in client.list_artifacts(parent, "sweep")] == ["sweep/sweep_results.csv"]


def test_report_with_tracking_makes_the_members_children_of_the_sweep_run(tmp_path: Path):
    params = report_params(tmp_path).replace(
        sweep=sweep_params(latent_dims={"mnist": [3], "frey": []}, seeds=[14]).sweep)
    client = mlflow_client()
    parent = sweep.sweep_run(params)
    experiment_id = client.get_run(parent).info.experiment_id
    children, evaluations = {}, {}
    first = sweep.members(params.sweep)[0]
    for member in sweep.members(params.sweep):
        folder = write_member(params, member)
        children[member] = client.create_run(experiment_id, run_name=member.name).info.run_id
        # As vae.evaluate tags the run it logged to; for one member a re-evaluation's child run, whose
        # training run (the one to adopt) is its vae.trained_run_id.
        digest = {tracking.METRICS_TAG: file_sha256(folder / "metrics.json")}
        if member == first:
            evaluations[member] = client.create_run(experiment_id, run_name=f"{member.name}-evaluate", tags={
                tracking.TRAINED_RUN_TAG: children[member], **digest}).info.run_id
        else:
            client.set_tag(children[member], tracking.METRICS_TAG, digest[tracking.METRICS_TAG])
    assert evaluations
    assert sweep.member_runs(params) == {member.name: run_id for member, run_id in children.items()}
    sweep.run_report(params, progress=False)
    assert {client.get_run(run_id).data.tags.get("mlflow.parentRunId") for run_id in children.values()} == {parent}
    assert client.get_run(parent).info.status == "FINISHED"
    assert {item.path for item in client.list_artifacts(parent, "sweep")} == {"sweep/lower_bound_sweep.png",
                                                                                "sweep/sweep_results.csv"}
