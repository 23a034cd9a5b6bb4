"""The long fuzz campaign: every tests/test_fuzz_*.py with many examples, outcomes counted.

Each fuzz file runs under pytest in its own process (a crash there is counted, not fatal here),
split over --jobs processes with different seeds (tests/fuzz_tally.py). Examples tally what they
ended in ('ran': loaded and ran to a checked result, 'refused': XCompileError at load,
'refused at run': XCompileError when run, ...); anything else fails the example's test, and is
reported with pytest's last lines. Files that keep no tally are counted by their pytest result.

    python benchmarks/fuzz_campaign.py                        # >= 50,000 examples per fuzz test
    python benchmarks/fuzz_campaign.py --examples 2000 --jobs 2
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000, help="examples per fuzz test, over all jobs (default 50,000)")
    parser.add_argument("--jobs", type=int, default=2, help="processes per fuzz file, each with its own seed (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; job j uses seed + j")
    parser.add_argument("--files", nargs="*", help="fuzz files (default: tests/test_fuzz_*.py)")
    args = parser.parse_args()
    files = [Path(f) for f in args.files] if args.files else sorted((ROOT / "tests").glob("test_fuzz_*.py"))
    failed = False
    grand = collections.Counter()
    for path in files:
        tallied = "fuzz_tally" in path.read_text()
        jobs = args.jobs if tallied else 1  # a file without seeds would repeat its examples in every job
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            runs = []
            for job in range(jobs):
                tally = Path(folder) / f"tally{job}"
                env = {**os.environ, "XCOMPILE_FUZZ_EXAMPLES": str(-(-args.examples // jobs)), "XCOMPILE_FUZZ_TALLY": str(tally),
                       "XCOMPILE_FUZZ_SEED": str(args.seed + job)}
                command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)]
                log = open(Path(folder) / f"log{job}", "w+")  # a file, not a pipe: a long failure report must not block the job
                runs.append((tally, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
            counts, problems = collections.Counter(), []
            for tally, process, log in runs:
                process.wait()
                log.seek(0)
                output = log.read()
                log.close()
                if tally.exists():
                    counts.update(line.strip() for line in tally.read_text().splitlines() if line.strip())
                if process.returncode != 0:
                    problems.append(f"pytest exit {process.returncode}:\n" + "\n".join(output.strip().splitlines()[-15:]))
            if not tallied:
                counts["passed tests (no tally)"] += sum(p.returncode == 0 for _, p, _ in runs)
        seconds = time.perf_counter() - started
        total = sum(counts.values())
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {total:,} examples in {seconds:.0f} s ({jobs} job(s))")
        for outcome, count in sorted(counts.items()):
            print(f"  {outcome:<34} {count:>9,}")
        print(f"  {'anything else (failure)':<34} {len(problems):>9,}")
        for problem in problems:
            print("    " + problem.replace("\n", "\n    "))
        failed |= bool(problems)
        grand.update(counts)
    print(f"all files: {sum(grand.values()):,} examples; " + ", ".join(f"{k} {v:,}" for k, v in sorted(grand.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
