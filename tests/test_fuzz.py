"""Property-based tests (hypothesis) of the parsers and of the params validation.

Every reader of a file the project did not write itself, or that may be damaged, is fed arbitrary
bytes and near-valid inputs: MNIST's IDX files (``read_idx_images``, ``read_idx_labels``), the
static binarization's ``.amat`` text (``read_amat``), Frey Face's MATLAB file (``read_frey``),
processed splits (``load_split``), checkpoints (``read_checkpoint``, ``load_model``) and the
parameters (``load_params`` on bytes, ``params_from_dict`` on arbitrary nested values).

The property, for each: the reader returns the right result (checked against the format's
definition where the test can compute it: shape, dtype, values), or raises the project's own
error type for that input (``DataError``, ``CheckpointError``, ``ConfigError``) with a message
naming the file or source. Any other exception fails the test: it would reach the user as a
traceback. The ``@example`` inputs are the crashes these properties found (regressions) and a few
known nasty cases.

Runs are reproducible (``derandomize``: the same examples every run, no example database) and
write their files into one module-scoped folder.
"""

from __future__ import annotations

import contextlib
import io
import math
import resource
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st

from support import amat_text, idx_bytes, synthetic_faces
from vae import profile
from vae.config import Params, load_params, params_from_dict
from vae.data.binarized_mnist import PIXELS, read_amat
from vae.data.frey import read_frey
from vae.data.mnist import IMAGE_MAGIC, IMAGE_SIDE, LABEL_MAGIC, read_idx_images, read_idx_labels
from vae.data.splits import BINARIZATIONS, Split, load_split
from vae.errors import CheckpointError, ConfigError, DataError
from vae.model import VAE, load_model, read_checkpoint, save_checkpoint

EXAMPLES = 200  # per property: the whole module runs in about 20 s on two cores
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
# torch.load warns about the pickle protocol of some random bytes before failing on them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def expect_error(error_type: type[Exception], call, source) -> str:
    """Run ``call``, which must raise ``error_type`` with a message naming ``source``; the message."""
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert message and str(source) in message, message
    return message


def result_or_error(error_type: type[Exception], call, source):
    """``call()``'s result, or None where it raised ``error_type`` naming ``source``. Any other
    exception propagates, failing the property."""
    try:
        result = call()
    except error_type as error:
        message = str(error)
        assert message and str(source) in message, message
        event(f"refused: {error_type.__name__}")
        return None
    event("accepted")
    return result


# Damage to a valid file: truncation, bit flips, and 32-bit words overwritten with values that
# matter in headers (sizes, counts, dimensions, type codes), in either byte order.
WORDS = [0, 1, 2, 14, 15, 560, 2**28, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x0000FFFF]
positions = st.integers(0, 4096)  # taken modulo the file's length
damages = st.lists(st.one_of(
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("word"), positions, st.sampled_from(WORDS), st.sampled_from("<>")),
), min_size=1, max_size=3)


def damage(content: bytes, edits: list[tuple]) -> bytes:
    data = bytearray(content)
    for edit in edits:
        position = edit[1] % max(len(data), 1)
        if edit[0] == "truncate":
            del data[position:]
        elif edit[0] == "flip" and data:
            data[position] ^= 1 << edit[2]
        elif edit[0] == "word":
            data[position: position + 4] = struct.pack(f"{edit[3]}I", edit[2])
    return bytes(data)


# --------------------------------------------------------------------------- IDX (MNIST)


IDX = {"images": (read_idx_images, IMAGE_MAGIC, (IMAGE_SIDE, IMAGE_SIDE)), "labels": (read_idx_labels, LABEL_MAGIC, ())}


def idx_expected(kind: str, content: bytes, count: int) -> torch.Tensor | None:
    """What the IDX format says ``content`` holds for ``count`` items, or None where it is invalid."""
    _, magic, tail = IDX[kind]
    header = idx_bytes(magic, (count, *tail), b"")
    body = content[len(header):]
    if not content.startswith(header) or len(body) != count * math.prod(tail):
        return None
    values = np.frombuffer(body, dtype=np.uint8)
    if kind == "images":
        return torch.from_numpy(values.reshape(count, IMAGE_SIDE * IMAGE_SIDE).copy())
    if values.size and values.max() > 9:
        return None
    return torch.from_numpy(values.astype(np.int64))


