"""Smoke test of benchmarks/kernels.py: it compiles both models' steps and its counts are sane."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_kernels_benchmark_counts_are_sane(tmp_path):
  out_json = tmp_path / "kernels.json"
  result = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "kernels.py"), "--blocks", "2",
       "--width", "8", "--batch", "2", "--context", "8", "--periods", "1,1",
       "--out", str(out_json)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  with open(out_json) as f:
    report = json.load(f)

  results = {r["model"]: r for r in report["results"]}
  assert set(results) == {"transformer", "resnet"}
  for name, r in results.items():
    adamw, kfac = r["runs"]
    assert adamw["optimizer"] == "adamw" and adamw["periods"] is None, name
    assert kfac["optimizer"] == "kaisa + adamw" and kfac["periods"] == [1, 1], name
    assert adamw["fusions"] > 0 and adamw["decompositions"] == 0, name
    assert kfac["decompositions"] > 0, name
    assert kfac["fusions"] > adamw["fusions"], name
    assert kfac["kernels"] == kfac["fusions"] + kfac["custom_calls"], name
    assert kfac["decompositions"] <= kfac["custom_calls"], name
    assert adamw["compile_s"] > 0 and kfac["compile_s"] > 0, name
    # The registry's figures: every layer is preconditioned, grouped by shape.
    assert r["registered"] == r["preconditioned"] > 0 and not r["skipped"], name
    assert 0 < len(r["groups"]) <= r["registered"], name
    assert sum(g["layers"] for g in r["groups"]) == r["preconditioned"], name
    assert len(r["groups"]) <= r["expected_decompositions"] <= 2 * len(r["groups"]), name
    # Today a decomposition per factor of each layer, at least one per group.
    assert kfac["decompositions"] >= r["expected_decompositions"], name
  assert results["resnet"]["kinds"] == {"conv": 20, "batch_norm": 20, "dense": 1}
  # The run reports itself: a verdict per target, and the targets it counted.
  verdicts = [line for line in out.splitlines() if line.split()[:1] in (["PASS"], ["FAIL"])]
  assert len(verdicts) == 2 * 3, out  # per model: kernels, compile time, decompositions
  seen = out.split("custom-call targets seen")[1].splitlines()[1:]
  assert any(line.startswith("  * ") for line in seen), out  # a decomposition target
