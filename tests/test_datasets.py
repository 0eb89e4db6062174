"""The static binarization of MNIST (``vae.data.binarized_mnist``), Frey Face (``vae.data.frey``),
their sources (the registry's, ``vae.datasets``, with ``vae.data.sources``), ``Split.values`` and the
data stages' dispatch.

Parsing and splitting are tested on small files the tests write (``.amat`` text, ``.mat`` via
``scipy.io.savemat``); the download and one parse of each real file use the shared dataset mirror
(``tests/support.py``'s ``dataset_mirror()``) and are skipped without one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from support import amat_text, dataset_mirror, synthetic_faces
from vae import datasets, stages
from vae.config import DataConfig, params_from_dict
from vae.data import binarized_mnist, frey
from vae.data.binarized_mnist import LINE_BYTES, prepare_static_mnist, read_amat
from vae.data.download import download_dataset, sha256_of
from vae.data.frey import prepare_frey, read_frey
from vae.data.sources import MIRROR_ENV, base_urls
from vae.data.splits import FREY_SCALE, SPLITS, Split, load_split, load_splits
from vae.errors import ConfigError, DataError

SOURCES = datasets.sources()
MNIST, BINARIZED_MNIST, FREY = SOURCES["mnist"], SOURCES["binarized_mnist"], SOURCES["frey"]

# --------------------------------------------------------------------------- helpers


def random_binary(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(count, 784), dtype=np.uint8)


def write_amat(path: Path, images: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(amat_text(images))
    return path


def edit_line(content: bytes, number: int, edit) -> bytes:
    """``content`` with its 1-based line ``number`` (without "\\n") replaced by ``edit(line)``."""
    lines = content.split(b"\n")
    lines[number - 1] = edit(lines[number - 1])
    return b"\n".join(lines)


def set_value(line: bytes, position: int, value: bytes) -> bytes:
    values = line.split(b" ")
    values[position - 1] = value
    return b" ".join(values)


def write_mat(path: Path, **variables) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)
    return path


def face_ids(images: torch.Tensor) -> np.ndarray:
    return images[:, 0].long().numpy() + 256 * images[:, 1].long().numpy()


def local_mirror(source: str) -> Path:
    """The shared mirror's folder for ``source``, or skip the test when there is none locally."""
    mirror = dataset_mirror()
    if mirror is None or "://" in mirror or not (Path(mirror) / source).is_dir():
        pytest.skip(f"no local dataset mirror with {source}/ (../shared/datasets or ${MIRROR_ENV})")
    return Path(mirror) / source


def expect_data_error(call, *fragments: str) -> str:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("dataset, binarization, source", [
    ("mnist", "dynamic", MNIST), ("mnist", "static", BINARIZED_MNIST), ("frey", "none", FREY)])
def test_variant_source(dataset, binarization, source):
    assert datasets.variant(dataset, binarization).source is source
    assert SOURCES[source.name] is source


@pytest.mark.parametrize("dataset, binarization", [
    ("mnist", "none"), ("frey", "dynamic"), ("frey", "static"), ("cifar", "dynamic"), ("binarized_mnist", "static"),
    ("mnist", "otsu")])
def test_variant_rejects_other_pairs(dataset, binarization):
    with pytest.raises(ConfigError) as caught:
        datasets.variant(dataset, binarization)
    message = str(caught.value)
    assert repr(dataset) in message and repr(binarization) in message
    for allowed in ("mnist + dynamic", "mnist + static", "frey + none"):
        assert allowed in message


def test_new_sources():
    assert set(SOURCES) == {"mnist", "binarized_mnist", "frey"}
    assert BINARIZED_MNIST.base_urls == ("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",)
    assert [f.name for f in BINARIZED_MNIST.files] == [
        "binarized_mnist_train.amat", "binarized_mnist_valid.amat", "binarized_mnist_test.amat"]
    assert FREY.base_urls == ("https://cs.nyu.edu/~roweis/data/",)
    assert [f.name for f in FREY.files] == ["frey_rawface.mat"]
    for remote in BINARIZED_MNIST.files + FREY.files:
        assert not remote.compressed and remote.local_name == remote.name
        assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256)
    # The mirror folder is the source's name.
    assert base_urls(BINARIZED_MNIST, "http://host/m") == ["http://host/m/binarized_mnist/"]
    assert base_urls(FREY, "http://host/m/") == ["http://host/m/frey/"]


