"""Paired runs: the balancer at two commits (or two configurations), same farm, alternating.

    python bench/paired.py --base 26734ea                  # HEAD against a commit
    python bench/paired.py --base 26734ea --only S2 --rounds 6
    python bench/paired.py --base 26734ea --only S6        # HTTP/2 (h2load), ALPN h2 offered
    python bench/paired.py --base HEAD --config-b reuse.toml  # one commit, two configurations
    python bench/paired.py --base 29a6a1f --only S2 --compiled  # both built with mypyc

On a noisy 2-core machine a change is judged by pairs, not by two separate runs: each round
runs A then B (then B then A, alternating) on CPU 0 against one farm on CPU 1, and the ratio
of CPU per request is taken per round; the median of those ratios is the verdict.

Each round starts A and B afresh. One process is not the code's average: its hash seed and
memory layout are its own for its life, and two processes of the same code kept for every
round differed by 5% in the median of six pairs (0.948 and 0.956, HEAD against itself,
2026-12-05), more than most changes measured here. New processes each round make that
difference a noise the median averages out, not a bias it keeps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import PROXY_CPU, Bench, Target, free_port, pinned, run_scenario  # noqa: E402

SUPERVISOR_PATHS = ("supervisor.py", "process/supervisor.py")


def worktree(rev: str, into: Path) -> Path:
    """A checkout of `rev` (its balancer/ is what `python -m balancer` imports from there)."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(into), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return into


def start(
    bench: Bench,
    name: str,
    source: Path,
    config: Path | None,
    env: dict[str, str] | None = None,
    h2: bool = False,
) -> Target:
    """`h2`: an https listener offering h2 too (S6), from a config written here unless one is
    given."""
    http = free_port()
    https = free_port() if h2 else None
    backends = [arg for port in bench.farm_ports for arg in ("--backend", f"127.0.0.1:{port}")]
    command = [sys.executable, "-m", "balancer", "run", "--http", f"127.0.0.1:{http}"]
    if https is not None:
        certs = bench.certificates("ecdsa")
        if config is None:
            config = bench.workdir / "paired-h2.toml"
            config.write_text(
                '[[listeners]]\nname = "https"\nbind = "127.0.0.1:1"\ntls = true\n'
                'alpn = ["h2", "http/1.1"]\n'
            )
        command += ["--https", f"127.0.0.1:{https}", "--cert", str(certs["cert"]),
                    "--key", str(certs["key"])]  # fmt: skip
    # One worker on the one proxy core, as HAProxy's nbthread 1 and nginx's worker_processes 1
    # (commits from before workers had none; the supervisor moved into process/ at 651c081).
    if any((source / "balancer" / where).exists() for where in SUPERVISOR_PATHS):
        command += ["--workers", "1"]
    if config is not None:
        command += ["-c", str(config.resolve())]
    log = bench.workdir / f"access-{name}.log"
    command += ["--access-log", str(log), *backends]
    process = subprocess.Popen(
        pinned(PROXY_CPU, command),
        cwd=source,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    bench.processes.append(process)
    target = Target(name, http, https, process)
    bench.wait_ready(http, None)
    if https is not None:
        bench.wait_ready(https, None)
    return target


def build_in_place(tree: Path) -> None:
    """The compiled build of `tree` (README, "Compiled build"), in place: `python -m
    balancer` there then runs it."""
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree, check=True, capture_output=True, env={**os.environ, "BALANCER_MYPYC": "1"},
    )  # fmt: skip


def stop(bench: Bench, target: Target) -> None:
    """SIGTERM, as an operator stops it; the next round starts a new process."""
    process = target.process
    assert process is not None
    process.terminate()
    process.wait(30)
    bench.processes.remove(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the commit to compare HEAD (B) with (A)")
    parser.add_argument("--config-a", type=Path, help="a config file for A")
    parser.add_argument("--config-b", type=Path, help="a config file for B")
    parser.add_argument(
        "--env-b", action="append", default=[], metavar="KEY=VALUE", help="environment for B"
    )
    parser.add_argument(
        "--only", action="append", choices=["S1", "S2", "S6"], help="scenario(s); S6: HTTP/2"
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--compiled", action="store_true", help="both sides built with mypyc (BALANCER_MYPYC=1)"
    )
    args = parser.parse_args(argv)
    scenarios = args.only or ["S1", "S2"]
    with tempfile.TemporaryDirectory(prefix="balancer-paired-") as tmp:
        workdir = Path(tmp)
        base = worktree(args.base, workdir / "base")
        bench = Bench(workdir, full=False, log=lambda line: print(line, flush=True))
        head = ROOT
        if args.compiled:  # B: a copy of this checkout, built (as bench/run.py builds it)
            build_in_place(base)
            bench.build_compiled()
            assert bench.compiled is not None, "the compiled build of HEAD failed"
            head = bench.compiled
        try:
            bench.start_farm()
            env_b = dict(item.split("=", 1) for item in args.env_b)
            for scenario in scenarios:
                ratios = []
                for round_number in range(args.rounds):
                    h2 = scenario == "S6"
                    a = start(bench, f"A {args.base}", base, args.config_a, h2=h2)
                    b = start(bench, "B HEAD", head, args.config_b, env_b, h2=h2)
                    pair = (a, b) if round_number % 2 == 0 else (b, a)
                    samples = {}
                    for target in pair:
                        sample = run_scenario(bench, target, scenario, full=False)
                        assert sample is not None and sample.per_core, sample
                        samples[target.name] = sample
                    for target in (a, b):
                        stop(bench, target)
                    us_a = 1e6 / samples[a.name].per_core  # type: ignore[operator]
                    us_b = 1e6 / samples[b.name].per_core  # type: ignore[operator]
                    ratios.append(us_b / us_a)
                    print(
                        f"{scenario} round {round_number + 1}: A {us_a:.1f} µs/req, "
                        f"B {us_b:.1f} µs/req, B/A {us_b / us_a:.3f}",
                        flush=True,
                    )
                print(
                    f"{scenario}: B/A CPU per request, median of {args.rounds} pairs: "
                    f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
                    f"max {max(ratios):.3f})",
                    flush=True,
                )
        finally:
            bench.close()
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
