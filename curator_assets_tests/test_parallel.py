"""The forked ordered map behind `index --workers` and `validate --workers`."""

from __future__ import annotations

import os

from curator_assets.cli.parallel import ordered_map


def _row(i: int) -> dict:
    return {"i": i, "pid": os.getpid(), "nested": {"sq": [i, i * i]}, "none": None, "ok": True}


def test_results_in_order_from_several_processes() -> None:
    rows = list(ordered_map(_row, list(range(11)), workers=3))
    assert [r["i"] for r in rows] == list(range(11))
    assert [r["nested"]["sq"][1] for r in rows] == [i * i for i in range(11)]
    assert len({r["pid"] for r in rows}) == 3  # the parent and two children did the work
    assert rows[0]["pid"] == os.getpid()


def test_one_worker_runs_in_process() -> None:
    rows = list(ordered_map(_row, [5, 6], workers=1))
    assert [r["pid"] for r in rows] == [os.getpid()] * 2


def test_a_dying_worker_is_reported_not_hung() -> None:
    parent = os.getpid()

    def die_on_three(i: int) -> dict:
        if i == 3 and os.getpid() != parent:
            os._exit(3)
        return {"i": i}

    # Two workers: the parent takes the even items, the child the odd ones (1, 3, 5).
    rows = list(ordered_map(die_on_three, list(range(6)), workers=2))
    assert [r.get("i") for r in rows] == [0, 1, 2, None, 4, None]
    assert "ended early" in rows[3]["error"] and "ended early" in rows[5]["error"]
