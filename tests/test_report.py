"""The report stage on files the test writes: values are escaped, images embedded, numbers shown;
the context holds data only, and both formats state the same text."""

from __future__ import annotations

import base64
import html as html_text
import json
import re

import pytest

from vae import datasets, report
from vae.config import Params, PathsConfig
from vae.errors import VaeError
from vae.io import read_json

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
HOSTILE = "<script>alert('x')</script>"
METRICS = {
    "dataset": "mnist", "binarization": "dynamic", "latent_dim": 20, "hidden_dim": 500, "epochs": 3,
    "importance_samples": 50, "test_examples": 100, "test_log_likelihood": -97.1234,
    "test_log_likelihood_stderr": 0.4321, "test_elbo": -101.5, "train_examples_evaluated": 200,
    "train_log_likelihood": -96.25, "train_log_likelihood_stderr": 0.5, "train_test_gap": 0.87,
    "train_elbo": -100.0, "valid_elbo": -101.0, "active_units": 17,
    "bound_curve": {"1": -101.6, "5": -99.3, "50": -97.1234},
}
FIGURES = ("samples", "elbo_curves", "prior_samples_by_latent_dim")


def _member(name, latent_dim, seed=0, examples_seen=200000):
    """A sweep member as the visualize stage lists it in figure_members.json."""
    return {"member": name, "stage": f"sweep-mnist@{latent_dim}-aevb-{seed}", "dataset": "mnist",
            "binarization": "dynamic", "latent_dim": latent_dim, "algorithm": "aevb", "seed": seed,
            "examples_seen": examples_seen, "train_examples": 10000,
            "checkpoint": f"models/sweep/mnist-z{latent_dim}-aevb-s{seed}/model.pt"}


# Figure 5's members: N_z 5 (its name hostile) and 20 shown, N_z 50 declared but not run.
MEMBERS = {"dataset": "mnist", "algorithm": "aevb",
           "declared": ["sweep-mnist@5-aevb-0", "sweep-mnist@20-aevb-0", "sweep-mnist@50-aevb-0"],
           "not_run": ["sweep-mnist@50-aevb-0"],
           "shown": [_member(HOSTILE, 5, examples_seen=150000), _member("mnist-z20-aevb-s0", 20, seed=1)]}
NO_MEMBERS = {"dataset": "mnist", "algorithm": "aevb", "declared": [], "not_run": [], "shown": []}


def _write_inputs(reports, metrics=METRICS, summary=None, figures=FIGURES, members=MEMBERS):
    """The evaluate, train and visualize stages' outputs in ``reports``; the parameters reading them."""
    (reports / "figures").mkdir(parents=True, exist_ok=True)
    for name in figures:
        (reports / "figures" / f"{name}.png").write_bytes(PNG_1x1)
    (reports / "figures" / "figure_members.json").write_text(json.dumps({"prior_samples_by_latent_dim": members}))
    (reports / "metrics.json").write_text(json.dumps(metrics))
    summary = summary or {"train_examples": 50000, "examples_seen": 150000, "device": HOSTILE, "mlflow_run_id": None}
    (reports / "train_summary.json").write_text(json.dumps(summary))
    return Params().replace(paths=PathsConfig(raw=HOSTILE, reports=str(reports)))


@pytest.fixture
def written(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports)
    report.run(params, progress=False)
    return reports, METRICS


def _context(reports, params=None):
    params = params or Params().replace(paths=PathsConfig(reports=str(reports)))
    return report.build_context(params, read_json(params.paths.metrics), read_json(params.paths.train_summary),
                                params.paths.figures)


def _md_cell(text: str) -> str:
    """A Markdown table cell's text as written before markdown_escape."""
    return html_text.unescape(re.sub(r"\\([|`*_\[\]])", r"\1", text.strip()))


