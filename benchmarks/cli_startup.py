"""How long the light ``pwfn`` commands take to answer, and whether they import torch.

Each command runs in a fresh interpreter (``python -m pwfn.cli ...``), ``--repeat`` times; the
median wall time is recorded, and a second run of the same command through a small wrapper
reports whether ``torch`` ended up in ``sys.modules``. ``report`` needs a finished run folder:
the script makes a tiny one first (digits, a few epochs) unless ``--run-dir`` names one.

    python benchmarks/cli_startup.py --label after            # writes results/cli_startup.{md,json}
    python benchmarks/cli_startup.py --label before --repeat 3

Results of several labels (e.g. ``before`` and ``after`` a change) are merged into the same
JSON file, so the Markdown table shows them side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import RESULTS, ROOT, command_line, fmt, md_table, utc_now

TINY = ["--no-progress", "--set", "baseline.epochs=2", "--set", "pwfn.round_epochs=0.2",
        "--set", "pwfn.first_round_epochs=0.1", "--set", "pwfn.mc_samples=1",
        "--set", "wfn.round_epochs=0.2", "--set", "model.kwargs={hidden: [16]}",
        "--set", "data.train_subset=200", "--set", "name=startup"]

# what `torch in sys.modules` is checked with: the CLI's main() in this interpreter, then a look
PROBE = ("import sys\nfrom pwfn.cli import main\n"
         "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
         "sys.stderr.write('\\nTORCH_IMPORTED=%s\\n' % ('torch' in sys.modules))\n")


def commands(run_dir: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "models": ["models"],
        "report RUN_DIR": ["report", str(run_dir)],
        "config typo": ["run", "--set", "pwfn.lamda=1"],
    }


def time_command(argv: list[str], repeat: int) -> dict:
    times = []
    rc = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pwfn.cli", *argv], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        rc = proc.returncode
    probe = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True)
    torch_imported = "TORCH_IMPORTED=True" in probe.stderr
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times),
            "exit_code": rc, "torch_imported": torch_imported}


def make_run(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pwfn.cli", "run", "--method", "wfn", "--out", str(folder), *TINY],
                   cwd=ROOT, check=True, capture_output=True)
    return folder / "startup" / "wfn"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="name of this measurement (e.g. before, after)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--run-dir", default=None, help="a finished method folder for `report` (made when absent)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--dry", action="store_true", help="one repetition, no results written")
    args = ap.parse_args(argv)
    repeat = 1 if args.dry else args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else make_run(Path(tmp))
        results = {name: time_command(cmd, repeat) for name, cmd in commands(run_dir).items()}
    for name, r in results.items():
        print(f"{args.label:>8} {name:<16} median {r['median_s']:.3f} s  torch imported: {r['torch_imported']}")
    if args.dry:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cli_startup.json"
    doc = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    doc["labels"][args.label] = {"when": utc_now(), "command": command_line("cli_startup.py", argv),
                                 "python": sys.version.split()[0], "results": results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    labels = list(doc["labels"])
    rows = []
    for name in commands(Path("RUN_DIR")):
        row = [f"`pwfn {name}`" if not name.startswith("config") else "`pwfn run --set pwfn.lamda=1` (typo)"]
        for label in labels:
            r = doc["labels"][label]["results"].get(name)
            row.append("-" if r is None else f"{fmt(r['median_s'], 2)} s ({'torch' if r['torch_imported'] else 'no torch'})")
        rows.append(row)
    md = ["# CLI start-up: time to answer (median of fresh interpreters)", ""]
    for label in labels:
        d = doc["labels"][label]
        md.append(f"- `{label}`: {d['when']}, Python {d['python']}, `{d['command']}`"
                  + (f" ({d['note']})" if d.get("note") else ""))
    md += ["", md_table(["command", *labels], rows), "",
           "Each command runs in a new interpreter; 'torch' means the command imported torch. The times are",
           "with a warm file cache: on a cold cache importing torch alone takes several seconds (9-14 s were",
           "seen on this machine), which every command that imports torch pays and these commands no longer do.",
           ""]
    (out / "cli_startup.md").write_text("\n".join(md))
    print(f"wrote {path} and {out / 'cli_startup.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
