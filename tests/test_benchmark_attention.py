"""benchmarks/attention.py: a run's JSON can be plotted again without running anything."""

import json

import pytest

from benchmarks import attention


def test_replot_draws_a_saved_run(tmp_path):
    cases = (("ENLA fwd+bwd", 1e-6, 0.02), ("exact fwd+bwd", 1e-5, 0.1))
    rows = [
        {"n": n, "case": case, "seconds": seconds * n, "xla_mib": mib * n}
        for n in (1024, 4096)
        for case, seconds, mib in cases
    ]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"batch": 4, "machine": {"device_kind": "test device"}, "rows": rows}))
    out = tmp_path / "plot.png"
    assert attention.main(["--replot", str(saved), "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_replot_without_a_destination_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        attention.main(["--replot", str(tmp_path / "run.json")])
    assert "--replot needs --plot" in capsys.readouterr().err
