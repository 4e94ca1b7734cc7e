import json
import math
import random
import shutil
from importlib import metadata

from spaceserve.bench import report
from spaceserve.bench.metrics import metric_field_names


def test_commit_comes_from_the_environment_where_there_is_no_git(tmp_path, monkeypatch):
    commit = "%040x" % random.getrandbits(160)
    monkeypatch.setenv("SPACESERVE_COMMIT", commit)
    monkeypatch.setattr(report, "_REPO_ROOT", tmp_path)  # a copy of the tree without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert report.git_state() == (commit, None)
    monkeypatch.delenv("SPACESERVE_COMMIT")
    assert report.git_state() == (None, None)


def test_version_falls_back_to_pyproject_when_not_installed(tmp_path, monkeypatch):
    shutil.copy(report._REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.setattr(report, "_REPO_ROOT", tmp_path)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(report.metadata, "version", not_installed)
    text = (tmp_path / "pyproject.toml").read_text()
    expected = next(line.split('"')[1] for line in text.splitlines() if line.startswith("version"))
    assert report.spaceserve_version() == expected


def test_rows_are_strict_json_and_failed_rows_print_their_error(tmp_path):
    run = {"model": "m", "multiplex": "space", "encoder_policy": "fcfs", "request_rate": math.inf}
    row = report.make_row(run, None, "ConfigError: no green contexts")
    path = tmp_path / "r.jsonl"
    report.append_jsonl(path, row)
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))  # no Infinity/NaN
    (back,) = report.read_jsonl(path)
    assert back["request_rate"] == "inf" and report.rate_from_json(back["request_rate"]) == math.inf
    assert list(back) == report.row_fields() and all(back[name] is None for name in metric_field_names())
    table = report.format_table([back])
    assert "space/fcfs" in table and "failed: ConfigError: no green contexts" in table
