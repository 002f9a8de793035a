"""Rendering a ``hiftune profile`` result: the table, the Markdown report, the plot, the files.

Each function takes the dict :func:`hiftune.memory.profile.profile` returns (or its JSON file,
loaded back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .render import markdown_table, plot_lines, write_json


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per run: peak, breakdown (MiB), mean step time (s) and the ratios."""
    ratios = {r["label"]: r for r in result["ratios"]}
    cuda = _on_cuda(result)
    rows = []
    for run in result["runs"]:
        mem, t = run["memory_mib"], run["time_s"]
        ratio = ratios.get(run["label"], {})
        device = (
            {"reserved": mem.get("reserved_peak"), "pinned": mem.get("pinned_peak")} if cuda else {}
        )
        rows.append(
            {
                "config": run["label"],
                "peak MiB": mem["peak"],
                **device,
                "weights": mem["weights"],
                "grads": mem["gradients"],
                "states": mem["optimizer_states"],
                "rest": mem["rest"],
                "(runtime)": mem["runtime"],
                "step s": t["mean_step"],
                "CPU s": t.get("mean_step_cpu", float("nan")),
                "timed steps": t["timed_steps"],
                "peak/FPFT": _fmt_ratio(ratio.get("peak_vs_fpft")),
                "time/FPFT": _fmt_ratio(ratio.get("time_vs_fpft")),
                "time/none": _fmt_ratio(ratio.get("time_vs_none")),
                "peak/discard": _fmt_ratio(ratio.get("peak_vs_discard")),
            }
        )
    return rows


def render_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`table_rows`."""
    return markdown_table(table_rows(result))


def render_markdown(result: dict[str, Any], command: str | None = None) -> str:
    """A Markdown report: the command, the workload, the table and the environment."""
    run0 = result["runs"][0]
    spec = run0["spec"]
    env = run0["environment"]
    host = result["host"]
    lines = [f"# hiftune profile: {result['model']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Workload: {spec['task']}, batch {spec['batch_size']} x {spec['seq_len']} tokens, "
        f"{spec['optimizer']}, m = {spec['units_per_group']} "
        f"(k = {max(r['num_groups'] for r in result['runs'])} groups), random weights and tokens, "
        f"device {spec['device']}, {run0['num_params'] / 1e6:.2f}M parameters.",
        "",
        render_table(result),
        "Memory in MiB (peak resident set size on CPU; on CUDA the peak allocated to tensors, "
        "`reserved` the caching allocator's peak reservation and `pinned` the peak pinned host "
        "memory), step time in seconds (mean over the timed "
        "steps; warm-up excluded; `CPU s`: CPU time of all the worker's threads). "
        "`rest` = peak - weights - grads - states: activations, "
        "temporaries, paging buffers and the runtime (Python + libraries, shown as `(runtime)`).",
        "",
        f"torch {env['torch']}, {env['threads']} threads, peak read by {env['peak_method']}, "
        f"malloc env {env['malloc']}, {host['cpus']} CPUs, load average before "
        f"{host['load_before']}, after {host['load_after']}.",
        "",
    ]
    return "\n".join(lines)


def plot_steps(path: str | Path, result: dict[str, Any]) -> Path:
    """Plots the peak memory of each measured step (one HiFT cycle by default) for every run."""
    series = {
        run["label"]: [s["peak_mib"] for s in run["steps"] if s["phase"] == "memory"]
        for run in result["runs"]
    }
    spec = result["runs"][0]["spec"]
    return plot_lines(
        path,
        series,
        title=f"{result['model']}: peak memory per step "
        f"(batch {spec['batch_size']} x {spec['seq_len']}, {spec['optimizer']})",
        xlabel="step of the measured cycle (HiFT: embedding first, bottom-up)",
        ylabel="peak memory (MiB)",
    )


def write_outputs(
    result: dict[str, Any],
    output_dir: str | Path,
    name: str = "profile",
    command: str | None = None,
) -> dict[str, Path]:
    """Writes ``<name>.md``, ``<name>.json`` and ``<name>.png`` under ``output_dir``.

    Returns:
        ``{"markdown": path, "json": path, "png": path}``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text(render_markdown(result, command))
    return {
        "markdown": md,
        "json": write_json(out / f"{name}.json", {"command": command, **result}),
        "png": plot_steps(out / f"{name}.png", result),
    }


def _on_cuda(result: dict[str, Any]) -> bool:
    """Whether the runs read the CUDA figures (reserved and pinned memory)."""
    return any(run["memory_mib"].get("reserved_peak") is not None for run in result["runs"])


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
