"""``vae.data.mnist`` (IDX parsing, split, binarization) and ``vae.data.splits`` (the on-disk format).

All IDX files are synthetic and written by the tests. The full-size ones (60000 + 10000 images,
as ``prepare_mnist`` expects) are written once per module. Every synthetic image carries its own
index in its first 16 pixels as bits of 0 or 255, which Bernoulli sampling maps to 0 or 1 exactly,
so the source image of every row of every split, binarized or not, can be decoded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from support import idx_bytes
from vae.config import DataConfig
from vae.data.mnist import FILES, IMAGE_MAGIC, LABEL_MAGIC, prepare_mnist, read_idx_images, read_idx_labels
from vae.data.splits import SPLITS, Split, load_split, load_splits
from vae.errors import ConfigError, DataError

ID_BITS = 16  # 2**16 > 60000


# --------------------------------------------------------------------------- helpers


def write_images(path: Path, images: np.ndarray) -> Path:
    """Write uint8 images of shape (n, 784) or (n, 28, 28) as an IDX3 file."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), 28, 28)
    path.write_bytes(idx_bytes(IMAGE_MAGIC, images.shape, images.tobytes()))
    return path


def write_labels(path: Path, labels: np.ndarray) -> Path:
    labels = np.asarray(labels, dtype=np.uint8)
    path.write_bytes(idx_bytes(LABEL_MAGIC, labels.shape, labels.tobytes()))
    return path


