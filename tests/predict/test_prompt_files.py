"""Broken prompt files are one-line errors naming the file and the line (or row); nothing is swallowed."""

import json

import pytest

from stepsaver.errors import StepsaverError
from stepsaver.predict.prompts import read_prompts


@pytest.mark.parametrize("name, text, match", [
    ("open.csv", 'prompt\n"a cat\na dog\na bird\n', r"open\.csv, line \d+: unreadable CSV .*unclosed quote"),
    ("big.csv", "prompt\n" + "x" * 140_000 + "\n", r"big\.csv, line 2: unreadable CSV .*field limit"),
    ("null.jsonl", '{"prompt": "a cat"}\n{"prompt": null}\n', r"null\.jsonl, line 2: the prompt is null"),
    ("number.jsonl", '{"prompt": 7}\n', r"number\.jsonl, line 1: the prompt is 7, not a string"),
    ("nocol.jsonl", '{"prompt": "a cat"}\n{"text2": "a dog"}\n', r"nocol\.jsonl, line 2: no prompt column"),
    ("nonobj.json", json.dumps(["a cat", 3]), r"nonobj\.json, item 1: expected a string or an object, got int"),
    ("nullobj.json", json.dumps([{"prompt": None}]), r"nullobj\.json, item 0: the prompt is null"),
    ("corrupt.parquet", "not a parquet file", r"corrupt\.parquet: not a readable parquet file"),
])
def test_broken_files_name_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(StepsaverError, match=match):
        read_prompts(tmp_path / name)


def test_null_prompts_in_parquet_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a cat", None]}), tmp_path / "p.parquet")
    with pytest.raises(StepsaverError, match=r"p\.parquet, row 1: the prompt is None"):
        read_prompts(tmp_path / "p.parquet")


def test_quoted_commas_and_newlines_in_closed_quotes_still_read(tmp_path):
    (tmp_path / "ok.csv").write_text('prompt,n\n"a cat, on a mat",1\n"two\nlines",2\na dog,3\n')
    assert read_prompts(tmp_path / "ok.csv") == ["a cat, on a mat", "two\nlines", "a dog"]


def test_tsv_quotes_are_literal_so_nothing_is_swallowed(tmp_path):
    (tmp_path / "p.tsv").write_text('prompt\tid\n"a cat\t1\na sign that says "hi"\t2\na dog\t3\n')
    assert read_prompts(tmp_path / "p.tsv") == ['"a cat', 'a sign that says "hi"', "a dog"]

