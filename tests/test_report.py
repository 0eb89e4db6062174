"""The report stage on files the test writes: values are escaped, images embedded, numbers shown."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from vae import report
from vae.config import Params, PathsConfig
from vae.errors import VaeError

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture
def written(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    (reports / "figures").mkdir(parents=True)
    for name in ("samples", "elbo_curves", "lower_bound_runs", "prior_samples_by_latent_dim"):
        (reports / "figures" / f"{name}.png").write_bytes(PNG_1x1)
    run = {"run_id": "abc123", "name": HOSTILE, "dataset": "mnist", "binarization": "dynamic", "profile": "quick",
           "latent_dim": 5, "current": False, "held_out": "validation", "points": 3}
    this = {**run, "run_id": None, "name": "this run", "latent_dim": 20, "current": True, "held_out": "test"}
    (reports / "figures" / "figure_runs.json").write_text(json.dumps(
        {"lower_bound_runs": [run, this], "prior_samples_by_latent_dim": [run, this]}))
    metrics = {
        "dataset": "mnist", "binarization": "dynamic", "latent_dim": 20, "hidden_dim": 500, "epochs": 3,
        "importance_samples": 50, "test_examples": 100, "test_log_likelihood": -97.1234,
        "test_log_likelihood_stderr": 0.4321, "test_elbo": -101.5, "train_examples_evaluated": 200,
        "train_log_likelihood": -96.25, "train_log_likelihood_stderr": 0.5, "train_test_gap": 0.87,
        "train_elbo": -100.0, "valid_elbo": -101.0, "active_units": 17,
        "bound_curve": {"1": -101.6, "5": -99.3, "50": -97.1234},
        "train_seconds": 12.0, "evaluate_seconds": 3.0,
    }
    (reports / "metrics.json").write_text(json.dumps(metrics))
    summary = {"train_examples": 50000, "examples_seen": 150000, "device": HOSTILE, "mlflow_run_id": None}
    (reports / "train_summary.json").write_text(json.dumps(summary))
    paths = PathsConfig(raw=HOSTILE, reports=str(reports))
    params = dataclasses.replace(Params(), paths=paths)
    report.run(params, progress=False)
    return reports, metrics


def test_html_escapes_values_and_embeds_images(written) -> None:
    reports, metrics = written
    html = (reports / "report.html").read_text()
    assert HOSTILE not in html and "<script>" not in html
    assert "&lt;script&gt;" in html
    # Figure 5 present: samples.png (the same draws as this run's panel) is not shown twice.
    assert html.count("data:image/png;base64,") == 3
    assert "cf. AEVB Figure 2" in html and "cf. AEVB Figure 5" in html and 'alt="Samples from the prior"' not in html
    assert html.index("cf. AEVB Figure 2") < html.index("This run&#39;s training curves") < html.index("cf. AEVB Figure 5")
    assert "Shown: N_z = 5, N_z = 20 (this run)." in html
    assert "Dotted: validation ELBO" in html  # a run without a per-pass test ELBO is not called test
    assert "abc123 (&lt;script&gt;" in html  # the run name, escaped
    for value in ("-97.12 ± 0.43", "-96.25 ± 0.50", "-101.50", "17 of 20", "-99.30"):
        assert value in html, value
    assert "Table 1" in html  # published numbers of the same (dynamic) binarization
    assert "Table 3" not in html  # static-binarization numbers never shown beside dynamic ones


def test_markdown_escapes_values_and_links_figures(written) -> None:
    reports, _ = written
    markdown = (reports / "report.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all("<script>" not in line for line in table_lines)
    assert "(figures/lower_bound_runs.png)" in markdown and "(figures/elbo_curves.png)" in markdown
    assert "(figures/samples.png)" not in markdown
    assert "abc123 (&lt;script&gt;" in markdown
    assert "-97.12 ± 0.43" in markdown


def test_setup_and_provenance_rows(written) -> None:
    reports, _ = written
    markdown = (reports / "report.md").read_text()
    for row in ("| hardware |", "| software |", "| training wall time | 12.0 s |", "| MLflow run | not tracked |",
                "| reproduce |", "| git commit |"):
        assert row in markdown, row
    assert "| Fig. 2 | 5 | mnist | dynamic | quick | validation | abc123" in markdown


def test_damaged_figure_runs_file_is_named(written) -> None:
    reports, metrics = written
    (reports / "figures" / "figure_runs.json").write_text("[1, 2")
    params = dataclasses.replace(Params(), paths=PathsConfig(reports=str(reports)))
    with pytest.raises(VaeError, match="figure_runs.json: not valid JSON"):
        report.run(params, progress=False)


def test_markdown_escape() -> None:
    assert report.markdown_escape("a|b") == "a\\|b"
    assert report.markdown_escape("<b>x</b>\nnext") == "&lt;b&gt;x&lt;/b&gt; next"


def test_tracking_uri_in_reports_masks_credentials(monkeypatch) -> None:
    from vae.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org/path")
    assert tracking_uri() == "https://***@mlflow.example.org/path"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri().startswith("sqlite:///") and tracking_uri().endswith("mlflow.db")


def test_figures_show_at_their_physical_size(tmp_path) -> None:
    """A matplotlib figure of 6.5 x 4 inches at 300 dpi shows 6.5 * 144 CSS px wide; a PNG that
    states no resolution gets no width (the browser's default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(6.5, 4.0))
    figure.savefig(tmp_path / "f.png", dpi=300)
    plt.close(figure)
    data = (tmp_path / "f.png").read_bytes()
    assert int.from_bytes(data[16:20], "big") == 1950  # pixels
    assert report.display_width(data) == round(6.5 * report.SCREEN_PX_PER_INCH) == 936
    assert report.display_width(PNG_1x1) is None
    with pytest.raises(ValueError, match="not a PNG"):
        report.display_width(b"GIF89a" + bytes(30))


def test_a_rewritten_dvc_lock_alone_is_not_an_uncommitted_change(tmp_path, monkeypatch) -> None:
    """`dvc repro` rewrites dvc.lock before the report stage runs: the report's provenance must not
    call the run's code uncommitted for that, but must for any other tracked change."""
    import subprocess

    from vae.tracking import git_dirty

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("profile: quick\n")
    git("add", "-A")
    git("commit", "-qm", "start")
    monkeypatch.chdir(tmp_path)
    assert not git_dirty()
    (tmp_path / "dvc.lock").write_text("stages: {train: {}}\n")
    assert git_dirty() and not git_dirty(ignore=("dvc.lock",))
    (tmp_path / "params.yaml").write_text("profile: aevb-mnist\n")
    assert git_dirty(ignore=("dvc.lock",))


# --------------------------------------------------------------------------- the latent-size sweep

SWEEP_HEADER = ("member,dataset,latent_dim,algorithm,seed,examples_seen,train_elbo,test_elbo,importance_samples,"
                "test_log_likelihood,test_log_likelihood_stderr,active_units,train_seconds,evaluate_seconds,"
                "started,finished,host,mlflow_run_id")
# Written out of order (N_z 20 before 3: a text sort would keep it so); the second member's name is hostile.
SWEEP_ROWS = (
    ("mnist-z20-aevb-s0,mnist,20,aevb,0,200000,-105.123,-106.456,100,-101.789,0.2345,12,61.25,4.5,"
     "2024-05-01T10:00:00.000+00:00,2024-05-01T10:01:05.000+00:00,host-a,"),
    ("\"<script>alert('z3'),</script>\",mnist,3,aevb,0,200000,-140.5,-141.25,100,-138.004,0.5,3,33.75,2.5,"
     "2024-05-01T10:00:00.000+00:00,2024-05-01T10:00:40.000+00:00,host-a,run42"),
)


def _write_sweep(reports, rows=SWEEP_ROWS, header=SWEEP_HEADER, figure=PNG_1x1):
    (reports / "sweep").mkdir(exist_ok=True)
    (reports / "sweep" / "lower_bound_sweep.png").write_bytes(figure)
    (reports / "sweep" / "sweep_results.csv").write_text("\n".join([header, *rows]) + "\n")


def _rerun(reports):
    report.run(dataclasses.replace(Params(), paths=PathsConfig(reports=str(reports))), progress=False)
    return (reports / "report.html").read_text(), (reports / "report.md").read_text()


def test_sweep_section_shows_the_figure_and_the_members(written) -> None:
    reports, _ = written
    before = (reports / "report.html").read_text().count("data:image/png;base64,")
    _write_sweep(reports)
    html, markdown = _rerun(reports)
    assert html.count("data:image/png;base64,") == before + 1  # the sweep's figure, embedded
    assert 'alt="Latent-size sweep (cf. AEVB Figure 2)"' in html
    assert html.index("This run&#39;s training curves") < html.index("Latent-size sweep (cf. AEVB Figure 2)") \
        < html.index("Provenance</h2>")
    assert "<h2>5. Provenance</h2>" in html
    assert "The quick sweep (params.sweep.size) with 2 members" in html and "k = 100 importance samples" in html
    assert "has not run" not in html
    for text in (html, markdown):
        assert "<script>" not in text and "&lt;script&gt;alert(" in text  # the hostile member name, escaped
        for value in ("-140.50", "-141.25", "-138.00 ± 0.50", "3 of 3", "33.75",
                      "-105.12", "-106.46", "-101.79 ± 0.23", "12 of 20", "61.25", "200,000"):
            assert value in text, value
        assert text.index("-138.00 ± 0.50") < text.index("-101.79 ± 0.23")  # sorted by N_z: 3 before 20
        assert "200,000 training examples evaluated per member" in text and "not the paper" in text
    assert "test L\\_100 ± s.e." in markdown
    assert "![Latent-size sweep (cf. AEVB Figure 2)](sweep/lower_bound_sweep.png)" in markdown
    assert "## 5. Provenance" in markdown


def test_full_sweep_is_called_the_papers_setup(written) -> None:
    reports, _ = written
    _write_sweep(reports)
    params = dataclasses.replace(Params(), paths=PathsConfig(reports=str(reports)))
    params = dataclasses.replace(params, sweep=dataclasses.replace(params.sweep, size="full"))
    report.run(params, progress=False)
    html = (reports / "report.html").read_text()
    assert "The full sweep (params.sweep.size)" in html and "the paper&#39;s set-up" in html
    assert "not the paper" not in html


def test_report_without_the_sweep_says_how_to_run_it(written) -> None:
    reports, _ = written
    html = (reports / "report.html").read_text()
    markdown = (reports / "report.md").read_text()
    for text in (html, markdown):
        assert "Latent-size sweep (cf. AEVB Figure 2)" not in text
        assert "has not run" in text and "uv run dvc repro sweep-report" in text
    assert "<h2>4. Provenance</h2>" in html and "## 4. Provenance" in markdown


@pytest.mark.parametrize("drop", ["test_log_likelihood_stderr", "latent_dim"])
def test_sweep_results_without_a_column_are_named(written, drop) -> None:
    reports, _ = written
    header = SWEEP_HEADER.split(",")
    index = header.index(drop)
    rows = [",".join(v for i, v in enumerate(row.split(",")) if i != index) for row in SWEEP_ROWS[:1]]
    _write_sweep(reports, rows=rows, header=",".join(h for h in header if h != drop))
    with pytest.raises(VaeError, match=rf"sweep_results\.csv: missing column {drop} ") as caught:
        _rerun(reports)
    assert str(reports / "sweep" / "sweep_results.csv") in str(caught.value)


def test_damaged_sweep_results_are_named(written) -> None:
    reports, _ = written
    _write_sweep(reports, rows=[SWEEP_ROWS[0].replace("-105.123", "lots")])
    with pytest.raises(VaeError, match=r"sweep_results\.csv: column train_elbo: 'lots' is not a number"):
        _rerun(reports)
    _write_sweep(reports, rows=[])
    with pytest.raises(VaeError, match=r"sweep_results\.csv: no members"):
        _rerun(reports)