def md_table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells unescaped) of the first table after the line ``heading``, header row excluded."""
    lines = markdown.split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([_md_cell(cell) for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def html_table(page: str, heading: str) -> list[list[str]]:
    """The rows (cells as text; a row of header cells only is left out) of the first table after ``heading``."""
    table = page.split(heading, 1)[1].split("<table>", 1)[1].split("</table>", 1)[0]
    rows = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        cells = re.findall(r"<t([hd])[^>]*>(.*?)</t[hd]>", row, re.S)
        if all(kind == "h" for kind, _ in cells):
            continue
        rows.append([html_text.unescape(re.sub(r"<[^>]+>", "", cell)) for _, cell in cells])
    return rows


def md_figures(markdown: str) -> list[tuple[str, str, str]]:
    """(path, title, caption) of each figure of the Markdown report, in order."""
    return [(path, _md_cell(title), _md_cell(caption)) for path, title, caption in
            re.findall(r"^!\[[^\n]*\]\(([^)\s]+)\)\n\n\*\*(.+?)\.\*\* ([^\n]*)$", markdown, re.M)]


def html_figures(page: str) -> list[tuple[str, str]]:
    """(title, caption) of each figure of the HTML report, in order."""
    return [(html_text.unescape(title), html_text.unescape(caption))
            for title, caption in re.findall(r"<figcaption><b>(.*?)\.</b> (.*?)</figcaption>", page, re.S)]


def test_html_escapes_values_and_embeds_images(written) -> None:
    reports, metrics = written
    html = (reports / "report.html").read_text()
    markdown = (reports / "report.md").read_text()
    assert HOSTILE not in html and "<script>" not in html
    assert "&lt;script&gt;" in html
    # This run's samples, then Figure 5 (the sweep members'); Figure 2 is the sweep section's, not a figure here.
    assert html.count("data:image/png;base64,") == 3
    figures = md_figures(markdown)
    assert [path for path, _, _ in figures] == [
        "figures/elbo_curves.png", "figures/samples.png", "figures/prior_samples_by_latent_dim.png"]
    context = _context(reports)
    assert [f["name"] for f in context["figures"]] == ["elbo_curves", "samples", "prior_samples_by_latent_dim"]
    figure_5 = context["figures"][2]
    assert [(m["latent_dim"], m["seed"]) for m in figure_5["members"]] == [(5, 0), (20, 1)]
    assert figure_5["not_run"] == ["sweep-mnist@50-aevb-0"]
    assert "lower_bound_runs" not in html and "MLflow tracking store" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; (N_z = 5" in html  # the member name, escaped
    for value in ("-97.12 ± 0.43", "-96.25 ± 0.50", "-101.50", "17 of 20", "-99.30"):
        assert value in html, value
    # Published numbers of the same (dynamic) binarization only: the registry's, never static ones.
    assert context["references"] == datasets.comparable("mnist", "dynamic")
    assert {ref.where for ref in context["references"]} == {"Table 1"}
    assert "Table 1" in html and "Table 3" not in html
    rows = md_table(markdown, "### Beside published numbers (dynamic binarization only)")
    assert rows[0][0] == "**this run**" and rows[0][-1] == "**-97.12**"
    assert [float(row[-1]) for row in rows[1:]] == [ref.log_likelihood for ref in context["references"]]


def test_markdown_escapes_values_and_links_figures(written) -> None:
    reports, _ = written
    markdown = (reports / "report.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all("<script>" not in line for line in table_lines)
    assert "(figures/prior_samples_by_latent_dim.png)" in markdown and "(figures/elbo_curves.png)" in markdown
    assert "(figures/samples.png)" in markdown
    assert "&lt;script&gt;alert('x')&lt;/script&gt; (N\\_z = 5" in markdown
    assert "-97.12 ± 0.43" in markdown


def test_setup_and_provenance_rows(written) -> None:
    reports, _ = written
    markdown = (reports / "report.md").read_text()
    setup = dict(md_table(markdown, "## 1. Set-up"))
    assert setup["hardware"] == HOSTILE and setup["software"] == "not recorded"
    assert setup["training wall time"] == "not recorded"  # tracking off (wall times are MLflow's only)
    assert setup["dataset"].startswith("mnist (50000 train / 100 test examples")
    assert setup["architecture"].startswith("784-500-20 ")
    provenance = dict(md_table(markdown, "## 4. Provenance"))
    assert provenance["MLflow run"] == "not tracked"
    assert {"git commit", "reproduce"} <= set(provenance)
    # Without the sweep's table, Figure 5's members alone (Figure 2's: test_figure_members_in_provenance).
    members = md_table(markdown, "### Sweep members behind Figures 2 and 5 (DVC-tracked)")
    assert members == [["Fig. 5", HOSTILE, "mnist", "5", "aevb", "0", "150,000"],
                       ["Fig. 5", "mnist-z20-aevb-s0", "mnist", "20", "aevb", "1", "200,000"]]


@pytest.mark.parametrize("damage", ["[1, 2", "[1, 2]", '{"prior_samples_by_latent_dim": {"shown": [1]}}'])
def test_damaged_figure_members_file_is_named(written, damage) -> None:
    reports, metrics = written
    (reports / "figures" / "figure_members.json").write_text(damage)
    params = Params().replace(paths=PathsConfig(reports=str(reports)))
    with pytest.raises(VaeError, match=r"figure_members\.json: (not valid JSON|expected).*re-run `vae visualize`"):
        report.run(params, progress=False)


def test_figure_members_in_provenance_and_captions(written) -> None:
    """Figure 5's caption names the members it shows (and those not run); the provenance table lists
    the members of Figure 2 (the sweep's table) and of Figure 5 (figure_members.json), same in both formats."""
    reports, _ = written
    _write_sweep(reports)
    html, markdown = _rerun(reports)
    heading = "### Sweep members behind Figures 2 and 5 (DVC-tracked)"
    rows = md_table(markdown, heading)
    assert rows == html_table(html, "<h3>Sweep members behind Figures 2 and 5")
    assert rows == [["Fig. 2", "<script>alert('z3'),</script>", "mnist", "3", "aevb", "0", "200,000"],
                    ["Fig. 2", "mnist-z20-aevb-s0", "mnist", "20", "aevb", "0", "200,000"],
                    ["Fig. 5", HOSTILE, "mnist", "5", "aevb", "0", "150,000"],
                    ["Fig. 5", "mnist-z20-aevb-s0", "mnist", "20", "aevb", "1", "200,000"]]
    caption = {path: caption for path, _, caption in md_figures(markdown)}["figures/prior_samples_by_latent_dim.png"]
    assert f"Shown: {HOSTILE} (N_z = 5, seed 0, 150,000 training examples evaluated), mnist-z20-aevb-s0 " \
           "(N_z = 20, seed 1, 200,000 training examples evaluated)." in caption
    assert "AEVB on mnist (dynamic binarization), the lowest seed of each N_z" in caption
    assert "Not run, so not shown: sweep-mnist@50-aevb-0." in caption
    for text in (html_text.unescape(html), markdown.replace("\\", "")):
        assert "AEVB Figure 2, the lower bound against the number of training examples evaluated for each " \
               "latent size, is the latent-size sweep's figure" in text
        assert "left out" not in text


@pytest.mark.parametrize(("members", "reason"), [
    (NO_MEMBERS, "the latent-size sweep declares no AEVB member on mnist (params.yaml: sweep.latent_dims.mnist"),
    ({**NO_MEMBERS, "declared": ["sweep-mnist@3-aevb-0"], "not_run": ["sweep-mnist@3-aevb-0"]},
     "the latent-size sweep's AEVB members on mnist have not run (sweep-mnist@3-aevb-0)")])
def test_report_says_why_figure_5_is_left_out(tmp_path, monkeypatch, members, reason) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports, figures=("samples", "elbo_curves"), members=members)
    report.run(params, progress=False)
    html, markdown = (reports / "report.html").read_text(), (reports / "report.md").read_text()
    for text in (html_text.unescape(html), markdown.replace("\\", "")):
        assert "Samples from the prior by latent size (cf. AEVB Figure 5) are left out: " + reason in text
        assert "Sweep members behind" not in text  # no sweep table and no member shown: no rows


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

    from vae.provenance import git_dirty

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
                "test_log_likelihood,test_log_likelihood_stderr,active_units")
