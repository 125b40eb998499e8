"""The data: where it is found (the copy inside the package by default), the download path against a
real HTTP server on 127.0.0.1, and the loader's workers.

The download runs in-process (prepare_mnist -> _download -> torchvision), with torchvision's mirror
list and resource list pointed at the local server. The offline copy's .gz files are recompressed
(shared/data/README.md): their MD5s are not torchvision's, so the resource list carries the served
files' MD5s, and the package's own check of the DECOMPRESSED files (check_raw_files) still applies.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from ddp_mnist.data.batches import LoaderBatches, load_split, rank_indices
from ddp_mnist.data.raw_files import DATA_ENV, EMBEDDED_DATA, RAW_FILES, prepare_mnist
from ddp_mnist.errors import DataError

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


# ---------------------------------------------------------------------- a local MNIST mirror
class Mirror:
    """An HTTP server on 127.0.0.1 serving a folder; it records the paths it was asked for."""

    def __init__(self, folder: Path):
        self.folder, self.requests = folder, []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet; and the record of what was fetched
                mirror.requests.append(self.path)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # torchvision's redirect probe closes its GET unread: a broken pipe here is normal

        self.server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path, data_dir) -> Path:
    """A folder holding the four .gz files as the mirror serves them (a test may damage one)."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in RAW_FILES:
        shutil.copyfile(data_dir / "MNIST" / "raw" / f"{name}.gz", folder / f"{name}.gz")
    return folder


def point_torchvision_at(monkeypatch, mirror: Mirror) -> None:
    """torchvision downloads from `mirror` and checks the .gz files against the files it serves."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [mirror.url])
    monkeypatch.setattr(MNIST, "resources", [(f"{n}.gz", md5(mirror.folder / f"{n}.gz")) for n in RAW_FILES])
    for var in PROXY_VARS:  # the request must reach 127.0.0.1 itself, whatever proxy the machine has
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def damage(path: Path, offsets=(100, 2000, 4000)) -> None:
    payload = bytearray(path.read_bytes())
    for i in offsets:
        payload[i] ^= 0xFF
    path.write_bytes(payload)


# ---------------------------------------------------------------------- where the data is found
@pytest.fixture
def fresh_user(tmp_path, monkeypatch) -> Path:
    """No data setting, an empty working folder, an empty cache: a newcomer's first run."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_without_a_data_folder_the_copy_inside_the_package_is_used(fresh_user):
    root = prepare_mnist(None)
    # Decompressed into the user's cache, never beside the package's files (site-packages may be read-only).
    assert root == fresh_user / "cache" / "ddp-mnist"
    assert sorted(p.name for p in (EMBEDDED_DATA / "MNIST" / "raw").iterdir()) == sorted(f"{n}.gz" for n in RAW_FILES)
    for name, official in RAW_FILES.items():
        assert md5(root / "MNIST" / "raw" / name) == official, name
    assert (len(load_split(root, train=True)), len(load_split(root, train=False))) == (60_000, 10_000)
    assert not (fresh_user / "work" / "data").exists()


def test_the_package_copy_named_as_the_data_folder_is_still_decompressed_into_the_cache(fresh_user):
    """.ci/run names it in DDP_MNIST_DATA on a machine without another copy: the checkout stays clean."""
    alias = fresh_user / "alias"
    alias.symlink_to(EMBEDDED_DATA)  # another spelling of the same folder
    assert prepare_mnist(str(alias)) == fresh_user / "cache" / "ddp-mnist"
    assert sorted(p.name for p in (EMBEDDED_DATA / "MNIST" / "raw").iterdir()) == sorted(f"{n}.gz" for n in RAW_FILES)


