"""benchmarks/results.json: each benchmark merges its figures without erasing the others', ratios are taken within
a round (same load) before the median, and cache_worker_scaling is copied from cache_results.json with its date."""

import json

from benchmarks import common


def test_results_merge_sections_and_copy_the_cache_scaling_with_its_date(tmp_path, monkeypatch):
    cache = tmp_path / "cache_results.json"
    cache.write_text(
        json.dumps(
            {"date": "2026-11-29T17:57:26+00:00", "cache_worker_scaling": 0.93, "cache_new_vs_old_per_core": 2.6}
        )
    )
    monkeypatch.setattr(common, "CACHE_RESULTS", cache)
    results = tmp_path / "results.json"
    env = {"date": "2026-11-29T18:00:00+00:00", "machine": {"cpu_flags": ["avx512f"], "load_average": [6.1]}}
    common.write_results("train", {"ratios": {}}, {"train_ratio": 7.5}, env, results)
    later = {"date": "2026-11-29T18:30:00+00:00", "machine": {"cpu_flags": ["avx512f"], "load_average": [3.0]}}
    common.write_results("caption", {"ratios": {}}, {"caption_ratio": 40.0}, later, results)
    saved = json.loads(results.read_text())
    assert saved["train_ratio"] == 7.5 and saved["caption_ratio"] == 40.0  # the first section survives the second
    assert saved["dates"] == {
        "train": env["date"],
        "caption": later["date"],
        "cache_worker_scaling": "2026-11-29T17:57:26+00:00",
    }
    assert saved["cache_worker_scaling"] == 0.93 and saved["machine"]["load_average"] == [3.0]
    assert saved["cache_new_vs_old_per_core"] == 2.6
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, which is gone

    # a new cache run alone updates results.json without touching the other sections
    cache.write_text(
        json.dumps(
            {"date": "2026-11-30T09:00:00+00:00", "cache_worker_scaling": 1.8, "cache_new_vs_old_per_core": 2.7}
        )
    )
    common.update_cache_figures(results)
    updated = json.loads(results.read_text())
    assert updated["cache_worker_scaling"] == 1.8 and updated["cache_new_vs_old_per_core"] == 2.7
    assert updated["dates"]["cache_worker_scaling"] == "2026-11-30T09:00:00+00:00" and updated["train_ratio"] == 7.5


def test_ratios_are_per_round_then_the_median():
    runs = {
        "course": [{"rate": 1.0}, {"rate": 0.5}, {"rate": 2.0}],  # the machine's load changed between rounds
        "ours": [{"rate": 10.0}, {"rate": 6.0}, {"rate": 30.0}],
    }
    rounds = common.per_round_ratios(runs, "ours", "course", "rate")
    assert rounds == [10.0, 12.0, 15.0] and common.median(rounds) == 12.0
    # the ratio of the medians would mix rounds measured under different loads
    assert common.median([10.0, 6.0, 30.0]) / common.median([1.0, 0.5, 2.0]) == 10.0
    summary = common.median_summary(runs["ours"], ("rate",))
    assert summary["rate"] == 10.0 and summary["rate_rounds"] == [10.0, 6.0, 30.0] and summary["rounds"] == 3