def test_checksums_match_the_shared_mirror_readme():
    mirror = dataset_mirror()
    readme = Path(mirror) / "README.md" if mirror and "://" not in mirror else None
    if readme is None or not readme.is_file():
        pytest.skip("no shared dataset mirror with a README.md")
    table = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[0-9a-f]{64}", cells[2]):
            table[cells[0]] = cells[2]
    for remote in BINARIZED_MNIST.files + FREY.files:
        assert table.get(remote.local_name) == remote.sha256, remote.name


# --------------------------------------------------------------------------- read_amat


def test_read_amat_round_trip(tmp_path):
    images = random_binary(6)
    path = write_amat(tmp_path / "x.amat", images)
    assert path.stat().st_size == 6 * LINE_BYTES
    read = read_amat(path, 6)
    assert read.dtype == torch.uint8 and read.shape == (6, 784) and read.is_contiguous()
    assert np.array_equal(read.numpy(), images)


def test_read_amat_pixel_order(tmp_path):
    """Value j (0-based) of line i + 1 is pixel j of image i, i.e. (row j // 28, column j % 28)."""
    images = np.zeros((3, 784), dtype=np.uint8)
    images[1, 3 * 28 + 5] = 1
    read = read_amat(write_amat(tmp_path / "x.amat", images), 3)
    assert read.reshape(3, 28, 28)[1, 3, 5] == 1 and int(read.sum()) == 1


def test_read_amat_tolerates_a_missing_final_newline(tmp_path):
    images = random_binary(4, seed=1)
    path = tmp_path / "x.amat"
    path.write_bytes(amat_text(images)[:-1])
    assert np.array_equal(read_amat(path, 4).numpy(), images)


def test_read_amat_empty_count(tmp_path):
    path = tmp_path / "x.amat"
    path.write_bytes(b"")
    assert read_amat(path, 0).shape == (0, 784)


BAD_LINES = [
    # (line, edit, expected message fragment)
    (3, lambda line: line[:-2], "line 3: 783 values, expected 784"),
    (1, lambda line: line + b" 0", "line 1: 785 values, expected 784"),
    (2, lambda line: set_value(line, 12, b"2"), "line 2: value '2' at position 12, expected 0 or 1"),
    (4, lambda line: set_value(line, 784, b"0.5"), "line 4: value '0.5' at position 784, expected 0 or 1"),
    (2, lambda line: set_value(line, 1, b"x"), "line 2: value 'x' at position 1, expected 0 or 1"),
    (3, lambda line: set_value(line, 5, b"\t1"), "line 3: value '\\t1' at position 5"),
    (2, lambda line: line.replace(b" ", b"  ", 1), "line 2: empty value at position 2"),
    (1, lambda line: b" " + line[:-2], "line 1: empty value at position 1"),
    (4, lambda line: line + b"\r", "line 4: ends with '\\r\\n'"),
    (2, lambda line: b"", "line 2: empty, expected 784 values"),
]


@pytest.mark.parametrize("number, edit, fragment", BAD_LINES)
def test_read_amat_reports_the_bad_line(tmp_path, number, edit, fragment):
    path = tmp_path / "x.amat"
    path.write_bytes(edit_line(amat_text(random_binary(5)), number, edit))
    expect_data_error(lambda: read_amat(path, 5), str(path), fragment)


def test_read_amat_reports_the_first_of_several_bad_lines(tmp_path):
    content = amat_text(random_binary(400))
    content = edit_line(content, 371, lambda line: set_value(line, 100, b"7"))
    content = edit_line(content, 388, lambda line: line[:-2])
    path = tmp_path / "x.amat"
    path.write_bytes(content)
    message = expect_data_error(lambda: read_amat(path, 400), str(path), "line 371: value '7' at position 100")
    assert "388" not in message


def test_read_amat_same_size_but_misaligned_lines(tmp_path):
    """Total bytes right, one value moved from line 2 to line 3: line 2 is reported."""
    lines = amat_text(random_binary(4)).split(b"\n")
    lines[1], lines[2] = lines[1][:-2], lines[2] + b" 1"
    path = tmp_path / "x.amat"
    path.write_bytes(b"\n".join(lines))
    assert path.stat().st_size == 4 * LINE_BYTES
    expect_data_error(lambda: read_amat(path, 4), str(path), "line 2: 783 values, expected 784")