def test_a_damaged_cache_is_caught_by_the_md5(fresh_user):
    """The cache is checked like any other copy: a damaged file there is named, not trained on."""
    root = prepare_mnist(None)
    damage(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is corrupt"):
        prepare_mnist(None)


def test_data_dir_and_the_environment_win_over_the_other_copies(fresh_user, data_dir, monkeypatch):
    mine = fresh_user / "mine"
    source = ROOT / data_dir / "MNIST"  # DDP_MNIST_DATA may be relative to the checkout; the test changed folder
    shutil.copytree(source, mine / "MNIST", copy_function=os.symlink)
    shutil.copytree(source, fresh_user / "work" / "data" / "MNIST", copy_function=os.symlink)  # ./data holds it too
    assert prepare_mnist(str(mine)) == mine  # --data-dir
    monkeypatch.setenv(DATA_ENV, str(mine))
    assert prepare_mnist(None) == mine  # $DDP_MNIST_DATA
    monkeypatch.delenv(DATA_ENV)
    assert prepare_mnist(None) == Path("data")  # then ./data, as before the package carried a copy
    # An explicit folder without MNIST is an error that names the ways out; no silent fallback.
    with pytest.raises(DataError) as error:
        prepare_mnist(str(fresh_user / "empty"))
    assert all(word in str(error.value) for word in ("--data-dir", DATA_ENV, "--download", "shipped with")), error.value


def test_without_download_nothing_is_fetched(tmp_path, served, monkeypatch):
    with Mirror(served) as mirror:
        point_torchvision_at(monkeypatch, mirror)
        with pytest.raises(DataError, match="MNIST not found"):
            prepare_mnist(str(tmp_path / "data"))
    assert mirror.requests == []


@pytest.mark.process
def test_the_wheel_carries_the_four_files(tmp_path):
    """`pip install .` (not editable) installs from a wheel: the .gz files must be in it."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", "runs", "data", "wandb", ".venv", ".pytest_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("ddp_mnist-*.whl")
    inside = {info.filename: info.file_size for info in zipfile.ZipFile(wheel).infolist()}
    for name in RAW_FILES:
        shipped = EMBEDDED_DATA / "MNIST" / "raw" / f"{name}.gz"
        assert inside.get(f"ddp_mnist/mnist/MNIST/raw/{name}.gz") == shipped.stat().st_size, name


# ---------------------------------------------------------------------- download
def test_download_fetches_the_four_files_and_checks_them(tmp_path, served, monkeypatch):
    with Mirror(served) as mirror:
        point_torchvision_at(monkeypatch, mirror)
        root = prepare_mnist(str(tmp_path / "data"), download=True)
    assert root == tmp_path / "data"
    fetched = {path.lstrip("/") for path in mirror.requests}
    assert fetched == {f"{n}.gz" for n in RAW_FILES}, mirror.requests
    raw = root / "MNIST" / "raw"
    for name, official in RAW_FILES.items():  # the decompressed files are the official ones
        assert md5(raw / name) == official, name
    assert (len(load_split(root, train=True)), len(load_split(root, train=False))) == (60_000, 10_000)
    # A second call finds the files and does not download again.
    requests = len(mirror.requests)
    assert prepare_mnist(str(tmp_path / "data"), download=True) == root and len(mirror.requests) == requests


def test_download_of_a_damaged_file_fails_with_a_clear_error(tmp_path, served, monkeypatch, data_dir):
    """The server sends bytes that are not the file torchvision's list describes: its .gz check fails."""
    with Mirror(served) as mirror:
        point_torchvision_at(monkeypatch, mirror)  # the MD5s of the good files
        damage(served / "t10k-labels-idx1-ubyte.gz")  # ... then the server's copy is damaged
        with pytest.raises(DataError) as error:
            prepare_mnist(str(tmp_path / "data"), download=True)
    message = str(error.value)
    assert f"download failed from {mirror.url}" in message, message  # which server sent it
    assert "corrupted" in message, message  # torchvision's words (0.26: "File not found or corrupted.")
    assert "lacks t10k-labels-idx1-ubyte.gz" in message, message  # only that file is missing
    # The damaged download is not left behind for the next attempt to decompress.
    assert not (tmp_path / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()  # the good ones are kept

    # Once the server has the right file again, the next attempt downloads only the missing one.
    shutil.copyfile(data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", served / "t10k-labels-idx1-ubyte.gz")
    with Mirror(served) as mirror:
        point_torchvision_at(monkeypatch, mirror)
        root = prepare_mnist(str(tmp_path / "data"), download=True)
    assert {path.lstrip("/") for path in mirror.requests} == {"t10k-labels-idx1-ubyte.gz"}
    assert md5(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") == RAW_FILES["t10k-labels-idx1-ubyte"]


def test_download_of_a_wrong_file_is_caught_by_the_decompressed_md5(tmp_path, served, monkeypatch):
    """A well-formed .gz that matches its listed MD5 but holds wrong labels: the package's own check
    of the decompressed file (against the official MD5) catches it."""
    labels = served / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(labels.read_bytes()))
    for i in (100, 5000, 9000):  # labels, not the header: size and structure stay right
        payload[i] = (payload[i] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(payload)))
    with Mirror(served) as mirror:
        point_torchvision_at(monkeypatch, mirror)  # the resource list describes the served (wrong) file
        with pytest.raises(DataError) as error:
            prepare_mnist(str(tmp_path / "data"), download=True)
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert str(error.value) == (
        f"{raw / 't10k-labels-idx1-ubyte'} is corrupt (MD5 differs from the official "
        f"file); delete it and put the official t10k-labels-idx1-ubyte.gz in {raw}"
    )


# ---------------------------------------------------------------------- DataLoader workers
@pytest.fixture(scope="module")
def train_split(data_dir):
    return load_split(prepare_mnist(str(data_dir), download=False), train=True)


def epoch_batches(split, rank: int, world_size: int, num_workers: int, epoch: int, start_step: int = 0):
    batches = LoaderBatches(
        split, rank, world_size, rank_batch=500, seed=3, device=torch.device("cpu"), num_workers=num_workers
    )
    return list(batches.epoch(epoch, start_step))


# (rank, world size, epoch, first step): 1 rank from the start of an epoch; rank 1 of 2, resumed mid-epoch.
@pytest.mark.process
@pytest.mark.parametrize("rank, world_size, epoch, start_step", [(0, 1, 1, 0), (1, 2, 2, 7)])
def test_workers_give_the_same_batches_as_the_main_process(train_split, rank, world_size, epoch, start_step):
    """--num-workers 2 changes who gathers the batches, never which samples or their order."""
    inline = epoch_batches(train_split, rank, world_size, 0, epoch, start_step)
    workers = epoch_batches(train_split, rank, world_size, 2, epoch, start_step)
    steps = 60_000 // world_size // 500
    assert len(inline) == len(workers) == steps - start_step
    # Both follow the DistributedSampler rule: this rank's indices of the (seed, epoch) permutation.
    expected = rank_indices(60_000, 3, epoch, rank, world_size)[start_step * 500 :]
    for i, ((xi, yi), (xw, yw)) in enumerate(zip(inline, workers)):
        idx = expected[i * 500 : (i + 1) * 500]
        assert torch.equal(xw, xi) and torch.equal(yw, yi), f"epoch {epoch} batch {i} differs"
        assert torch.equal(xi, train_split.images[idx]) and torch.equal(yi, train_split.labels[idx])


def test_each_file_is_md5_checked_once_and_again_when_it_changes(tmp_path, monkeypatch, data_dir):
    """Start-up: a file whose MD5 matched is remembered (the cache's verified-files.json) and not hashed again
    at the next start; a file changed since, even to the same size and mtime, is hashed again and caught."""
    import ddp_mnist.data.raw_files as raw_files

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        shutil.copyfile(data_dir / "MNIST" / "raw" / name, raw / name)
    hashed: list[str] = []
    digest = raw_files.file_digest
    monkeypatch.setattr(
        raw_files, "file_digest", lambda path, algorithm: hashed.append(path.name) or digest(path, algorithm)
    )
    raw_files.check_raw_files(raw)
    assert sorted(hashed) == sorted(RAW_FILES) and (tmp_path / "cache" / "ddp-mnist" / "verified-files.json").exists()
    hashed.clear()
    raw_files.check_raw_files(raw)
    assert hashed == []  # the second start hashes nothing
    damaged = raw / "t10k-labels-idx1-ubyte"
    before = damaged.stat()
    payload = bytearray(damaged.read_bytes())
    payload[5000] ^= 0xFF
    damaged.write_bytes(payload)
    os.utime(damaged, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    with pytest.raises(DataError, match="corrupt"):
        raw_files.check_raw_files(raw)
    assert hashed == ["t10k-labels-idx1-ubyte"]
