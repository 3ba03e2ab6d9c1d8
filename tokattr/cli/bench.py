"""``tokattr bench``: every method and metric over a prompt set, on one CPU or many GPUs.

    tokattr bench --config configs/bench/arith.yaml [--trainer.devices 2 ...] [--out_dir DIR]

LightningCLI over :class:`~tokattr.lightning.runner.AttributionModule` and
:class:`~tokattr.lightning.runner.PromptDataModule`: every ``--trainer.*`` flag
(accelerator, devices, strategy, precision, num_nodes, …), ``--model.*``, ``--data.*``, plus
``--out_dir``,
``--max_examples``, ``--methods``, ``--overwrite`` and ``--retry_errors``. Results are
written as they are produced; the same command on the same ``out_dir`` resumes a killed run.

Cheap checks come first, before the model loads: the config, the data file, every prompt's
length in tokens (with the tokenizer alone), each error naming its file and line, then the
``out_dir`` lock (one run per ``out_dir``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tokattr.lightning.prompts import PromptDataModule
from tokattr.lightning.runner import (
    AttributionModule,
    ExamplesPerSecond,
    ResultWriter,
    done_pairs,
    finished_examples,
)
from tokattr.results import (
    OutDirLock,
    check_run,
    cost_markdown,
    error_summary,
    iter_rows,
    merge,
)
from tokattr.rows import ResultRow, RunIdentity
from tokattr.sanity import sanity_markdown
from tokattr.validation import check_bench_target, known_methods


class BenchCLI(LightningCLI):
    """The ``tokattr bench`` parser: LightningCLI plus the run's own options.

    ``state`` (a dict the caller keeps) receives the ``out_dir`` lock and the examples read
    before the model is instantiated, so the caller can release the lock whatever fails."""

    def __init__(self, *args: Any, state: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.state = {} if state is None else state
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--out_dir", type=str, default="runs/bench", help="Where results are written."
        )
        parser.add_argument(
            "--max_examples",
            type=int | None,
            default=None,
            help="Keep only the first N examples of the data set.",
        )
        parser.add_argument(
            "--methods",
            type=list[str] | None,
            default=None,
            help="Run only these methods (names; parameters from model.methods or defaults).",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Discard results of a different run found in out_dir.",
        )
        parser.add_argument(
            "--retry_errors",
            type=bool,
            default=False,
            help="Compute again the (example, method) pairs a previous run left as error rows.",
        )
        parser.add_argument(
            "--report",
            type=bool,
            default=True,
            help="Write out_dir/report.html and the PNG figures when the run is complete.",
        )
        parser.add_argument(
            "--wandb",
            type=bool,
            default=True,
            help="Log to W&B (WandbLogger; files under out_dir/wandb): live progress from the "
            "first batch, the charts and tables at the end; a resumed run continues the same "
            "W&B run.",
        )
        parser.add_argument("--wandb_project", type=str, default="tokattr", help="The W&B project.")
        parser.add_argument(
            "--wandb_entity",
            type=str | None,
            default=None,
            help="The W&B entity (user or team) of the run and of out_dir/wandb_dashboard.json.",
        )
        parser.add_argument(
            "--wandb_group",
            type=str | None,
            default=None,
            help="W&B group of the run (e.g. one per sweep or per node of a multi-node run).",
        )
        parser.add_argument(
            "--wandb_tags", type=list[str] | None, default=None, help="W&B tags of the run."
        )
        parser.add_argument(
            "--wandb_online",
            type=bool,
            default=False,
            help="Sync to W&B (needs a key); offline otherwise. WANDB_MODE is respected.",
        )
        parser.add_argument(
            "--n_bootstrap",
            type=int,
            default=1000,
            help="Bootstrap resamples for the 95%% intervals of metrics.csv.",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        if cfg.methods is not None:
            known_methods(cfg.methods)
            configured = cfg.model.methods or {}
            cfg.model.methods = {m: dict(configured.get(m) or {}) for m in cfg.methods}
        if cfg.max_examples is not None:
            cfg.data.max_examples = cfg.max_examples
        _check_devices(cfg.trainer)
        _check_device_map(cfg)
        _check_sharding(cfg)
        check_bench_target(cfg.model.target_fn)
        self._cheap_checks(cfg)

    def _cheap_checks(self, cfg: Any) -> None:
        """Before the model loads: read the data, check every prompt's length in tokens with
        the tokenizer alone, then take the ``out_dir`` lock (rank zero)."""
        data = cfg.data.as_dict()
        data.pop("__path__", None)
        examples = PromptDataModule(**data).examples()
        self.state["examples"] = examples
        from tokattr.messages import no_room
        from tokattr.models import load_tokenizer

        tokenizer, limit = load_tokenizer(cfg.model.model)
        prompts = [e["prompt"] for e in examples]
        lengths = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
        for e, ids in zip(examples, lengths, strict=True):
            if why := no_room(e["prompt"], len(ids), limit, name=e["example_id"]):
                raise ValueError(f"{e['where']}: {why}")
        if _is_rank_zero():
            lock = OutDirLock(cfg.out_dir)
            lock.acquire()
            self.state["lock"] = lock


def _example_key(e: dict[str, Any]) -> list[Any]:
    key = [e["example_id"], e["prompt"], e["answer"]]
    return [*key, e["features"]] if "features" in e else key


def _strategy_name(cfg: Any) -> str:
    strategy = cfg.trainer.strategy
    name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", strategy))
    return name.rsplit(".", 1)[-1]


def _check_sharding(cfg: Any) -> None:
    """FSDP2 (``ModelParallelStrategy``): what cannot run sharded, refused before any work."""
    if _strategy_name(cfg) not in ("ModelParallelStrategy", "model_parallel"):
        return
    from tokattr.evaluation import needs_random_model

    if needs_random_model(cfg.model.metrics or ["randomization_spearman"]):
        raise ValueError(
            "randomization_spearman needs a second, unsharded model on every rank; leave it out "
            "of --model.metrics when the model is sharded"
        )


def _check_device_map(cfg: Any) -> None:
    """A ``device_map`` splits the model inside one process: refuse more processes, and a
    strategy that would shard or replicate it, before the model loads."""
    if cfg.model.device_map is None:
        return
    devices = cfg.trainer.devices
    if str(devices).strip() != "1" or int(cfg.trainer.num_nodes or 1) > 1:
        raise ValueError(
            f"--model.device_map splits the model inside one process; --trainer.devices "
            f"{devices} would start several. Use --trainer.devices 1, or "
            "configs/bench/fsdp.yaml to shard the model over processes"
        )
    name = _strategy_name(cfg)
    if name not in ("auto", "single_device", "SingleDeviceStrategy"):
        raise ValueError(f"--model.device_map runs under one process, not strategy {name!r}")


def _check_devices(trainer_cfg: Any) -> None:
    """``devices`` more than this machine has: a clear error before any work."""
    devices, accelerator = trainer_cfg.devices, str(trainer_cfg.accelerator)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)  # the command line gives "2"
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return  # "auto", -1 and lists are Lightning's to resolve
    if accelerator == "cpu" and devices > (os.cpu_count() or 1):
        raise ValueError(
            f"--trainer.devices {devices}: this machine has {os.cpu_count()} CPU cores"
        )
    if accelerator in ("gpu", "cuda") and devices > torch.cuda.device_count():
        raise ValueError(
            f"--trainer.devices {devices}: this machine has {torch.cuda.device_count()} GPU(s)"
        )


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Where launchers put a process's rank (torchrun / Lightning, SLURM's srun, LSF's jsrun)."""