@pytest.mark.parametrize("written, expected", [(3, 4), (5, 4), (0, 4)])
def test_read_amat_wrong_line_count(tmp_path, written, expected):
    path = write_amat(tmp_path / "x.amat", random_binary(written))
    expect_data_error(lambda: read_amat(path, expected), str(path), f"{written} lines, expected {expected}")


def test_read_amat_truncated_file(tmp_path):
    path = tmp_path / "x.amat"
    path.write_bytes(amat_text(random_binary(4))[: 2 * LINE_BYTES + 601])  # 300 values and a half of line 3
    expect_data_error(lambda: read_amat(path, 4), str(path), "line 3: 301 values, expected 784", "truncated")


def test_read_amat_truncated_at_a_line_end(tmp_path):
    path = tmp_path / "x.amat"
    path.write_bytes(amat_text(random_binary(4))[: 2 * LINE_BYTES])
    expect_data_error(lambda: read_amat(path, 4), str(path), "2 lines, expected 4")


def test_read_amat_missing_file(tmp_path):
    expect_data_error(lambda: read_amat(tmp_path / "nothing.amat", 4),
                      str(tmp_path / "nothing.amat"), "not found", "vae download")


# --------------------------------------------------------------------------- prepare_static_mnist


SMALL_COUNTS = {"train": 50, "valid": 12, "test": 10}


@pytest.fixture
def static_raw(tmp_path, monkeypatch) -> dict:
    """Small .amat files (50 / 12 / 10 images) and ``FILES`` patched to expect those counts."""
    raw = tmp_path / "raw"
    images = {}
    patched = {}
    for seed, (name, (file, _)) in enumerate(binarized_mnist.FILES.items()):
        images[name] = random_binary(SMALL_COUNTS[name], seed=seed)
        write_amat(raw / file, images[name])
        patched[name] = (file, SMALL_COUNTS[name])
    monkeypatch.setattr(binarized_mnist, "FILES", patched)
    return {"dir": raw, "images": images}


def test_prepare_static_mnist(static_raw, tmp_path):
    out = tmp_path / "out"
    assert prepare_static_mnist(static_raw["dir"], out, DataConfig(binarization="static")) == SMALL_COUNTS
    splits = load_splits(out)
    for name in SPLITS:
        split = splits[name]
        assert np.array_equal(split.images.numpy(), static_raw["images"][name])  # the files' order
        assert split.labels.dtype == torch.int64 and torch.equal(split.labels, torch.full((len(split),), -1))
        assert (split.binary, split.binarization) == (True, "static")


def test_prepare_static_mnist_subsets(static_raw, tmp_path):
    out = tmp_path / "out"
    sizes = prepare_static_mnist(static_raw["dir"], out, DataConfig(binarization="static", train_subset=7,
                                                                    eval_subset=3))
    assert sizes == {"train": 7, "valid": 3, "test": 3}
    splits = load_splits(out)
    for name in SPLITS:
        assert np.array_equal(splits[name].images.numpy(), static_raw["images"][name][: sizes[name]])
        assert len(splits[name].labels) == sizes[name]
    # Subsets larger than a split keep it whole.
    assert prepare_static_mnist(static_raw["dir"], out, DataConfig(binarization="static", train_subset=1000,
                                                                   eval_subset=1000)) == SMALL_COUNTS


def test_prepare_static_mnist_is_byte_identical(static_raw, tmp_path):
    config = DataConfig(binarization="static", train_subset=20)
    prepare_static_mnist(static_raw["dir"], tmp_path / "a", config)
    prepare_static_mnist(static_raw["dir"], tmp_path / "b", config)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.pt").read_bytes() == (tmp_path / "b" / f"{name}.pt").read_bytes()


@pytest.mark.parametrize("setting", [{"validation_size": 100}, {"test_size": 100}])
def test_prepare_static_mnist_rejects_split_sizes(static_raw, tmp_path, setting):
    with pytest.raises(ConfigError) as caught:
        prepare_static_mnist(static_raw["dir"], tmp_path / "out", DataConfig(binarization="static", **setting))
    assert f"data.{next(iter(setting))} = 100" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_prepare_static_mnist_bad_file_writes_nothing(static_raw, tmp_path):
    test_file = static_raw["dir"] / binarized_mnist.FILES["test"][0]
    test_file.write_bytes(edit_line(test_file.read_bytes(), 9, lambda line: set_value(line, 3, b"5")))
    config = DataConfig(binarization="static")
    expect_data_error(lambda: prepare_static_mnist(static_raw["dir"], tmp_path / "out", config),
                      str(test_file), "line 9: value '5' at position 3")
    assert not (tmp_path / "out").exists()
    test_file.unlink()
    expect_data_error(lambda: prepare_static_mnist(static_raw["dir"], tmp_path / "out", config),
                      str(test_file), "vae download")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- read_frey