# Written out of order (N_z 20 before 3: a text sort would keep it so); the second member's name is hostile.
SWEEP_ROWS = (
    "mnist-z20-aevb-s0,mnist,20,aevb,0,200000,-105.123,-106.456,100,-101.789,0.2345,12",
    "\"<script>alert('z3'),</script>\",mnist,3,aevb,0,200000,-140.5,-141.25,100,-138.004,0.5,3",
)


def _write_sweep(reports, rows=SWEEP_ROWS, header=SWEEP_HEADER, figure=PNG_1x1):
    (reports / "sweep").mkdir(exist_ok=True)
    (reports / "sweep" / "lower_bound_sweep.png").write_bytes(figure)
    (reports / "sweep" / "sweep_results.csv").write_text("\n".join([header, *rows]) + "\n")


def _rerun(reports):
    report.run(Params().replace(paths=PathsConfig(reports=str(reports))), progress=False)
    return (reports / "report.html").read_text(), (reports / "report.md").read_text()


def test_sweep_section_shows_the_figure_and_the_members(written) -> None:
    reports, _ = written
    before = (reports / "report.html").read_text().count("data:image/png;base64,")
    _write_sweep(reports)
    html, markdown = _rerun(reports)
    assert html.count("data:image/png;base64,") == before + 1  # the sweep's figure, embedded
    paths = [path for path, _, _ in md_figures(markdown)]
    assert paths[-2:] == ["figures/prior_samples_by_latent_dim.png", "sweep/lower_bound_sweep.png"]
    assert markdown.index("](sweep/lower_bound_sweep.png)") < markdown.index("## 5. Provenance")
    assert "<h2>5. Provenance</h2>" in html and "## 5. Provenance" in markdown
    sweep = _context(reports)["sweep"]
    assert (sweep["size"], sweep["members"], sweep["seeds"], sweep["importance_samples"]) == ("quick", 2, 1, [100])
    assert sweep["examples_seen"] == [200000]
    assert sweep["subsets"] == [{"dataset": "mnist", "train_subset": 10000, "eval_subset": 1000}]
    assert _context(reports)["sweep_missing"] == [] and "uv run dvc repro sweep-report" not in html
    caption = md_figures(markdown)[-1][2]
    assert "2 members" in caption and "k = 100 importance samples" in caption
    for text in (html, markdown):
        assert "<script>" not in text and "&lt;script&gt;alert(" in text  # the hostile member name, escaped
        for value in ("-140.50", "-141.25", "-138.00 ± 0.50", "3 of 3",
                      "-105.12", "-106.46", "-101.79 ± 0.23", "12 of 20", "200,000"):
            assert value in text, value
        assert text.index("-138.00 ± 0.50") < text.index("-101.79 ± 0.23")  # sorted by N_z: 3 before 20
        assert "not the paper" in text  # a quick sweep's numbers are never passed off as the paper's
    rows = md_table(markdown, "## 4. Latent-size sweep (cf. AEVB Figure 2)")
    assert rows == html_table(html, "<h2>4. Latent-size sweep (cf. AEVB Figure 2)</h2>")
    assert [row[2] for row in rows] == ["3", "20"] and rows[0][0] == "<script>alert('z3'),</script>"
    assert rows[1] == ["mnist-z20-aevb-s0", "mnist", "20", "aevb", "0", "200,000", "-105.12", "-106.46",
                       "-101.79 ± 0.23", "12 of 20", "-"]  # wall time: MLflow's, tracking is off
    note = markdown.split("| 12 of 20 | - |\n", 1)[1].strip().splitlines()[0]
    assert "200,000" in note and "10,000" in note and "1,000" in note  # training length and subsets
    assert "test L\\_100 ± s.e." in markdown
    assert "![Latent-size sweep (cf. AEVB Figure 2)](sweep/lower_bound_sweep.png)" in markdown


