"""toolkit compare of runs given one by one (JSON, compare.png where --out says), and of what is not a run.
The compare of a whole sweep (its table, JSON and picture) is tested on the sweep of tests/test_sweep.py."""

from __future__ import annotations

import json


from conftest import run_main, train_run

def test_compare_runs_given_one_by_one_and_refuses_what_is_not_a_run(tmp_path, capsys):
    a, _ = train_run(tmp_path, "train.epochs=1", "data.synthetic_samples=128", name="a")
    b, _ = train_run(tmp_path, "train.epochs=1", "data.synthetic_samples=128", "optim.name=sgd", name="b")
    code, out, _ = run_main(capsys, "compare", str(a), str(b), "--out", str(tmp_path / "pics"))
    assert code == 0 and (tmp_path / "pics" / "compare.png").is_file()
    code, out, _ = run_main(capsys, "compare", str(a), str(b), "--json")
    assert [r["values"] for r in sorted(json.loads(out)["runs"], key=lambda r: r["name"])] == [
        {"optim.name": "adam"}, {"optim.name": "sgd"}]
    code, _, err = run_main(capsys, "compare", str(tmp_path / "nothing"))
    assert code == 2 and "neither a run directory (no config.yaml) nor a sweep directory (no sweep.json)" in err
