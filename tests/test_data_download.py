"""download_file / extract_zip_atomic / load_omniglot(download=True) against a local HTTP server."""
import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from pymeta.data import DownloadError, download_file, extract_zip_atomic, load_omniglot
from pymeta.data.omniglot import CHECKSUMS

SMALL1 = "images_background_small1.zip"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # keep test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/truncated/"):   # promise the whole file, send half, hang up
            data = (self.directory_path / self.path.split("/")[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(omniglot_root):
    directory = omniglot_root / "omniglot"
    handler = functools.partial(_Handler, directory=str(directory))
    _Handler.directory_path = directory
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", directory
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url(name="x.zip"):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"     # nothing listens there any more


def test_download_verifies_and_leaves_only_the_file(server, tmp_path):
    url, directory = server
    dest = download_file(f"{url}/{SMALL1}", tmp_path / "sub" / SMALL1, progress=False,
                         **CHECKSUMS["images_background_small1"])
    assert dest.read_bytes() == (directory / SMALL1).read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [SMALL1]
    md5 = hashlib.md5((directory / SMALL1).read_bytes()).hexdigest()
    again = download_file(f"{url}/{SMALL1}", tmp_path / "m.zip", md5=md5, progress=True)
    assert again.read_bytes() == dest.read_bytes()


def test_existing_verified_file_is_not_refetched(server, tmp_path):
    _, directory = server
    dest = tmp_path / SMALL1
    dest.write_bytes((directory / SMALL1).read_bytes())
    # The URL is dead: success proves no request was made.
    assert download_file(_closed_port_url(), dest, progress=False,
                         **CHECKSUMS["images_background_small1"]) == dest


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, _ = server
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        download_file(f"{url}/{SMALL1}", tmp_path / "a.zip", sha256=wrong, progress=False)
    msg = str(err.value)
    assert wrong in msg and CHECKSUMS["images_background_small1"]["sha256"] in msg
    assert list(tmp_path.iterdir()) == []


def test_server_dying_midway_keeps_old_file(server, tmp_path):
    url, _ = server
    dest = tmp_path / SMALL1
    dest.write_bytes(b"old contents")
    with pytest.raises(DownloadError, match="closed after|IncompleteRead"):
        download_file(f"{url}/truncated/{SMALL1}", dest, progress=False,
                      **CHECKSUMS["images_background_small1"])
    assert dest.read_bytes() == b"old contents" and list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("kind", ["offline", "404"])
def test_network_failure_says_where_to_put_the_file(server, tmp_path, kind):
    url = _closed_port_url() if kind == "offline" else f"{server[0]}/no_such.zip"
    dest = tmp_path / "data" / "x.zip"
    with pytest.raises(DownloadError) as err:
        download_file(url, dest, progress=False, timeout=5)
    assert isinstance(err.value, OSError)
    assert url in str(err.value) and str(dest.parent) in str(err.value)
    assert not dest.exists()


def test_load_omniglot_downloads(server, tmp_path, monkeypatch):
    url, directory = server
    classes = load_omniglot("small1", tmp_path, alphabets=["Early_Aramaic"], download=True,
                            base_url=url, cache=False)
    assert classes.num_classes == 22
    assert (tmp_path / "omniglot" / SMALL1).read_bytes() == (directory / SMALL1).read_bytes()
    monkeypatch.setenv("PYMETA_OMNIGLOT_URL", url)     # small2 via the environment
    only = load_omniglot("small2-only", tmp_path, alphabets=["Tagalog"], download=True,
                         cache=False)
    assert only.num_classes == 17
    assert sorted(p.name for p in (tmp_path / "omniglot").iterdir()) == [
        SMALL1, "images_background_small2.zip"]


def test_download_true_replaces_a_half_written_zip(server, tmp_path):
    """What an interrupted wget leaves: with download=True it is verified and fetched again."""
    url, directory = server
    (tmp_path / "omniglot").mkdir()
    whole = (directory / SMALL1).read_bytes()
    (tmp_path / "omniglot" / SMALL1).write_bytes(whole[: len(whole) // 2])
    classes = load_omniglot("small1", tmp_path, alphabets=["Early_Aramaic"], download=True,
                            base_url=url, cache=False)
    assert classes.num_classes == 22
    assert (tmp_path / "omniglot" / SMALL1).read_bytes() == whole


def test_load_omniglot_offline_message(tmp_path):
    base = _closed_port_url("").rstrip("/")
    with pytest.raises(DownloadError) as err:
        load_omniglot("small2-only", tmp_path, download=True, base_url=base)
    msg = str(err.value)
    assert f"{base}/images_background_small2.zip" in msg and f"{base}/{SMALL1}" in msg
    assert str(tmp_path / "omniglot") in msg
    assert not any((tmp_path / "omniglot").glob("*.zip"))


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_extract_zip_atomic(tmp_path):
    src = _zip(tmp_path / "a.zip", {"top/x.txt": "1", "top/sub/y.txt": "2", "z.txt": "3"})
    dest = tmp_path / "out"
    assert extract_zip_atomic(src, dest) == [dest / "top", dest / "z.txt"]
    assert (dest / "top" / "sub" / "y.txt").read_text() == "2"
    # re-extracting a newer archive replaces the old tree whole (stale files disappear)
    (dest / "top" / "stale.txt").write_text("old")
    extract_zip_atomic(_zip(tmp_path / "b.zip", {"top/x.txt": "new"}), dest)
    assert sorted(p.name for p in (dest / "top").iterdir()) == ["x.txt"]
    assert sorted(p.name for p in dest.iterdir()) == ["top", "z.txt"]   # no temp leftovers
    # a symlinked top-level folder is refused before anything is written
    (tmp_path / "real").mkdir()
    (dest / "top").rename(tmp_path / "real" / "top")
    (dest / "top").symlink_to(tmp_path / "real" / "top", target_is_directory=True)
    with pytest.raises(ValueError, match="top is a symbolic link"):
        extract_zip_atomic(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["top", "z.txt"]


def test_download_to_a_directory_is_refused_before_fetching(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        download_file("http://127.0.0.1:9/never-fetched.zip", tmp_path, progress=False)


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs.txt", "ok/../../escape.txt",
                                  "C:\\win.txt"])
def test_extract_rejects_unsafe_members(tmp_path, evil):
    src = _zip(tmp_path / "evil.zip", {"fine.txt": "a", evil: "b"})
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match="unsafe"):
        extract_zip_atomic(src, dest)
    assert not dest.exists() or list(dest.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_user_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    from pathlib import Path
    from pymeta.data import data_root
    monkeypatch.delenv("PYMETA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_root() == tmp_path / "pymeta"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == Path.home() / ".cache" / "pymeta"
