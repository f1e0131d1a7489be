"""Settings (docs/configuration.md): environment over file, secrets, validation with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from saiproxy.base.settings import Secret, SettingsError, load_settings

from .conftest import CONFIG, ROOT

BASE = {"SAI_URL": "http://sai.test", "SAI_KEY": "k-123456", "SAI_TEMPLATE_ID": "t1"}


def test_defaults_from_the_shipped_config() -> None:
    settings = load_settings({**BASE, "SAIPROXY_CONFIG": CONFIG})
    assert str(settings.sai_url) == "http://sai.test"
    assert settings.port == 4000
    assert settings.host == "0.0.0.0"
    assert settings.request_timeout == 600
    assert settings.max_retries == 3
    assert settings.max_context_tokens == 128_000
    assert settings.max_body_bytes == 8 * 1024 * 1024
    assert settings.error_mode == "message"
    assert settings.log_format == "json"
    assert settings.log_max_bytes == 5 * 1024 * 1024
    assert settings.log_backups == 3
    assert settings.ping_interval == 15
    assert settings.shutdown_delay == 2
    assert settings.shutdown_timeout == 30
    assert settings.auth_chain == ("metadata", "header", "system_key", "system_cookie")
    assert settings.default_model == "sai-model"
    assert settings.models["sai-model"].template_id == "t1"


def test_builtin_defaults_match_the_shipped_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_settings({**BASE, "SAIPROXY_CONFIG": str(empty)}) == load_settings(
        {**BASE, "SAIPROXY_CONFIG": CONFIG}
    )


def test_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nport = 5000\nerror_mode = "http"\n[upstream]\nmax_retries = 7\n')
    env = {**BASE, "SAIPROXY_CONFIG": str(config), "PORT": "6000"}
    settings = load_settings(env)
    assert (settings.port, settings.error_mode, settings.max_retries) == (6000, "http", 7)


def test_secret_values_never_print() -> None:
    settings = load_settings(
        {**BASE, "SAI_COOKIE": "c-very-secret", "PROXY_API_KEYS": "p-1,p-2",
         "ADMIN_API_KEYS": "adm-1"}
    )  # fmt: skip
    text = repr(settings) + str(settings)
    for secret in ("k-123456", "c-very-secret", "p-1", "p-2", "adm-1"):
        assert secret not in text
    assert Secret("adm-1") in settings.secrets()  # masked in every log line
    assert str(Secret("hunter2")) == "Secret(<7 chars>)"


def test_docker_secret_paths_and_file_variables(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "SAI_KEY").write_text("  key-from-secret\n")
    (secrets / "SAI_COOKIE").write_text("cookie-from-secret\n")
    (secrets / "ADMIN_API_KEYS").write_text("ak-1,ak-2\n")
    keys = tmp_path / "proxy_keys"
    keys.write_text("pk-1, pk-2\n")
    env = {
        "SAI_URL": "http://sai.test",
        "SAI_TEMPLATE_ID": "t",
        "SAI_KEY": f"{secrets}/SAI_KEY",
        "SAI_COOKIE_FILE": str(secrets / "SAI_COOKIE"),
        "PROXY_API_KEYS_FILE": str(keys),
        "ADMIN_API_KEYS": f"{secrets}/ADMIN_API_KEYS",
    }
    settings = load_settings(env, secrets_dir=str(secrets))
    assert settings.sai_key == Secret("key-from-secret")
    assert settings.sai_cookie == Secret("cookie-from-secret")
    assert settings.proxy_api_keys == (Secret("pk-1"), Secret("pk-2"))
    assert settings.admin_api_keys == (Secret("ak-1"), Secret("ak-2"))


def test_missing_secret_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "SAI_KEY": "", "SAI_KEY_FILE": str(tmp_path / "nope")})
    assert caught.value.variable == "SAI_KEY_FILE"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SAI_URL": None}, "SAI_URL"),
        ({"SAI_URL": "ftp://x"}, "SAI_URL"),
        ({"SAI_URL": "not a url"}, "SAI_URL"),
        ({"SAI_KEY": None}, "SAI_KEY"),
        ({"SAI_TEMPLATE_ID": None}, "SAI_TEMPLATE_ID"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"REQUEST_TIMEOUT": "0"}, "REQUEST_TIMEOUT"),
        ({"MAX_RETRIES": "-1"}, "MAX_RETRIES"),
        ({"ERROR_MODE": "loud"}, "ERROR_MODE"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"STRICT_MODELS": "maybe"}, "STRICT_MODELS"),
        ({"VERBOSE_LOGGING": "2"}, "VERBOSE_LOGGING"),
        ({"AUTH_CHAIN": "metadata,magic"}, "AUTH_CHAIN"),
        ({"AUTH_CHAIN": "bearer,system_key", "PROXY_API_KEYS": "pk"}, "PROXY_API_KEYS"),
        ({"SAIPROXY_CONFIG": "/nonexistent/saiproxy.toml"}, "SAIPROXY_CONFIG"),
        ({"WORKERS": "0"}, "WORKERS"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str | None], variable: str) -> None:
    merged: dict[str, str] = {**BASE, "SAIPROXY_CONFIG": CONFIG}
    for name, value in env.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    with pytest.raises(SettingsError) as caught:
        load_settings(merged)
    assert caught.value.variable == variable


def test_cookie_alone_is_enough() -> None:
    env = {**BASE, "SAI_COOKIE": "c=1"}
    del env["SAI_KEY"]
    assert load_settings(env).sai_key is None


def test_every_model_naming_its_template_needs_no_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('default_model = "a"\n[models.a]\ntemplate_id = "ta"\n')
    env = {"SAI_URL": "http://x", "SAI_KEY": "k", "SAIPROXY_CONFIG": str(config)}
    assert load_settings(env).models["a"].template_id == "ta"


def test_bad_toml_is_a_settings_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server\nport=")
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "SAIPROXY_CONFIG": str(config)})
    assert caught.value.variable == "SAIPROXY_CONFIG"


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAI_", "PROXY_"))}
    return subprocess.run(
        [sys.executable, "-m", "saiproxy", *args],
        env={**clean, "SAIPROXY_CONFIG": CONFIG, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "SAI_URL"),
        ({"SAI_URL": "http://x", "SAI_TEMPLATE_ID": "t"}, "SAI_KEY"),
        ({"SAI_URL": "http://x", "SAI_KEY": "secret-k-9", "PORT": "abc"}, "PORT"),
        ({"SAI_URL": "http://x", "SAI_KEY": "secret-k-9", "ERROR_MODE": "x"}, "ERROR_MODE"),
    ],
)
def test_startup_validation_exits_2_with_one_line(env: dict[str, str], variable: str) -> None:
    result = _run_cli(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]
    assert "secret-k-9" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("toml", "named", "closest"),
    [
        ("[server]\nprot = 4001\n", "'prot' in [server]", "did you mean 'port'?"),
        ("[serverr]\nport = 4001\n", "table 'serverr'", "did you mean 'server'?"),
        ("[upstream]\ntemplate_id = 't'\n", "'template_id' in [upstream]", "'sai_template_id'"),
        ("[server]\nmax_retries = 1\n", "'max_retries' in [server]", "belongs in [upstream]"),
        ("defualt_model = 'a'\n", "key 'defualt_model'", "did you mean 'default_model'?"),
        ("[models.m]\ntemplate = 't'\n", "'template' in [models.m]", "'template_id'"),
    ],
)
def test_unknown_config_keys_exit_2_naming_the_closest(
    tmp_path: Path, toml: str, named: str, closest: str
) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(toml)
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "SAIPROXY_CONFIG": str(config)})
    assert named in caught.value.problem and closest in caught.value.problem
    result = _run_cli({**BASE, "SAIPROXY_CONFIG": str(config)})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert str(config) in line and named in line and closest in line


def test_every_key_the_shipped_config_shows_is_known(tmp_path: Path) -> None:
    # Its commented examples too: uncommented, each must be a key saiproxy reads.
    lines = []
    for line in Path(CONFIG).read_text().splitlines():
        example = line.removeprefix("# ")
        lines.append(example if line.startswith("# ") and " = " in example else line)
    uncommented = tmp_path / "uncommented.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    assert "sai_url = " in uncommented.read_text()
    settings = load_settings({**BASE, "SAIPROXY_CONFIG": str(uncommented), "SAI_URL": ""})
    assert str(settings.sai_url) == "https://sai.example.com"


def test_known_config_keys_come_from_the_settings() -> None:
    from saiproxy.base.settings import OPTIONS, unknown_toml_keys

    for option in OPTIONS.values():
        assert unknown_toml_keys({option.section: {option.toml_key: "x"}}) == [], option.env


def test_env_example_and_readme_document_every_variable() -> None:
    from saiproxy.base.settings import OPTIONS

    documented = (ROOT / "config" / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    names = {option.env for option in OPTIONS.values()} | {"SAIPROXY_CONFIG"}
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for name in sorted(names):
        assert f"\n{name}=" in documented, name
        assert f"`{name}`" in readme, name
    del reference  # docs/configuration.md is checked whole below


def _documented_default(value: Any) -> str:
    """Return a built-in default as docs/configuration.md writes it."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple):
        return f"`{','.join(str(item) for item in value)}`" if value else "unset"
    return f"`{value}`"


