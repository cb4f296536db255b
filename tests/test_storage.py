"""The storage seat (pipeline/storage.py) on a local folder and on a real S3 server."""

from __future__ import annotations


import pytest

from pipeline import storage


def test_local_paths_and_file_urls_are_paths(tmp_path):
    assert storage.location(str(tmp_path)) == tmp_path
    assert storage.location(f"file://{tmp_path}") == tmp_path
    assert storage.is_local(storage.location(str(tmp_path)))
    assert not storage.is_url("relative/dir") and not storage.is_url("/abs") and storage.is_url("s3://b/k")


def test_storage_options_parse_json_values_and_name_a_bad_pair_without_its_value():
    assert storage.parse_storage_options(["anon=true", "key=abc", "client_kwargs={\"a\": 1}"]) == {
        "anon": True, "key": "abc", "client_kwargs": {"a": 1}}
    with pytest.raises(ValueError) as err:
        storage.parse_storage_options(["secret"])
    assert "secret" in str(err.value)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_atomic_write_exclusive_create_and_remove(where, tmp_path, request):
    if where == "local":
        root = tmp_path
    else:
        s3 = request.getfixturevalue("s3")
        root = storage.location(f"s3://{s3.bucket()}/out")
    target = root / "a" / "file.bin"
    if storage.is_local(target):
        target.parent.mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with storage.atomic_file(target) as handle:
            handle.write(b"half")
            raise RuntimeError("killed mid-write")
    assert not target.exists()  # nothing under the final name
    storage.write_atomic(target, b"whole")
    assert target.read_bytes() == b"whole"
    lock = root / "lock"
    assert storage.create_exclusive(lock, b"me")
    assert not storage.create_exclusive(lock, b"you")
    assert lock.read_bytes() == b"me"
    storage.remove_tree(root / "a")
    assert not target.exists()