def check_idx(kind: str, path: Path, content: bytes, count: int) -> None:
    path.write_bytes(content)
    reader = IDX[kind][0]
    expected = idx_expected(kind, content, count)
    event("invalid" if expected is None else "valid")
    if expected is None:
        expect_error(DataError, lambda: reader(path, count), path)
    else:
        read = reader(path, count)
        assert read.dtype == expected.dtype and read.shape == expected.shape and torch.equal(read, expected)


@pytest.mark.parametrize("kind", IDX)
@FUZZ
@given(content=st.binary(max_size=64), count=st.integers(0, 3))
@example(content=b"", count=0)
@example(content=b"\x00\x00\x08\x03", count=0)
def test_idx_arbitrary_bytes(folder, kind, content, count):
    check_idx(kind, folder / f"arbitrary-{kind}", content, count)


@pytest.mark.parametrize("kind", IDX)
@FUZZ
@given(count=st.integers(0, 3), header_count=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       extra=st.one_of(st.integers(-3, 3), st.integers(-3 * 784, 2 * 784)), high=st.sampled_from([10, 11, 256]),
       seed=st.integers(0, 2**16))
@example(count=0, header_count=None, extra=0, high=10, seed=0)  # an empty file: torchvision's reader crashed
@example(count=2, header_count=None, extra=0, high=256, seed=0)
def test_idx_valid_header_arbitrary_payload(folder, kind, count, header_count, extra, high, seed):
    """A header with the right magic number and dimensions (and mostly the right count), then a
    payload of any length: the fuzzer gets past the header check."""
    size = count * math.prod(IDX[kind][2])
    payload = np.random.default_rng(seed).integers(0, high, max(size + extra, 0), dtype=np.uint8).tobytes()
    header = idx_bytes(IDX[kind][1], (count if header_count is None else header_count, *IDX[kind][2]), b"")
    check_idx(kind, folder / f"header-{kind}", header + payload, count)


# --------------------------------------------------------------------------- .amat (static MNIST)


def amat_expected(content: bytes, count: int) -> torch.Tensor | None:
    """The ``.amat`` format's definition (``vae.data.binarized_mnist``), written plainly: ``count``
    lines of 784 values 0 or 1 separated by single spaces, each ended by ``\\n`` (the last may lack it)."""
    lines = content.split(b"\n")
    if content.endswith(b"\n") or not content:
        lines.pop()
    if len(lines) != count:
        return None
    rows = []
    for line in lines:
        values = line.split(b" ")
        if len(values) != PIXELS or any(value not in (b"0", b"1") for value in values):
            return None
        rows.append([int(value) for value in values])
    return torch.tensor(rows, dtype=torch.uint8).reshape(count, PIXELS)


def check_amat(path: Path, content: bytes, count: int) -> None:
    path.write_bytes(content)
    expected = amat_expected(content, count)
    event("invalid" if expected is None else "valid")
    if expected is None:
        message = expect_error(DataError, lambda: read_amat(path, count), path)
        assert "line" in message, message  # the first bad line, or the number of lines
    else:
        read = read_amat(path, count)
        assert read.dtype == torch.uint8 and read.shape == (count, PIXELS) and torch.equal(read, expected)


AMAT_PIECES = [b"0", b"1", b" ", b"\n", b"\r\n", b"\t", b"2", b"0.5", b"-1", b"\xc3\xa9", b"\xff"]


@FUZZ
@given(content=st.one_of(st.binary(max_size=80), st.lists(st.sampled_from(AMAT_PIECES), max_size=40).map(b"".join)),
       count=st.integers(0, 2))
@example(content=b"", count=0)
@example(content=b"\n", count=0)
@example(content=b"0 1\n", count=1)
def test_amat_arbitrary_bytes(folder, content, count):
    check_amat(folder / "arbitrary.amat", content, count)


AMAT_TOKENS = ["0", "1", "2", "0.5", "", "-1", "1e3", "nan", "é", "\u00a0", "01", "0 ", "\t1", "１"]
amat_edits = st.lists(st.one_of(
    st.tuples(st.sampled_from(["set", "insert"]), st.integers(0, 5), st.integers(0, PIXELS), st.sampled_from(AMAT_TOKENS)),
    st.tuples(st.just("delete"), st.integers(0, 5), st.integers(0, PIXELS)),
    st.tuples(st.sampled_from(["crlf", "trailing space", "leading space", "drop line", "double line"]), st.integers(0, 5)),
), max_size=3)


