"""``vae.data.download`` and ``vae.data.sources`` (with the registry's sources): fetching, verifying and storing dataset files.

Every file here is synthetic and made by the test; it is served for real from a local folder
(``file://`` URLs) and from an HTTP server on 127.0.0.1 started by the test. Only the last test
reads the shared mirror's README (to check the project's MNIST checksums against it).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import random
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vae import datasets
from vae.data.download import download_dataset, fetch_file, sha256_of
from vae.data.sources import MIRROR_ENV, base_urls, mirror_base_url
from vae.datasets import DatasetSource, RemoteFile
from vae.errors import DataError, DownloadError

SOURCES = datasets.sources()
MNIST = datasets.variant("mnist", "dynamic").source

TORCHVISION_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


# --------------------------------------------------------------------------- helpers


def synthetic_bytes(seed: int, size: int = 6000) -> bytes:
    """Deterministic pseudo-random bytes with some structure (so gzip levels give different output)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gz(data: bytes, level: int = 9, mtime: int = 0) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=mtime)


def folder_url(folder: Path) -> str:
    return folder.as_uri() + "/"


def listing(folder: Path) -> list[str]:
    """Every entry in ``folder`` (hidden temporary files included), sorted."""
    return sorted(os.listdir(folder)) if folder.exists() else []


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder; records request paths instead of logging them to stderr."""

    requests: list[str]

    def log_message(self, format, *args):  # noqa: A002 (signature of the base class)
        pass

    def do_GET(self):  # noqa: N802 (name of the base class's method)
        self.requests.append(self.path)
        super().do_GET()


class Server:
    """A real HTTP server on 127.0.0.1 serving ``folder``, run in a thread."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[str] = []
        handler = type("Handler", (_QuietHandler,), {"requests": self.requests})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    """``serve(folder)`` -> an HTTP server on 127.0.0.1 serving it; all are shut down afterwards."""
    servers: list[Server] = []

    def start(folder: Path) -> Server:
        folder.mkdir(parents=True, exist_ok=True)
        server = Server(folder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=["file", "http"])
def base_url_of(request, serve):
    """``base_url_of(folder)`` -> a base URL serving ``folder``: a file:// URL or a real HTTP server."""
    if request.param == "file":
        return folder_url
    return lambda folder: serve(folder).url


DATA = synthetic_bytes(1)
REMOTE = RemoteFile(name="x.gz", sha256=sha256_hex(DATA))


