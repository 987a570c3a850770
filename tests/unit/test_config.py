"""One way to configure: every option of every command is a flag and a variable, flag first. No database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgbridge import cli, config
from pgbridge.errors import ConfigError

SAMPLES: dict[Any, tuple[str, str]] = {  # two different valid spellings of a value, per kind
    str: ("from-the-flag", "from-the-variable"),
    int: ("7", "11"),
    float: ("2.5", "4.5"),
    Path: ("/flag/path", "/variable/path"),
    config.boolean: ("false", "true"),
    config.log_format: ("json", "text"),
}
CASES: list[tuple[str | None, config.Option]] = [
    (command, option) for command, options in config.COMMANDS.items() for option in options
]
CASES += [(None, option) for option in config.LOGGING]


def _argv(command: str | None, *extra: str) -> list[str]:
    if command is None:
        return [*extra, "migrate"]
    return [command, *(["t"] if command in ("publish", "unpublish") else []), *extra]


@pytest.mark.parametrize(("command", "option"), CASES, ids=lambda c: c if isinstance(c, str) else getattr(c, "name", c))
def test_flag_then_variable_then_default(command: str | None, option: config.Option) -> None:
    flag_value, env_value = SAMPLES[option.kind]
    options = config.LOGGING if command is None else config.COMMANDS[command]
    environ = {option.variable: env_value}

    def resolved(argv: list[str], env: dict[str, str]) -> Any:
        return config.resolve(cli._parser().parse_args(argv), options, env)[option.name]

    expect_flag = option.kind(flag_value)
    expect_env = option.kind(env_value)
    if option.many:
        expect_flag, expect_env = [expect_flag], [expect_env]
    assert resolved(_argv(command, option.flag, flag_value), environ) == expect_flag  # the flag wins
    assert resolved(_argv(command), environ) == expect_env  # then the variable
    assert resolved(_argv(command), {}) == option.default  # then the default
    assert resolved(_argv(command), {option.variable: ""}) == option.default  # an empty variable is unset


def test_list_options_take_commas_in_variables() -> None:
    args = cli._parser().parse_args(["publish", "t"])
    values = config.resolve(args, config.PUBLISH, {"PGBRIDGE_EXCLUDE": "a, b,c"})
    assert values["exclude"] == ["a", "b", "c"]


def test_a_bad_variable_names_itself() -> None:
    args = cli._parser().parse_args(["serve"])
    with pytest.raises(ConfigError, match="PGBRIDGE_PORT='eighty' is not a valid int"):
        config.resolve(args, config.SERVE, {"PGBRIDGE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="PGBRIDGE_WAKE='maybe' is not a valid boolean"):
        config.resolve(cli._parser().parse_args(["publish", "t"]), config.PUBLISH, {"PGBRIDGE_WAKE": "maybe"})


def test_serve_help_shows_every_variable_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for option in config.SERVE:
        assert option.flag in shown
        default = "unset" if option.default is None else option.default
        assert f"(env {option.variable}; default {default})" in shown, option.name


def test_settings_are_validated_with_the_flag_named() -> None:
    values = config.resolve(cli._parser().parse_args(["serve", "--max-frame", "0"]), config.SERVE, {})
    with pytest.raises(ConfigError, match="--max-frame must be positive"):
        config.settings({**values, "jwt_secret": "x" * 32})