@FUZZ
@given(lines=st.integers(0, 3), seed=st.integers(0, 2**16), edits=amat_edits, final_newline=st.booleans(),
       count_offset=st.sampled_from([0, 0, 0, -1, 1]))
@example(lines=2, seed=0, edits=[("crlf", 1)], final_newline=True, count_offset=0)
@example(lines=1, seed=0, edits=[("set", 0, 783, "")], final_newline=True, count_offset=0)
@example(lines=1, seed=0, edits=[("set", 0, 5, "é")], final_newline=False, count_offset=0)
def test_amat_near_valid_text(folder, lines, seed, edits, final_newline, count_offset):
    """Valid lines with a few tokens replaced, inserted or deleted, Windows line ends, stray spaces,
    lines dropped or doubled, with or without the final line end, and the wrong expected count."""
    rows = [line.split(" ") for line in amat_text(np.random.default_rng(seed).integers(0, 2, (lines, PIXELS)))
            .decode().splitlines()]
    suffixes = [""] * len(rows)
    for edit in edits:
        if not rows:
            break
        number = edit[1] % len(rows)
        if edit[0] == "set":
            rows[number][edit[2] % PIXELS] = edit[3]
        elif edit[0] == "insert":
            rows[number].insert(edit[2], edit[3])
        elif edit[0] == "delete":
            del rows[number][edit[2] % len(rows[number])]
        elif edit[0] == "crlf":
            suffixes[number] = "\r"
        elif edit[0] == "trailing space":
            suffixes[number] = " "
        elif edit[0] == "leading space":
            rows[number].insert(0, "")
        elif edit[0] == "drop line":
            del rows[number], suffixes[number]
        else:
            rows.insert(number, list(rows[number]))
            suffixes.insert(number, suffixes[number])
    text = "\n".join(" ".join(row) + suffix for row, suffix in zip(rows, suffixes))
    content = (text + "\n" if rows and final_newline else text).encode()
    check_amat(folder / "near-valid.amat", content, max(len(rows) + count_offset, 0))


# --------------------------------------------------------------------------- .mat (Frey Face)


MAT5_HEADER = b"MATLAB 5.0 MAT-file, fuzz".ljust(116, b" ") + bytes(8) + b"\x00\x01IM"


@contextlib.contextmanager
def peak_memory_grows_less_than(megabytes: int):
    """Fail if the block raises the process's peak resident memory by ``megabytes`` or more (the
    peak is a high-water mark: a block that stays below an earlier peak always passes)."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - before
    assert grown < megabytes * 2**20, f"the peak memory grew by {grown / 2**20:.0f} MB"


def check_frey(path: Path, expected: np.ndarray | None = None) -> None:
    """read_frey(path) raises DataError naming the file, or returns uint8 (N, 560) faces
    (``expected.T`` where the test knows the file holds a valid ``ff``), without allocating
    much more than the file holds."""
    with warnings.catch_warnings(), peak_memory_grows_less_than(256):
        warnings.simplefilter("ignore")  # scipy warns about unreadable or duplicated variables
        if expected is not None:
            read = read_frey(path)
            assert read.dtype == torch.uint8 and np.array_equal(read.numpy(), expected.T)
            return
        read = result_or_error(DataError, lambda: read_frey(path), path)
    if read is not None:
        assert read.dtype == torch.uint8 and read.ndim == 2 and read.shape[0] >= 1 and read.shape[1] == 560


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda tail: MAT5_HEADER + tail)))
@example(content=b"")
@example(content=MAT5_HEADER)
@example(content=MAT5_HEADER + struct.pack("<II", 14, 0x7FFFFFF0))
def test_frey_arbitrary_bytes(folder, content):
    """Any bytes, and any bytes behind a valid MATLAB 5 header (so the variables' tags are parsed)."""
    path = folder / "arbitrary.mat"
    path.write_bytes(content)
    check_frey(path)


def array_of(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).normal(0, 1e3, size=shape)
    if dtype == "complex128":
        return values + 1j * values
    if dtype == "bool":
        return values > 0
    return np.abs(values).astype(dtype) if dtype.startswith("u") else values.astype(dtype)


mat_arrays = st.builds(
    array_of, st.sampled_from(["uint8", "int8", "uint16", "int32", "int64", "float32", "float64", "complex128", "bool"]),
    st.one_of(st.tuples(st.just(560), st.integers(0, 2)), st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    st.integers(0, 100))
mat_scalars = st.one_of(
    mat_arrays, st.text(max_size=8), st.integers(-2**63, 2**63 - 1), st.floats(),
    st.sampled_from([np.array([np.nan, np.inf, -np.inf, 1e308]), np.array([], dtype=np.uint8), np.uint8(7),
                     np.zeros((560, 0), dtype=np.uint8), np.zeros((560, 1, 1), dtype=np.uint8)]))
mat_values = st.recursive(mat_scalars, lambda inner: st.one_of(
    st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), inner, min_size=1, max_size=3),  # structs
    st.lists(inner, min_size=1, max_size=3).map(lambda items: np.array(items + [None], dtype=object)[:-1])),  # cells
    max_leaves=5)
