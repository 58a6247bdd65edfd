"""Output safety and run records."""

import json

import pytest

from sirf_ddip.errors import OutputExistsError
from sirf_ddip.io.header import InterfileHeader
from sirf_ddip.errors import InputFileError
from sirf_ddip.utils.provenance import check_output, write_run_record


def test_check_output_refuses_existing(tmp_path):
    f = tmp_path / "out.hv"
    assert check_output(f) == f
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="out.hv"):
        check_output(f)
    assert check_output(f, overwrite=True) == f


def test_run_record_has_config_seed_versions(tmp_path):
    p = write_run_record(tmp_path, config={"beta": 0.1}, seed=7)
    rec = json.loads(p.read_text())
    assert rec["seed"] == 7 and rec["config"]["beta"] == 0.1
    assert "torch" in rec["versions"] and "sirf_ddip" in rec["versions"]
    assert (tmp_path / "run_record_config.yaml").is_file()


def test_header_parser_errors(tmp_path):
    bad = tmp_path / "bad.hv"
    bad.write_text("hello\n")
    with pytest.raises(InputFileError, match="bad.hv.*INTERFILE"):
        InterfileHeader.read(bad)
    with pytest.raises(InputFileError, match="not found"):
        InterfileHeader.read(tmp_path / "missing.hv")
    h = InterfileHeader.parse("!INTERFILE :=\n!matrix size [1] := 12\nfoo := {1, 2,3}\nbar := abc\n", "x.hv")
    assert h.get_int("matrix size[1]") == 12 and h.get_int_list("foo") == [1, 2, 3]
    with pytest.raises(InputFileError, match=r"x.hv \[key 'bar'\]"):
        h.get_float("bar")
    with pytest.raises(InputFileError, match="missing"):
        h.require("name of data file")
