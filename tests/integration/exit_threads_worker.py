"""Worker for test_train_e2e.py: the recipe's main(), then the threads still alive in this process.

Linux names gloo's threads pt_gloo_runloop / gloo_tcp_loop (in /proc/self/task/*/comm); none may be
left once main() returns, or interpreter shutdown races them.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from recipes.moe18b import main  # noqa: E402

code = main(sys.argv[1:])
threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
# One write per line: two ranks share the pipe, and a print's separate newline can land after the
# other rank's text.
sys.stdout.write(f"rank {os.environ.get('RANK', '?')} exit {code} threads {threads}\n")
sys.stdout.flush()
sys.exit(code)
