"""`dsv3 params`: the 671B numbers of the report, from a model built on the meta device."""

import subprocess
import sys

import dsv3
from dsv3.cli import main
from dsv3.params import count_parameters


def test_671b_counts():
    r = count_parameters(dsv3.get_config("deepseek-v3-671b"))
    assert r.total == 671_026_419_200
    assert round(r.activated / 1e9, 2) == 37.55
    assert round((r.activated - r.main["embedding"]) / 1e9, 2) == 36.63
    assert round(r.mtp_unique / 1e9, 2) == 11.61 and round(r.mtp_stored / 1e9, 2) == 13.46
    assert r.kv_bytes_per_token(2) == (70_272, 4_997_120)


def test_counts_equal_the_real_tiny_model():
    cfg = dsv3.get_config("tiny")
    r = count_parameters(cfg)
    model = dsv3.DeepseekV3(cfg)
    stored = sum(t.numel() for n, t in model.state_dict().items())
    assert r.total + r.mtp_unique == stored


def test_cli_prints_the_671b_numbers():
    proc = subprocess.run([sys.executable, "-m", "dsv3", "params", "--model-config", "deepseek-v3-671b"],
                          capture_output=True, text=True, check=True, env={"COLUMNS": "140", "PATH": ""})
    assert "671,026,419,200" in proc.stdout and "37.55B" in proc.stdout and "70,272" in proc.stdout
    assert proc.stderr == ""


def test_cli_names_a_bad_config(capsys):
    assert main(["params", "--model-config", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 params: error: ") and "no-such-preset" in err and "Traceback" not in err