def test_read_frey_round_trip(tmp_path):
    ff = synthetic_faces(7)
    read = read_frey(write_mat(tmp_path / "f.mat", ff=ff))
    assert read.dtype == torch.uint8 and read.shape == (7, 560) and read.is_contiguous()
    assert np.array_equal(read.numpy(), ff.T)


def test_read_frey_layout(tmp_path):
    """Column i of ``ff`` is face i, 28 rows x 20 columns, row-major: element r * 20 + c is (r, c)."""
    ff = np.zeros((560, 3), dtype=np.uint8)
    ff[3 * 20 + 5, 2] = 200
    read = read_frey(write_mat(tmp_path / "f.mat", ff=ff))
    assert read.reshape(3, 28, 20)[2, 3, 5] == 200 and int(read.sum()) == 200


def test_read_frey_missing_file(tmp_path):
    expect_data_error(lambda: read_frey(tmp_path / "frey_rawface.mat"),
                      str(tmp_path / "frey_rawface.mat"), "not found", "vae download")


def test_read_frey_not_a_mat_file(tmp_path):
    path = tmp_path / "f.mat"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_data_error(lambda: read_frey(path), str(path), "not a readable MATLAB file")
    path.write_text("ff = [1 2 3]\n")
    expect_data_error(lambda: read_frey(path), str(path), "not a readable MATLAB file")


def test_read_frey_truncated_file(tmp_path):
    path = write_mat(tmp_path / "f.mat", ff=synthetic_faces(50))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_data_error(lambda: read_frey(path), str(path))


def test_read_frey_without_ff(tmp_path):
    path = write_mat(tmp_path / "f.mat", faces=synthetic_faces(3), x=np.zeros(2))
    expect_data_error(lambda: read_frey(path), str(path), "no variable 'ff'", "'faces'", "'x'")


@pytest.mark.parametrize("ff, found", [
    (np.zeros((784, 5), dtype=np.uint8), "uint8 of shape (784, 5)"),
    (np.zeros((5, 560), dtype=np.uint8), "uint8 of shape (5, 560)"),
    (np.zeros((560, 5), dtype=np.float64), "float64 of shape (560, 5)"),
    (np.zeros((560, 0), dtype=np.uint8), "uint8 of shape (560, 0)"),
])
def test_read_frey_wrong_shape_or_dtype(tmp_path, ff, found):
    path = write_mat(tmp_path / "f.mat", ff=ff)
    expect_data_error(lambda: read_frey(path), str(path), found, "expected uint8 of shape (560, N)")


# --------------------------------------------------------------------------- prepare_frey


@pytest.fixture(scope="module")
def frey_raw(tmp_path_factory) -> dict:
    """A synthetic frey_rawface.mat of 1965 faces, written once."""
    raw = tmp_path_factory.mktemp("frey_raw")
    ff = synthetic_faces(1965)
    write_mat(raw / frey.FILE, ff=ff)
    return {"dir": raw, "faces": torch.from_numpy(ff.T.copy())}


def frey_split(frey_raw, out: Path, **settings) -> tuple[dict[str, int], dict[str, Split]]:
    sizes = prepare_frey(frey_raw["dir"], out, DataConfig(dataset="frey", binarization="none", **settings))
    return sizes, load_splits(out)


def test_prepare_frey_default_split(frey_raw, tmp_path):
    sizes, splits = frey_split(frey_raw, tmp_path / "out")
    assert sizes == {"train": 1565, "valid": 200, "test": 200}
    ids = {name: face_ids(split.images) for name, split in splits.items()}
    assert np.array_equal(np.sort(np.concatenate(list(ids.values()))), np.arange(1965))  # disjoint, covering
    for name, split in splits.items():
        assert torch.equal(split.images, frey_raw["faces"][ids[name]])  # whole faces, unchanged
        assert split.images.dtype == torch.uint8 and split.images.shape == (sizes[name], 560)
        assert torch.equal(split.labels, torch.full((sizes[name],), -1, dtype=torch.int64))
        assert (split.binary, split.binarization) == (False, "none")
    assert not np.array_equal(np.sort(ids["test"]), np.arange(200))  # shuffled, not the first faces


