"""The model fingerprint and its cache (apr.trace.fingerprint): the sha256 is always the bytes' own, a
cached one is used only while every file's key is unchanged, and a broken cache is never trusted."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest

from apr.errors import FormatError
from apr.formats.aprcodec import MAGIC as APR_MAGIC
from apr.trace import fingerprint as fp


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(fp.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "RACY_NS", 0)  # files written by the test count as settled
    return tmp_path / "cache" / fp.CACHE_NAME


def model(tmp_path: Path, data: bytes = b"GGUF" + bytes(range(256)) * 40) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hashed(path: Path) -> tuple[str, int]:
    got = fp.fingerprint(path)
    return got.sha256, got.bytes


def entries(cache: Path) -> dict[str, dict[str, object]]:
    data = json.loads(cache.read_bytes())
    assert data["schema"] == fp.CACHE_SCHEMA
    return data["entries"]  # type: ignore[no-any-return]


def test_a_file_is_hashed_and_the_hash_cached(tmp_path: Path, cache: Path) -> None:
    path = model(tmp_path)
    want = (sha(path.read_bytes()), path.stat().st_size)
    assert hashed(path) == want
    assert entries(cache)[str(path.resolve())]["sha256"] == want[0]
    assert hashed(path) == want


def test_a_cached_hash_is_what_is_returned_while_the_keys_match(tmp_path: Path, cache: Path) -> None:
    """The cache is read: an entry with the file's exact key is returned without hashing (the sha here is
    deliberately not the file's, to see that it came from the cache)."""
    path = model(tmp_path)
    fp.fingerprint(path)
    data = json.loads(cache.read_bytes())
    data["entries"][str(path.resolve())]["sha256"] = "ab" * 32
    cache.write_text(json.dumps(data))
    assert fp.fingerprint(path).sha256 == "ab" * 32


def test_a_file_rewritten_in_place_with_the_same_size_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    path = model(tmp_path, b"a" * 5000)
    fp.fingerprint(path)
    with path.open("r+b") as f:  # same inode, same size, and the mtime put back: only ctime tells
        f.write(b"b")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, entries(cache)[str(path.resolve())]["files"][0][4]))  # type: ignore[index]
    assert hashed(path) == (sha(b"b" + b"a" * 4999), 5000)


def test_a_file_replaced_by_a_rename_is_hashed_again(tmp_path: Path, cache: Path) -> None:
    path = model(tmp_path, b"a" * 5000)
    fp.fingerprint(path)
    other = tmp_path / "new"
    other.write_bytes(b"c" * 5000)
    other.replace(path)
    assert hashed(path) == (sha(b"c" * 5000), 5000)


def test_a_recently_changed_file_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the timestamp granularity a later write could keep the key: such a hash is not kept."""
    monkeypatch.setenv(fp.CACHE_ENV, str(tmp_path / "cache"))
    assert fp.RACY_NS >= 1_000_000_000
    path = model(tmp_path)
    assert hashed(path) == (sha(path.read_bytes()), path.stat().st_size)
    assert not (tmp_path / "cache" / fp.CACHE_NAME).exists()


def test_a_folder_is_hashed_by_name_and_content_and_a_new_file_misses(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{}")
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    want = hashlib.sha256(b"config.json\0{}" + b"model.safetensors\0" + b"x" * 100).hexdigest()
    assert hashed(folder) == (want, 102)
    assert hashed(folder) == (want, 102)
    (folder / "tokenizer.json").write_bytes(b"[]")
    more = hashlib.sha256(b"config.json\0{}" + b"model.safetensors\0" + b"x" * 100 + b"tokenizer.json\0[]")
    assert hashed(folder) == (more.hexdigest(), 104)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"schema": "something else", "entries": {}}',
        b'{"schema": "apr-fingerprints/2", "entries": []}',
        b'{"schema":"apr-fingerprints/2","entries":{"/x":{"files":[["",1]],"sha256":"0","bytes":1}}}',
        b'{"schema":"apr-fingerprints/1","entries":{}}',  # its entries carry no footer verdict
        b"\xff\xfe",
        b"",
        b"[" * 200_000 + b"]" * 200_000,  # nested past the interpreter's recursion limit
        b'{"schema":"apr-fingerprints/2","entries":{}}' + b" " * (2 << 20),  # larger than a cache
    ],
)
def test_a_cache_file_apr_did_not_write_is_ignored_and_replaced(
    tmp_path: Path, cache: Path, content: bytes
) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content)
    path = model(tmp_path)
    assert hashed(path) == (sha(path.read_bytes()), path.stat().st_size)
    assert list(entries(cache)) == [str(path.resolve())]


def test_an_entry_with_a_forged_key_shape_is_not_trusted(tmp_path: Path, cache: Path) -> None:
    path = model(tmp_path)
    fp.fingerprint(path)
    data = json.loads(cache.read_bytes())
    entry = data["entries"][str(path.resolve())]
    entry["sha256"], entry["files"][0][3] = "ab" * 32, float(entry["files"][0][3])  # a float size
    cache.write_text(json.dumps(data))
    assert fp.fingerprint(path).sha256 == sha(path.read_bytes())


def test_off_and_unwritable_caches_still_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp, "RACY_NS", 0)
    path = model(tmp_path)
    want = (sha(path.read_bytes()), path.stat().st_size)
    monkeypatch.setenv(fp.CACHE_ENV, fp.CACHE_OFF)
    assert fp.cache_file() is None
    assert hashed(path) == want
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv(fp.CACHE_ENV, str(blocker / "cache"))  # under a regular file: cannot be made
    assert hashed(path) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.gguf"]


def test_the_cache_keeps_the_most_recently_used(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp, "MAX_ENTRIES", 3)
    paths = []
    for i in range(4):
        (p := tmp_path / f"m{i}").write_bytes(bytes([i]) * 10)
        paths.append(p.resolve())
    for p in paths[:3]:
        fp.fingerprint(p)
    fp.fingerprint(paths[0])  # used again: now the most recent
    fp.fingerprint(paths[3])
    assert list(entries(cache)) == [str(paths[2]), str(paths[0]), str(paths[3])]


def test_a_fifo_where_the_cache_belongs_is_not_opened(tmp_path: Path, cache: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: apr must not hang on one."""
    cache.parent.mkdir(parents=True)
    os.mkfifo(cache)
    path = model(tmp_path)
    assert hashed(path) == (sha(path.read_bytes()), path.stat().st_size)


