"""Turn a run-config class into a typer command: one flag per config field, its help text from the
field's declaration, `--config FILE` and `--dry-run`. Flags given on the command line override the
YAML, which overrides the defaults (the parameter source tells which flags were given)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional

import typer

from dschat_cli.config.schema import ConfigError, FlagSpec, flag_specs, resolve


def _option(spec: FlagSpec) -> tuple[Any, Any]:
    """(annotation, typer.Option) for one field."""
    help_text = spec.help
    if spec.choices:
        help_text += " \\[choices: " + ", ".join(str(c) for c in spec.choices) + "]"
    common = dict(help=help_text, rich_help_panel=spec.panel, hidden=spec.hidden)
    if spec.type is bool:
        decl = f"{spec.flag}/--no-{spec.flag[2:]}"
        return bool, typer.Option(bool(spec.default), decl, **common)
    if spec.type is tuple:
        default = list(spec.default) if spec.default else None
        return Optional[List[str]], typer.Option(default, spec.flag, **common)
    annotation = Optional[spec.type] if (spec.optional or spec.default is None) else spec.type
    return annotation, typer.Option(spec.default, spec.flag, **common)


def config_command(app: typer.Typer, name: str, cfg_cls: type, *, help: str,
                   handler: Callable[..., int | None], extra: list[inspect.Parameter] | None = None,
                   epilog: str | None = None,
                   dry_run_help: str = "Print the resolved config, the DeepSpeed JSON and the "
                                       "launch command, then exit without running.",
                   with_dry_run: bool = True, check: bool = True) -> None:
    """Register `name` on `app`. `handler(cfg, dry_run=..., **extra_values)` runs the command and
    returns an exit code. Without `with_dry_run` there is no --dry-run flag (and no dry_run
    argument); without `check` the handler runs the config's cross-field checks itself."""
    specs = flag_specs(cfg_cls)
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context)]
    for spec in specs:
        annotation, option = _option(spec)
        params.append(inspect.Parameter(spec.param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Option(None, "--config", help="YAML run config (nested sections as in a run's "
                             "run_config.yaml); flags given here override it.",
                             rich_help_panel="Run")))
    if with_dry_run:
        params.append(inspect.Parameter(
            "dry_run", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--dry-run", help=dry_run_help, rich_help_panel="Run")))
    params.extend(extra or [])
    extra_names = [p.name for p in extra or []]

    def command(ctx: typer.Context, **kwargs):
        given = {}
        for spec in specs:
            source = ctx.get_parameter_source(spec.param)
            if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
                given[spec.path] = kwargs[spec.param]
        try:
            cfg = resolve(cfg_cls, kwargs["config"], given)
            if check and hasattr(cfg, "check"):
                cfg.check()
            if with_dry_run:
                rc = handler(cfg, dry_run=kwargs["dry_run"], **{k: kwargs[k] for k in extra_names})
            else:
                rc = handler(cfg, **{k: kwargs[k] for k in extra_names})
        except ConfigError as e:
            from dschat_cli.ui.console import error_line

            error_line(e.where, e.message)
            raise typer.Exit(2) from None
        raise typer.Exit(rc or 0)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    command.__doc__ = help
    app.command(name, help=help, epilog=epilog)(command)


def show_config(cfg) -> int:
    """--dry-run of the commands that launch nothing: the resolved config as YAML."""
    from dschat_cli.config.schema import to_yaml
    from dschat_cli.ui.console import console

    console.print(to_yaml(cfg), highlight=False, markup=False)
    return 0
