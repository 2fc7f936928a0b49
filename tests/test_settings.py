"""Settings from the environment (DESIGN §4): defaults, a bad value names its variable, the hardened
environments' requirements, and the CLI refusing to start on a bad value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pricer.settings import (
    DEV_API_KEY_PEPPER,
    DEV_JWT_SECRET_KEY,
    AuditDurability,
    Environment,
    SettingsError,
    load_settings,
)

SECRETS = {"API_KEY_PEPPER": "a-real-pepper-0123456789", "JWT_SECRET_KEY": "a-real-jwt-secret-0123456789"}
SECRETS_BUT_JWT = {"API_KEY_PEPPER": SECRETS["API_KEY_PEPPER"]}


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.environment is Environment.DEV
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 1)
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.calculation_service_url is None
    assert settings.data_service_url is None
    assert settings.enable_authentication is True
    assert settings.enable_rate_limiting is True
    assert settings.rate_limit_per_minute == 60
    assert settings.effective_burst == 60
    assert settings.positions_limit_per_minute == 1_000_000
    assert settings.expected_replicas == 3
    assert settings.cors_origins == ()
    assert settings.max_body_bytes == 1 << 20
    assert settings.max_batch_body_bytes == 128 << 20
    assert settings.max_batch_size == 1_000_000
    assert settings.slow_request_ms == 100
    assert settings.volatility_factor == "0.01"
    assert settings.volatility_threshold == "0"
    assert settings.default_volatility_index == "20"
    assert settings.event_risk_factor == "0.05"
    assert settings.event_window_days == 7
    assert settings.min_borrow_rate == "0.0001"
    assert settings.max_borrow_rate == "10"
    assert settings.rate_cache_ttl_seconds == 300
    assert settings.jwt_ttl_seconds == 900
    assert settings.shutdown_drain_seconds == 5
    assert settings.market_data_stale_after_hours == 36
    assert settings.bootstrap_admin_key is None
    assert (settings.key_cache_ttl_seconds, settings.key_cache_stale_seconds) == (60, 300)
    # dev defaults to fixed development secrets (so keys survive restarts)
    assert settings.api_key_pepper == DEV_API_KEY_PEPPER
    assert settings.jwt_secret_key == DEV_JWT_SECRET_KEY


def test_values_are_read() -> None:
    settings = load_settings(
        {
            "ENVIRONMENT": "staging",
            **SECRETS,
            "HOST": "0.0.0.0",
            "PORT": "9001",
            "RATE_LIMIT_PER_MINUTE": "120",
            "RATE_LIMIT_BURST": "30",
            "MAX_BATCH_SIZE": "5000",
            "VOLATILITY_FACTOR": "0.02",
            "MIN_BORROW_RATE": "0.00025",
            "EVENT_WINDOW_DAYS": "14",
            "SLOW_REQUEST_MS": "0",
        }
    )
    assert settings.environment is Environment.STAGING
    assert (settings.host, settings.port) == ("0.0.0.0", 9001)
    assert (settings.rate_limit_per_minute, settings.effective_burst) == (120, 30)
    assert settings.max_batch_size == 5000
    assert settings.volatility_factor == "0.02"
    assert settings.min_borrow_rate == "0.00025"
    assert settings.event_window_days == 14
    assert settings.slow_request_ms == 0
    assert settings.api_key_pepper == SECRETS["API_KEY_PEPPER"]
    assert settings.jwt_secret_key == SECRETS["JWT_SECRET_KEY"]


BAD_VALUES = [
    ("ENVIRONMENT", "production"),
    ("ENVIRONMENT", "test"),
    ("LOG_LEVEL", "LOUD"),
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("PORT", "-1"),
    ("PORT", "80.5"),
    ("WORKERS", "0"),
    ("WORKERS", "many"),
    ("ROLE", "everything"),
    ("JWT_TTL_SECONDS", "0"),
    ("JWT_TTL_SECONDS", "ten"),
    ("ENABLE_AUTHENTICATION", "maybe"),
    ("ENABLE_AUTHENTICATION", "2"),
    ("ENABLE_RATE_LIMITING", "enabled"),
    ("RATE_LIMIT_PER_MINUTE", "0"),
    ("RATE_LIMIT_PER_MINUTE", "-5"),
    ("RATE_LIMIT_PER_MINUTE", "1.5"),
    ("RATE_LIMIT_BURST", "0"),
    ("RATE_LIMIT_BURST", "lots"),
    ("POSITIONS_LIMIT_PER_MINUTE", "0"),
    ("EXPECTED_REPLICAS", "0"),
    ("CORS_ORIGINS", "example.com"),
    ("CORS_ORIGINS", "ftp://example.com"),
    ("CORS_ORIGINS", "*,https://example.com"),
    ("MAX_BODY_BYTES", "-1"),
    ("MAX_BODY_BYTES", "1MB"),
    ("MAX_BATCH_BODY_BYTES", "0"),
    ("MAX_BATCH_SIZE", "0"),
    ("MAX_BATCH_SIZE", "1e6"),
    ("SLOW_REQUEST_MS", "-1"),
    ("SLOW_REQUEST_MS", "fast"),
    ("SLOW_REQUEST_MS", "nan"),
    ("VOLATILITY_FACTOR", "abc"),
    ("VOLATILITY_FACTOR", "-0.01"),
    ("VOLATILITY_FACTOR", "NaN"),
    ("VOLATILITY_THRESHOLD", "-1"),
    ("VOLATILITY_THRESHOLD", "Infinity"),
    ("DEFAULT_VOLATILITY_INDEX", "201"),
    ("DEFAULT_VOLATILITY_INDEX", "twenty"),
    ("EVENT_RISK_FACTOR", "x"),
    ("EVENT_RISK_FACTOR", "-0.05"),
    ("EVENT_WINDOW_DAYS", "-1"),
    ("EVENT_WINDOW_DAYS", "7.5"),
    ("MIN_BORROW_RATE", "-0.0001"),
    ("MIN_BORROW_RATE", "0.000000001"),
    ("MIN_BORROW_RATE", "11"),
    ("MAX_BORROW_RATE", "0"),
    ("MAX_BORROW_RATE", "11"),
    ("MAX_BORROW_RATE", "ten"),
    ("RATE_CACHE_TTL_SECONDS", "-1"),
    ("RATE_CACHE_TTL_SECONDS", "forever"),
    ("SHUTDOWN_DRAIN_SECONDS", "-1"),
    ("SHUTDOWN_DRAIN_SECONDS", "soon"),
    ("MARKET_DATA_STALE_AFTER_HOURS", "-1"),
    ("MARKET_DATA_STALE_AFTER_HOURS", "stale"),
    ("KEY_CACHE_TTL_SECONDS", "0"),
    ("KEY_CACHE_TTL_SECONDS", "forever"),
    ("KEY_CACHE_STALE_SECONDS", "-1"),
    ("KEY_CACHE_STALE_SECONDS", "100000"),
    ("RATE_CACHE_STALE_SECONDS", "-1"),
    ("RATE_CACHE_STALE_SECONDS", "100000"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_raises_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({variable: value})
    message = str(raised.value)
    assert message.startswith(variable), message
    assert "\n" not in message


def test_min_rate_above_max_rate_is_refused() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"MIN_BORROW_RATE": "0.5", "MAX_BORROW_RATE": "0.25"})
    assert str(raised.value).startswith(("MIN_BORROW_RATE", "MAX_BORROW_RATE"))


@pytest.mark.parametrize("environment", ["staging", "prod"])
@pytest.mark.parametrize("missing", ["API_KEY_PEPPER", "JWT_SECRET_KEY"])
def test_secrets_are_required_in_hardened_environments(environment: str, missing: str) -> None:
    given = {name: value for name, value in SECRETS.items() if name != missing}
    for environ in (
        {"ENVIRONMENT": environment, **given},
        {"ENVIRONMENT": environment, **given, missing: "  "},
    ):
        with pytest.raises(SettingsError) as raised:
            load_settings(environ)
        assert str(raised.value).startswith(missing)
    settings = load_settings({"ENVIRONMENT": environment, **SECRETS})
    assert settings.environment.value == environment


@pytest.mark.parametrize(
    "where",
    [{"DATABASE_URL": "postgresql://db/pricer"}, {"ENVIRONMENT": "staging"}, {"ENVIRONMENT": "prod"}],
)
@pytest.mark.parametrize("variable", ["API_KEY_PEPPER", "JWT_SECRET_KEY"])
def test_development_secrets_are_refused_with_a_database_or_outside_dev(
    where: dict[str, str], variable: str
) -> None:
    """Issue 16: the published development values let anyone forge admin tokens; refused whether left
    unset (the default) or set explicitly, wherever keys outlive the process or outside dev."""
    development = {"API_KEY_PEPPER": DEV_API_KEY_PEPPER, "JWT_SECRET_KEY": DEV_JWT_SECRET_KEY}
    others = {name: value for name, value in SECRETS.items() if name != variable}
    for environ in ({**where, **others}, {**where, **others, variable: development[variable]}):
        with pytest.raises(SettingsError) as raised:
            load_settings(environ)
        assert str(raised.value).startswith(variable), raised.value
    assert load_settings({**where, **SECRETS}).jwt_secret_key == SECRETS["JWT_SECRET_KEY"]


def test_development_secrets_stay_in_the_embedded_default() -> None:
    """No database and dev: the quick start stays one command (its keys live in the process only)."""
    settings = load_settings({"REDIS_URL": "redis://cache:6379/0"})
    assert (settings.api_key_pepper, settings.jwt_secret_key) == (DEV_API_KEY_PEPPER, DEV_JWT_SECRET_KEY)


def test_secrets_are_not_echoed_in_errors() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"ENVIRONMENT": "prod", "API_KEY_PEPPER": SECRETS["API_KEY_PEPPER"]})
    assert SECRETS["API_KEY_PEPPER"] not in str(raised.value)


def test_authentication_off_is_refused_in_prod_only() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"ENVIRONMENT": "prod", **SECRETS, "ENABLE_AUTHENTICATION": "false"})
    assert str(raised.value).startswith("ENABLE_AUTHENTICATION")
    assert load_settings({"ENABLE_AUTHENTICATION": "false"}).enable_authentication is False
    staging = load_settings({"ENVIRONMENT": "staging", **SECRETS, "ENABLE_AUTHENTICATION": "0"})
    assert staging.enable_authentication is False


@pytest.mark.parametrize(
    "extra",
    [{}, {"DATABASE_URL": "postgresql://db/pricer"}, {"REDIS_URL": "redis://cache:6379/0"}],
)
def test_several_workers_need_database_and_redis(extra: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"WORKERS": "2", **extra})
    assert str(raised.value).startswith("WORKERS")


def test_several_workers_with_database_and_redis() -> None:
    settings = load_settings(
        {
            "WORKERS": "4",
            "DATABASE_URL": "postgresql://db/pricer",
            "REDIS_URL": "redis://cache:6379/0",
            **SECRETS,
        }
    )
    assert settings.workers == 4
    assert settings.database_url == "postgresql://db/pricer"
    assert settings.redis_url == "redis://cache:6379/0"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("TRUE", True),
        ("False", False),
        (" true ", True),
    ],
)
@pytest.mark.parametrize("variable", ["ENABLE_AUTHENTICATION", "ENABLE_RATE_LIMITING"])
def test_booleans(variable: str, raw: str, value: bool) -> None:
    settings = load_settings({variable: raw})
    field = variable.lower()
    assert getattr(settings, field) is value


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        ("https://a.example", ("https://a.example",)),
        ("https://a.example,http://b.example:8080", ("https://a.example", "http://b.example:8080")),
        (" https://a.example , https://b.example/ ,", ("https://a.example", "https://b.example")),
        ("*", ("*",)),
    ],
)
def test_cors_origins_is_a_comma_separated_list(raw: str, origins: tuple[str, ...]) -> None:
    assert load_settings({"CORS_ORIGINS": raw}).cors_origins == origins


def test_burst_defaults_to_the_rate() -> None:
    settings = load_settings({"RATE_LIMIT_PER_MINUTE": "500"})
    assert settings.effective_burst == 500


def test_decimal_factors_stay_exact_text() -> None:
    settings = load_settings(
        {"VOLATILITY_FACTOR": "0.010", "EVENT_RISK_FACTOR": "0.1", "MAX_BORROW_RATE": "5.00"}
    )
    assert settings.volatility_factor in ("0.01", "0.010")
    assert settings.event_risk_factor == "0.1"
    assert settings.max_borrow_rate in ("5", "5.00")


def clean_environment(**extra: str) -> dict[str, str]:
    variables = {
        "ENVIRONMENT", "LOG_LEVEL", "HOST", "PORT", "WORKERS", "DATABASE_URL", "REDIS_URL", "API_KEY_PEPPER",
        "JWT_SECRET_KEY", "BOOTSTRAP_ADMIN_KEY", "DEMO_KEYS_FILE",
    }  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in variables and not k.startswith("PRICER_")}
    return {**base, **extra}


@pytest.mark.parametrize(
    ("variable", "value", "extra"),
    [
        ("PORT", "abc", {}),
        ("WORKERS", "0", {}),
        ("ENVIRONMENT", "qa", {}),
        # a database with no secrets set: refused before any connection is tried
        ("API_KEY_PEPPER", "", {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}),
        ("JWT_SECRET_KEY", "", {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none", **SECRETS_BUT_JWT}),
    ],
)
def test_cli_serve_refuses_a_bad_value_with_one_line(
    variable: str, value: str, extra: dict[str, str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pricer", "serve"],
        env=clean_environment(**{variable: value}, **extra, DEMO_KEYS_FILE=""),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


# ---- audit durability (issue 16) ----


def test_audit_durability() -> None:
    assert load_settings({}).audit_durability is AuditDurability.MEMORY
    assert load_settings({"AUDIT_DURABILITY": " Disk "}).audit_durability is AuditDurability.DISK
    with pytest.raises(SettingsError) as raised:
        load_settings({"AUDIT_DURABILITY": "fsync"})
    assert str(raised.value).startswith("AUDIT_DURABILITY: expected one of memory, disk")