def apr_file(tmp_path: Path, *, corrupt: bool) -> Path:
    """Bytes with the .apr magic and a footer CRC32 of all before it (the check reads nothing else)."""
    body = APR_MAGIC + bytes(range(256)) * 50
    data = bytearray(body + zlib.crc32(body).to_bytes(4, "little"))
    if corrupt:
        data[len(data) // 2] ^= 0x10
    path = tmp_path / "m.apr"
    path.write_bytes(bytes(data))
    return path


def mismatch(path: Path) -> str:
    data = path.read_bytes()
    stored, computed = int.from_bytes(data[-4:], "little"), zlib.crc32(data[:-4])
    return (
        f"{path}: footer checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x} "
        f"over bytes [0, {len(data) - 4}) (the file is corrupt)"
    )


def test_an_apr_files_footer_is_checked_on_the_reads_of_its_hash(tmp_path: Path, cache: Path) -> None:
    good = apr_file(tmp_path, corrupt=False)
    got = fp.intact(good)
    assert (got.sha256, got.bytes) == (sha(good.read_bytes()), good.stat().st_size) and got.footer is not None
    assert got.footer.ok and entries(cache)[str(good.resolve())]["footer"] == [
        got.footer.stored,
        got.footer.computed,
        good.stat().st_size - 4,
    ]
    bad = apr_file(tmp_path, corrupt=True)
    with pytest.raises(FormatError) as e:
        fp.intact(bad)
    assert str(e.value) == mismatch(bad)
    assert fp.intact(model(tmp_path)).footer is None  # not an .apr: no checksum to check


def test_a_file_found_corrupt_stays_corrupt_while_its_keys_hold(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = apr_file(tmp_path, corrupt=True)
    with pytest.raises(FormatError):
        fp.intact(bad)

    def no_read(*args: object) -> None:
        raise AssertionError("a cache hit reads nothing")

    monkeypatch.setattr(fp, "_hash", no_read)
    with pytest.raises(FormatError) as e:
        fp.intact(bad)  # from the cache
    assert str(e.value) == mismatch(bad)
    with pytest.raises(FormatError):
        fp.check_intact(bad)
    fp.check_intact(model(tmp_path))  # not an .apr: nothing read, nothing to check


def test_an_entry_with_a_forged_verdict_is_not_trusted(tmp_path: Path, cache: Path) -> None:
    bad = apr_file(tmp_path, corrupt=True)
    with pytest.raises(FormatError):
        fp.intact(bad)
    data = json.loads(cache.read_bytes())
    data["entries"][str(bad.resolve())]["footer"] = [1, 1, "all"]
    cache.write_text(json.dumps(data))
    with pytest.raises(FormatError):
        fp.intact(bad)  # hashed again, not the forged "ok"
