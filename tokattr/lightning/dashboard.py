"""A ready W&B workspace for benchmark runs, built with ``wandb-workspaces``.

Every run writes its spec offline to ``out_dir/wandb_dashboard.json`` (no server call: the
entity is whatever ``--wandb_entity`` gave, else a placeholder replaced at push time);
``tokattr dashboard push --entity E --project P [out_dir]`` saves it as a workspace of the
project, and a report of the run (:func:`build_report`: the leaderboard, the curves, cost and
examples, each a panel grid over the project's runs), where a key and a network exist. The
report is rebuilt from the spec's keys at push time: ``wandb-workspaces`` cannot serialise a
report's run set without a server.

Sections, top to bottom:

- **Leaderboard**: one bar chart per headline metric (a bar per method, from the run
  summary), the method x metric table with its intervals (``metrics``).
- **Live progress**: examples done per method, the fraction of the run done, seconds per
  example, errors, and the running mean of each metric per method, against the step (rows
  done), as they were logged batch by batch.
- **Metric checks**: each metric against the ``random`` control (``metric_checks``, one row
  per metric; ``metric_sanity``, one per metric and method; :mod:`tokattr.sanity`).
- **Faithfulness curves**: the mean deletion / insertion curves (table and figure).
- **Cost**: time and model evaluations per method.
- **Examples**: one token heatmap image per example and method, all of one size
  (``heatmaps``), and the per-token scores.
- **Agreement**: the method x method rank agreement (table and figure).
- **Run comparison**: the runs side by side (differences only); the run list is grouped by
  model (``model.model`` of the config); ``--wandb_group`` groups the runs of one sweep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokattr.lightning.live import LIVE_PREFIX

DASHBOARD_FILE = "wandb_dashboard.json"
PLACEHOLDER_ENTITY = "<entity>"
"""The entity of a spec written without ``--wandb_entity``; ``push`` replaces it."""


def build_workspace(
    keys: Iterable[str],
    methods: Sequence[str],
    charts: Mapping[str, Mapping[str, Any]] | None = None,
    entity: str | None = None,
    project: str = "tokattr",
    name: str = "tokattr benchmark",
) -> Any:
    """The workspace of a run that logged ``keys`` (a ``wandb_workspaces`` ``Workspace``).

    Only keys in ``keys`` appear in a panel, and every key of ``keys`` appears in one
    (``trainer/global_step``, the step, is the x axis of the live plots). ``charts``: the
    native charts logged (:class:`~tokattr.lightning.wandb_log.LoggedRun`), drawn again
    from their tables.
    """
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    logged = list(dict.fromkeys(keys))
    have = set(logged)
    methods = [m for m in methods if any(k.startswith(f"{m}/") for k in have)] or list(methods)
    metric_names = list(
        dict.fromkeys(k.split("/", 1)[1] for k in logged for m in methods if k.startswith(f"{m}/"))
    )
    step = "trainer/global_step"
    live = [k for k in logged if k.startswith(f"{LIVE_PREFIX}/")]

    def live_of(quantity: str) -> list[str]:
        return [k for k in live if k.rsplit("/", 1)[-1] == quantity and k.count("/") == 2]

    leaderboard = [
        wr.BarPlot(title=metric, metrics=[f"{m}/{metric}" for m in methods
                                          if f"{m}/{metric}" in have])
        for metric in metric_names
    ]  # fmt: skip
    progress = [
        wr.LinePlot(title="fraction of the run done", x=step,
                    y=[k for k in live if k.endswith(("/fraction_done", "/examples_done"))
                       and k.count("/") == 1]),
    ]  # fmt: skip
    live_quantities = list(dict.fromkeys(k.rsplit("/", 1)[-1] for k in live if k.count("/") == 2))
    progress += [
        wr.LinePlot(title=f"{q} (live)", x=step, y=live_of(q))
        for q in live_quantities
        if live_of(q)
    ]

    def tables(*names: str) -> list[Any]:
        return [wr.WeavePanelSummaryTable(table_name=t) for t in names if t in have]

    def images(*names: str) -> list[Any]:
        present = [k for k in names if k in have]
        return [wr.MediaBrowser(title=", ".join(present), media_keys=present)] if present else []

    custom = []
    for spec in (charts or {}).values():
        if spec["table"] in have:
            panel = wr.CustomChart.from_table(spec["table"], dict(spec["fields"]),
                                              dict(spec["strings"]))  # fmt: skip
            panel.chart_name = spec["spec_name"]
            custom.append(panel)
    chart_tables = {spec["table"] for spec in (charts or {}).values()}
    leftover = [k for k in logged if k.startswith("charts/") and k not in chart_tables]
    sections = [
        ws.Section(name="Leaderboard", is_open=True,
                   panels=[*leaderboard, *tables("metrics"), *images("metrics_chart")]),
        ws.Section(name="Live progress", is_open=True, panels=progress),
        ws.Section(name="Metric checks", panels=tables("metric_checks", "metric_sanity")),
        ws.Section(name="Faithfulness curves",
                   panels=[*tables("erasure_curves_table"), *images("erasure_curves")]),
        ws.Section(name="Cost", panels=tables("cost")),
        ws.Section(name="Examples", panels=tables("heatmaps", "token_scores")),
        ws.Section(name="Agreement", panels=[*tables("agreement_table"), *images("agreement")]),
        ws.Section(name="Charts", is_open=True,
                   panels=[*custom, *(wr.WeavePanelSummaryTable(table_name=c)
                                      for c in leftover)]),
        ws.Section(name="Run comparison", panels=[wr.RunComparer(diff_only="split")]),
    ]  # fmt: skip
    return ws.Workspace(
        entity=entity or PLACEHOLDER_ENTITY,
        project=project,
        name=name,
        sections=[s for s in sections if s.panels],
        runset_settings=ws.RunsetSettings(groupby=[ws.Config("model.model")]),
    )


def build_report(spec: Mapping[str, Any], entity: str, project: str) -> Any:
    """A ``wandb-workspaces`` report of a run, from a dashboard spec (:func:`write_dashboard`):
    the workspace's sections as panel grids over the runs of ``entity/project``, below a short
    text on what each section shows. Built without a server call; ``save()`` needs one."""
    import wandb_workspaces.reports.v2 as wr

    workspace = build_workspace(spec["keys"], spec.get("methods") or [], spec.get("charts"),
                                entity, project)  # fmt: skip
    blocks: list[Any] = [
        wr.P("Token attribution methods scored by tokattr (faithfulness metrics with 95% "
             "bootstrap intervals; each chart says which way is better)."),
    ]  # fmt: skip
    for section in workspace.sections:
        if section.name == "Run comparison":
            continue
        blocks += [
            wr.H2(section.name),
            wr.PanelGrid(panels=list(section.panels),
                         runsets=[wr.Runset(entity=entity, project=project)]),
        ]  # fmt: skip
    return wr.Report(
        entity=entity,
        project=project,
        title="tokattr benchmark",
        description="Faithfulness of token attribution methods",
        blocks=blocks,
    )


def report_keys(report: Any) -> set[str]:
    """Every logged key a report's panels read."""
    return _keys_read([p for b in report.blocks for p in (getattr(b, "panels", None) or [])])


