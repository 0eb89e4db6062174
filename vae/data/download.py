"""The ``download`` stage: fetch a dataset's files, verify them, and store them uncompressed.

Each file is streamed (gunzipped on the fly when its name ends in ``.gz``) into a temporary file
beside its final path while its SHA-256 is computed; only a verified file is renamed into place,
so a partial or corrupt download never sits at the final path. Sources are tried in order, and a
file already present and verified is not fetched again.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from vae.data.sources import base_urls
from vae.datasets import DatasetSource, RemoteFile
from vae.errors import ChecksumError, DataError, DownloadError
from vae.io import atomic_open

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
USER_AGENT = "vae-pipeline/0.1 (+https://github.com/)"


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_url(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310 (http/https/file only)


def fetch_file(remote: RemoteFile, urls: Sequence[str], destination: Path, progress: bool = True) -> str:
    """Fetch ``remote`` into ``destination``, trying each base URL in ``urls`` in turn.

    Returns:
        The URL the file came from, or ``"cached"`` when a verified copy was already present.

    Raises:
        DownloadError: no source delivered a verified copy; the message lists, per source, why
            (unreachable, refused, cut off before the announced length, truncated gzip stream, or
            the expected and actual checksum).
    """
    if destination.is_file():
        actual = sha256_of(destination)
        if actual == remote.sha256:
            log.info("%s: present and verified, not fetched again", destination)
            return "cached"
        log.warning("%s: present but its sha256 %s is not the expected %s; fetching again",
                    destination, actual, remote.sha256)
    failures = []
    for base in urls:
        url = base + remote.name
        try:
            _fetch_verified(remote, url, destination, progress)
            return url
        except (OSError, http.client.HTTPException, zlib.error, DataError) as error:  # URLError is an OSError
            failures.append(f"  {url}: {error}")
            log.warning("%s: %s", url, error)
    raise DownloadError(f"could not fetch a verified copy of {remote.name} "
                        f"(expected sha256 {remote.sha256} of its uncompressed content):\n"
                        + "\n".join(failures))


def _fetch_verified(remote: RemoteFile, url: str, destination: Path, progress: bool) -> None:
    digest = hashlib.sha256()
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if remote.compressed else None
    with _open_url(url) as response, atomic_open(destination) as out:
        announced = response.headers.get("Content-Length", "")
        total = int(announced) if announced.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True,
                  desc=remote.name, disable=not progress, leave=False) as bar:
            received = 0
            for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                bar.update(len(block))
                received += len(block)
                data = inflater.decompress(block) if inflater else block
                digest.update(data)
                out.write(data)
        if total is not None and received != total:
            raise DataError(f"the connection closed after {received} of the {total} bytes announced")
        if inflater is not None:
            tail = inflater.flush()
            digest.update(tail)
            out.write(tail)
            if not inflater.eof:
                raise DataError("truncated gzip stream (the download ended before the archive did)")
        actual = digest.hexdigest()
        if actual != remote.sha256:
            raise ChecksumError(f"checksum mismatch for {remote.name} from {url}: "
                                f"expected sha256 {remote.sha256}, got {actual}")


def download_dataset(source: DatasetSource, destination: Path, mirror: str | None = None,
                     progress: bool = True) -> dict[str, str]:
    """Fetch every file of ``source`` into ``destination`` (created if needed), verified.

    Args:
        source: the dataset's files and default URLs.
        destination: folder that receives the uncompressed files under their local names.
        mirror: a folder or URL laid out as ``<mirror>/<dataset>/<file>``; defaults to
            ``VAE_DATA_MIRROR``, and to the upstream URLs when that is unset.

    Returns:
        ``{local file name: URL it came from or "cached"}``.

    Raises:
        DownloadError: a file could not be fetched and verified from any source.
    """
    destination.mkdir(parents=True, exist_ok=True)
    urls = base_urls(source, mirror)
    origins = {}
    for remote in source.files:
        origin = fetch_file(remote, urls, destination / remote.local_name, progress=progress)
        origins[remote.local_name] = origin
        print(f"{remote.local_name}: sha256 ok ({origin})", flush=True)
    return origins
