"""End-to-end run of the examples: they start, train and write their outputs."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("MLP", "CNN")
OPTIMIZERS = ("kaisa + sgd", "adam", "sgd")


@pytest.mark.slow
def test_digits_quick(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join("examples", "digits.py"), "--quick",
       "--out", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert (tmp_path / "digits.png").stat().st_size > 0
  with open(tmp_path / "digits.json") as f:
    report = json.load(f)

  for model in MODELS:
    for optimizer in OPTIMIZERS:
      curve = report["curves"][model][optimizer]
      losses = curve["train_loss"] + curve["batch_loss"]
      assert losses and all(
          l is not None and math.isfinite(l) for l in losses), (model, optimizer)
  summarized = {(s["model"], s["optimizer"]) for s in report["summary"]}
  assert summarized == {(m, o) for m in MODELS for o in OPTIMIZERS}
  for row in report["summary"]:
    assert math.isfinite(row["final_train_loss"])


@pytest.mark.slow
def test_data_parallel_every_strategy_matches_one_device():
  result = subprocess.run(
      [sys.executable, os.path.join("examples", "data_parallel.py"), "--steps", "6"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith("8 devices")]
  assert len(rows) == 8  # pmap and shard_map for each of the four fractions
  for row in rows:
    distance = float(row.split()[6])  # "params vs 1 device"
    assert distance <= 1e-5, row
