"""The command line: ``ftrain run | resume | inspect | policy check`` (DESIGN §1).

Only click and rich live here. Every ``FtrainError`` becomes one red line per problem on
stderr and exit status 2; nothing is launched after an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from ftrain import __version__
from ftrain.errors import FtrainError, PolicyError

EXIT_USAGE = 2


def _fail(exc: FtrainError) -> None:
    lines = exc.errors if isinstance(exc, PolicyError) else [str(exc)]
    for line in lines:
        click.secho(f"ftrain: error: {line}", fg="red", err=True)
    sys.exit(EXIT_USAGE)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ftrain's own errors into one line each and exit 2, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FtrainError as exc:
            _fail(exc)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftrain")
def main() -> None:
    """Keep a training job alive: launch it, recognise what went wrong, restart it by policy.

    \b
      ftrain run train.py --policy policy.yaml --config config.yaml
      ftrain resume                      # continue the newest run under ./runs
      ftrain inspect runs/train-…/       # the run's story, or a checkpoint folder
      ftrain policy check policy.yaml    # validate a policy before a long run

    Exit status: 0 finished, 1 failed and the policy stopped, 2 bad input (nothing
    launched), 3 ftrain itself failed, 130 interrupted (SIGINT), 143 terminated (SIGTERM);
    after 3, 130 and 143 the run stays resumable.
    """


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Policy YAML (default: the built-in policy, see configs/policy.default.yaml).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The script's YAML config; overrides are applied to it per attempt.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key for the whole run (dotted keys; value read as YAML). Repeatable.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/<script>-<YYYYmmdd-HHMMSS>/).")
@click.option("--inject", metavar="SPEC",
              help="Rehearse faults, each once per run: e.g. oom@30,segv@60,nan@90,hang@120 "
                   "(oom cuda nccl segv abort kill nan spike hang exc term).")
@click.option("--no-ui", is_flag=True, help="Plain [ftrain] lines instead of the live view.")
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
              help="Mirror metrics and ftrain's events into TensorBoard files in DIR.")
@click.option("--nproc-per-node", type=int, default=1, show_default=True,
              help="Ranks on this machine; >1 runs the script under torchrun.")
@click.option("--nnodes", default="1", show_default=True, metavar="N|MIN:MAX",
              help="Machines in the job; MIN:MAX lets it go on with as few as MIN (torchrun's spelling).")
@click.option("--node-rank", type=int, default=0, show_default=True, help="This machine's rank.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="Rendezvous endpoint for several machines.")
@_guard
def run(script: str, script_args: Sequence[str], policy_path: Path | None, config_path: Path | None,
        sets: Sequence[str], run_dir: Path | None, inject: str | None, no_ui: bool,
        tensorboard: Path | None, nproc_per_node: int, nnodes: str, node_rank: int,
        rdzv_endpoint: str | None) -> None:
    """Run SCRIPT under supervision. Arguments after `--` go to the script unchanged.

    SCRIPT ending in .py runs with ftrain's own Python; anything else is executed.
    """
    from ftrain import runs

    code = runs.start_run(
        script=script, script_args=tuple(script_args), policy_path=policy_path, config_path=config_path,
        sets=tuple(sets), run_dir=run_dir, inject=inject, no_ui=no_ui, tensorboard=tensorboard,
        nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
    )
    sys.exit(code)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-restarts", type=click.IntRange(min=0),
              help="A new budget: this many more restarts (also clears spent rule budgets).")
@click.option("--no-ui", is_flag=True, help="Plain [ftrain] lines instead of the live view.")
@_guard
def resume(run_dir: Path | None, max_restarts: int | None, no_ui: bool) -> None:
    """Continue a run whose supervisor stopped or died (default: the newest under ./runs)."""
    from ftrain import runs

    sys.exit(runs.resume_run(run_dir, max_restarts=max_restarts, no_ui=no_ui))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the watched metrics across attempts into a PNG (needs matplotlib).")
@_guard
def inspect(path: Path, as_json: bool, plot: Path | None) -> None:
    """Show a run folder's story, or a checkpoint folder's checkpoints."""
    from ftrain import report

    sys.exit(report.inspect_path(path, as_json=as_json, plot=plot))


@main.group()
def policy() -> None:
    """Work with policy files."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also check that every overridden key exists in this config.")
@_guard
def policy_check(file: Path, config_path: Path | None) -> None:
    """Validate a policy: exit 0 and explain it, or exit 2 listing every error."""
    from ftrain.overrides import load_config
    from ftrain.policyfile import load_policy

    pol = load_policy(file)
    config = load_config(config_path) if config_path is not None else None
    if config is not None:
        problems = pol.check_config(config)
        if problems:
            raise PolicyError(problems)
    if pol.script:
        from ftrain.adapter import ScriptAdapter

        ScriptAdapter.from_policy(pol.script, source=pol.source, config=config)
    click.echo(f"{file}: ok — {len(pol.rules)} rule(s), max_restarts {pol.max_restarts}, "
               f"no_progress {pol.no_progress}, grace {pol.grace:g}s, warm_start {str(pol.warm_start).lower()}")
    for rule in pol.rules:
        extra = []
        if rule.set:
            extra.append("set " + ", ".join(rule.set))
        if rule.max is not None:
            extra.append(f"at most {rule.max}×")
        if rule.action.value == "rollback":
            extra.append(f"margin {rule.margin}, skip {rule.skip_steps} steps")
        kinds = ", ".join(sorted(k.value for k in rule.kinds))
        click.echo(f"  {rule.label()} when {kinds}" + (f": {'; '.join(extra)}" if extra else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