def test_the_configuration_reference_is_the_settings_table() -> None:
    # A real Markdown table (header, separator, one row per setting) whose
    # variable, table, key and default are the settings' own; its meanings
    # are not copied from row to row.
    from dataclasses import MISSING, fields

    from saiproxy.base.settings import OPTIONS, Settings

    lines = (ROOT / "docs" / "configuration.md").read_text().splitlines()
    start = lines.index("| variable | TOML table and key | default | meaning |")
    assert lines[start + 1] == "|---|---|---|---|"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 4, line
        rows.append(cells)
    defaults = {f.name: f.default for f in fields(Settings)}
    expected = {}
    for name, option in OPTIONS.items():
        default = defaults[name]
        shown = None if default is None or default is MISSING else _documented_default(default)
        expected[f"`{option.env}`"] = (f"`[{option.section}]` `{option.toml_key}`", shown)
    variables = [row[0] for row in rows]
    assert len(variables) == len(set(variables)), "a setting documented twice"
    assert set(variables) == set(expected)
    for variable, where, default, meaning in rows:
        expected_where, expected_default = expected[variable]
        assert where == expected_where, variable
        if expected_default is None:  # no built-in value: the row says what is needed
            assert not default.startswith("`"), variable
        else:
            assert default == expected_default, variable
        assert meaning, variable
    meanings = [row[3] for row in rows]
    assert len(set(meanings)) == len(meanings), "a meaning copied from another row"


def test_the_readme_settings_table_shows_the_built_in_defaults() -> None:
    from dataclasses import MISSING, fields

    from saiproxy.base.settings import OPTIONS, Settings

    defaults = {f.name: f.default for f in fields(Settings)}
    by_variable = {option.env: defaults[name] for name, option in OPTIONS.items()}
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| variable | default | meaning |")
    checked = 0
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        variables, shown, _ = (cell.strip() for cell in line.strip("|").split(" | "))
        names = [name.strip("`") for name in variables.split(", ")]
        values = shown.split(", ")  # one per variable, or one for all
        values = values if len(values) == len(names) else [shown] * len(names)
        for name, value in zip(names, values, strict=True):
            default = by_variable[name]
            if default is not None and default is not MISSING:
                assert value == _documented_default(default), name
                checked += 1
    assert checked >= 25


def test_env_example_loads(tmp_path: Path) -> None:
    env = {}
    for line in (ROOT / "config" / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    env.update(SAI_KEY="k-example", SAI_TEMPLATE_ID="tpl", SAIPROXY_CONFIG=CONFIG)
    settings = load_settings(env)
    assert settings.port == 4000 and settings.error_mode == "message"
