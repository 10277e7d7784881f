"""Time `ctxmem.load_model("reference")` offline, each run in a fresh Python process.

Prints one table: the import of ctxmem (torch and transformers included) and the load call,
as the median and the max over the runs. Run with `make benchmark`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from rich.console import Console
from rich.table import Table

PROBE = """
import json, time
started = time.perf_counter()
import ctxmem
imported = time.perf_counter()
model, tokenizer = ctxmem.load_model("reference")
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported}))
"""


def time_once() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    runs = [time_once() for _ in range(args.runs)]
    table = Table("step", "median s", "max s", title=f"reference model, {args.runs} fresh processes, HF_HUB_OFFLINE=1")
    for key, label in (("import_s", "import ctxmem"), ("load_s", "load_model('reference')")):
        values = [run[key] for run in runs]
        table.add_row(label, f"{statistics.median(values):.2f}", f"{max(values):.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
