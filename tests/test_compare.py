"""The comparison tool at runlocal size: every run trained and evaluated, the table written, a rerun skips."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xsample_jax.tools import compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_runlocal_writes_the_table_and_resumes(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "xsample_jax.tools.compare", "--config", "configs/compare.py:runlocal",
         "--workdir", str(tmp_path)]
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  runs = {p.parent.name for p in tmp_path.glob("*/result.json")}
  assert runs == {"random_init-s0", "simclr-f0.1-s0", "xclr-f0.1-s0"}
  table = (tmp_path / "table.md").read_text()
  assert "| random init | — |" in table and "| xclr | 10% |" in table and "| simclr | 10% |" in table
  assert "python -m xsample_jax.tools.compare --config configs/compare.py:runlocal" in table
  assert str(tmp_path) not in table
  xclr = json.loads((tmp_path / "xclr-f0.1-s0" / "result.json").read_text())
  assert xclr["step"] == 3 and 0 <= xclr["eval/linear_probe/top1"] <= 1
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and "[1/3]" not in again.stdout  # nothing retrained
  assert (tmp_path / "table.md").read_text() == table


def test_table_means_and_spreads():
  rows = {f"xclr-f1-s{s}": {"method": "xclr", "fraction": 1.0, "seed": s, "eval/linear_probe/top1": v,
                            "eval/graph_alignment/spearman": 0.5 + s / 10}
          for s, v in enumerate([0.80, 0.90])}
  text = compare.table(rows, "python -m xsample_jax.tools.compare --config configs/compare.py")
  line = next(l for l in text.splitlines() if l.startswith("| xclr"))
  assert "| 85.0 ± 7.1 |" in line  # mean 85%, sample std 7.07 points
  assert "0.55 ± 0.07" in line and "—" in line  # Spearman unscaled; absent metrics are dashes