valid_ff = st.builds(synthetic_faces, st.integers(1, 3), st.integers(0, 100))


@FUZZ
@given(variables=st.dictionaries(st.sampled_from(["faces", "x", "FF", "ff_", "a" * 31]), mat_values, max_size=2),
       ff=st.one_of(st.none(), valid_ff, mat_values), form=st.sampled_from(["5", "5z", "4"]))
@example(variables={}, ff=np.array([np.zeros((560, 2), np.uint8)] + [None], dtype=object)[:-1], form="5")
@example(variables={}, ff={"ff": np.zeros((560, 2), np.uint8)}, form="5z")
@example(variables={}, ff="faces", form="5")
@example(variables={"x": np.zeros(3)}, ff=np.zeros((560, 2), np.uint8), form="4")
def test_frey_real_mat_files(folder, variables, ff, form):
    """MATLAB files written by scipy holding any variables: ``ff`` missing, of another shape,
    dtype or number of dimensions, empty, a string, a struct or a cell, complex, huge or NaN."""
    path = folder / "variables.mat"
    if ff is not None:
        variables = {**variables, "ff": ff}
    try:
        scipy.io.savemat(path, variables, format=form[0], do_compression=form == "5z")
    except Exception:  # scipy cannot write this combination (e.g. a struct in a MATLAB 4 file)
        reject()
    valid = (isinstance(ff, np.ndarray) and ff.dtype == np.uint8 and ff.ndim == 2 and ff.shape[0] == 560
             and ff.shape[1] > 0)
    event("valid ff" if valid else "no valid ff")
    check_frey(path, ff if valid else None)


def frey_base(kind: str, form: str) -> bytes:
    """A file whose ``ff`` is valid (uint8), a cell or a struct (in MATLAB 5 format: 4 has neither)."""
    if kind != "uint8":
        form = form.replace("4", "5")
    ff = {"uint8": synthetic_faces(2), "cell": np.array([np.zeros(3), "a"], dtype=object),
          "struct": {"a": np.zeros(2), "b": "x"}}[kind]
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"ff": ff}, format=form[0], do_compression=form == "5z")
    return buffer.getvalue()


@FUZZ
@given(kind=st.sampled_from(["uint8", "cell", "struct"]), form=st.sampled_from(["5", "5z", "4"]), edits=damages)
# ff's dimensions are the words at bytes 160 and 164: a cell or struct array claiming 2**28
# elements had scipy allocate gigabytes (and take seconds) before failing
@example(kind="cell", form="5", edits=[("word", 160, 2**28, "<")])
@example(kind="struct", form="5", edits=[("word", 160, 2**28, "<")])
@example(kind="cell", form="5", edits=[("word", 160, 0x7FFFFFFF, "<"), ("word", 164, 0x7FFFFFFF, "<")])
@example(kind="uint8", form="5", edits=[("word", 164, 0x7FFFFFFF, "<")])
@example(kind="uint8", form="5", edits=[("truncate", 600)])
def test_frey_damaged_files(folder, kind, form, edits):
    """Truncated, bit-flipped and overwritten MATLAB files; headers that claim gigantic arrays
    (the reader must refuse them without allocating what they claim)."""
    path = folder / "damaged.mat"
    path.write_bytes(damage(frey_base(kind, form), edits))
    check_frey(path)


