"""The fault campaign's sample (benchmarks/faults.py --sample): one trial of each kind of fault,
checked as the full campaign checks it. A file of its own, so the suite's two workers can run it next
to the other benchmarks' smoke runs."""

import subprocess
import sys

from launching import REPO


def test_a_sample_of_the_fault_campaign_finds_nothing_broken():
    """kill -9 during an async save, one damaged file, one bad 'latest' pointer, one edited source, one
    credential hunt, one kill of the plain loop with dropout, one object store gone: each checked as
    the full campaign checks it (docs/reliability.md)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--sample", "--seed", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total = next(line for line in proc.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["7", "0", "0", "0", "0", "0", "0"], proc.stdout
