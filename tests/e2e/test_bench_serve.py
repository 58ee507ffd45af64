"""benchmarks/bench_serve.py's plumbing on a tiny run: every server starts, answers every request
of every row, and is stopped; the batch-1 servers really run batches of one; the goals are judged;
LitServe's rows are there when it is installed (the bench extra), else one row says so. The
numbers themselves are the benchmark's business, not this test's."""

from __future__ import annotations

import importlib.util
import os

from tests.helpers import PY, ROOT, TINY, run, table_rows, train_cmd

CLIENTS = [1, 8, 32]
REQUESTS = 40


def test_bench_serve_runs_every_server_at_every_number_of_clients(tmp_path, cache_dir):
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline")
    run_dir = tmp_path / "tiny"
    run(train_cmd(*TINY, f"run.dir={run_dir}"), env)
    results = tmp_path / "RESULTS.md"
    record = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    run([PY, "benchmarks/bench_serve.py", "--run", str(run_dir), "--clients", *map(str, CLIENTS), "--requests",
         str(REQUESTS), "--rounds", "1"], dict(env, CIFAR_DIST_RESULTS=str(results)), timeout=900)
    text = results.read_text()
    header, ceiling, *rows = table_rows(text)
    assert header == ["server", "clients", "answered", "req/s", "p50 ms", "p99 ms", "errors", "mean batch"]
    assert ceiling[:3] == ["client ceiling: GET /healthz", "32", f"{REQUESTS}"] and ceiling[6] == "0"
    by_server: dict[str, list[list[str]]] = {}
    for r in rows:
        by_server.setdefault(r[0], []).append(r)
    ours = ["torch, batched", "torch, batch 1", "onnx, batched", "onnx, batch 1"]
    peer_installed = importlib.util.find_spec("litserve") is not None
    assert list(by_server) == [*ours, "LitServe, batched"]
    for name in ours + (["LitServe, batched"] if peer_installed else []):
        assert [r[1] for r in by_server[name]] == [str(c) for c in CLIENTS], name
        for r in by_server[name]:
            assert r[2] == str(REQUESTS) and r[6] == "0", r  # every request answered
            assert float(r[3].split()[0].replace(",", "")) > 0 and float(r[4]) <= float(r[5]), r
    for name in ("torch, batch 1", "onnx, batch 1"):
        assert {r[7] for r in by_server[name]} == {"1.00"}, by_server[name]
    for r in by_server["torch, batched"] + by_server["onnx, batched"]:
        assert 1 <= float(r[7]) <= int(r[1]), r  # never more images in a batch than clients waiting
    if not peer_installed:
        assert by_server["LitServe, batched"] == [["LitServe, batched", "not installed: pip install 'cifar-dist[bench]'",
                                                   "", "", "", "", "", ""]]
    for goal in ("goal, torch at 32 clients: batching", "goal, onnx at 32 clients: batching",
                 "goal, torch batched at 8 clients: p99", "goal, errors: 0"):
        assert goal in text, goal
    assert "model served: tiny, the blitz net" in text and "CPU (lscpu): " in text
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == record  # the record is untouched
