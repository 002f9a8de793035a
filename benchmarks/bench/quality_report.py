"""The quality section of ``docs/benchmarks.md`` and its verdicts, from ``quality.json``.

Every figure is computed from the runs (medians over seeds at each method's chosen rate); the
verdicts (met / missed, with the gap) are computed here, never typed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hiftune.memory.render import markdown_table, plot_lines

from . import methods

#: The target of "time to quality": this fraction of full fine-tuning's final validation accuracy.
TARGET_OF_FULL_FT = 0.95
#: The issue's targets, in accuracy points (hiftune's defaults minus full FT, medians).
SHORT_LIMIT, LONG_LIMIT, EQUAL_TIME_LIMIT = -5.0, -1.5, -1.0
#: Equal wall time: the target holds when it is met on at least this many tasks.
EQUAL_TIME_TASKS = 2
FULL, OURS, PEER = "fpft", "hift-defaults", "badam-rec"


def _label(name: str) -> str:
    m = methods.BY_NAME.get(name)
    return m.label if m else name


def owner(block: Mapping[str, Any], name: str) -> str:
    """The method whose runs stand for ``name`` (itself, or the row with the same options)."""
    return str(block.get("same_as", {}).get(name, name))


def chosen_runs(block: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    """``name``'s runs at its chosen rate, every seed."""
    src = owner(block, name)
    lr = block.get("chosen", {}).get(src)
    return [
        r for r in block["results"] if r["method"] == src and r["lr"] == lr and "error" not in r
    ]


def median_of(block: Mapping[str, Any], name: str, key: str = "test_acc") -> float | None:
    """Median over seeds of ``key`` at the chosen rate (``None`` without runs)."""
    runs = chosen_runs(block, name)
    return statistics.median(r[key] for r in runs) if runs else None


def on_edge(block: Mapping[str, Any], name: str) -> bool:
    """Whether ``name``'s chosen rate is still on its grid's edge (the extension cap was hit)."""
    src = owner(block, name)
    grid, lr = block.get("grids", {}).get(src), block.get("chosen", {}).get(src)
    return bool(grid) and len(grid) > 1 and lr in (min(grid), max(grid))


def time_to_target(
    block: Mapping[str, Any], target: float | None = None
) -> tuple[float | None, dict[str, Mapping[str, Any] | None]]:
    """Per method, the first evaluation of its first-seed curve (chosen rate) at or above
    ``target`` (default: :data:`TARGET_OF_FULL_FT` of full FT's median final validation
    accuracy); ``None`` where it is not reached."""
    if target is None:
        full = median_of(block, FULL, "val_acc")
        if full is None:
            return None, {}
        target = TARGET_OF_FULL_FT * full
    seed0 = block["settings"]["seeds"][0]
    out: dict[str, Mapping[str, Any] | None] = {}
    for name in block["settings"]["methods"]:
        runs = [r for r in chosen_runs(block, name) if r["seed"] == seed0]
        if runs:
            out[name] = next((p for p in runs[0]["curve"] if p["val_acc"] >= target), None)
    return target, out


def verdict(ours: float | None, ref: float | None, limit: float, what: str) -> tuple[str, bool]:
    """One line ``what: ours vs ref: met/missed (gap)``; ``ok`` is ``ours - ref >= limit``
    (``limit`` 0 with a strict ``>``: "ahead of")."""
    if ours is None or ref is None:
        return f"{what}: not measured", False
    # Rounded far below the printed precision, so that 75.0 vs 80.0 is exactly -5.0 points.
    gap = round(100 * (ours - ref), 9)
    ok = gap > 0 if limit == 0 else gap >= limit
    bound = "ahead" if limit == 0 else f"limit {limit:+.1f}"
    mark = "met" if ok else "**missed**"
    return f"{what} {100 * ours:.1f} vs {100 * ref:.1f}: {mark} ({gap:+.1f} points; {bound})", ok


