"""predict (into a folder) and evaluate report progress as train does: events to a callable,
tqdm bars with progress=True."""

from conftest import NUCLEI, blobs, write_png

import unetpp


def check_bar(events, label, total, names):
    assert events[0] == ("start", total, label), events
    assert events[-1] == ("finish", 0, ""), events
    updates = [e for e in events if e[0] == "update"]
    positions = [n for _, n, _ in updates]
    assert positions == sorted(positions) and positions[-1] == total, updates
    assert {t for _, _, t in updates} == set(names), updates


def test_predict_into_a_folder_reports_each_input(tiny, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        write_png(inputs / f"c{i}.png", blobs(48, 48, seed=i))
    events = []
    written = tiny.predict_file(inputs, out=tmp_path / "out", progress=lambda *e: events.append(e))
    assert sorted(p.name for p in written) == ["c0.png", "c1.png", "c2.png"]
    check_bar(events, "predict", 3, ["c0", "c1", "c2"])


def test_evaluate_reports_each_image(tiny, tmp_path):
    events = []
    summary = unetpp.evaluate(tiny.path, NUCLEI, tmp_path / "eval", progress=lambda *e: events.append(e))
    names = [row["name"] for row in summary["images"]]
    assert len(names) == 2
    check_bar(events, "eval", 2, names)


def test_tqdm_bars_follow_prediction_and_evaluation(tiny, tqdm_bars, tmp_path):
    write_png(tmp_path / "a.png", blobs(48, 48))
    tiny.predict_file(tmp_path / "a.png", out=tmp_path / "out")
    unetpp.evaluate(tiny.path, NUCLEI, tmp_path / "eval")
    got = [(b.desc, b.unit, b.total, b.n, b.closed) for b in tqdm_bars]
    assert got == [("predict", "image", 1, 1, True), ("eval", "image", 2, 2, True)]
    # progress=False: no bar.
    unetpp.evaluate(tiny.path, NUCLEI, tmp_path / "quiet", progress=False)
    assert len(tqdm_bars) == 2
