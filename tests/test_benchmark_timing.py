"""The benchmarks' timing helper: variants timed against each other in one run."""
from benchmarks import timing


def test_switch_warmup_runs_each_fn_before_its_timed_call():
  calls = []
  fns = [lambda: calls.append("a"), lambda: calls.append("b")]
  medians = timing.interleaved_medians(fns, repeats=2, switch_warmup=1)
  assert len(medians) == 2
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
