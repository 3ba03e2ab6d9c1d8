"""``tokattr dashboard``: the W&B workspace of a benchmark run (:mod:`tokattr.lightning.dashboard`).

tokattr dashboard push --entity E --project P [OUT_DIR]   # save it to W&B, print the URL
tokattr dashboard check [OUT_DIR]                          # validate the spec offline
"""

from __future__ import annotations

import argparse
import sys


def dashboard_command(argv: list[str]) -> int:
    """Parse ``argv`` and run ``push`` or ``check``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="tokattr dashboard", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    push = sub.add_parser(
        "push", help="save out_dir/wandb_dashboard.json as a W&B workspace, and a report"
    )
    push.add_argument("--entity", required=True, help="W&B user or team")
    push.add_argument("--project", required=True, help="W&B project (where the runs are)")
    push.add_argument("out_dir", nargs="?", default="runs/bench", help="the run's folder")
    check = sub.add_parser("check", help="validate the spec with wandb-workspaces, offline")
    check.add_argument("out_dir", nargs="?", default="runs/bench", help="the run's folder")
    args = parser.parse_args(argv)
    from tokattr.lightning.dashboard import (
        build_report,
        load_dashboard,
        panel_keys,
        push_dashboard,
        report_keys,
    )

    if args.action == "check":
        workspace, spec = load_dashboard(args.out_dir)
        missing = panel_keys(workspace) - set(spec["keys"])
        if missing:
            raise ValueError(f"the dashboard reads keys the run did not log: {sorted(missing)}")
        report = build_report(spec, spec.get("entity") or "entity", spec["project"])
        missing = report_keys(report) - set(spec["keys"])
        if missing:
            raise ValueError(f"the report reads keys the run did not log: {sorted(missing)}")
        print(
            f"{len(workspace.sections)} sections, {len(panel_keys(workspace))} keys; "
            f"report of {len(report.blocks)} blocks: valid"
        )
        return 0
    try:
        workspace_url, report_url = push_dashboard(args.out_dir, args.entity, args.project)
    except RuntimeError as e:
        print(f"tokattr dashboard push: error: {e}", file=sys.stderr)
        return 1
    print(f"workspace: {workspace_url}\nreport: {report_url}")
    return 0