def synthetic_images(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 784) uint8: pixels 0..15 encode the row index as 0/255 bits, the rest random grey."""
    images = rng.integers(0, 256, size=(count, 784), dtype=np.uint8)
    bits = (np.arange(count)[:, None] >> np.arange(ID_BITS)) & 1
    images[:, :ID_BITS] = (bits * 255).astype(np.uint8)
    return images


def decode_ids(images: torch.Tensor) -> np.ndarray:
    """The source indices encoded in the first pixels of grey (0/255) or binary (0/1) images."""
    bits = (images[:, :ID_BITS].numpy() > 0).astype(np.int64)
    return (bits << np.arange(ID_BITS)).sum(axis=1)


# --------------------------------------------------------------------------- IDX parsing


def test_read_idx_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    read_images = read_idx_images(write_images(tmp_path / "img", images), 7)
    read_labels = read_idx_labels(write_labels(tmp_path / "lbl", labels), 7)
    assert read_images.dtype == torch.uint8 and read_images.shape == (7, 784)
    assert np.array_equal(read_images.numpy(), images)
    assert read_labels.dtype == torch.int64 and read_labels.shape == (7,)
    assert np.array_equal(read_labels.numpy(), labels.astype(np.int64))


def test_read_idx_images_row_major_layout(tmp_path):
    """Pixel (r, c) of image i is element r * 28 + c of row i."""
    image = np.zeros((1, 28, 28), dtype=np.uint8)
    image[0, 3, 5] = 200
    read = read_idx_images(write_images(tmp_path / "img", image), 1)
    assert read[0, 3 * 28 + 5] == 200 and int(read.sum()) == 200


def _expect_data_error(path: Path, *fragments: str, reader=read_idx_images, count: int = 4) -> str:
    with pytest.raises(DataError) as caught:
        reader(path, count)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(0x00000802, (4, 28, 28), bytes(4 * 784)))
    _expect_data_error(path, "0x00000802", "expected 0x00000803")


def test_labels_file_read_as_images(tmp_path):
    path = write_labels(tmp_path / "lbl", np.zeros(40))  # long enough for an image header
    _expect_data_error(path, "0x00000801", "expected 0x00000803")


def test_images_file_read_as_labels(tmp_path):
    path = write_images(tmp_path / "img", np.zeros((4, 784)))
    _expect_data_error(path, "expected 0x00000801", reader=read_idx_labels)


def test_wrong_image_dimensions(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(IMAGE_MAGIC, (4, 27, 28), bytes(4 * 27 * 28)))
    _expect_data_error(path, "(4, 27, 28)", "expected (4, 28, 28)")


def test_wrong_image_count(tmp_path):
    path = write_images(tmp_path / "img", np.zeros((3, 784)))
    _expect_data_error(path, "(3, 28, 28)", "expected (4, 28, 28)")


def test_wrong_label_count(tmp_path):
    path = write_labels(tmp_path / "lbl", np.zeros(5))
    _expect_data_error(path, "(5,)", "expected (4,)", reader=read_idx_labels)


def test_truncated_images(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(IMAGE_MAGIC, (4, 28, 28), bytes(4 * 784 - 100)))
    _expect_data_error(path, f"{16 + 4 * 784 - 100} bytes", f"expected {16 + 4 * 784}")


def test_extra_bytes(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(idx_bytes(IMAGE_MAGIC, (4, 28, 28), bytes(4 * 784 + 1)))
    _expect_data_error(path, f"{16 + 4 * 784 + 1} bytes", f"expected {16 + 4 * 784}")


def test_truncated_labels(tmp_path):
    path = tmp_path / "lbl"
    path.write_bytes(idx_bytes(LABEL_MAGIC, (4,), bytes(3)))
    _expect_data_error(path, "11 bytes", "expected 12", reader=read_idx_labels)


def test_label_out_of_range(tmp_path):
    path = write_labels(tmp_path / "lbl", np.array([0, 9, 10, 3]))
    _expect_data_error(path, "label 10", "0..9", reader=read_idx_labels)


@pytest.mark.parametrize("reader", [read_idx_images, read_idx_labels])
def test_missing_file(tmp_path, reader):
    _expect_data_error(tmp_path / "nothing-here", "not found", reader=reader)


@pytest.mark.parametrize("size", [0, 3, 15])
def test_shorter_than_header(tmp_path, size):
    path = tmp_path / "img"
    path.write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 4, 28, 28)[:size])
    _expect_data_error(path, "too short for an IDX header", f"({size} bytes)")


# --------------------------------------------------------------------------- prepare_mnist, full size


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict:
    """Full-size synthetic raw MNIST files (written once) and their contents."""
    folder = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(2024)
    contents = {}
    for split, (image_name, label_name, count) in FILES.items():
        images = synthetic_images(count, rng)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_images(folder / image_name, images)
        write_labels(folder / label_name, labels)
        contents[split] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    return {"dir": folder, **contents}


@pytest.fixture(scope="module")
def default_splits(raw, tmp_path_factory) -> dict:
    """``prepare_mnist`` with the default configuration, run once."""
    out = tmp_path_factory.mktemp("processed")
    sizes = prepare_mnist(raw["dir"], out, DataConfig())
    return {"dir": out, "sizes": sizes, **load_splits(out)}


def test_split_sizes(default_splits):
    assert default_splits["sizes"] == {"train": 50000, "valid": 10000, "test": 10000}
    assert sorted(p.name for p in default_splits["dir"].iterdir()) == ["test.pt", "train.pt", "valid.pt"]
    for name in SPLITS:
        split = default_splits[name]
        assert len(split) == default_splits["sizes"][name]
        assert split.images.dtype == torch.uint8 and split.images.shape[1] == 784
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert split.binarization == "dynamic"


def test_train_and_valid_partition_the_training_images(raw, default_splits):
    source_images, source_labels = raw["train"]
    train, valid = default_splits["train"], default_splits["valid"]
    train_ids, valid_ids = decode_ids(train.images), decode_ids(valid.images)
    assert len(np.unique(train_ids)) == 50000 and len(np.unique(valid_ids)) == 10000
    assert not set(train_ids) & set(valid_ids)
    assert np.array_equal(np.sort(np.concatenate([train_ids, valid_ids])), np.arange(60000))
    # Rows and labels are those of the decoded source images.
    assert torch.equal(train.images, source_images[train_ids])
    assert torch.equal(train.labels, source_labels[train_ids])
    assert torch.equal(valid.labels, source_labels[valid_ids])
    # The split is shuffled, not the first / last 10000.
    assert not np.array_equal(np.sort(valid_ids), np.arange(50000, 60000))
    assert not np.array_equal(np.sort(valid_ids), np.arange(10000))


def test_file_order_split_is_the_iwae_authors(raw, tmp_path):
    """split_order file, validation_size 400 (yburda/iwae datasets.binarized_mnist(n_validation=400)):
    the first 59600 training images train, in file order; the last 400 validate."""
    sizes = prepare_mnist(raw["dir"], tmp_path, DataConfig(validation_size=400, split_order="file"))
    assert sizes == {"train": 59600, "valid": 400, "test": 10000}
    splits = load_splits(tmp_path)
    assert np.array_equal(decode_ids(splits["train"].images), np.arange(59600))
    assert np.array_equal(decode_ids(splits["valid"].images), np.arange(59600, 60000))
    assert torch.equal(splits["train"].images, raw["train"][0][:59600])
    with pytest.raises(ValueError, match="split_order"):
        DataConfig(dataset="mnist", binarization="static", split_order="file")  # the files fix that split


def test_test_split_is_the_test_images_in_order(raw, default_splits):
    source_images, source_labels = raw["test"]
    test = default_splits["test"]
    assert np.array_equal(decode_ids(test.images), np.arange(10000))
    assert torch.equal(test.labels, source_labels)


def test_valid_and_test_are_binary_train_is_grey(raw, default_splits):
    train = default_splits["train"]
    assert not train.binary
    assert torch.count_nonzero(torch.bincount(train.images[:1000].flatten(), minlength=256)) == 256
    for name, source in (("valid", raw["train"][0][decode_ids(default_splits["valid"].images)]),
                         ("test", raw["test"][0])):
        split = default_splits[name]
        assert split.binary
        assert (int(split.images.min()), int(split.images.max())) == (0, 1)
        # Black pixels stay 0, white ones become 1.
        assert not (split.images.bool() & (source == 0)).any()
        assert not (~split.images.bool() & (source == 255)).any()


def test_binarization_is_unbiased(raw, default_splits):
    """Per grey level v, the fraction of binarized test pixels that are 1 is v / 255."""
    grey = raw["test"][0][:, ID_BITS:].flatten().long()
    binary = default_splits["test"].images[:, ID_BITS:].flatten().double()
    ones = torch.zeros(256, dtype=torch.float64).index_add_(0, grey, binary)
    counts = torch.bincount(grey, minlength=256).double()
    assert int(counts.min()) > 20000
    p = torch.arange(256, dtype=torch.float64) / 255
    observed = ones / counts
    sigma = (p * (1 - p) / counts).sqrt()
    assert torch.all((observed - p).abs() <= 5 * sigma + 1e-12), (observed - p).abs().max()
    overall = float(binary.mean())
    assert abs(overall - float(grey.double().mean()) / 255) < 1e-3


def test_same_seeds_same_tensors(raw, default_splits, tmp_path):
    prepare_mnist(raw["dir"], tmp_path, DataConfig())
    for name in SPLITS:
        again = load_split(tmp_path / f"{name}.pt")
        assert torch.equal(again.images, default_splits[name].images)
        assert torch.equal(again.labels, default_splits[name].labels)
        assert (again.binary, again.binarization) == (default_splits[name].binary, default_splits[name].binarization)


def test_same_seeds_byte_identical_files(raw, tmp_path):
    config = DataConfig(train_subset=50, eval_subset=50)
    prepare_mnist(raw["dir"], tmp_path / "a", config)
    prepare_mnist(raw["dir"], tmp_path / "b", config)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.pt").read_bytes() == (tmp_path / "b" / f"{name}.pt").read_bytes(), name


def test_subsets_are_prefixes_of_the_full_split(raw, default_splits, tmp_path):
    sizes = prepare_mnist(raw["dir"], tmp_path, DataConfig(train_subset=300, eval_subset=200))
    assert sizes == {"train": 300, "valid": 200, "test": 200}
    capped = load_splits(tmp_path)
    assert torch.equal(capped["train"].images, default_splits["train"].images[:300])
    assert np.array_equal(decode_ids(capped["valid"].images), decode_ids(default_splits["valid"].images)[:200])
    assert np.array_equal(decode_ids(capped["test"].images), np.arange(200))
    assert set(torch.unique(capped["test"].images).tolist()) == {0, 1}


def test_other_split_seed_gives_another_split(raw, default_splits, tmp_path):
    prepare_mnist(raw["dir"], tmp_path, DataConfig(split_seed=1, eval_subset=1000))
    other = load_splits(tmp_path)
    assert len(other["train"]) == 50000
    default_valid = set(decode_ids(default_splits["valid"].images)[:1000])
    other_valid = set(decode_ids(other["valid"].images))
    assert len(default_valid & other_valid) < 500  # about 1000 * 10000 / 60000 overlap by chance
    assert not torch.equal(other["train"].images, default_splits["train"].images)
    # The test split does not depend on the split seed.
    assert np.array_equal(decode_ids(other["test"].images), np.arange(1000))


def test_other_binarization_seed_gives_other_binary_images(raw, tmp_path):
    prepare_mnist(raw["dir"], tmp_path / "a", DataConfig(binarization_seed=0, train_subset=100, eval_subset=1000))
    prepare_mnist(raw["dir"], tmp_path / "b", DataConfig(binarization_seed=1, train_subset=100, eval_subset=1000))
    a, b = load_splits(tmp_path / "a"), load_splits(tmp_path / "b")
    assert torch.equal(a["train"].images, b["train"].images)  # same split, grey training images untouched
    for name in ("valid", "test"):
        assert np.array_equal(decode_ids(a[name].images), decode_ids(b[name].images))  # same images...
        differing = (a[name].images != b[name].images).float().mean()
        assert differing > 0.2  # ...sampled differently (about 1/3 of random grey pixels differ)


@pytest.mark.parametrize("validation_size", [60000, 60001])
def test_validation_size_leaving_no_training_images(raw, tmp_path, validation_size):
    with pytest.raises(ConfigError) as caught:
        prepare_mnist(raw["dir"], tmp_path / "out", DataConfig(validation_size=validation_size))
    assert f"data.validation_size = {validation_size}" in str(caught.value)
    assert "60000" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_prepare_mnist_missing_raw_files(tmp_path):
    with pytest.raises(DataError) as caught:
        prepare_mnist(tmp_path / "raw", tmp_path / "out", DataConfig())
    assert str(tmp_path / "raw" / FILES["train"][0]) in str(caught.value)
    assert "vae download" in str(caught.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- splits


def _grey_split(n: int = 64, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(images=torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=g),
                 labels=torch.randint(0, 10, (n,), generator=g), binary=False, binarization="dynamic")


def test_split_save_load_round_trip(tmp_path):
    split = _grey_split()
    split.save(tmp_path / "sub" / "train.pt")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["train.pt"]  # no temporary file left
    loaded = load_split(tmp_path / "sub" / "train.pt")
    assert torch.equal(loaded.images, split.images) and torch.equal(loaded.labels, split.labels)
    assert loaded.binary is False and loaded.binarization == "dynamic"
    binary = Split(split.images % 2, split.labels, binary=True, binarization="dynamic")
    binary.save(tmp_path / "valid.pt")
    assert load_split(str(tmp_path / "valid.pt")).binary is True


def test_load_split_missing_file(tmp_path):
    with pytest.raises(DataError) as caught:
        load_split(tmp_path / "train.pt")
    assert str(tmp_path / "train.pt") in str(caught.value) and "vae binarize" in str(caught.value)


def test_load_split_random_bytes(tmp_path):
    path = tmp_path / "train.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as caught:
        load_split(path)
    assert str(path) in str(caught.value)


def test_load_split_missing_keys(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"images": torch.zeros(2, 784, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64)}, path)
    with pytest.raises(DataError) as caught:
        load_split(path)
    assert str(path) in str(caught.value) and "binarization" in str(caught.value)


def test_load_split_wrong_shapes(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"images": torch.zeros(2, 784, dtype=torch.float32), "labels": torch.zeros(2, dtype=torch.int64),
                "binary": True, "binarization": "dynamic"}, path)
    with pytest.raises(DataError, match="uint8"):
        load_split(path)
    torch.save({"images": torch.zeros(2, 784, dtype=torch.uint8), "labels": torch.zeros(3, dtype=torch.int64),
                "binary": True, "binarization": "dynamic"}, path)
    with pytest.raises(DataError, match=r"labels \(3,\)"):
        load_split(path)


def test_load_split_non_tensor_images(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"images": [[0, 1]], "labels": torch.zeros(1, dtype=torch.int64),
                "binary": True, "binarization": "dynamic"}, path)
    with pytest.raises(DataError, match="must be tensors"):
        load_split(path)


def test_values_of_a_dynamic_grey_split():
    split = _grey_split(n=200)
    first = split.values(generator=torch.Generator().manual_seed(3))
    again = split.values(generator=torch.Generator().manual_seed(3))
    other = split.values(generator=torch.Generator().manual_seed(4))
    assert first.dtype == torch.float32 and first.shape == (200, 784)
    assert set(torch.unique(first).tolist()) == {0.0, 1.0}
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not first[split.images == 0].any() and first[split.images == 255].all()
    assert abs(float(first.mean()) - float(split.images.float().mean()) / 255) < 0.01


def test_values_of_a_binary_split_are_returned_as_is():
    images = (torch.arange(2 * 784) % 3 == 0).to(torch.uint8).reshape(2, 784)
    split = Split(images, torch.zeros(2, dtype=torch.int64), binary=True, binarization="dynamic")
    out = split.values(dtype=torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, images.double())
