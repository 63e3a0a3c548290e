"""cli: the entry points restart once with glibc's malloc on transparent huge pages, where the host has them."""
import os
import pathlib
import subprocess
import sys

import pytest

from xsample_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
MADVISE = "always [madvise] never\n"


def test_huge_pages_environ_adds_the_tunable_once_and_only_where_it_helps():
  assert cli.huge_pages_environ({"HOME": "/h"}, MADVISE, "linux") == {"HOME": "/h",
                                                                      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert cli.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "[always] madvise never", "linux") == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  for environ, mode, platform in (
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, "linux"),  # the user's own choice stands
      ({"XSAMPLE_HUGE_PAGES": "0"}, MADVISE, "linux"),  # opted out
      ({}, "always madvise [never]\n", "linux"),  # the kernel gives none
      ({}, None, "linux"),  # no THP in this kernel
      ({}, MADVISE, "darwin")):
    assert cli.huge_pages_environ(environ, mode, platform) is None


def _thp_mode():
  try:
    return pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return None


PROBE = ("import os, sys\nfrom xsample_jax import cli\nprint('start', os.getpid(), flush=True)\ncli.use_huge_pages()\n"
         "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")


@pytest.mark.skipif(cli.huge_pages_environ({}, _thp_mode()) is None, reason="no transparent huge pages here")
def test_use_huge_pages_restarts_the_same_process_once_with_the_same_arguments():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XSAMPLE_HUGE_PAGES")}
  out = subprocess.run([sys.executable, "-c", PROBE, "a b", "--c"], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  pid = out[0].split()[1]
  assert out == [f"start {pid}", f"start {pid}", f"run {pid} glibc.malloc.hugetlb=1 ['a b', '--c']"]
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=dict(env, XSAMPLE_HUGE_PAGES="0"),
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 2 and out[1].endswith("None []")