# --------------------------------------------------------------------------- params.yaml


SECTIONS = list(Params.model_fields)
FIELD_NAMES = sorted({key for section in Params().to_dict().values() if isinstance(section, dict) for key in section})
CHOICES = ["mnist", "frey", "dynamic", "static", "none", "aevb", "wake-sleep", "adam", "adagrad", "elbo", "iwae",
           "constant", "auto", "cpu", "cuda", "pca", "tsne", "quick", "full", "1e-3", "nan", "inf", "-1", "1e999", ""]
HUGE = 10**400  # more than a float holds

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2, 3), st.sampled_from([HUGE, -HUGE, 2**63]),
                    st.floats(), st.text(max_size=6), st.sampled_from(CHOICES))
keys = st.one_of(st.text(max_size=6), st.sampled_from(SECTIONS + FIELD_NAMES), st.integers(), st.none(),
                 st.booleans(), st.floats())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=8)


def check_params(raw, source: str = "fuzz-source") -> Params | None:
    """params_from_dict(raw): valid Params (which read back as themselves), or a ConfigError whose
    message starts with the source and names, on each further line, a key and what is wrong."""
    try:
        params = params_from_dict(raw, source=source)
    except ConfigError as error:
        first, *problems = str(error).split("\n")
        assert first.startswith(f"{source}: ") and (problems == [] or first == f"{source}: invalid parameters:"), first
        for line in problems:
            assert line.startswith("  ") and ": " in line and line.strip(), (line, str(error))
        event("refused: ConfigError")
        return None
    event("accepted")
    assert isinstance(params, Params)
    assert params_from_dict(params.to_dict(), source=source) == params
    return params


@FUZZ
@given(raw=values)
@example(raw={1: 2})  # a key that is not a string: difflib's TypeError
@example(raw={"data": {None: 1}})
@example(raw={"train": {"learning_rate": HUGE}})  # int too large for a float: OverflowError
@example(raw={"train": {"samples": -10**5000}})  # too many digits to print: ValueError
@example(raw={"sweep": {"settings": {"mnist": {"data": {True: 1}}, "frey": {}}}})
@example(raw={"data": 5})
def test_params_from_arbitrary_values(raw):
    check_params(raw)


def default_params() -> dict:
    return Params().to_dict()


