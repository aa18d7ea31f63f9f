"""bench reliability: every known bad input to the CLI, files, label store and instruments is a clear error."""

import json

from stepsaver.bench.reliability import bench_reliability, cli_and_file_cases


def test_every_cli_and_file_case_is_as_designed(tmp_path):
    result = bench_reliability(out_dir=tmp_path, service=False)
    bad = [r for r in result["rows"] if not r["as_designed"]]
    assert not bad, bad
    counts = result["counts"]
    assert counts["tracebacks"] == 0 and counts["5xx"] == 0 and counts["rows_lost"] == 0
    assert counts["inputs_tried"] == len(cli_and_file_cases()) == counts["clear_errors"] + counts["accepted"]
    saved = json.loads((tmp_path / "reliability.json").read_text())
    assert saved["counts"] == counts and (tmp_path / "reliability.md").read_text().count("|") > 50