def verdicts(q: Mapping[str, Any]) -> list[str]:
    """The issue's targets on the medians over seeds, per task, and the overall line of each."""
    lines: list[str] = []
    eq_ok: list[bool] = []
    for task, t in q["tasks"].items():
        b = t["budgets"]
        short = b.get("short")
        if short is not None:
            d = median_of(short, OURS)
            lines.append(
                "- "
                + verdict(
                    d,
                    median_of(short, FULL),
                    SHORT_LIMIT,
                    f"short, {task}: hiftune defaults vs full FT",
                )[0]
            )
            lines.append(
                "- "
                + verdict(
                    d,
                    median_of(short, PEER),
                    0.0,
                    f"short, {task}: hiftune defaults vs BAdam (authors')",
                )[0]
            )
        long = b.get("long")
        if long is None:
            lines.append(f"- long, {task}: not run in this plan")
        else:
            lines.append(
                "- "
                + verdict(
                    median_of(long, OURS),
                    median_of(long, FULL),
                    LONG_LIMIT,
                    f"long, {task}: hiftune defaults vs full FT",
                )[0]
            )
        eq = b.get("equal-time")
        if eq is not None and short is not None:
            text, ok = verdict(
                median_of(eq, OURS),
                median_of(short, FULL),
                EQUAL_TIME_LIMIT,
                f"equal wall time, {task}: hiftune defaults vs full FT (short)",
            )
            lines.append("- " + text)
            eq_ok.append(ok)
    if eq_ok:
        met = sum(eq_ok)
        mark = "met" if met >= EQUAL_TIME_TASKS else "**missed**"
        lines.append(
            f"- equal wall time: within 1 point on {met} of {len(eq_ok)} tasks "
            f"(target: {EQUAL_TIME_TASKS}): {mark}"
        )
    return lines  # fmt: skip


def best_options(block: Mapping[str, Any]) -> str | None:
    """The hiftune row with the best median test accuracy in ``block``."""
    rows = [
        (median_of(block, n), n)
        for n in block["settings"]["methods"]
        if n.startswith("hift") and median_of(block, n) is not None
    ]
    return max(rows)[1] if rows else None


def _options_text(opts: Mapping[str, Any]) -> str:
    if "units_per_group" not in opts:
        keep = {k: v for k, v in opts.items() if k != "block_prefix_list"}
        return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"
    always = opts.get("always_active") or []
    text = f"m={opts['units_per_group']}, K={opts.get('steps_per_group', 1)}"
    if always:
        text += f", always {'|'.join(always)} lr x{opts.get('always_active_lr_scale', 1.0):g}"
    return text


