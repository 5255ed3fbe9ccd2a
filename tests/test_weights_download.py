"""Pretrained weights fetched the way torchvision users expect: once, into torch hub's cache,
checksum checked, progress reported; a failed or corrupt download is one line and leaves
nothing behind. The weights are served by an HTTP server on 127.0.0.1 that each test starts
and stops; the test writes the weights itself."""

import dataclasses
import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from hpo.config.store import Store
from hpo.config.study import StudyError, load_study
from hpo.search.run import run_search
from imgcls.errors import ConfigError
from imgcls.models import MODELS, build_model, fetch_weights
from imgcls.models.catalog import MIRROR_ENV, OFFLINE_ENV, hub_checkpoints
from imgcls.registry import Entry


class WeightsServer:
    """Serves the files of `folder` on a free port of 127.0.0.1, counting the requests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.requests: list[str] = []
        self.truncate: dict[str, int] = {}  # file name: bytes sent before the connection drops
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if name in server.truncate:  # announce the whole file, send part of it
                    body = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:server.truncate[name]])
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def fetched(self, filename: str) -> int:
        return sum(path.endswith("/" + filename) for path in self.requests)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[WeightsServer]:
    served = WeightsServer(tmp_path / "served")
    served.folder.mkdir()
    served.thread.start()
    try:
        yield served
    finally:
        served.httpd.shutdown()
        served.httpd.server_close()


@pytest.fixture
def online(tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine that reaches the weights' URL (the local server, as a mirror) and has no
    weights yet: torch hub's cache is empty. The hub's checkpoint folder."""
    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.setenv(MIRROR_ENV, server.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return hub_checkpoints()


def serve_resnet18(server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Real resnet18 weights written to the server's folder under a torchvision-style name that
    carries their own SHA-256 prefix, and the catalog pointed at that name."""
    torch.manual_seed(0)
    state = tvm.resnet18(weights=None).state_dict()
    staged = server.folder / "staged.pth"
    torch.save(state, staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    filename = f"resnet18-{digest[:8]}.pth"
    staged.rename(server.folder / filename)
    arch = MODELS.get("resnet18")
    url = str(arch.weights_url).rsplit("/", 1)[0] + "/" + filename
    monkeypatch.setitem(MODELS._entries, "resnet18",
                        Entry("resnet18", dataclasses.replace(arch, weights_url=url)))
    return state


def test_a_missing_file_is_downloaded_once_checked_and_loads(
        online: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    state = serve_resnet18(server, monkeypatch)
    filename = MODELS.get("resnet18").weights_filename
    seen: list[tuple[str, int, int]] = []
    path = fetch_weights("resnet18", lambda *update: seen.append(update))
    assert path == online / filename
    assert [p.name for p in online.iterdir()] == [filename]  # no partial file left
    size = path.stat().st_size
    assert seen[0] == (filename, 0, size) and seen[-1] == (filename, size, size)
    model = build_model("resnet18", 2, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert fetch_weights("resnet18") == path  # there now: not fetched again
    assert server.fetched(filename) == 1


def test_a_corrupt_download_is_one_line_and_nothing_is_kept(
        online: Path, server: WeightsServer) -> None:
    filename = MODELS.get("resnet18").weights_filename  # resnet18-f37072fd.pth
    (server.folder / filename).write_bytes(b"not the weights" * 1000)
    with pytest.raises(ConfigError) as caught:
        fetch_weights("resnet18")
    message = str(caught.value)
    assert "\n" not in message
    assert f"the download of {filename}" in message and "is corrupt" in message
    assert "f37072fd" in message
    assert not online.exists() or list(online.iterdir()) == []


def test_a_connection_that_drops_is_one_line_and_nothing_is_kept(
        online: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_resnet18(server, monkeypatch)
    filename = MODELS.get("resnet18").weights_filename
    server.truncate[filename] = 1000
    with pytest.raises(ConfigError, match=r"connection closed after 1,000 of [\d,]+ bytes"):
        fetch_weights("resnet18")
    assert list(online.iterdir()) == []


def test_a_file_the_server_lacks_names_the_url_and_where_to_put_it(
        online: Path, server: WeightsServer) -> None:
    with pytest.raises(ConfigError) as caught:
        fetch_weights("resnet50")
    message = str(caught.value)
    assert "\n" not in message
    assert f"{server.url}/resnet50-11ad3fa6.pth (HTTP 404" in message
    assert str(online) in message and f"{OFFLINE_ENV}=1" in message


def test_an_address_where_nothing_listens_is_one_line(
        online: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}/models")
    with pytest.raises(ConfigError, match=r"could not be downloaded from .*\(.*refused"):
        fetch_weights("resnet18", timeout=5)


def test_a_mirror_password_is_never_shown(online: Path, server: WeightsServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, server.url.replace("http://", "http://me:s3cret@"))
    with pytest.raises(ConfigError) as caught:
        fetch_weights("resnet18")
    assert "s3cret" not in str(caught.value) and "me:***@127.0.0.1" in str(caught.value)


def test_online_a_pretrained_study_loads_without_its_weights(online: Path,
                                                             tmp_path: Path) -> None:
    spec = load_study("tb", {"data.path": str(tmp_path)})  # pretrained ResNet-50, as shipped
    assert spec.missing_weights() == ["resnet50"]


def test_offline_or_with_weights_dir_a_missing_file_is_the_one_line_error(
        online: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StudyError, match=r"resnet50-11ad3fa6\.pth, not found in .*weights"):
        load_study("tb", {"data.path": str(tmp_path), "weights_dir": str(tmp_path / "weights")})
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(StudyError, match=r"resnet50-11ad3fa6.pth, not found in .*hub/checkpoints"):
        load_study("tb", {"data.path": str(tmp_path)})


def test_a_search_fetches_the_weights_before_its_first_trial(
        online: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch, study_file: Path,
        store: Store) -> None:
    serve_resnet18(server, monkeypatch)
    filename = MODELS.get("resnet18").weights_filename
    spec = load_study(str(study_file), {"trials": 1, "max_epochs": 1, "data.image_size": 32,
                                        "space.arch": "resnet18", "space.pretrained": "true"})
    seen: list[tuple[str, int, int]] = []
    result = run_search(spec, store, download_progress=lambda *update: seen.append(update))
    assert [t.state for t in result.trials] == ["COMPLETE"], result.trials[0].fail_reason
    assert seen and seen[-1][1] == seen[-1][2] > 0
    assert (online / filename).is_file() and server.fetched(filename) == 1


def test_a_search_whose_download_fails_stops_before_reading_an_image(
        online: Path, server: WeightsServer, study_file: Path, store: Store) -> None:
    spec = load_study(str(study_file), {"trials": 1, "data.image_size": 32,
                                        "space.arch": "resnet18", "space.pretrained": "true"})
    with pytest.raises(ConfigError, match="HTTP 404"):
        run_search(spec, store)
    assert not store.cache_dir.exists() or not any(store.cache_dir.iterdir())  # no image read