def near(default) -> st.SearchStrategy:
    """Values of the kind a parameter's default has (so that some replacements are valid)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 2 * default + 2)
    if isinstance(default, float):
        return st.one_of(st.floats(-1, 10), st.integers(-1, 5), st.sampled_from(["1e-3", "2e-2", "nan", "1.5"]))
    if isinstance(default, str):
        return st.sampled_from([default, *CHOICES])
    if default is None:
        return st.one_of(st.none(), st.integers(-1, 100), st.floats(0, 1))
    if isinstance(default, list):
        return st.lists(near(default[0]) if default else scalars, max_size=4)
    return st.just(default)


PARAMETERS = [(section, key) for section, keys_ in default_params().items() if isinstance(keys_, dict) for key in keys_]


def check_replaced(section: str, key, value) -> None:
    """The default parameters with ``section.key`` set to ``value``: a ConfigError, or Params that
    hold the value (as a float where a float is expected) and are otherwise the defaults."""
    raw = default_params()
    raw[section][key] = value
    params = check_params(raw)
    if params is None:
        return
    assert isinstance(key, str) and key in default_params()[section], f"{section}.{key!r} accepted"
    held = getattr(getattr(params, section), key)
    assert held == value or (isinstance(value, (str, int)) and not isinstance(value, bool) and held == float(value))
    assert {name: part for name, part in params.to_dict().items() if name != section} == \
        {name: part for name, part in default_params().items() if name != section}


@FUZZ
@given(data=st.data())
@example(data=("train", "learning_rate", 2))  # an integer for a float: held as 2.0
@example(data=("train", "learning_rate", "1e-3"))  # YAML reads 1e-3 (no dot) as a string
@example(data=("train", "learning_rate", 10**400))  # OverflowError in the float conversion
@example(data=("sweep", "seeds", [2**63]))
@example(data=("data", "dataset", "frey"))  # refused: Frey Face needs binarization none
def test_params_one_value_replaced(data):
    """The default parameters with one value replaced: by one of the kind its default has (often
    valid) or by any value."""
    if isinstance(data, tuple):
        section, key, value = data
    else:
        section, key = data.draw(st.sampled_from(PARAMETERS), label="parameter")
        close = near(default_params()[section][key])
        value = data.draw(st.one_of(close, close, values), label="value")
    check_replaced(section, key, value)


@FUZZ
@given(section=st.sampled_from([s for s in SECTIONS if s != "profile"]), key=keys, value=values)
@example(section="data", key=None, value=1)  # difflib's TypeError
@example(section="train", key=True, value=1)
@example(section="model", key="hiden_dim", value=5)
def test_params_key_added(section, key, value):
    """The default parameters with any key (a name, or an integer, None, a bool or a float, as YAML
    reads ``1:``, ``null:``, ``true:``, ``1.5:``) set in a section: refused unless it is a known key."""
    check_replaced(section, key, value)


@FUZZ
@given(profile=st.one_of(st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True), st.text(max_size=8), values))
@example(profile="Quick")
@example(profile=["quick"])
@example(profile="-quick")
def test_params_profile(profile):
    params = check_params({"profile": profile})
    assert params is None or params.profile == profile


YAML_PIECES = ["train:", "data:", "sweep:", "settings:", "mnist:", "  ", "    ", "\n", "\t", ": ", "- ", "? ", ", ",
               "[", "]", "{", "}", "'", '"', "#", "&a ", "*a", "<<: ", "---\n", "...\n", "%YAML 1.1\n", "!!int ",
               "!!float ", "!!str ", "!!timestamp ", "!!binary ", "!!set ", "!!python/object:os.system ",
               "!!python/tuple ", "seed: ", "epochs: ", "learning_rate: ", "dataset: ", "2001-13-01", "2001-01-01",
               "0x1F", "0o17", "1_000", "1e3", ".nan", ".inf", "~", "null", "yes", "caf\u00e9", "\ufeff", "9" * 30]


@FUZZ
@given(content=st.one_of(st.binary(max_size=100), st.lists(st.sampled_from(YAML_PIECES), max_size=16)
                         .map(lambda pieces: "".join(pieces).encode())))
@example(content=b"profile: caf\xe9\n")  # not UTF-8: UnicodeDecodeError
@example(content=b"train:\n  seed: 2001-13-01\n")  # a date that does not exist: ValueError
@example(content=b"train:\n  seed: !!int abc\n")  # ValueError
@example(content=b"train:\n  learning_rate: !!float abc\n")  # ValueError
@example(content=b"train:\n  seed: !!timestamp abc\n")  # AttributeError
@example(content=b"train:\n  seed: " + b"1" * 5000 + b"\n")  # too many digits: ValueError
@example(content=b"[" * 5000)  # nesting deeper than the recursion limit: RecursionError
@example(content=b"a: !!python/object:os.system ls\n")
@example(content=b"sweep:\n  seeds: &a [*a]\n")  # a list that contains itself
@example(content=b"\xff\xfe" + "train: {}\n".encode("utf-16-le"))
def test_load_params_arbitrary_bytes(folder, content):
    path = folder / "params.yaml"
    path.write_bytes(content)
    params = result_or_error(ConfigError, lambda: load_params(path), path)
    assert params is None or isinstance(params, Params)


def test_load_params_unreadable_paths(folder):
    """A folder (IsADirectoryError) or a file that is not UTF-8 (UnicodeDecodeError, also from
    ``vae profile``'s rewrite) is a ConfigError naming the path."""
    assert "cannot read" in expect_error(ConfigError, lambda: load_params(folder), folder)
    path = folder / "latin1.yaml"
    path.write_bytes("profile: quick\n# caf\u00e9\n".encode("latin-1"))
    message = expect_error(ConfigError, lambda: load_params(path), path)
    assert "must be YAML encoded as UTF-8" in message and "line 2" in message
    assert "UTF-8" in expect_error(ConfigError, lambda: profile.apply("quick", path), path)
    assert path.read_bytes() == "profile: quick\n# caf\u00e9\n".encode("latin-1")  # left as it was


# --------------------------------------------------------------------------- checkpoints


def small_vae(likelihood: str) -> VAE:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return VAE(input_dim=6, hidden_dim=3, latent_dim=2, likelihood=likelihood)


def check_checkpoint(path: Path, expected: VAE | None = None) -> None:
    """read_checkpoint and load_model raise CheckpointError naming the file, or load a VAE
    (without allocating much more than the file holds)."""
    with peak_memory_grows_less_than(256):
        payload = result_or_error(CheckpointError, lambda: read_checkpoint(path), path)
        model = result_or_error(CheckpointError, lambda: load_model(path), path)
    if model is None:
        return
    assert payload is not None and isinstance(model, VAE) and not model.training
    if expected is not None:  # the architecture is the one the valid file declared
        assert model.config() == expected.config()
        assert model.state_dict().keys() == expected.state_dict().keys()


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda tail: b"PK\x03\x04" + tail)))
@example(content=b"")
@example(content=b"\x80\x02}q\x00.")  # a pickled empty dict (the legacy format's opening)
def test_checkpoint_arbitrary_bytes(folder, content):
    path = folder / "arbitrary.pt"
    path.write_bytes(content)
    check_checkpoint(path)