def test_prepare_frey_same_seed_same_split(frey_raw, tmp_path):
    frey_split(frey_raw, tmp_path / "a", split_seed=3)
    frey_split(frey_raw, tmp_path / "b", split_seed=3)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.pt").read_bytes() == (tmp_path / "b" / f"{name}.pt").read_bytes()


def test_prepare_frey_other_seed_other_split(frey_raw, tmp_path):
    _, a = frey_split(frey_raw, tmp_path / "a", split_seed=0)
    _, b = frey_split(frey_raw, tmp_path / "b", split_seed=1)
    test_a, test_b = set(face_ids(a["test"].images)), set(face_ids(b["test"].images))
    assert len(test_a & test_b) < 60  # about 200 * 200 / 1965 = 20 by chance
    assert not torch.equal(a["train"].images, b["train"].images)


def test_prepare_frey_sizes_and_subsets(frey_raw, tmp_path):
    sizes, splits = frey_split(frey_raw, tmp_path / "sized", validation_size=100, test_size=50)
    assert sizes == {"train": 1815, "valid": 100, "test": 50}
    _, full = frey_split(frey_raw, tmp_path / "full")
    sizes, capped = frey_split(frey_raw, tmp_path / "capped", train_subset=64, eval_subset=30)
    assert sizes == {"train": 64, "valid": 30, "test": 30}
    for name in SPLITS:  # subsets are prefixes of the full split
        assert torch.equal(capped[name].images, full[name].images[: sizes[name]])


@pytest.mark.parametrize("settings", [{"validation_size": 1000, "test_size": 965},
                                      {"validation_size": 1765}, {"test_size": 3000}])
def test_prepare_frey_split_sizes_leaving_no_training_faces(frey_raw, tmp_path, settings):
    with pytest.raises(ConfigError) as caught:
        frey_split(frey_raw, tmp_path / "out", **settings)
    message = str(caught.value)
    assert "data.validation_size" in message and "data.test_size" in message and "1965" in message
    assert not (tmp_path / "out").exists()


def test_prepare_frey_missing_file(tmp_path):
    expect_data_error(lambda: prepare_frey(tmp_path / "raw", tmp_path / "out", DataConfig(dataset="frey",
                                                                                       binarization="none")),
                      str(tmp_path / "raw" / "frey_rawface.mat"), "vae download")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Split.values