def rows(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The table of one budget: per method, its options, grid, rate, accuracy, time, updates."""
    out = []
    for name in block["settings"]["methods"]:
        src = owner(block, name)
        runs = chosen_runs(block, name)
        if not runs:
            out.append({"method": _label(name), "test acc (median)": "failed"})
            continue
        accs = sorted(100 * r["test_acc"] for r in runs)
        grid = ", ".join(f"{x:g}" for x in block["grids"].get(src, []))
        out.append(
            {
                "method": _label(name) + (f" (= {_label(src)})" if src != name else ""),
                "options": _options_text(block["options"].get(name, {})),
                "grid": grid + (" (best on edge)" if on_edge(block, name) else ""),
                "lr": f"{block['chosen'][src]:g}",
                "test acc (median)": f"{statistics.median(accs):.1f}",
                "min-max": f"{accs[0]:.1f}-{accs[-1]:.1f}",
                "val acc": f"{100 * statistics.median(r['val_acc'] for r in runs):.1f}",
                "seeds": len(runs),
                "train s": f"{statistics.median(r['train_s'] for r in runs):.0f}",
                "updates/weight": f"{statistics.median(r['updates_per_weight'] for r in runs):.1f}",
            }
        )
    return out


def plot(path: Path, block: Mapping[str, Any], title: str) -> Path | None:
    """Validation accuracy vs training wall time (first seed, each method at its chosen rate)."""
    series: dict[str, list[float]] = {}
    xs: dict[str, list[float]] = {}
    seed0 = block["settings"]["seeds"][0]
    for name in block["settings"]["methods"]:
        if owner(block, name) != name:
            continue
        runs = [r for r in chosen_runs(block, name) if r["seed"] == seed0]
        if runs:
            series[_label(name)] = [p["val_acc"] for p in runs[0]["curve"]]
            xs[_label(name)] = [p["train_s"] for p in runs[0]["curve"]]
    if not series:
        return None
    return plot_lines(
        path, series, x=xs, title=title, ylabel="validation accuracy",
        xlabel="training wall time, s (1 thread; evaluation excluded)",
    )  # fmt: skip


def _reached(block: Mapping[str, Any]) -> tuple[float | None, list[dict[str, Any]]]:
    target, hits = time_to_target(block)
    table = []
    for name, hit in hits.items():
        table.append(
            {
                "method": _label(name),
                "reached at (train s)": f"{hit['train_s']:.0f}" if hit else "not reached",
                "at step": hit["step"] if hit else "-",
                "_t": hit["train_s"] if hit else float("inf"),
            }
        )
    table.sort(key=lambda r: r["_t"])
    return target, [{k: v for k, v in r.items() if k != "_t"} for r in table]


def section(q: Mapping[str, Any], out: Path, rel: Path) -> list[str]:
    """The document's quality section."""
    lines = ["## Quality and time to quality (3 tasks, 2 budgets + equal wall time)", ""]
    if q.get("plan") == "reduced":
        lines += [
            "> **Reduced setting** (`python -m bench quality --reduced`): tiny budgets, run only "
            "to show that the machinery works. These accuracies are not a quality result; "
            "`make bench-quality` runs the full plan.",
            "",
        ]
    est = q.get("estimate_minutes", {}).get("total")
    lines += [
        f"Run {q['started']['time']} to {q['finished']['time']} (load average "
        f"{q['started']['loadavg']} at the start), plan `{q['plan']}` (estimated "
        f"{est:.0f} min beforehand), one torch thread per run, one run at a time. Per task and "
        "budget every method gets the same training subset, batches and linear LR decay (hiftune "
        "counts it in cycles). Rates lie on a 1-3-10 ladder; full FT is searched first, every "
        "other grid reaches 3x above full FT's best, and a best rate on a grid's edge adds the "
        "next rung (up to the plan's cap); the rate is chosen by validation accuracy at the first "
        "seed, and the other seeds run at it. *test acc* is the median over seeds; "
        "*updates/weight* the optimizer updates a weight receives on average (steps times the "
        "share of the weights each step trains). A row whose options equal an earlier row's is "
        "not run twice ('= ...'). hiftune's rows train at `hiftune train`'s precision and paging.",
        "",
        f"- {q['lisa']}",
        "",
        "### Verdicts (medians over seeds)",
        "",
        *verdicts(q),
        "",
    ]
    for task, t in q["tasks"].items():
        facts = t.get("facts", {})
        lines += [f"### {task}: {t['label']}", ""]
        lines += [f"{facts.get('n_units', '?')} units; new parameters: "
                  f"{', '.join(facts.get('new_params', [])) or 'none'}.", ""]  # fmt: skip
        for budget, block in t["budgets"].items():
            s = block["settings"]
            lines += [
                f"**{budget}**: {block['steps']} steps of batch {s['batch_size']} "
                f"({s['train_samples']} examples), validation {s['val_samples']}, test "
                f"{s['test_samples']}, seeds {list(s['seeds'])}.",
                "",
                markdown_table(rows(block)),
            ]
            best = best_options(block)
            if best:
                lines += [f"Best hiftune option set here: {_label(best)}.", ""]
            notes = sorted({n for ns in block.get("notes", {}).values() for n in ns})
            lines += [f"- note: {n}" for n in notes] + ([""] if notes else [])
            png = plot(out / f"quality_{task}_{budget}.png", block, f"{task}, {budget} budget")
            if png:
                lines += [f"![accuracy vs wall time, {task} {budget}]({rel}/{png.name})", ""]
            target, reached = _reached(block)
            if target is not None and budget != "equal-time":
                lines += [
                    f"Time to {100 * target:.1f}% validation accuracy ("
                    f"{100 * TARGET_OF_FULL_FT:.0f}% of full FT's median final value; first seed "
                    "at the chosen rate; resolution: the evaluation points):",
                    "",
                    markdown_table(reached),
                ]
            for r in block["results"]:
                if "error" in r:
                    lines.append(f"- failed: {_label(r['method'])} lr {r['lr']:g}: {r['error']}")
            lines.append("")
    return lines


def headline(q: Mapping[str, Any]) -> list[str]:
    """The README's quality lines: the verdicts, and the best option set per task and budget."""
    lines = [f"Quality ({q.get('plan', 'full')} plan, medians over seeds of test accuracy):", ""]
    lines += verdicts(q)
    best = []
    for task, t in q["tasks"].items():
        for budget, block in t["budgets"].items():
            name = best_options(block)
            if name and budget != "equal-time":
                best.append(f"{task} {budget}: {_label(name)}")
    if best:
        lines += ["", "Best hiftune option set: " + "; ".join(best) + "."]
    return lines


def is_current(q: Any) -> bool:
    """Whether ``q`` was written by this plan (older files have another layout)."""
    return isinstance(q, Mapping) and q.get("format") == 2


def runs_of(q: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """Every run in ``q``."""
    return [r for t in q["tasks"].values() for b in t["budgets"].values() for r in b["results"]]
