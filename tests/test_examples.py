"""End-to-end run of the examples: they start, train and write their outputs."""

import json
import math
import os
import re
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


def run_script(*argv):
  result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_autoencoder_quick(tmp_path):
  run_script(os.path.join("examples", "autoencoder.py"), "--quick", "--out", str(tmp_path))
  assert (tmp_path / "autoencoder.png").stat().st_size > 0
  with open(tmp_path / "autoencoder.json") as f:
    report = json.load(f)
  assert set(report["curves"]) == {"batch 128", "batch 1024"}
  for runs in report["curves"].values():
    assert set(runs) == set(OPTIMIZERS)
    for curve in runs.values():
      # 0.5 * squared error over 64 pixels in [0, 1]: finite and falling from the start
      assert all(l is not None and math.isfinite(l) for l in curve["train_loss"])
      assert curve["train_loss"][-1] < curve["train_loss"][0]


@pytest.mark.slow
def test_checkpoint_resume_is_identical(tmp_path):
  out = run_script(os.path.join("examples", "checkpoint.py"), "--steps", "12",
                   "--save-every", "5", "--dir", str(tmp_path / "ckpt"))
  assert "restored step 10" in out and out.rstrip().endswith("identical"), out


@pytest.mark.slow
def test_convergence_benchmark_quick(tmp_path):
  out = run_script(os.path.join("benchmarks", "convergence.py"), "--quick", "--out",
                   str(tmp_path))
  with open(tmp_path / "convergence.json") as f:
    report = json.load(f)
  results = report["results"]["mlp b128"]
  expected = {"adam", "sgd", "kaisa", "kaisa/pe"}
  try:
    import kfac_jax  # noqa: F401  (the optional peer)
    expected.add("kfac-jax")
  except ImportError:
    assert "kfac-jax is not installed: skipping it" in out
  assert set(results) == expected
  for name, r in results.items():
    # the grid's one configuration, run on the grid seed and one report seed
    assert len(r["grid"]) == 1 and len(r["seeds"]) == 1, name
    if name != "kfac-jax":  # the peer may diverge at the smoke run's setting
      assert r["seeds"][0]["step"][-1] == 20, name
  assert (tmp_path / "convergence.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("scan_blocks", [0, 3])
def test_nnx_mlp_trains(scan_blocks):
  out = run_script(os.path.join("examples", "nnx_mlp.py"), "--steps", "30",
                   "--scan-blocks", str(scan_blocks))
  # The registry table lists the nnx.Linear layers, the scanned ones stacked.
  hidden = ((["blocks/dense", "dense", "(scan,", "3", "stacked)", "3x129", "3x128"],)
            if scan_blocks else (["hidden2", "dense", "129", "128"],))
  for row in (["hidden1", "dense", "65", "128"],) + hidden + (["out", "dense", "129", "10"],):
    assert any(line.split() == row for line in out.splitlines()), out
  for optimizer in ("kaisa + sgd", "adam"):
    section = out.split(optimizer + ":")[1]
    losses = [float(line.split()[-1]) for line in section.splitlines()
              if "batch loss" in line]
    assert losses and all(math.isfinite(l) for l in losses), out
    assert losses[-1] < losses[0], out  # from about ln 10 = 2.3


@pytest.mark.slow
def test_transformer_quick(tmp_path):
  run_script(os.path.join("examples", "transformer.py"), "--quick", "--out", str(tmp_path))
  assert (tmp_path / "transformer.png").stat().st_size > 0
  with open(tmp_path / "transformer.json") as f:
    report = json.load(f)
  optimizers = {"adamw", "kaisa + sgd", "kaisa + adamw"}
  assert set(report["curves"]) == optimizers
  assert {row["optimizer"] for row in report["summary"]} == optimizers
  assert len(report["summary"]) == len(optimizers)
  for name, curve in report["curves"].items():
    assert curve["step"][-1] == 20, name
    losses = curve["train_loss"] + curve["test_loss"] + curve["batch_loss"]
    assert all(l is not None and math.isfinite(l) for l in losses), name
    # the next-character cross-entropy starts near log(vocabulary) or above and falls
    assert curve["test_loss"][-1] < curve["test_loss"][0], name
  for row in report["summary"]:
    assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["final_test_loss"])
  # the registry the run used is recorded, and K-FAC preconditioned some of it
  assert report["config"]["registered"] and isinstance(report["config"]["skipped"], list)


@pytest.mark.slow
def test_scan_benchmark_runs_and_both_models_agree():
  out = run_script(os.path.join("benchmarks", "scan.py"), "--blocks", "2", "--steps", "3",
                   "--d-model", "16", "--heads", "2", "--context", "8", "--batch", "4")
  rows = {tuple(line.split()[:3]) for line in out.splitlines() if line.split()[:1] == ["2"]}
  assert rows == {("2", model, optimizer) for model in ("unrolled", "scan")
                  for optimizer in ("adamw", "kaisa")}, out
  # The same optimizer on the same network, scanned or not: 3 steps from the
  # same parameters leave float32 rounding only (3e-4 measured at d 32).
  gap = float(out.split("differ by at most ")[1].split()[0])
  assert gap < 1e-2, out


@pytest.mark.slow
def test_decompose_benchmark_is_accurate_where_it_runs():
  out = run_script(os.path.join("benchmarks", "decompose.py"), "--sizes", "8", "24",
                   "--batch", "2", "--repeats", "1")
  rows = [line for line in out.splitlines() if line.split()[:1] in (["8"], ["24"])]
  assert len(rows) == 4, out  # each size, one matrix and a batch
  for row in rows:
    errors = [float(e) for e in re.findall(r"\(\s*([-+.e0-9]+)\)", row)]
    # the default eigh, QR and Cholesky run everywhere; float32 against float64
    assert len(errors) >= 3 and max(errors) < 1e-3, row