def panel_keys(workspace: Any) -> set[str]:
    """Every logged key a workspace's panels read (line and bar series, tables, media)."""
    return _keys_read([p for section in workspace.sections for p in section.panels])


def _keys_read(panels: Iterable[Any]) -> set[str]:
    keys: set[str] = set()
    for panel in panels:
        for attr in ("y", "metrics", "media_keys"):
            for item in getattr(panel, attr, None) or []:
                keys.add(item if isinstance(item, str) else getattr(item, "name", str(item)))
        if getattr(panel, "table_name", None):
            keys.add(panel.table_name)
        query = getattr(panel, "query", None) or {}
        if "summaryTable" in query:
            keys.add(query["summaryTable"]["tableKey"])
    return keys


def write_dashboard(
    out_dir: str | Path,
    run: Any,
    keys: Iterable[str],
    charts: Mapping[str, Mapping[str, Any]] | None = None,
    entity: str | None = None,
    project: str = "tokattr",
) -> Path:
    """Write ``out_dir/wandb_dashboard.json``: the workspace spec (``wandb-workspaces``'
    view model, as JSON) and the keys the run logged."""
    keys = list(dict.fromkeys(keys))
    workspace = build_workspace(keys, list(run.methods), charts, entity, project)
    spec = {
        "tokattr_dashboard": 1,
        "entity": entity,
        "project": project,
        "keys": keys,
        "methods": list(run.methods),
        "charts": {k: dict(v) for k, v in (charts or {}).items()},
        "view": workspace._to_model().model_dump(mode="json", by_alias=True),
    }
    path = Path(out_dir) / DASHBOARD_FILE
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def load_dashboard(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The ``Workspace`` of a spec written by :func:`write_dashboard`, and the spec.

    Raises:
        FileNotFoundError: no such file (or no ``wandb_dashboard.json`` in the folder).
        ValueError: not a tokattr dashboard spec, or one ``wandb-workspaces`` refuses.
    """
    from wandb_workspaces.workspaces import Workspace, internal

    path = Path(path)
    if path.is_dir():
        path = path / DASHBOARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no dashboard spec at {path} (a tokattr bench run writes one)")
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict) or spec.get("tokattr_dashboard") != 1 or "view" not in spec:
        raise ValueError(f"{path} is not a tokattr dashboard spec")
    try:
        view = internal.View.model_validate(spec["view"])
        return Workspace._from_model(view), spec
    except Exception as e:  # pydantic's ValidationError, or the library's own checks
        raise ValueError(f"{path}: wandb-workspaces refuses the spec: {e}") from e


def push_dashboard(path: str | Path, entity: str, project: str) -> tuple[str, str]:
    """Save the spec at ``path`` as a workspace of ``entity/project``, and its report;
    returns both URLs.

    Raises:
        RuntimeError: W&B is offline here (``WANDB_MODE=offline`` / ``disabled``) or no API
            key is set: nothing is sent.
    """
    import os

    import wandb

    if not re.fullmatch(r"[\w.-]+", entity) or not re.fullmatch(r"[\w.-]+", project):
        raise ValueError(f"entity and project must be W&B names, got {entity!r}, {project!r}")
    workspace, spec = load_dashboard(path)
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        raise RuntimeError(
            f"WANDB_MODE={mode}: pushing a dashboard needs W&B online (unset WANDB_MODE)"
        )
    if not (os.environ.get("WANDB_API_KEY") or wandb.login(prompt=False)):
        raise RuntimeError("no W&B API key: run `wandb login` or set WANDB_API_KEY, then retry")
    workspace.entity, workspace.project = entity, project
    try:
        saved = workspace.save()
        report = build_report(spec, entity, project)
        report.save()
    except Exception as e:  # no network, a refused key, an unknown entity
        raise RuntimeError(f"W&B did not save the dashboard: {e}") from e
    return saved.url, report.url