def _is_rank_zero() -> bool:
    """True in the process the user started (before Lightning launches the others), and in
    task 0 of a cluster launcher."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in RANK_VARIABLES)


def make_cli(argv: list[str], state: dict[str, Any] | None = None) -> BenchCLI:
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads ``args`` only
    try:
        with warnings.catch_warnings():
            # Lightning 2.6's LightningCLI calls jsonargparse's deprecated add_instantiator.
            warnings.simplefilter("ignore", DeprecationWarning)
            return BenchCLI(
                AttributionModule,
                PromptDataModule,
                run=False,
                args=argv,
                seed_everything_default=0,
                save_config_callback=None,
                trainer_defaults={
                    "inference_mode": False,  # gradient methods need autograd in predict_step
                    "logger": False,
                    "enable_checkpointing": False,
                    "enable_model_summary": False,
                },
                parser_kwargs={"prog": "tokattr bench", "description": __doc__.split("\n\n")[0]},
                state=state,
            )
    except MisconfigurationException as e:
        raise ValueError(f"trainer: {e}") from e
    finally:
        sys.argv = saved


def run_bench(argv: list[str]) -> int:
    """Entry point of ``tokattr bench``; returns a process exit code."""
    state: dict[str, Any] = {}
    # The W&B run points WANDB_DIR / WANDB_DATA_DIR at out_dir while it runs (wandb_dirs).
    saved_env = {k: os.environ.get(k) for k in ("WANDB_DIR", "WANDB_DATA_DIR")}
    try:
        return _run_bench(argv, state)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if "lock" in state:
            state["lock"].release()


def _run_bench(argv: list[str], state: dict[str, Any]) -> int:
    # Batches are whole chunks of examples (see PromptDataModule.chunks); the results writer
    # does not need Lightning's batch indices.
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    cli = make_cli(argv, state)
    cfg, module, data, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    out_dir = Path(cfg.out_dir)
    if "examples" in state:
        data._examples = state["examples"]  # read and checked before the model loaded
    examples = data.examples()  # a missing file or an empty data set fails here
    methods = list(module.methods)
    from tokattr.models import fingerprint

    identity = RunIdentity(
        model=module.model_name,
        weights=fingerprint(module.lm),
        dtype=str(cfg.model.dtype),
        examples=[
            [
                e["example_id"],
                e["prompt"],
                e["answer"],
                *([e["features"]] if "features" in e else []),
            ]
            for e in examples
        ],
        methods=module.methods,
        metrics=module.metric_names,
        metric_params=module.metric_params,
        baseline=module.baseline,
        target_fn=module.target_fn,
        shapley_max_tokens=module.shapley_max_tokens,
        randomization_seed=module.randomization_seed,
    )
    if _is_rank_zero():
        check_run(out_dir, identity, cfg.overwrite)
        (out_dir / "config.yaml").write_text(cli.parser.dump(cfg, skip_none=False))
    done = done_pairs(out_dir, keep_errors=not cfg.retry_errors)
    module.done = done
    data.skip = finished_examples(done, examples, methods)
    todo = len(examples) - len(data.skip)
    # Rows of a batch cut short by a kill are kept too: only their missing methods re-run.
    kept = sum((e["example_id"], m) in done for e in examples for m in methods)
    from tokattr.lightning.live import LiveProgress

    live = LiveProgress(out_dir, total=len(examples) * len(methods))
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)] + [
        ResultWriter(out_dir),
        live,
        ExamplesPerSecond(),
    ]
    wandb_logger = None
    if cfg.wandb and _is_rank_zero():
        import json

        from tokattr.lightning.wandb_log import make_logger

        wandb_logger = make_logger(
            out_dir, cfg.wandb_project, cfg.wandb_online, entity=cfg.wandb_entity,
            group=cfg.wandb_group, tags=cfg.wandb_tags, new_run=bool(cfg.overwrite),
        )  # fmt: skip
        wandb_logger.log_hyperparams(
            json.loads(cli.parser.dump(cfg, format="json", skip_none=False))
        )
        trainer.loggers = [*trainer.loggers, wandb_logger]
        live.publish(trainer)  # the rows of an earlier run, if any: the W&B run exists now
    if _is_rank_zero():
        print(
            f"tokattr bench: {len(examples)} examples x {len(methods)} methods -> {out_dir}"
            + (
                f" ({kept} of {len(examples) * len(methods)} results already done,"
                f" {len(examples) - todo} examples complete)"
                if kept
                else ""
            ),
            file=sys.stderr,
        )
    start = time.perf_counter()
    if todo:
        trainer.predict(module, datamodule=data, return_predictions=False)
        module.finish_passes()  # a sharded model: ranks with fewer batches (or none) too
        # Every rank's rows are flushed and synced per batch: once all ranks are here, the
        # part files are complete.
        trainer.strategy.barrier("tokattr-merge")
    if not trainer.is_global_zero:
        return 0
    live.publish(trainer)  # every rank's last batch
    ids = [e["example_id"] for e in examples]
    table = merge(out_dir, ids, methods, module.metric_params, cfg.n_bootstrap)
    print(table.to_markdown())
    print()
    if table.sanity:
        print(sanity_markdown(table.checks, table.sanity))
        print()
    rows = _rows_in_order(out_dir)
    print(cost_markdown(rows, methods))
    errors = error_summary(rows)
    if errors:
        print("\n" + errors, file=sys.stderr)
    _report_and_log(cli, out_dir, wandb_logger, list(live.metrics()))
    print(
        f"\n{len(examples)} examples x {len(methods)} methods in "
        f"{time.perf_counter() - start:.1f} s -> {out_dir}/attributions.jsonl, metrics.csv, "
        "metric_sanity.csv, summary.md"
    )
    return 0


def _rows_in_order(out_dir: Path) -> list[ResultRow]:
    return list(iter_rows(out_dir / "attributions.jsonl"))


def _report_and_log(
    cli: BenchCLI, out_dir: Path, logger: Any = None, live_keys: list[str] | None = None
) -> None:
    """The HTML report, the W&B run's charts and tables and its dashboard spec of a complete
    run (rank 0)."""
    cfg = cli.config
    if cfg.report:
        from tokattr.report import write_report

        path = write_report(out_dir)
        print(f"report: {path}", file=sys.stderr)
    if cfg.wandb and logger is not None:
        from tokattr.lightning.dashboard import write_dashboard
        from tokattr.lightning.wandb_log import log_run
        from tokattr.report import load_run

        run = load_run(out_dir)
        logged = log_run(logger, run, finish=False)
        path = write_dashboard(
            out_dir,
            run,
            [*(live_keys or []), *logged.keys],
            logged.charts,
            entity=cfg.wandb_entity,
            project=cfg.wandb_project,
        )
        logger.experiment.finish()
        print(f"W&B run (offline unless --wandb_online): {out_dir / 'wandb'}", file=sys.stderr)
        print(f"W&B dashboard spec: {path} (tokattr dashboard push)", file=sys.stderr)