def test_full_sweep_is_called_the_papers_setup(written) -> None:
    reports, _ = written
    _write_sweep(reports)
    params = Params().replace(paths=PathsConfig(reports=str(reports)))
    params = params.replace(sweep=params.sweep.replace(size="full"))
    report.run(params, progress=False)
    html = (reports / "report.html").read_text()
    sweep = _context(reports, params)["sweep"]
    assert sweep["size"] == "full" and sweep["subsets"] == []
    assert "The full sweep (params.sweep.size)" in html and "the paper&#39;s set-up" in html
    assert "not the paper" not in html


def test_report_without_the_sweep_says_how_to_run_it(written) -> None:
    reports, _ = written
    html = (reports / "report.html").read_text()
    markdown = (reports / "report.md").read_text()
    context = _context(reports)
    assert context["sweep"] is None
    assert context["sweep_missing"] == [str(reports / "sweep" / "lower_bound_sweep.png"),
                                        str(reports / "sweep" / "sweep_results.csv")]
    assert context["sweep_missing"][1] in html  # named as missing
    assert html.count("data:image/png;base64,") == len(context["figures"]) == 3  # no sweep figure
    assert "](sweep/" not in markdown
    for text in (html, markdown):
        assert "uv run dvc repro sweep-report" in text
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