@pytest.fixture(scope="module")
def checkpoints(folder) -> dict[str, Path]:
    """A valid checkpoint of each likelihood, written by save_checkpoint."""
    for likelihood in ("bernoulli", "gaussian"):
        save_checkpoint(small_vae(likelihood), folder / f"{likelihood}.pt", metadata={"epochs": 1})
    return {likelihood: folder / f"{likelihood}.pt" for likelihood in ("bernoulli", "gaussian")}


@FUZZ
@given(likelihood=st.sampled_from(["bernoulli", "gaussian"]), edits=damages)
@example(likelihood="bernoulli", edits=[("truncate", 1000)])
@example(likelihood="gaussian", edits=[("flip", 100, 0)])
def test_checkpoint_damaged(folder, checkpoints, likelihood, edits):
    path = folder / "damaged.pt"
    path.write_bytes(damage(checkpoints[likelihood].read_bytes(), edits))
    check_checkpoint(path, small_vae(likelihood))


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(math.prod(shape)).reshape(shape).to(dtype)


tensors = st.builds(make_tensor, st.sampled_from([torch.uint8, torch.int64, torch.float32, torch.float64, torch.bool,
                                                  torch.complex64]),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple))
plain = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=6), tensors),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)),
    max_leaves=6)


def replacements(current):
    """Any plain value, or none (the key deleted), or one close to ``current``: a tensor of the
    same shape in another dtype or of another shape, an integer near it, the same string."""
    close = st.just(current)
    if isinstance(current, torch.Tensor):
        close = st.one_of(st.sampled_from([torch.float64, torch.float16, torch.int64, torch.bool]).map(current.to),
                          st.sampled_from([current[:-1], current.unsqueeze(0)]))
    elif isinstance(current, int) and not isinstance(current, bool):
        close = st.integers(current - 2, current + 2)
    elif isinstance(current, str):
        close = st.sampled_from([current, current.upper()])
    return st.one_of(close, close, st.just("delete"), plain)  # close values twice as often


