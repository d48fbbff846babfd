"""Paired benchmarks that can fail: a measurement A (the thing) against its baseline B.

Each measurement is a FRESH child process (``python -m ...``) that prints, as its last line, a
JSON object with ``rate`` (items per second) and whatever else it wants recorded. The runner
interleaves them A,B,B,A,A,B,... for ``rounds`` rounds (round r runs A then B when r is even,
B then A otherwise, so that a drift of the machine's load favours neither), and reports the
per-round ratios ``rate(A) / rate(B)``: median, spread (IQR: 25th-75th percentile), min/max, the
median rates, and the 1-minute load average before and after each round.

Benchmarks hand their figures to ``reco bench``'s table (``bench-results/summary.md``) as
:class:`Claim` rows in ``results["claims"]``; :func:`summary_markdown` writes the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROUNDS = {"quick": 3, "full": 10}           # default rounds of a paired claim
SUMMARY_FILE = "summary.md"


class BenchChildError(RuntimeError):
    """A measured child process failed or printed no result."""


def run_child(argv: list[str], timeout: float | None = None) -> dict:
    """Run ``python -m``-style argv (``sys.executable`` prepended) in a fresh process; its last
    stdout line is parsed as JSON and must hold ``rate``."""
    cmd = [sys.executable, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchChildError(f"benchmark child {' '.join(argv)} failed (exit {done.returncode}): "
                              f"{done.stderr.strip()[-2000:]}")
    try:
        result = json.loads(lines[-1])
        float(result["rate"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchChildError(f"benchmark child {' '.join(argv)} printed no result with a rate "
                              f"({exc}): {lines[-1][:500]!r}") from exc
    return result


def quantiles(values: list[float]) -> dict:
    """median, q25, q75 (linear interpolation), min, max of ``values``."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("no values")

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median": q(0.5), "q25": q(0.25), "q75": q(0.75), "min": xs[0], "max": xs[-1]}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def paired(a: list[str], b: list[str], rounds: int, *, timeout: float | None = None,
           runner=run_child) -> dict:
    """Interleaved fresh-process measurements of A and its baseline B (see module docstring).

    Args:
        a, b: argv of the child processes (after the Python executable).
        rounds: pairs measured (>= 1).
        timeout: seconds per child (None: no limit).
        runner: (argv, timeout) -> result dict (default :func:`run_child`).

    Returns {"rounds", "pairs": [{"order", "a", "b", "ratio", "load_before", "load_after"}],
    "ratio": quantiles, "a_rate": median, "b_rate": median, "load_before": [...], "load_after": [...]}.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    pairs = []
    for r in range(rounds):
        order = "AB" if r % 2 == 0 else "BA"
        before, t0 = _load(), time.perf_counter()
        got = {}
        for which in order:
            got[which] = runner(a if which == "A" else b, timeout)
        pairs.append({"order": order, "a": got["A"], "b": got["B"],
                      "ratio": float(got["A"]["rate"]) / float(got["B"]["rate"]),
                      "load_before": before, "load_after": _load(),
                      "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  round {r + 1}/{rounds} {order}: A {got['A']['rate']:.1f}/s  B {got['B']['rate']:.1f}/s  "
              f"ratio {pairs[-1]['ratio']:.3f}  load {before} -> {pairs[-1]['load_after']}", flush=True)
    return summarise(pairs)


def _cpu_per_item(result: dict) -> float | None:
    if not {"cpu_seconds", "seconds", "rate"} <= set(result) or not result["cpu_seconds"]:
        return None
    return result["cpu_seconds"] / (result["rate"] * result["seconds"])


def cpu_ratio(pair: dict) -> float | None:
    """CPU seconds per item of B / of A (the children's ``cpu_seconds``, ``seconds``, ``rate``):
    the ratio in CPU time, steadier than wall time on a shared machine; None when not reported."""
    a, b = _cpu_per_item(pair["a"]), _cpu_per_item(pair["b"])
    return None if a is None or b is None else b / a


def summarise(pairs: list[dict]) -> dict:
    """The statistics of measured pairs (see :func:`paired`)."""
    cpu = [c for c in map(cpu_ratio, pairs) if c is not None]
    return {"rounds": len(pairs), "pairs": pairs,
            "cpu_ratio": round(quantiles(cpu)["median"], 4) if len(cpu) == len(pairs) else None,
            "ratio": {k: round(v, 4) for k, v in quantiles([p["ratio"] for p in pairs]).items()},
            "a_rate": round(quantiles([p["a"]["rate"] for p in pairs])["median"], 2),
            "b_rate": round(quantiles([p["b"]["rate"] for p in pairs])["median"], 2),
            "load_before": [p["load_before"] for p in pairs],
            "load_after": [p["load_after"] for p in pairs]}


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

@dataclass
class Claim:
    """One row of ``summary.md``: a figure and the goal it is held to.

    ``value`` is the median ratio A/B of a paired run (or a single figure such as a recall, with
    ``rounds`` 1 and no spread); ``goal`` the least value that meets the claim (None: reported
    only; ``at_most``: the most, as for a memory ratio); ``rates`` says what A and B measured
    (e.g. "stage 21.3 vs raw 24.0 img/s").
    """

    claim: str
    value: float
    goal: float | None = None
    at_most: bool = False
    q25: float | None = None
    q75: float | None = None
    rates: str = ""
    rounds: int = 1
    cpu_ratio: float | None = None
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    command: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    @classmethod
    def from_paired(cls, claim: str, stats: dict, goal: float | None, unit: str, a_name: str,
                    b_name: str, command: str = "") -> "Claim":
        r = stats["ratio"]
        return cls(claim=claim, value=r["median"], goal=goal, q25=r["q25"], q75=r["q75"],
                   rates=f"{a_name} {stats['a_rate']:,.1f} vs {b_name} {stats['b_rate']:,.1f} {unit}",
                   rounds=stats["rounds"], cpu_ratio=stats.get("cpu_ratio"), load_before=stats["load_before"],
                   load_after=stats["load_after"], command=command)

    def as_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


COLUMNS = ("claim", "goal", "value (median)", "spread (IQR)", "rates", "rounds", "CPU-time ratio",
           "load before", "load after", "met", "command")


def _loads(values: list[float]) -> str:
    return "" if not values else (f"{values[0]:.2f}" if len(set(values)) == 1
                                  else f"{min(values):.2f}-{max(values):.2f}")


def row(claim: dict) -> str:
    """One Markdown table row of a claim (as :meth:`Claim.as_dict` writes it)."""
    c = Claim(**{k: v for k, v in claim.items() if k != "met"})
    spread = "" if c.q25 is None else f"{c.q25:.3f}-{c.q75:.3f}"
    met = "n/a" if c.met is None else ("yes" if c.met else "**no**")
    goal = "" if c.goal is None else f"{'<=' if c.at_most else '>='} {c.goal:g}"
    cells = [c.claim, goal, f"{c.value:.3f}", spread, c.rates,
             str(c.rounds), "" if c.cpu_ratio is None else f"{c.cpu_ratio:.3f}", _loads(c.load_before), _loads(c.load_after), met,
             f"`{c.command}`" if c.command else ""]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def summary_markdown(results: dict) -> str:
    """``summary.md``: one row per claim of every bench in ``results`` (``results[bench]["claims"]``)."""
    machine = results.get("machine", {})
    lines = [f"# reco bench summary ({'quick' if results.get('quick', True) else 'full'} sizes)", "",
             f"Machine: {machine.get('cpus', '?')} CPUs, {machine.get('platform', '?')}. Ratios are "
             "A/B of items/s per round of fresh processes run A,B,B,A,... (median, IQR); CPU-time "
             "ratio: B's CPU seconds per item / A's (median); load: 1-min load average before and "
             "after each round (min-max).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for bench, result in results.items():
        if isinstance(result, dict):
            lines += [row(claim) for claim in result.get("claims", [])]
    return "\n".join(lines) + "\n"
