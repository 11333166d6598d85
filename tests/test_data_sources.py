"""Sources: names, folder scan, the embedded sample, DIV2K download/resume/verify/extract.

The download is tested against a local HTTP server on 127.0.0.1 (never the real host): it
serves a small zip, honours Range requests, and cuts the first response short once.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from pipeline.config import DataParams, Div2kParams
from pipeline.data.sources import (
    SAMPLE_IMAGES,
    SourceError,
    div2k_images,
    download,
    extract_zip,
    folder_images,
    list_files,
    resolve_source,
    sample_images,
    sanitize_name,
    sha256_file,
)
from tests.data_fixtures import save, textured

# ---------------------------------------------------------------------------------------------
# names and folders


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0001", "0001"),
        ("img.0", "img_0"),
        ("sub/dir/a b.c", "sub_dir_a_b_c"),
        ("ünï-cøde_ok", "_n_-c_de_ok"),
        ("", "_"),
    ],
)
def test_sanitize_name(text, expected):
    assert sanitize_name(text) == expected


def test_long_names_are_shortened_uniquely():
    a, b = sanitize_name("x" * 200 + "a"), sanitize_name("x" * 200 + "b")
    assert len(a) == len(b) == 64 and a != b


def test_folder_scan_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ["b.png", "a/z.png", "a/b.c.png", ".hidden.png", ".git/x.png", "c/.tmp.png"]:
        save(tmp_path / rel, textured(8, 8))
    assert list_files(tmp_path) == ["a/b.c.png", "a/z.png", "b.png"]
    src = folder_images(tmp_path)
    assert [im.name for im in src.images] == ["a_b_c", "a_z", "b"]
    assert [im.source for im in src.images] == ["a/b.c.png", "a/z.png", "b.png"]


def test_folder_name_clashes_get_suffixes(tmp_path):
    for rel in ["a_b.png", "a/b.png", "a/b.jpg"]:
        save(tmp_path / rel, textured(8, 8))
    names = [im.name for im in folder_images(tmp_path).images]
    assert names == ["a_b", "a_b_1", "a_b_2"]


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="not a directory"):
        folder_images(tmp_path / "absent")
    with pytest.raises(SourceError, match="no files"):
        folder_images(tmp_path)


def test_sample_images_are_verified_and_offline():
    pytest.importorskip("skimage")
    src = sample_images()
    assert [im.name for im in src.images] == [
        "astronaut",
        "chelsea",
        "coffee",
        "hubble_deep_field",
        "rocket",
    ]
    for im, item in zip(src.images, SAMPLE_IMAGES, strict=True):
        assert sha256_file(im.path) == item.sha256
        assert item.licence in ("CC0", "public domain")
    assert resolve_source(DataParams(), "unused").images == src.images


# ---------------------------------------------------------------------------------------------
# a local HTTP server with Range support that interrupts the first transfer once


class _Server:
    def __init__(
        self,
        payload: bytes,
        *,
        cut_first: bool = True,
        honour_range: bool = True,
        first_status: int | None = None,
    ):
        self.payload = payload
        self.requests: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append(rng)
                if first_status and len(server.requests) == 1:
                    self.send_error(first_status)
                    return
                data, start = server.payload, 0
                if rng and honour_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_first and len(server.requests) == 1:
                    self.wfile.write(body[: len(body) // 3])  # then hang up mid-transfer
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/DIV2K_train_HR.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def make_div2k_zip(path: Path, n: int = 3) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(1, n + 1):
            png = save(path.parent / "src" / f"{i:04d}.png", textured(40, 48, i))
            zf.write(png, f"DIV2K_train_HR/{i:04d}.png")
        zf.writestr("DIV2K_train_HR/readme.txt", "not an image")
    return path.read_bytes()


def test_download_resumes_after_interruption(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    digest = hashlib.sha256(payload).hexdigest()
    with _Server(payload) as server:
        out = download(
            server.url,
            tmp_path / "dl" / "x.zip",
            sha256=digest,
            size=len(payload),
            retries=2,
            timeout=10,
            backoff=0,
        )
    assert out.read_bytes() == payload
    assert server.requests[0] is None
    assert server.requests[1] == f"bytes={len(payload) // 3}-"  # resumed, not restarted
    assert not (tmp_path / "dl" / "x.zip.part").exists()


def test_download_resumes_a_part_file_from_an_earlier_run(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    part = tmp_path / "x.zip.part"
    part.write_bytes(payload[:100])
    with _Server(payload, cut_first=False) as server:
        download(
            server.url, tmp_path / "x.zip", sha256=hashlib.sha256(payload).hexdigest(), backoff=0
        )
    assert server.requests == ["bytes=100-"]
    assert (tmp_path / "x.zip").read_bytes() == payload


def test_download_restarts_when_the_server_ignores_range(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    with _Server(payload, honour_range=False) as server:
        download(
            server.url,
            tmp_path / "x.zip",
            sha256=hashlib.sha256(payload).hexdigest(),
            retries=2,
            backoff=0,
        )
    assert (tmp_path / "x.zip").read_bytes() == payload


def test_download_retries_a_server_error_but_not_a_client_error(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    digest = hashlib.sha256(payload).hexdigest()
    with _Server(payload, cut_first=False, first_status=503) as server:
        download(server.url, tmp_path / "x.zip", sha256=digest, retries=1, backoff=0)
    assert len(server.requests) == 2 and (tmp_path / "x.zip").read_bytes() == payload
    with (
        _Server(payload, cut_first=False, first_status=404) as server,
        pytest.raises(SourceError, match="HTTP 404"),
    ):
        download(server.url, tmp_path / "y.zip", sha256=digest, retries=3, backoff=0)
    assert len(server.requests) == 1


def test_download_checksum_mismatch_deletes_and_raises(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    with _Server(payload, cut_first=False) as server, pytest.raises(SourceError, match="sha256"):
        download(server.url, tmp_path / "x.zip", sha256="0" * 64, backoff=0)
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()


def test_download_gives_up_after_retries_and_keeps_part(tmp_path):
    payload = make_div2k_zip(tmp_path / "src.zip")
    with _Server(payload) as server, pytest.raises(SourceError, match="run again to resume"):
        download(
            server.url,
            tmp_path / "x.zip",
            sha256=hashlib.sha256(payload).hexdigest(),
            retries=0,
            backoff=0,
        )
    assert (tmp_path / "x.zip.part").stat().st_size == len(payload) // 3


def test_div2k_download_then_extract(tmp_path, monkeypatch):
    import pipeline.data.sources as sources

    payload = make_div2k_zip(tmp_path / "src.zip")
    digest = hashlib.sha256(payload).hexdigest()
    real_download = sources.download
    monkeypatch.setattr(sources, "download", lambda *a, **kw: real_download(*a, **kw, backoff=0))
    with _Server(payload) as server:
        p = Div2kParams(
            url=server.url, sha256=digest, size=len(payload), expected_images=3, retries=2
        )
        src = div2k_images(p, tmp_path / "dl")
    assert len(server.requests) == 2 and server.requests[1] is not None  # resumed once
    assert (tmp_path / "dl" / "DIV2K_train_HR.zip").read_bytes() == payload
    assert [im.name for im in src.images] == ["0001", "0002", "0003"]
    assert [im.source for im in src.images] == ["0001.png", "0002.png", "0003.png"]
    # a second call reuses the extracted directory without touching the network
    again = div2k_images(p, tmp_path / "dl")
    assert [im.path for im in again.images] == [im.path for im in src.images]


def test_div2k_local_zip_is_verified(tmp_path):
    payload = make_div2k_zip(tmp_path / "local.zip")
    good = Div2kParams(
        local=str(tmp_path / "local.zip"),
        sha256=hashlib.sha256(payload).hexdigest(),
        expected_images=3,
    )
    assert len(div2k_images(good, tmp_path / "dl").images) == 3
    bad = Div2kParams(local=str(tmp_path / "local.zip"), sha256="1" * 64, expected_images=3)
    with pytest.raises(SourceError, match="does not match"):
        div2k_images(bad, tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists() or not any((tmp_path / "dl2").iterdir())


def test_div2k_local_directory_is_counted(tmp_path):
    for i in range(1, 4):
        save(tmp_path / "DIV2K_train_HR" / f"{i:04d}.png", textured(8, 8, i))
    p = Div2kParams(local=str(tmp_path / "DIV2K_train_HR"), expected_images=3)
    assert [im.name for im in div2k_images(p, tmp_path / "dl").images] == ["0001", "0002", "0003"]
    with pytest.raises(SourceError, match="holds 3 images, expected 800"):
        div2k_images(Div2kParams(local=str(tmp_path / "DIV2K_train_HR")), tmp_path / "dl")
    with pytest.raises(SourceError, match="neither a directory nor a zip"):
        div2k_images(Div2kParams(local=str(tmp_path / "nothing")), tmp_path / "dl")


def test_extract_zip_is_atomic_and_refuses_unsafe_paths(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ok/0001.png", b"x")
        zf.writestr("../evil.png", b"x")
    with pytest.raises(SourceError, match="unsafe member path"):
        extract_zip(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="not a valid zip"):
        extract_zip(tmp_path / "junk.zip", tmp_path / "out")