def publish(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------- sources


def test_remote_file_names():
    assert REMOTE.compressed and REMOTE.local_name == "x"
    plain = RemoteFile("data.amat", "0" * 64)
    assert not plain.compressed and plain.local_name == "data.amat"


def test_mnist_upstream_urls_are_the_torchvision_mirrors(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert MNIST.base_urls == TORCHVISION_MIRRORS
    assert base_urls(MNIST) == list(TORCHVISION_MIRRORS)
    assert SOURCES["mnist"] is MNIST
    assert [f.name for f in MNIST.files] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_mirror_env_means_upstream(monkeypatch, value):
    monkeypatch.setenv(MIRROR_ENV, value)
    assert base_urls(MNIST) == list(TORCHVISION_MIRRORS)


def test_mirror_env_folder_gives_one_file_url(monkeypatch, tmp_path):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    urls = base_urls(MNIST)
    assert urls == [(tmp_path / "mirror" / "mnist").as_uri() + "/"]
    assert urls[0].startswith("file://") and urls[0].endswith("/mnist/")


def test_mirror_env_relative_folder_is_resolved(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, "rel/mirror")
    assert base_urls(MNIST) == [(tmp_path / "rel" / "mirror" / "mnist").as_uri() + "/"]


@pytest.mark.parametrize("mirror", ["http://host/data/", "http://host/data"])
def test_mirror_env_url(monkeypatch, mirror):
    monkeypatch.setenv(MIRROR_ENV, mirror)
    assert base_urls(MNIST) == ["http://host/data/mnist/"]


def test_explicit_mirror_overrides_env(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://env/")
    assert base_urls(MNIST, "https://arg/x/") == ["https://arg/x/mnist/"]
    assert mirror_base_url("file:///srv/mirror", "frey") == "file:///srv/mirror/frey/"


# --------------------------------------------------------------------------- fetch_file


def test_fetch_gz_from_source(tmp_path, base_url_of):
    base = base_url_of(publish(tmp_path / "src", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [base], destination, progress=False) == base + "x.gz"
    assert destination.read_bytes() == DATA  # stored uncompressed
    assert sha256_of(destination) == REMOTE.sha256
    assert listing(destination.parent) == ["x"]


def test_fetch_uncompressed_file_is_stored_as_is(tmp_path, serve):
    data = synthetic_bytes(2)
    server = serve(publish(tmp_path / "src", "plain.amat", data).parent)
    destination = tmp_path / "out" / "plain.amat"
    url = fetch_file(RemoteFile("plain.amat", sha256_hex(data)), [server.url], destination, progress=False)
    assert url == server.url + "plain.amat"
    assert destination.read_bytes() == data
    assert server.requests == ["/plain.amat"]


def test_fetch_with_progress_bar(tmp_path, serve, capsys):
    server = serve(publish(tmp_path / "src", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [server.url], destination, progress=True) == server.url + "x.gz"
    assert destination.read_bytes() == DATA


def test_corrupted_file_is_rejected_and_leaves_nothing(tmp_path, base_url_of):
    wrong = synthetic_bytes(99)
    base = base_url_of(publish(tmp_path / "src", "x.gz", gz(wrong)).parent)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [base], out / "x", progress=False)
    message = str(caught.value)
    assert "x.gz" in message
    assert base + "x.gz" in message
    assert REMOTE.sha256 in message
    assert sha256_hex(wrong) in message
    assert listing(out) == []  # neither the final file nor a temporary one


def test_not_gzip_at_all_is_rejected(tmp_path, base_url_of):
    base = base_url_of(publish(tmp_path / "src", "x.gz", b"this is not gzip data\n" * 50).parent)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [base], out / "x", progress=False)
    assert base + "x.gz" in str(caught.value)
    assert listing(out) == []


def test_truncated_gzip_is_rejected(tmp_path, base_url_of):
    compressed = gz(DATA)
    base = base_url_of(publish(tmp_path / "src", "x.gz", compressed[: len(compressed) // 2]).parent)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [base], out / "x", progress=False)
    message = str(caught.value)
    assert "truncated" in message and "gzip" in message
    assert base + "x.gz" in message
    assert listing(out) == []


def test_falls_back_past_a_404(tmp_path, serve):
    empty = serve(tmp_path / "empty")
    good = serve(publish(tmp_path / "good", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [empty.url, good.url], destination, progress=False) == good.url + "x.gz"
    assert destination.read_bytes() == DATA
    assert empty.requests == ["/x.gz"] and good.requests == ["/x.gz"]


def test_falls_back_past_a_missing_folder(tmp_path):
    good = folder_url(publish(tmp_path / "good", "x.gz", gz(DATA)).parent)
    missing = folder_url(tmp_path / "does-not-exist")
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [missing, good], destination, progress=False) == good + "x.gz"
    assert destination.read_bytes() == DATA


def test_falls_back_past_a_corrupted_copy(tmp_path, serve):
    bad = serve(publish(tmp_path / "bad", "x.gz", gz(synthetic_bytes(7))).parent)
    good = folder_url(publish(tmp_path / "good", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [bad.url, good], destination, progress=False) == good + "x.gz"
    assert destination.read_bytes() == DATA
    assert listing(destination.parent) == ["x"]


def test_first_good_source_wins(tmp_path, serve):
    first = serve(publish(tmp_path / "a", "x.gz", gz(DATA)).parent)
    second = serve(publish(tmp_path / "b", "x.gz", gz(DATA)).parent)
    assert fetch_file(REMOTE, [first.url, second.url], tmp_path / "out" / "x", progress=False) == first.url + "x.gz"
    assert second.requests == []


def test_all_sources_fail_lists_every_url(tmp_path, serve):
    missing = folder_url(tmp_path / "does-not-exist")
    not_found = serve(tmp_path / "empty").url
    corrupted = serve(publish(tmp_path / "bad", "x.gz", gz(synthetic_bytes(5))).parent).url
    truncated = folder_url(publish(tmp_path / "cut", "x.gz", gz(DATA)[:40]).parent)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [missing, not_found, corrupted, truncated], out / "x", progress=False)
    message = str(caught.value)
    for base in (missing, not_found, corrupted, truncated):
        assert base + "x.gz" in message
    assert "404" in message
    assert sha256_hex(synthetic_bytes(5)) in message
    assert "truncated" in message
    assert isinstance(caught.value, DataError)
    assert listing(out) == []


def test_no_sources_is_an_error(tmp_path):
    with pytest.raises(DownloadError, match="x.gz"):
        fetch_file(REMOTE, [], tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_verified_copy_is_not_fetched_again(tmp_path, serve):
    server = serve(publish(tmp_path / "src", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [server.url], destination, progress=False) == server.url + "x.gz"
    os.utime(destination, ns=(1_000_000_000, 1_000_000_000))  # a past mtime, clear of clock granularity
    before = destination.stat()
    assert fetch_file(REMOTE, [server.url], destination, progress=False) == "cached"
    after = destination.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert server.requests == ["/x.gz"]  # one request: the first call's


def test_wrong_copy_present_is_fetched_again(tmp_path, serve):
    server = serve(publish(tmp_path / "src", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    destination.parent.mkdir()
    destination.write_bytes(DATA[:-1] + b"\x00")
    assert fetch_file(REMOTE, [server.url], destination, progress=False) == server.url + "x.gz"
    assert destination.read_bytes() == DATA
    assert listing(destination.parent) == ["x"]


def test_wrong_copy_present_and_no_good_source_raises(tmp_path):
    """A failed re-fetch raises; the bad copy is not reported as fine (as "cached")."""
    destination = tmp_path / "x"
    destination.write_bytes(b"stale")
    with pytest.raises(DownloadError):
        fetch_file(REMOTE, [folder_url(tmp_path / "nowhere")], destination, progress=False)
    assert not any(name.endswith(".tmp") for name in listing(tmp_path))


def test_recompressed_gzip_verifies(tmp_path):
    fast = gz(DATA, level=1, mtime=1)
    best = gz(DATA, level=9, mtime=1_700_000_000)
    assert fast != best and gzip.decompress(fast) == gzip.decompress(best) == DATA
    for i, compressed in enumerate((fast, best)):
        base = folder_url(publish(tmp_path / f"src{i}", "x.gz", compressed).parent)
        destination = tmp_path / f"out{i}" / "x"
        assert fetch_file(REMOTE, [base], destination, progress=False) == base + "x.gz"
        assert destination.read_bytes() == DATA


# --------------------------------------------------------------------------- download_dataset


A_DATA, B_DATA = synthetic_bytes(11), synthetic_bytes(12, size=3000)
SYNTH = DatasetSource(
    name="synth",
    base_urls=("http://127.0.0.1:9/never-used/",),  # the discard port: only reached if the mirror is ignored
    files=(RemoteFile("a.bin.gz", sha256_hex(A_DATA)), RemoteFile("b.txt", sha256_hex(B_DATA))),
)


@pytest.fixture
def mirror(tmp_path) -> Path:
    root = tmp_path / "mirror"
    publish(root / "synth", "a.bin.gz", gz(A_DATA))
    publish(root / "synth", "b.txt", B_DATA)
    return root


def test_download_dataset_from_a_mirror_folder(tmp_path, mirror, capsys):
    raw = tmp_path / "raw" / "synth"
    origins = download_dataset(SYNTH, raw, mirror=str(mirror), progress=False)
    base = (mirror / "synth").as_uri() + "/"
    assert origins == {"a.bin": base + "a.bin.gz", "b.txt": base + "b.txt"}
    assert (raw / "a.bin").read_bytes() == A_DATA and (raw / "b.txt").read_bytes() == B_DATA
    assert listing(raw) == ["a.bin", "b.txt"]
    printed = capsys.readouterr().out
    assert "a.bin: sha256 ok" in printed and "b.txt: sha256 ok" in printed
    assert download_dataset(SYNTH, raw, mirror=str(mirror), progress=False) == {"a.bin": "cached", "b.txt": "cached"}


def test_download_dataset_from_the_env_mirror_over_http(tmp_path, mirror, serve, monkeypatch):
    server = serve(mirror)
    monkeypatch.setenv(MIRROR_ENV, server.url)
    raw = tmp_path / "raw"
    origins = download_dataset(SYNTH, raw, progress=False)
    assert origins == {"a.bin": server.url + "synth/a.bin.gz", "b.txt": server.url + "synth/b.txt"}
    assert (raw / "a.bin").read_bytes() == A_DATA and (raw / "b.txt").read_bytes() == B_DATA
    assert sorted(server.requests) == ["/synth/a.bin.gz", "/synth/b.txt"]


def test_download_dataset_missing_file_fails_cleanly(tmp_path, mirror):
    (mirror / "synth" / "b.txt").unlink()
    raw = tmp_path / "raw"
    with pytest.raises(DownloadError) as caught:
        download_dataset(SYNTH, raw, mirror=str(mirror), progress=False)
    assert (mirror / "synth").as_uri() + "/b.txt" in str(caught.value)
    assert listing(raw) == ["a.bin"]  # the verified file stays; nothing partial for b.txt


# --------------------------------------------------------------------------- the real checksums


def shared_datasets_readme() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "datasets"]
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror and "://" not in mirror:
        candidates.append(Path(mirror).expanduser())
    for folder in candidates:
        if (folder / "README.md").is_file():
            return folder / "README.md"
    return None


def test_mnist_checksums_match_the_shared_mirror_readme():
    readme = shared_datasets_readme()
    if readme is None:
        pytest.skip("no shared dataset mirror (../shared/datasets or $VAE_DATA_MIRROR) with a README.md")
    table = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[0-9a-f]{64}", cells[2]):
            table[cells[0]] = cells[2]
    assert table, f"{readme}: no sha256 table found"
    for remote in MNIST.files:
        assert table.get(remote.local_name) == remote.sha256, remote.name


# --------------------------------------------------------------------------- unreachable and cut-off servers

def _closed_port_url() -> str:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class _CutOff(BaseHTTPRequestHandler):
    """Announces the whole file's Content-Length, sends half of it, and closes the connection."""

    content = b""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.content)))
        self.end_headers()
        self.wfile.write(self.content[: len(self.content) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def cut_off_server():
    handler = type("Handler", (_CutOff,), {"content": gz(DATA, level=0)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_falls_back_past_an_unreachable_mirror(tmp_path):
    unreachable = _closed_port_url()
    good = folder_url(publish(tmp_path / "good", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [unreachable, good], destination, progress=False) == good + "x.gz"
    assert destination.read_bytes() == DATA


def test_an_unreachable_mirror_alone_is_a_clear_error(tmp_path):
    unreachable = _closed_port_url()
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [unreachable], tmp_path / "out" / "x", progress=False)
    assert unreachable + "x.gz" in str(caught.value) and "refused" in str(caught.value).lower()
    assert listing(tmp_path / "out") == []


def test_a_connection_cut_mid_file_falls_back_and_leaves_nothing(tmp_path, cut_off_server):
    good = folder_url(publish(tmp_path / "good", "x.gz", gz(DATA)).parent)
    destination = tmp_path / "out" / "x"
    assert fetch_file(REMOTE, [cut_off_server, good], destination, progress=False) == good + "x.gz"
    assert destination.read_bytes() == DATA
    assert listing(destination.parent) == ["x"]

    (tmp_path / "alone").mkdir()
    with pytest.raises(DownloadError) as caught:
        fetch_file(REMOTE, [cut_off_server], tmp_path / "alone" / "x", progress=False)
    assert cut_off_server + "x.gz" in str(caught.value) and "closed after 3" in str(caught.value)
    assert listing(tmp_path / "alone") == []
