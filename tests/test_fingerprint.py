"""The mixture fingerprint: the same rows give the same hash however Arrow lays them out; any change gives another."""

from __future__ import annotations

import json

from conftest import diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset, concatenate_datasets

from delia import prepare_datasets
from delia.data.fingerprint import file_identity, fingerprint_differences, hash_rows, mixture_fingerprint


def fingerprint(train, cache, **options) -> dict:
    options = {"ratio": 2, "seed": 0, **options}
    return mixture_fingerprint(prepare_datasets(str(train), str(cache), **options), str(train), str(cache))


def test_the_same_rows_hash_the_same_whatever_their_layout():
    rows = diverse_rows(30)
    whole = Dataset.from_list(rows)
    pieces = concatenate_datasets([Dataset.from_list(rows[:7]), Dataset.from_list(rows[7:])])
    assert hash_rows(whole) == hash_rows(pieces)
    expected = hash_rows(Dataset.from_list(rows[5:25]))
    assert hash_rows(whole.select(range(5, 25))) == hash_rows(whole.select(range(5, 25)).flatten_indices()) == expected
    assert hash_rows(whole.select(range(24, 4, -1))) == hash_rows(Dataset.from_list(rows[5:25][::-1])) != expected
    changed = [dict(row) for row in rows]
    changed[17] = {"messages": [dict(m) for m in rows[17]["messages"]]}
    changed[17]["messages"][1]["content"] += "!"
    assert hash_rows(Dataset.from_list(changed)) != hash_rows(whole)
    assert hash_rows(whole, [0, 1, 2]) != hash_rows(whole, [0, 2, 1]) != hash_rows(whole)


def test_the_fingerprint_follows_the_rows_the_order_and_the_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40))
    first = fingerprint(train, cache)
    assert first == fingerprint(train, cache) and first["rows"] == 24
    assert first["diverse_file"] == {
        "path": str(cache),
        "bytes": cache.stat().st_size,
        "sha256": first["diverse_file"]["sha256"],
    }
    assert fingerprint_differences(first, first) == []

    reseeded = fingerprint(train, cache, seed=1)  # same files, other draw and order
    assert reseeded["combined"] != first["combined"] and reseeded["diverse_file"] == first["diverse_file"]
    assert fingerprint_differences(first, reseeded) == [
        f"the mixed rows differ (24 rows, sha256 {first['rows_sha256'][:16]} then; 24 rows, sha256 "
        f"{reseeded['rows_sha256'][:16]} now)"
    ]

    # one character of one row, same file size: the file's hash changes even where the drawn rows do not
    text = cache.read_text()
    cache.write_text(text.replace("note number 39", "note number 93"))
    edited = fingerprint(train, cache)
    assert edited["diverse_file"]["bytes"] == first["diverse_file"]["bytes"]
    assert (
        edited["diverse_file"]["sha256"] != first["diverse_file"]["sha256"] and edited["combined"] != first["combined"]
    )
    assert [part.split(" (")[0] for part in fingerprint_differences(first, edited)][0] == "the diverse cache differs"

    # the same file elsewhere (another mount point) is the same data
    moved = tmp_path / "elsewhere" / "cache.jsonl"
    moved.parent.mkdir()
    moved.write_text(text)
    assert fingerprint(train, moved)["combined"] == first["combined"]


def test_what_has_no_file_identity(tmp_path):
    saved = tmp_path / "saved"
    Dataset.from_list(diverse_rows(5)).save_to_disk(str(saved))
    identity = file_identity(str(saved))
    assert identity["bytes"] == sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    (saved / "dataset_info.json").write_text(json.dumps({"edited": True}))
    assert file_identity(str(saved))["sha256"] != identity["sha256"]
    assert file_identity(Dataset.from_list(diverse_rows(5))) is None and file_identity("org/some-hub-dataset") is None
    streaming = Dataset.from_list(downstream_rows(4)).to_iterable_dataset()
    result = mixture_fingerprint(prepare_datasets(streaming, None), streaming, None)
    assert result["rows"] is None and result["rows_sha256"] is None and result["combined"]
