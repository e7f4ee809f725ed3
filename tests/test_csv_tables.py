"""CSV files as users have them: dialects, encodings, a bad value deep in a file, malformed lines."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from mcl_ray.cli import app
from mcl_ray.core.config import TableRef, validate_config
from mcl_ray.data import csv_tables
from mcl_ray.data.prepare import DataValidationError, prepare

# A classic public ratings dump: semicolons, quoted fields, NULL tokens, latin-1, CRLF and
# backslash-escaped quotes inside titles; line 5 has one field too many.
BOOKS = ('"ISBN";"Book-Title";"Book-Author";"Year"\r\n'
         '"0001";"L\'\u00e9tranger";"Camus";"1942"\r\n'
         '"0002";"The \\"Best\\" Book";"NULL";"1999"\r\n'
         '"0003";"Caf\u00e9 Society";"Woody";NULL\r\n'
         '"0004";"Broken";"line";"2001";"extra"\r\n'
         '"0005";"Fine";"Again";"2005"\r\n').encode("latin-1")
DUMP = {"format": "csv", "delimiter": ";", "escape_char": "\\", "null_values": ["", "NULL"], "encoding": "latin-1"}


def test_dialect_encoding_nulls_escapes_and_a_malformed_line(tmp_path):
    path = tmp_path / "books.csv"
    path.write_bytes(BOOKS)
    t = csv_tables.read_table([str(path)], TableRef(path=str(path), **DUMP))
    rows = {r["ISBN"]: r for r in t.to_pylist() if r["ISBN"]}
    assert rows["0001"]["Book-Title"] == "L'\u00e9tranger"  # latin-1 decoded, not "undecodable"
    assert rows["0002"]["Book-Title"] == 'The "Best" Book' and rows["0002"]["Book-Author"] is None
    assert rows["0003"]["Year"] is None and rows["0005"]["Year"] == "2005"  # text: typed later, by validation
    bad = [r for r in t.to_pylist() if r[csv_tables.MALFORMED]]
    assert len(bad) == 1 and '"Broken"' in bad[0][csv_tables.MALFORMED] and bad[0][csv_tables.LINE] == 5
    assert t.num_rows == 5  # every data line is a row: 4 parsed + 1 malformed


def test_bad_dialect_settings_are_config_errors(tmp_path):
    with pytest.raises(Exception, match="unknown text encoding"):
        TableRef(path="x.csv", format="csv", encoding="latin-42")
    with pytest.raises(Exception, match="column_names"):
        TableRef(path="x.csv", format="csv", header=False)


def test_a_word_in_the_third_block_is_text_not_a_failed_read(tmp_path):
    path = tmp_path / "r.csv"
    lines = ["user_id,item_id,rating,timestamp"] + [f"u{i % 7},i{i % 5},{1 + i % 5},{1000 + i}" for i in range(3000)]
    lines[2500] = "u1,i2,five,1000"
    path.write_text("\n".join(lines) + "\n")
    blocks = list(csv_tables.read_blocks(str(path), TableRef(path=str(path), format="csv"), block_bytes=16 << 10))
    assert len(blocks) >= 3 and sum(b.num_rows for b in blocks) == 3000
    assert "five" in [v for b in blocks for v in b.column("rating").to_pylist()]


def _ratings(folder, bad_line=2500):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,rating,timestamp"] + [f"u{i % 7},i{i % 5},{1 + i % 5},2001-09-09 {i % 24:02d}:00:00"
                                                    for i in range(3000)]
    lines[bad_line] = "u1,i2,five,1000"
    lines[bad_line + 100] = "u2,i3,4,1000,extra"  # a field too many: the parser cannot split this line
    (folder / "r.csv").write_text("\n".join(lines) + "\n")
    return folder


def _config(folder, run_dir, policy):
    return {"name": "words", "run_dir": str(run_dir),
            "data": {"source": "tables", "interactions": {"path": str(folder / "r.csv"), "format": "csv"}},
            "prepare": {"scenario": {"column": "item_id", "groups": None},
                        "categorical": [{"name": "user_id"}, {"name": "item_id"}], "context": ["hour"],
                        "validation": {"policy": policy}}}


@pytest.mark.ray
def test_bad_value_and_malformed_line_quarantined_or_named(tmp_path, ray_cluster):
    folder = _ratings(tmp_path / "in")
    res = prepare(validate_config(_config(folder, tmp_path / "q", "quarantine")), force=True)
    stats = json.loads((res.out_dir / "stats.json").read_text())
    inter = stats["rows"]["interactions"]
    assert inter["holds"] and inter["rows_in"] == 3000 and inter["rows_quarantined"] >= 2
    reasons = stats["quarantine_reasons"]["interactions"]
    assert reasons.get("bad_type:rating") == 1 and reasons.get("malformed_line", 0) >= 1
    q = pq.read_table(res.out_dir / "quarantine" / "interactions").to_pandas()
    assert any("five" in r for r in q["_raw"]) and q["_source"].str.endswith("r.csv").all()
    # the date/time text became epoch seconds (context feature hour from it)
    assert res.spec.scenario_names == ["i0", "i1", "i2", "i3", "i4"]
    # policy fail: exit 1, naming file, column and the value
    cfg = tmp_path / "fail.yaml"
    cfg.write_text(yaml.safe_dump(_config(folder, tmp_path / "f", "fail")))
    r = CliRunner().invoke(app, ["prepare", str(cfg)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "r.csv" in r.output and ("bad_type" in r.output or "malformed_line" in r.output)
    with pytest.raises(DataValidationError):
        prepare(validate_config(_config(folder, tmp_path / "f2", "fail")), force=True)
