"""`make bench` measures what it claims: its data-side worker on the repo's sample (no timing asserted)."""

import sys

from support import REPO

sys.path.insert(0, str(REPO / "recipes"))
from bench import run_worker  # noqa: E402


def test_bench_worker_measures_ours_and_the_stock_path_on_the_same_data(tmp_path):
    ours = run_worker("ours", REPO / "data", 256, tmp_path / "cache")
    warm = run_worker("ours", REPO / "data", 256, tmp_path / "cache")
    documents = run_worker("stock-documents", REPO / "data", 256, tmp_path / "cache")
    assert ours["text_kept"] == 1.0 and documents["text_kept"] < 0.9  # stock truncates each document to one window
    assert ours["fill"] > documents["fill"] and ours["packs"] <= documents["packs"]
    assert {k: v for k, v in warm.items() if k not in ("seconds", "peak_rss_mb")} == \
           {k: v for k, v in ours.items() if k not in ("seconds", "peak_rss_mb")}