# --------------------------------------------------------------------- data in Python, text in templates

FREY_METRICS = {**METRICS, "dataset": "frey", "binarization": "none", "latent_dim": 10, "hidden_dim": 200,
                "test_examples": 200, "test_log_likelihood": 1234.5678, "test_log_likelihood_stderr": 12.3,
                "bound_curve": {"1": 1100.0, "50": 1234.5678}}
FREY_SUMMARY = {"train_examples": 1565, "examples_seen": 156500, "likelihood": "gaussian", "algorithm": "wake-sleep",
                "samples": 3, "epochs": 100}
ALL_FIGURES = ("elbo_curves", "bound_curve", "log_likelihood_histogram", "manifold",
               "prior_samples_by_latent_dim", "samples", "reconstructions", "latent_space")
# Context keys whose strings are data however long: embedded PNGs, file paths, the parameters' YAML.
LONG_DATA = {"data", "path", "sweep_missing", "params_yaml"}


def _leaves(value, key=""):
    """(key, value) of every scalar in a nested context value."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _leaves(item, name)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item, key)
    else:
        yield key, value


@pytest.mark.parametrize("case", ["mnist-dynamic-sweep", "mnist-static", "frey"])
def test_context_holds_data_not_sentences(tmp_path, monkeypatch, case) -> None:
    """build_context gives numbers, names, flags and lists of them: no string but data (a PNG, a path,
    the parameters) is longer than a name, and the published numbers are the registry's own."""
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    if case == "frey":
        params = _write_inputs(reports, metrics=FREY_METRICS, summary=FREY_SUMMARY, figures=ALL_FIGURES)
    elif case == "mnist-static":
        params = _write_inputs(reports, metrics={**METRICS, "binarization": "static"}, figures=ALL_FIGURES)
    else:
        params = _write_inputs(reports)
        _write_sweep(reports)
    context = _context(reports, params)
    metrics = read_json(params.paths.metrics)
    references = context.pop("references")
    assert references == datasets.comparable(metrics["dataset"], metrics["binarization"])
    assert all(isinstance(ref, datasets.Reference) for ref in references)
    for key, value in _leaves(context):
        assert value is None or isinstance(value, (bool, int, float, str)), (key, value)
        if isinstance(value, str) and key not in LONG_DATA:
            assert len(value) <= 80, (key, value)
    # The dataset's facts are the registry's.
    entry = datasets.get(metrics["dataset"])
    assert (context["data"]["title"], context["data"]["fixed_test"]) == (entry.title, entry.fixed_test)


