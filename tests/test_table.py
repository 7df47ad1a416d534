"""TableSchema: fit on train only, encoding, unseen categories, JSON round trip; read_table errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cmml_monai.data.errors import DataError
from cmml_monai.data.table import TableSchema, read_table

TRAIN = [
    {"age": 40, "sex": "female", "site": "back"},
    {"age": 60, "sex": "male", "site": "arm"},
    {"age": "50", "sex": "female", "site": ""},
    {"age": None, "sex": "male", "site": "back"},
]
VALID = [{"age": 1000, "sex": "other", "site": "leg"}]


def test_fit_uses_train_rows_only():
    schema = TableSchema.fit(TRAIN, ["age", "sex", "site"], {"sex": "categorical"})
    with_valid = TableSchema.fit(TRAIN + VALID, ["age", "sex", "site"], {"sex": "categorical"})
    age = schema.columns[0]
    assert age.type == "numeric" and age.mean == pytest.approx(50.0)
    assert age.std == pytest.approx(np.std([40, 60, 50]))
    assert schema.columns[1].vocabulary == ["female", "male"]
    assert schema.columns[2].vocabulary == ["arm", "back"]
    # a validation row would have moved the statistics: fitting on train only keeps them clean
    assert with_valid.columns[0].mean != pytest.approx(50.0)
    assert "other" not in schema.columns[1].vocabulary


def test_types_declared_or_inferred_and_cardinalities():
    schema = TableSchema.fit(TRAIN, ["age", "sex", "site"], {"sex": "categorical"})
    assert {c.name: c.type for c in schema.columns} == {"age": "numeric", "sex": "categorical", "site": "categorical"}
    assert [c.name for c in schema.columns if c.inferred] == ["age", "site"]
    assert schema.cardinalities == [0, 2, 2]
    assert [c.name for c in schema.columns] == ["age", "sex", "site"] and schema.num_features == 3
    # a numeric-looking column declared categorical stays categorical, with 1 and 1.0 the same code
    coded = TableSchema.fit([{"g": 1}, {"g": 2.0}, {"g": "1"}], ["g"], {"g": "categorical"})
    assert coded.columns[0].vocabulary == ["1", "2"]
    assert coded.encode({"g": 1.0}).tolist() == [0.0]
    with pytest.raises(ValueError, match="bogus"):
        TableSchema.fit(TRAIN, ["age"], {"age": "bogus"})
    with pytest.raises(ValueError, match="nope"):
        TableSchema.fit(TRAIN, ["age"], {"nope": "numeric"})


def test_encode_values_empty_and_unseen():
    schema = TableSchema.fit(TRAIN, ["age", "sex", "site"], {"sex": "categorical"})
    std = np.std([40, 60, 50])
    out = schema.encode({"age": 60, "sex": "male", "site": "back"})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [10 / std, 1.0, 1.0], rtol=1e-6)
    empty = schema.encode({"age": float("nan"), "sex": "  ", "site": None})
    assert np.isnan(empty).all()
    with pytest.warns(UserWarning, match="'sex'.*'other'"):
        unseen = schema.encode({"age": 50, "sex": "other", "site": "arm"})
    assert unseen[0] == pytest.approx(0.0) and math.isnan(unseen[1]) and unseen[2] == 0.0
    with pytest.warns(UserWarning, match="'age'.*not a number"):
        assert np.isnan(schema.encode({"age": "old"})[0])


def test_save_load_round_trip(tmp_path):
    schema = TableSchema.fit(TRAIN, ["age", "sex", "site"], {"sex": "categorical"})
    path = tmp_path / "sub" / "table_schema.json"
    schema.save(path)
    text = path.read_text()
    assert json.loads(text)["columns"][1]["vocabulary"] == ["female", "male"]  # human-readable
    loaded = TableSchema.load(path)
    assert loaded == schema
    rows = TRAIN + [{"age": 70, "sex": "female", "site": "arm"}]
    for row in rows:
        np.testing.assert_array_equal(loaded.encode(row), schema.encode(row))
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text  # stable
    (tmp_path / "bad.json").write_text('{"version": 1, "columns": [{"name": "a"}]}')
    with pytest.raises(DataError, match="bad.json"):
        TableSchema.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        TableSchema.load(tmp_path / "absent.json")


def test_read_table_csv_xlsx_and_errors(tmp_path):
    df = pd.DataFrame({"id": [1, 2], " grade ": [1, None]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_excel(tmp_path / "t.xlsx", sheet_name="Sheet1", index=False)
    csv = read_table(tmp_path / "t.csv", required=["id", "grade"])
    xlsx = read_table(tmp_path / "t.xlsx", sheet="Sheet1", required=["grade"])
    assert list(csv.columns) == ["id", "grade"] and list(xlsx.columns) == ["id", "grade"]
    assert math.isnan(csv["grade"][1]) and math.isnan(xlsx["grade"][1])
    with pytest.raises(DataError, match="missing required column 'age'.*t.csv|t.csv.*missing required column 'age'"):
        read_table(tmp_path / "t.csv", required=["id", "age"])
    with pytest.raises(DataError, match="sheet 'Other'"):
        read_table(tmp_path / "t.xlsx", sheet="Other")
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        read_table(tmp_path / "t.json")
