"""`make demo` as a new user meets it: a fresh machine's first run, then a second run of a new config.

    python benchmarks/demo_run.py                 # CPU: the demo config as shipped
    python benchmarks/demo_run.py --set engine.enforce_eager=true
    python benchmarks/demo_run.py --config tokenskip/configs/gsm8k_qwen2_5_7b_gpu.yaml   # a GPU machine

"Fresh" means no caches: the run gets empty cache folders (XDG_CACHE_HOME: tokenskip's converted
demo model, vLLM's compile cache, the HF cache; TORCHINDUCTOR_CACHE_DIR: inductor's kernels) and a
new output folder, so it pays for the model conversion and the first compile as a new machine would
(the install itself is not timed). The second run changes the config (sampling temperature: a new
run id, the same engine) and keeps the caches: its engine start is the compile cache's. Each run's
console output (stdout + stderr, not a TTY) is counted in lines.

Prints the two wall times, their ratio, the engine start of each (from the console's "ready in"
line) and the console line counts; ``--out`` writes the same as text.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"vLLM engine ready in (\d+) s")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def run_demo(config: str, overrides: list[str], cache: Path, output: Path) -> dict:
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
    }
    env.pop("TOKENSKIP_CACHE", None)
    command = [sys.executable, "-m", "tokenskip.cli", "run", "--config", config, "--set", f"output.root={output}"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    console = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"demo failed ({result.returncode}):\n{console[-4000:]}")
    ready = READY.search(console)
    return {
        "wall_s": wall,
        "engine_start_s": int(ready.group(1)) if ready else None,
        "console_lines": len(console.splitlines()),
        "console": console,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "tokenskip" / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], help="override for both runs")
    parser.add_argument("--out", type=Path, default=None, help="write the figures (and first console) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenskip-demo-bench-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        first = run_demo(args.config, args.set, cache, out)
        second = run_demo(args.config, [*args.set, "sampling.temperature=0.6"], cache, out)
    lines = [
        f"# benchmarks/demo_run.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        f"fresh machine wall {_clock(first['wall_s'])} (after install)",
        f"fresh machine engine start {first['engine_start_s']} s",
        f"console {first['console_lines']} lines",
        f"second run (new config, caches kept) wall {_clock(second['wall_s'])}",
        f"second run engine start {second['engine_start_s']} s",
        f"second run console {second['console_lines']} lines",
        f"second / fresh wall ratio {second['wall_s'] / first['wall_s']:.2f}",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n\n# fresh run console\n" + first["console"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