def test_both_formats_say_the_same(written) -> None:
    """The set-up, results, figures' captions, sweep and provenance read the same in HTML and Markdown
    (both take their text from report_text.j2)."""
    reports, _ = written
    _write_sweep(reports)
    html, markdown = _rerun(reports)
    for md_heading, html_heading in (("## 1. Set-up", "<h2>1. Set-up</h2>"), ("## 2. Results", "<h2>2. Results</h2>"),
                                     ("## 4. Latent-size sweep (cf. AEVB Figure 2)", "<h2>4. Latent-size sweep"),
                                     ("## 5. Provenance", "<h2>5. Provenance</h2>"),
                                     ("### Sweep members behind Figures 2 and 5 (DVC-tracked)",
                                      "<h3>Sweep members behind")):
        rows = md_table(markdown, md_heading)
        assert rows and rows == html_table(html, html_heading), md_heading
    figures = md_figures(markdown)
    assert len(figures) == 4 and [(title, caption) for _, title, caption in figures] == html_figures(html)
    results = dict(md_table(markdown, "## 2. Results"))
    assert results["test log-likelihood L_50"] == "-97.12 ± 0.43"
    assert results["test L_1"] == "-101.60" and results["test L_5"] == "-99.30" and "test L_50" not in results


def test_frey_face_run_takes_its_facts_from_the_registry(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports, metrics=FREY_METRICS, summary=FREY_SUMMARY, figures=ALL_FIGURES)
    params = params.replace(data=params.data.replace(dataset="frey", binarization="none", split_seed=7))
    report.run(params, progress=False)
    markdown = (reports / "report.md").read_text()
    context = _context(reports, params)
    assert context["data"]["title"] == datasets.get("frey").title == "Frey Face"
    assert not context["data"]["labelled"] and context["data"]["split_seed"] == 7
    assert markdown.startswith("# VAE on Frey Face (Gaussian decoder), latent_dim = 10\n")
    setup = dict(md_table(markdown, "## 1. Set-up"))
    assert setup["dataset"].startswith("frey (1565 train / 200 test examples") and setup["dataset"].endswith(" 7)")
    assert setup["architecture"].startswith("560-200-10 ")  # the registry's 28 x 20 pixels: none recorded
    assert "Gaussian p(x|z)" in setup["architecture"] and "3 samples" in setup["objective"]
    assert context["references"] == [] and "| source |" not in markdown and "Burda" not in markdown
    assert "not comparable with MNIST" in markdown
    captions = {path: caption for path, _, caption in md_figures(markdown)}
    assert "digit" not in captions["figures/latent_space.png"]  # no labels to colour by
    assert "With latent_dim = 10" in captions["figures/latent_space.png"]  # projected to 2-D


def test_the_iwae_authors_protocol_is_named_in_the_setup(tmp_path, monkeypatch) -> None:
    """The iwae-mnist profile's split, rounded rates and output bias, each said in the set-up table;
    at their defaults, none of them is."""
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports)
    protocol = params.replace(data=params.data.replace(validation_size=400, split_order="file"),
                              model=params.model.replace(output_bias_init="data_mean"),
                              train=params.train.replace(schedule="iwae", schedule_rounding=True))
    report.run(protocol, progress=False)
    setup = dict(md_table((reports / "report.md").read_text(), "## 1. Set-up"))
    assert "the last 400 training images, in file order, held out for validation" in setup["dataset"]
    assert "round(10^(1 - i/7), 1) / 10" in setup["optimizer"] and "rounded as the authors' code" in setup["optimizer"]
    assert "output bias initialised to the logit of the training mean image" in setup["optimizer"]
    report.run(params, progress=False)
    setup = dict(md_table((reports / "report.md").read_text(), "## 1. Set-up"))
    assert "file order" not in setup["dataset"] and "round(" not in setup["optimizer"]
    assert "output bias" not in setup["optimizer"]


