"""The dataset registry (``vae.datasets``) itself: every entry and variant is complete and
consistent with the parsers, the mirror and the error messages the configuration relies on.

Structural checks only: no file is parsed here (``test_datasets.py`` and ``test_mnist.py`` do
that). The mirror checks use the shared dataset mirror (``tests/support.py``'s
``dataset_mirror()``) and are skipped without a local one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from support import dataset_mirror
from vae import datasets
from vae.data import binarized_mnist, frey, mnist
from vae.datasets import DatasetSource
from vae.errors import ConfigError

VARIANTS = [(entry, variant) for entry in datasets.DATASETS.values() for variant in entry.variants.values()]
IDS = [f"{entry.name}-{variant.binarization}" for entry, variant in VARIANTS]


def test_names_and_binarizations():
    assert datasets.NAMES == tuple(datasets.DATASETS) == ("mnist", "frey")
    assert datasets.BINARIZATIONS == ("dynamic", "static", "none")
    for name, entry in datasets.DATASETS.items():
        assert entry.name == name and datasets.get(name) is entry
        assert entry.binarizations == tuple(entry.variants) and entry.binarizations
        for binarization, variant in entry.variants.items():
            assert variant.binarization == binarization
            assert datasets.variant(name, binarization) is variant is entry.variant(binarization)


@pytest.mark.parametrize("entry, variant", VARIANTS, ids=IDS)
def test_every_variant_has_a_verified_source(entry, variant):
    source = variant.source
    assert isinstance(source, DatasetSource) and re.fullmatch(r"[a-z_]+", source.name)
    assert source.base_urls and all(re.match(r"https?://.+/$", url) for url in source.base_urls)
    assert source.files
    local_names = [remote.local_name for remote in source.files]
    assert len(set(local_names)) == len(local_names)
    for remote in source.files:
        assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote.name


def test_sources_are_unique_by_name():
    sources = datasets.sources()
    assert set(sources) == {"mnist", "binarized_mnist", "frey"}
    assert sorted(sources) == sorted(variant.source.name for _, variant in VARIANTS)  # one variant each
    for name, source in sources.items():
        assert source.name == name


@pytest.mark.parametrize("entry, variant", VARIANTS, ids=IDS)
def test_the_mirror_holds_every_file_of_every_source(entry, variant):
    mirror = dataset_mirror()
    if mirror is None or "://" in mirror or not Path(mirror).is_dir():
        pytest.skip("no local dataset mirror (../shared/datasets or $VAE_DATA_MIRROR)")
    folder = Path(mirror) / variant.source.name  # <mirror>/<source name>/<upstream file name>
    for remote in variant.source.files:
        assert (folder / remote.name).is_file(), folder / remote.name


@pytest.mark.parametrize("entry, variant", VARIANTS, ids=IDS)
def test_every_parser_resolves_to_a_callable(entry, variant):
    assert re.fullmatch(r"vae\.data\.[a-z_]+:[a-z_]+", variant.parser)
    parser = variant.load_parser()
    assert callable(parser)
    module, function = variant.parser.split(":")
    assert getattr(sys.modules[module], function) is parser


def test_reading_the_registry_imports_no_parser_nor_torch():
    """The registry is read to validate ``params.yaml`` and for ``--help``: it stays cheap."""
    import subprocess

    code = ("import sys, vae.datasets as d; d.sources(); d.variant('mnist', 'static'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('vae.data.') and "
            "m not in ('vae.data.sources',)))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


@pytest.mark.parametrize("entry", datasets.DATASETS.values(), ids=lambda entry: entry.name)
def test_input_dim_matches_the_image_shape(entry):
    height, width = entry.image_shape
    assert height > 0 and width > 0
    assert entry.input_dim == height * width


def test_parsers_read_their_sizes_from_the_registry():
    assert mnist.IMAGE_SHAPE == datasets.get("mnist").image_shape == (28, 28)
    assert binarized_mnist.PIXELS == datasets.get("mnist").input_dim == 784
    assert (frey.HEIGHT, frey.WIDTH) == datasets.get("frey").image_shape == (28, 20)
    assert frey.PIXELS == datasets.get("frey").input_dim == 560
    dynamic, static = datasets.variant("mnist", "dynamic"), datasets.variant("mnist", "static")
    assert {split: count for split, (_, _, count) in mnist.FILES.items()} == dynamic.file_counts \
        == {"train": 60000, "test": 10000}
    assert {split: count for split, (_, count) in binarized_mnist.FILES.items()} == static.file_counts \
        == {"train": 50000, "valid": 10000, "test": 10000}
    assert (datasets.get("mnist").validation_size, datasets.get("mnist").test_size) == (10000, 10000)
    assert (datasets.get("frey").validation_size, datasets.get("frey").test_size) == (200, 200)


def test_the_parsers_files_are_their_sources_files():
    names = {remote.local_name for remote in datasets.variant("mnist", "dynamic").source.files}
    assert {name for image, label, _ in mnist.FILES.values() for name in (image, label)} == names
    names = {remote.local_name for remote in datasets.variant("mnist", "static").source.files}
    assert {file for file, _ in binarized_mnist.FILES.values()} == names
    assert {remote.local_name for remote in datasets.variant("frey", "none").source.files} == {frey.FILE}


@pytest.mark.parametrize("entry, variant", VARIANTS, ids=IDS)
def test_variant_facts(entry, variant):
    assert variant.likelihood in datasets.LIKELIHOODS
    assert set(variant.file_counts) <= set(datasets.SPLITS)
    assert all(count > 0 for count in variant.file_counts.values())
    if variant.fixed_split:
        assert set(variant.file_counts) == set(datasets.SPLITS)
    assert variant.description and entry.title and entry.split
    # binary data is modelled by a Bernoulli decoder, grey data (binarization none) by a Gaussian
    assert variant.likelihood == ("gaussian" if variant.binarization == "none" else "bernoulli")


def test_panel_titles():
    assert datasets.get("mnist").panel_title("dynamic") == "MNIST, dynamic binarization"
    assert datasets.get("mnist").panel_title("static") == "MNIST, static binarization"
    assert datasets.get("frey").panel_title("none") == "Frey Face"


@pytest.mark.parametrize("name", ["cifar", "MNIST", "", "binarized_mnist"])
def test_get_names_the_bad_value_and_lists_the_allowed_ones(name):
    with pytest.raises(ConfigError) as caught:
        datasets.get(name)
    message = str(caught.value)
    assert repr(name) in message and "mnist, frey" in message


@pytest.mark.parametrize("name, binarization", [("mnist", "none"), ("frey", "static")])
def test_an_entrys_variant_names_the_bad_value_and_lists_its_binarizations(name, binarization):
    with pytest.raises(ConfigError) as caught:
        datasets.get(name).variant(binarization)
    message = str(caught.value)
    assert repr(binarization) in message
    assert ", ".join(datasets.get(name).binarizations) in message


@pytest.mark.parametrize("name, binarization", [
    (name, binarization) for name in (*datasets.NAMES, "cifar") for binarization in datasets.BINARIZATIONS])
def test_comparable_returns_only_references_of_that_binarization(name, binarization):
    found = datasets.comparable(name, binarization)
    assert all(isinstance(ref, datasets.Reference) for ref in found)
    assert all(ref.binarization == binarization for ref in found)
    entry = datasets.DATASETS.get(name)
    expected = entry.variants[binarization].references if entry and binarization in entry.variants else ()
    assert found == list(expected)


def test_the_published_references():
    """The numbers the report sets beside ours: IWAE's Table 1 (dynamic) and Table 3 (static)."""
    dynamic, static = datasets.comparable("mnist", "dynamic"), datasets.comparable("mnist", "static")
    assert [ref.log_likelihood for ref in dynamic] == [-86.76, -86.35, -84.78, -85.33, -82.90]
    assert [ref.log_likelihood for ref in static] == [-88.71, -87.10, -88.08, -85.32]
    assert datasets.comparable("frey", "none") == []
    for ref in dynamic + static:
        assert ref.log_likelihood < 0 and ref.importance_samples == 5000 and ref.source and ref.where


def test_panel_title_of_a_dataset_the_registry_does_not_know_is_its_name():
    assert datasets.panel_title("cifar", "dynamic") == "cifar, dynamic binarization"
    assert datasets.panel_title("cifar", "none") == "cifar"


def test_the_data_stages_help_names_every_registered_file_and_split():
    from vae.cli import build_parser

    helps = {action.dest: action for action in build_parser()._subparsers._group_actions}
    stages = next(iter(helps.values())).choices
    download, binarize = stages["download"].description, stages["binarize"].description
    for entry in datasets.DATASETS.values():
        assert entry.split in binarize
        for variant in entry.variants.values():
            assert variant.description in binarize
            assert all(remote.name in download for remote in variant.source.files)
    assert all(name in download for name in datasets.sources())
