"""Fetching torchvision's ImageNet weights into torch hub's cache, the way torchvision does it:
once, to the file name torchvision uses, its SHA-256 checked against the prefix that name
carries (resnet18-f37072fd.pth: the digest starts f37072fd). A download goes to a temporary file
beside the target and is renamed only when whole and checked, so an interrupted or corrupt
download leaves nothing a later run would read, and two processes fetching at once each write
their own file and the last rename wins with identical bytes.

No torch import: the search fetches what its study may need before it reads any image.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imgcls.errors import ConfigError
from imgcls.models.catalog import (
    OFFLINE_ENV,
    find_weights,
    hub_checkpoints,
    pretrained_filename,
    weights_url,
)

# (file name, bytes so far, bytes in all or 0 where the server does not say)
DownloadProgress = Callable[[str, int, int], None]

TIMEOUT_S = 30.0  # to connect, and between two reads
CHUNK = 1 << 20
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,})\.[a-z]+$")


def fetch_weights(name: str, progress: DownloadProgress | None = None,
                  timeout: float = TIMEOUT_S) -> Path:
    """`name`'s weights file in torch hub's cache, downloaded first where it is missing.

    Raises ConfigError, in one line, when the download fails (unreachable, refused, an HTTP
    error) or brings a file whose checksum is not the expected one; nothing is kept then."""
    found = find_weights(name)
    if found is not None:
        return found
    filename = pretrained_filename(name)
    url = weights_url(name)
    target = hub_checkpoints() / filename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create torch hub's weights folder {target.parent}: "
                          f"{exc.strerror or exc}") from None
    partial = target.with_name(f".{filename}.{os.getpid()}.part")
    try:
        digest = _download(url, partial, filename, progress, timeout)
        expected = _expected_prefix(filename)
        if expected and not digest.startswith(expected):
            raise ConfigError(
                f"the download of {filename} from {_masked(url)} is corrupt: its SHA-256 starts "
                f"{digest[:len(expected)]}, not {expected}; nothing was kept, run again or copy "
                f"the file into {target.parent}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _download(url: str, partial: Path, filename: str, progress: DownloadProgress | None,
              timeout: float) -> str:
    """Stream `url` into `partial`; the hex SHA-256 of what came."""
    sha = hashlib.sha256()
    done = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "imgcls-hpo"})
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            if progress:
                progress(filename, 0, total)
            while chunk := response.read(CHUNK):
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if progress:
                    progress(filename, done, total)
            if total and done < total:
                raise ConfigError(_failed(filename, url, f"the connection closed after "
                                                         f"{done:,} of {total:,} bytes"))
    except urllib.error.HTTPError as exc:
        raise ConfigError(_failed(filename, url, f"HTTP {exc.code} {exc.reason}")) from None
    except urllib.error.URLError as exc:
        raise ConfigError(_failed(filename, url, str(exc.reason))) from None
    except TimeoutError:
        raise ConfigError(_failed(filename, url, f"no answer within {timeout:g} s")) from None
    except OSError as exc:  # reset mid-transfer, or the cache folder's disk
        raise ConfigError(_failed(filename, url, exc.strerror or str(exc))) from None
    return sha.hexdigest()


def _failed(filename: str, url: str, why: str) -> str:
    return (f"pretrained weights {filename} could not be downloaded from {_masked(url)} ({why}); "
            f"copy the file into {hub_checkpoints()} (or a folder named by weights_dir), or set "
            f"{OFFLINE_ENV}=1 to be told what is missing without trying")


def _expected_prefix(filename: str) -> str | None:
    match = _HASH_PREFIX.search(filename)
    return match.group(1) if match else None


def _masked(url: str) -> str:
    """The URL without a password a mirror's address may carry."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