def grey(n: int = 300, d: int = 560, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, d), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_values_none_is_scaled_by_256():
    images = grey()
    images[0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    split = Split(images, torch.full((300,), -1), binary=False, binarization="none")
    values = split.values()
    assert FREY_SCALE == 256
    assert values.dtype == torch.float32 and values.shape == (300, 560)
    assert torch.equal(values, images.float() / 256)
    assert float(values[0, 0]) == 0.0 and float(values[0, 1]) == 255 / 256 and float(values.max()) < 1
    assert torch.equal(split.values(dtype=torch.float64), images.double() / 256)
    assert torch.equal(split.values(generator=torch.Generator().manual_seed(1)), values)  # nothing is sampled


def test_values_dynamic_sampling_is_reproducible():
    images = grey(d=784)
    split = Split(images, torch.zeros(300, dtype=torch.int64), binary=False, binarization="dynamic")
    first = split.values(generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, split.values(generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, split.values(generator=torch.Generator().manual_seed(6)))
    assert set(torch.unique(first).tolist()) == {0.0, 1.0}
    assert not first[images == 0].any() and first[images == 255].all()
    assert abs(float(first.mean()) - float(images.float().mean()) / 255) < 0.01


@pytest.mark.parametrize("binarization", ["static", "dynamic"])
def test_values_of_binary_splits(binarization):
    images = torch.from_numpy(random_binary(5))
    split = Split(images, torch.full((5,), -1), binary=True, binarization=binarization)
    assert torch.equal(split.values(), images.float())
    assert split.values(dtype=torch.float64).dtype == torch.float64


def test_values_of_a_grey_static_split_is_an_error():
    split = Split(grey(n=2, d=784), torch.full((2,), -1), binary=False, binarization="static")
    with pytest.raises(DataError, match="static"):
        split.values()


def test_unlabelled_split_round_trip(tmp_path):
    split = Split(grey(n=4), torch.full((4,), -1, dtype=torch.int64), binary=False, binarization="none")
    split.save(tmp_path / "s.pt")
    loaded = load_split(tmp_path / "s.pt")
    assert torch.equal(loaded.images, split.images) and torch.equal(loaded.labels, split.labels)
    assert (loaded.binary, loaded.binarization) == (False, "none")


def test_load_split_rejects_an_unknown_binarization(tmp_path):
    path = tmp_path / "s.pt"
    torch.save({"images": torch.zeros(2, 784, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64),
                "binary": True, "binarization": "otsu"}, path)
    expect_data_error(lambda: load_split(path), str(path), "'otsu'", "dynamic, static, none")


# --------------------------------------------------------------------------- the stages' dispatch


def params_for(tmp_path: Path, **data):
    return params_from_dict({"paths": {"raw": str(tmp_path / "raw"), "processed": str(tmp_path / "processed")},
                             "data": data})


def test_binarize_stage_dispatches_frey(frey_raw, tmp_path, capsys):
    params = params_for(tmp_path, dataset="frey", binarization="none")
    raw = params.paths.raw_dir("frey")
    raw.mkdir(parents=True)
    (raw / frey.FILE).write_bytes((frey_raw["dir"] / frey.FILE).read_bytes())
    assert stages.binarize(params) == {"train": 1565, "valid": 200, "test": 200}
    assert load_split(params.paths.processed_dir("frey") / "test.pt").binarization == "none"
    printed = capsys.readouterr().out
    assert "train: 1565 examples, valid: 200 examples, test: 200 examples (none binarization)" in printed


def test_binarize_stage_dispatches_static_mnist(static_raw, tmp_path, capsys):
    params = params_for(tmp_path, dataset="mnist", binarization="static")
    raw = params.paths.raw_dir("mnist")  # raw files live under the dataset's name, not the source's
    raw.mkdir(parents=True)
    for file, _ in binarized_mnist.FILES.values():
        (raw / file).write_bytes((static_raw["dir"] / file).read_bytes())
    assert stages.binarize(params) == SMALL_COUNTS
    assert load_split(params.paths.processed_dir("mnist") / "train.pt").binarization == "static"
    assert "(static binarization)" in capsys.readouterr().out


def test_download_stage_uses_the_source_of_the_binarization(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("vae.data.download.download_dataset",
                        lambda source, destination, progress=True: calls.append((source, destination)) or {})
    stages.download(params_for(tmp_path, dataset="mnist", binarization="static"), progress=False)
    stages.download(params_for(tmp_path, dataset="frey", binarization="none"), progress=False)
    assert calls == [(BINARIZED_MNIST, tmp_path / "raw" / "mnist"), (FREY, tmp_path / "raw" / "frey")]


# --------------------------------------------------------------------------- the real files


@pytest.mark.parametrize("source", [BINARIZED_MNIST, FREY], ids=lambda source: source.name)
def test_download_from_the_mirror_verifies_checksums(tmp_path, source, capsys):
    local_mirror(source.name)
    destination = tmp_path / "raw"
    origins = download_dataset(source, destination, mirror=dataset_mirror(), progress=False)
    printed = capsys.readouterr().out
    assert sorted(origins) == sorted(remote.local_name for remote in source.files)
    for remote in source.files:
        assert origins[remote.local_name].endswith(f"/{source.name}/{remote.name}")  # the source's folder
        assert sha256_of(destination / remote.local_name) == remote.sha256
        assert f"{remote.local_name}: sha256 ok" in printed


def test_read_real_binarized_mnist():
    folder = local_mirror("binarized_mnist")
    start = time.perf_counter()
    images = read_amat(folder / "binarized_mnist_valid.amat", 10000)
    assert time.perf_counter() - start < 5
    assert images.shape == (10000, 784) and images.dtype == torch.uint8
    assert set(torch.unique(images).tolist()) == {0, 1}
    assert 0.10 < float(images.float().mean()) < 0.16  # about 13% of binarized MNIST pixels are on
    # Digits are centred: the border pixels are almost always off, the centre often on.
    square = images.float().mean(dim=0).reshape(28, 28)
    assert float(square[0].max()) < 0.01 and float(square[10:18, 10:18].mean()) > 0.2


def test_read_real_frey():
    folder = local_mirror("frey")
    faces = read_frey(folder / "frey_rawface.mat")
    assert faces.shape == (1965, 560) and faces.dtype == torch.uint8
    mean = float(faces.float().mean()) / FREY_SCALE
    assert 0.45 < mean < 0.75  # grey faces, not a blank or saturated file
    assert int(faces.min()) < 50 and int(faces.max()) > 200
