"""train from settings with progress events, resume, evaluate."""

import json

from conftest import NUCLEI, TINY

import unetpp


def test_training_reports_progress_and_writes_a_run(tiny_run):
    run, events = tiny_run
    assert (run / "checkpoints" / "best.unetpp").is_file() and (run / "config.toml").is_file()
    # One epoch of two steps: a bar started, moved to 2 with the loss, finished.
    assert events[0] == ("start", 2, "epoch 1/1"), events
    assert events[-1] == ("finish", 0, "")
    updates = [e for e in events if e[0] == "update"]
    assert updates[-1][1] == 2 and updates[-1][2].startswith("loss "), updates


def test_train_config_fills_in_the_clis_defaults():
    cfg = unetpp.train_config(TINY)
    assert cfg["epochs"] == 1 and cfg["model"]["width"] == 4
    assert cfg["lr"] == 3e-4 and cfg["seed"] == 42 and cfg["model"]["arch"] == "unetpp"
    assert cfg["input"]["normalize"] == {"kind": "imagenet"}


def test_a_toml_config_and_resume(tiny_run, tmp_path):
    # The run's own config.toml replays it; resuming a finished run changes nothing.
    run, _ = tiny_run
    again = unetpp.train(run / "config.toml", tmp_path / "again", progress=False)
    assert (again / "checkpoints" / "best.unetpp").is_file()
    before = (again / "metrics.csv").read_text()
    assert unetpp.train(None, again, progress=False) == again
    assert (again / "metrics.csv").read_text() == before


def test_evaluate_returns_the_summary_it_writes(tiny, tmp_path):
    summary = unetpp.evaluate(tiny.path, NUCLEI, tmp_path / "eval")
    assert summary == json.loads((tmp_path / "eval" / "summary.json").read_text())
    s = summary["summary"]
    assert s["images"] == 2 and s["mode"] == "accurate" and 0 <= s["mean_dice"] <= 1
    assert (tmp_path / "eval" / "report.html").is_file()


def test_tqdm_bars_follow_training(tqdm_bars, tmp_path):
    """progress=True draws one tqdm.auto bar per epoch."""
    unetpp.train(dict(TINY, epochs=2), tmp_path / "run")
    got = [(b.desc, b.unit, b.total, b.n, b.closed) for b in tqdm_bars]
    assert got == [("epoch 1/2", "step", 2, 2, True), ("epoch 2/2", "step", 2, 2, True)]
    assert tqdm_bars[0].postfix.startswith("loss ")