def test_static_mnist_is_set_beside_static_numbers_only(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports, metrics={**METRICS, "binarization": "static", "latent_dim": 2},
                           figures=[name for name in ALL_FIGURES if name != "prior_samples_by_latent_dim"],
                           members=NO_MEMBERS)
    report.run(params, progress=False)
    markdown = (reports / "report.md").read_text()
    context = _context(reports, params)
    assert context["references"] == datasets.comparable("mnist", "static")
    assert {ref.binarization for ref in context["references"]} == {"static"}
    rows = md_table(markdown, "### Beside published numbers (static binarization only)")
    assert [row[0] for row in rows[1:]] == [f"{ref.source}, {ref.where}" for ref in context["references"]]
    assert not context["data"]["labelled"]  # Larochelle's files carry no labels
    captions = {path: caption for path, _, caption in md_figures(markdown)}
    assert "digit" not in captions["figures/latent_space.png"] and "latent_dim" not in captions["figures/latent_space.png"]
    assert "figures/prior_samples_by_latent_dim.png" not in captions and "figures/samples.png" in captions
    assert "(cf. AEVB Figure 5) are left out: the latent-size sweep declares no AEVB member" in markdown


TIGHTNESS = {
    "ais_temperatures": 200, "ais_chains": 16, "ais_leapfrog_steps": 10, "ais_initial": "encoder",
    "ais_schedule": "sigmoid",
    "test_ais_examples": 32, "test_ais_log_likelihood": -90.6609, "test_ais_log_likelihood_stderr": 4.9662,
    "test_ais_bound": -91.8278, "test_ais_elbo": -96.948, "test_ais_gap": 1.1669, "test_ais_gap_stderr": 0.2103,
    "test_ais_acceptance_rate": 0.86,
    "bdmc_examples": 16, "bdmc_lower": -111.7467, "bdmc_upper": -111.5976, "bdmc_gap": 0.1491,
    "bdmc_gap_stderr": 0.1422,
}


def test_tightness_table_sets_ais_beside_the_bound_in_both_formats(tmp_path, monkeypatch) -> None:
    """With AIS and BDMC in metrics.json the results show ELBO, L_k, AIS and the gap per split, the
    BDMC bounds in a sentence, and Wu et al.'s estimators; App. D is '-' for latent_dim 20 and the
    caption says why. Without them (a run before AIS, or every count 0) the section is absent."""
    monkeypatch.setenv("VAE_TRACKING", "off")
    reports = tmp_path / "reports"
    params = _write_inputs(reports, metrics={**METRICS, **TIGHTNESS})
    report.run(params, progress=False)
    html, markdown = (reports / "report.html").read_text(), (reports / "report.md").read_text()
    heading = "How tight is the bound? ELBO ≤ L_k ≤ AIS ≤ log p(x), in expectation"
    rows = md_table(markdown, "### " + heading.replace("_", "\\_"))
    assert rows == [["test (32 images)", "-96.95", "-91.83", "-90.66 ± 4.97", "1.17 ± 0.21", "-"]]
    assert rows == html_table(html, heading)
    references = html_table(html, "nats per image, bounds how far AIS")
    assert ["Wu, Burda, Salakhutdinov & Grosse 2017, Table 1", "IWAE's MNIST VAE (Burda et al. 2016), "
            "10000 test images", "binarized MNIST", "AIS from the prior, T = 10000, 16 chains", "-85.62"] in references
    for text in (html_text.unescape(html), markdown.replace("\\", "")):
        assert "forward AIS gives -111.75 and reverse AIS, started at each image's true z, -111.60" in text
        assert "their gap, 0.15 ± 0.14 nats per image" in text
        assert "reliable only for fewer than 5 latent dimensions (latent_dim = 20)" in text
        assert "T = 200 (sigmoid schedule), 16 chains, 10 leapfrog steps" in text
    assert report.tightness_context(METRICS) is None
    assert "How tight" not in _rerun_without(reports, params)


def _rerun_without(reports, params) -> str:
    (reports / "metrics.json").write_text(json.dumps(METRICS))
    report.run(params, progress=False)
    return (reports / "report.md").read_text()