@FUZZ
@given(likelihood=st.sampled_from(["bernoulli", "gaussian"]), data=st.data())
@example(likelihood="bernoulli", data=[("format_version", torch.tensor([1, 1]))])  # bool(tensor): RuntimeError
@example(likelihood="bernoulli", data=[("state_dict", {0: torch.zeros(1)})])  # a key that is not a string
@example(likelihood="bernoulli", data=[("model_config.hidden_dim", 2**25)])  # allocated 2.7 GB before refusing
@example(likelihood="bernoulli", data=[("model_config.latent_dim", 2**70)])
@example(likelihood="bernoulli", data=[("format_version", 2**70)])
@example(likelihood="gaussian", data=[("model_config.input_dim", 6.0)])
def test_checkpoint_payloads(folder, checkpoints, likelihood, data):
    """Checkpoints written by torch.save whose fields (format, version, model_config and its keys,
    state_dict and its tensors, metadata) hold any tensors and plain values, or are missing."""
    payload = torch.load(checkpoints[likelihood], weights_only=True)
    if isinstance(data, list):
        changes = data
    else:
        fields = ["format", "format_version", "model_config", "state_dict", "metadata",
                  *(f"model_config.{key}" for key in payload["model_config"]),
                  *(f"state_dict.{key}" for key in payload["state_dict"])]
        changes = []
        for name in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique=True), label="fields"):
            parent, key = name.split(".", 1) if "." in name else ("", name)
            current = (payload[parent] if parent else payload)[key]
            changes.append((name, data.draw(replacements(current), label=name)))
    for name, value in changes:
        parent, key = name.split(".", 1) if "." in name else ("", name)
        target = payload.get(parent) if parent else payload
        if not isinstance(target, dict):  # its parent was deleted or replaced
            continue
        if isinstance(value, str) and value == "delete":
            target.pop(key, None)
        else:
            target[key] = value
    path = folder / "payload.pt"
    torch.save(payload, path)
    with peak_memory_grows_less_than(256):
        loaded = result_or_error(CheckpointError, lambda: load_model(path), path)
    if loaded is not None:
        state = payload["state_dict"]
        assert loaded.state_dict().keys() == state.keys()
        for key, tensor in loaded.state_dict().items():
            saved = state[key].real if state[key].is_complex() else state[key]
            assert torch.equal(tensor, saved.to(tensor.dtype)), key


# --------------------------------------------------------------------------- processed splits


def split_bytes(binary: bool) -> bytes:
    buffer = io.BytesIO()
    images = torch.arange(12 * 7).reshape(12, 7).to(torch.uint8)
    torch.save({"images": images % 2 if binary else images, "labels": torch.arange(12) % 10, "binary": binary,
                "binarization": "static" if binary else "dynamic"}, buffer)
    return buffer.getvalue()


def check_split(path: Path) -> Split | None:
    split = result_or_error(DataError, lambda: load_split(path), path)
    if split is not None:
        assert isinstance(split.images, torch.Tensor) and split.images.dtype == torch.uint8 and split.images.ndim == 2
        assert isinstance(split.labels, torch.Tensor) and split.labels.shape == split.images.shape[:1]
        assert isinstance(split.binary, bool) and split.binarization in BINARIZATIONS
    return split


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda tail: b"PK\x03\x04" + tail)))
@example(content=b"")
def test_split_arbitrary_bytes(folder, content):
    path = folder / "arbitrary-split.pt"
    path.write_bytes(content)
    check_split(path)


@FUZZ
@given(binary=st.booleans(), edits=damages)
@example(binary=True, edits=[("truncate", 700)])
def test_split_damaged(folder, binary, edits):
    path = folder / "damaged-split.pt"
    path.write_bytes(damage(split_bytes(binary), edits))
    check_split(path)


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional={
    "images": st.one_of(plain, st.builds(make_tensor, st.just(torch.uint8),
                                         st.tuples(st.sampled_from([12, 12, 3, 0]), st.integers(0, 8)))),
    "labels": st.one_of(plain, st.builds(make_tensor, st.sampled_from([torch.int64, torch.int8]),
                                         st.tuples(st.sampled_from([12, 12, 3, 0])))),
    "binary": st.one_of(st.booleans(), plain), "binarization": st.one_of(st.sampled_from(BINARIZATIONS), plain),
    "extra": plain}), base=st.sampled_from([True, True, True, False]))
@example(fields={"binary": torch.tensor([True, False])}, base=True)  # bool(tensor): RuntimeError
@example(fields={"binary": "no"}, base=True)
@example(fields={"binarization": torch.tensor([1, 2])}, base=True)
def test_split_payloads(folder, fields, base):
    """Splits written by torch.save whose fields hold any tensors and plain values."""
    payload = torch.load(io.BytesIO(split_bytes(True)), weights_only=True) if base else {}
    payload.update(fields)
    path = folder / "payload-split.pt"
    torch.save(payload, path)
    split = check_split(path)
    if split is not None:
        assert split.binary is payload["binary"] and split.binarization == payload["binarization"]
        assert torch.equal(split.images, payload["images"]) and torch.equal(split.labels, payload["labels"])
