"""Settings, read from the environment once at start-up into a frozen struct (DESIGN §4).

A bad value stops start-up with one line naming the variable (`SettingsError`). Nothing imports a
settings singleton: `create_app(settings)` receives the struct and hands each part what it needs.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import msgspec

DEV_API_KEY_PEPPER = "dev-only-pepper-not-for-production"
DEV_JWT_SECRET_KEY = "dev-only-jwt-secret-not-for-production"  # noqa: S105 - refused outside dev

log = logging.getLogger("pricer.settings")

T = TypeVar("T")


class Environment(enum.StrEnum):
    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"


class Role(enum.StrEnum):
    ALL = "all"
    GATEWAY = "gateway"
    CALCULATION = "calculation"
    DATA = "data"


class AuditDurability(enum.StrEnum):
    """When an accepted audit record is safe from a SIGKILL (src/pricer/audit.py)."""

    MEMORY = "memory"  # queued in memory, group-committed to the database
    DISK = "disk"  # fsynced to this process's journal before the response


SECRET_FIELDS = frozenset(
    {
        "api_key_pepper",
        "jwt_secret_key",
        "bootstrap_admin_key",
        "internal_service_secret",
        "lender_api_key",
        "volatility_api_key",
        "event_api_key",
    }
)


def _http_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or "@" in url:
        raise ValueError(
            "expected an http:// or https:// URL without credentials (the key goes in *_API_KEY)"
        )
    return url


class SettingsError(ValueError):
    """A variable with a value the engine refuses; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    environment: Environment = Environment.DEV
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    role: Role = Role.ALL
    database_url: str | None = None
    database_schema: str | None = None
    database_pool_size: int = 10
    migrate_on_start: bool = True
    redis_url: str | None = None
    calculation_service_url: str | None = None
    data_service_url: str | None = None
    internal_service_secret: str | None = None
    backend_timeout_seconds: float = 2.0
    backend_batch_timeout_seconds: float = 30.0
    backend_breaker_failures: int = 5
    backend_breaker_open_seconds: float = 10.0
    backend_max_connections: int = 64
    source_timeout_seconds: float = 2.0
    source_max_age_seconds: float = 900.0
    source_cold_fetch_ms: float = 200.0
    source_max_concurrency: int = 8
    # Live market data over HTTP (issue 20, DESIGN §3.1): each provider is enabled by its URL. The keys are
    # secrets: kept out of repr() (see `__repr__`), logs, metrics and health.
    lender_api_url: str | None = None
    lender_api_key: str | None = None
    volatility_api_url: str | None = None
    volatility_api_key: str | None = None
    event_api_url: str | None = None
    event_api_key: str | None = None
    lender_refresh_seconds: float = 60.0
    volatility_refresh_seconds: float = 300.0
    event_refresh_seconds: float = 3600.0
    source_breaker_open_seconds: float = 30.0  # how long a provider's open breaker answers before a probe
    api_key_pepper: str = DEV_API_KEY_PEPPER
    jwt_secret_key: str = DEV_JWT_SECRET_KEY
    jwt_ttl_seconds: int = 900
    jwt_issuer: str = "borrow-rate-engine"
    jwt_audience: str = "borrow-rate-engine-api"
    bootstrap_admin_key: str | None = None
    enable_authentication: bool = True
    enable_rate_limiting: bool = True
    rate_limit_per_minute: int = 60
    rate_limit_burst: int | None = None
    positions_limit_per_minute: int = 1_000_000
    expected_replicas: int = 3
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_batch_body_bytes: int = 128 << 20
    max_batch_size: int = 1_000_000
    slow_request_ms: float = 100.0
    enable_metrics: bool = True
    volatility_factor: str = "0.01"
    volatility_threshold: str = "0"
    default_volatility_index: str = "20"
    event_risk_factor: str = "0.05"
    event_window_days: int = 7
    min_borrow_rate: str = "0.0001"
    max_borrow_rate: str = "10"
    rate_cache_ttl_seconds: float = 300.0
    audit_spool_dir: str | None = None
    shutdown_drain_seconds: float = 5.0
    market_data_stale_after_hours: float = 36.0
    memory_quotes_max_rows: int = 200_000
    demo_keys_file: str | None = ".demo-keys.env"
    seed_demo_data: bool = True
    # ---- audit durability (issue 16) ----
    audit_durability: AuditDurability = AuditDurability.MEMORY
    # keys and authentication availability (issue 16): the key and client caches in front of PostgreSQL
    key_cache_ttl_seconds: float = 60.0
    key_cache_stale_seconds: float = 300.0
    # Connection hygiene, shutdown and several workers (issue 16, server).
    header_read_timeout_seconds: float = 10.0
    body_read_timeout_seconds: float = 30.0
    max_header_bytes: int = 64 << 10
    max_connections: int = 4096
    metrics_multiproc_dir: str | None = None
    # Market data while PostgreSQL is down (issue 16, PostgreSQL outage): rates priced before it stand in.
    rate_cache_stale_seconds: float = 300.0
    # Batches off the event loop (issue 14): worker processes per server process (0: inline), and the body
    # size up to which a batch is handled inline (cheaper than a worker's round trips).
    batch_workers: int = 1
    batch_inline_max_bytes: int = 256 << 10

    def __repr__(self) -> str:
        # Every secret shows as *** (a settings struct in a traceback or a debug line must not leak one).
        shown = (
            f"{name}={'***' if name in SECRET_FIELDS and value is not None else value!r}"
            for name, value in msgspec.structs.asdict(self).items()
        )
        return f"Settings({', '.join(shown)})"

    @property
    def effective_burst(self) -> int:
        return self.rate_limit_burst if self.rate_limit_burst is not None else self.rate_limit_per_minute


_TRUE = {"true", "1"}
_FALSE = {"false", "0"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true/false/1/0")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse


def _decimal_in(low: str, high: str, places: int) -> Callable[[str], str]:
    """Keeps the decimal's text: pricing parameters must stay exact decimals (DESIGN §3)."""

    def parse(raw: str) -> str:
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise ValueError("expected a decimal number") from None
        if not value.is_finite() or not Decimal(low) <= value <= Decimal(high):
            raise ValueError(f"expected a decimal from {low} to {high}")
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int) and -exponent > places:
            raise ValueError(f"expected at most {places} decimals")
        return str(value.normalize()) if value != 0 else "0"

    return parse


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in raw.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"origin {origin!r} must start with http:// or https://")
    return origins


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _enum(kind: type[enum.StrEnum]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return kind(raw.strip().lower())
        except ValueError:
            raise ValueError("expected one of " + ", ".join(member.value for member in kind)) from None

    return parse


def _optional_path(raw: str) -> str | None:
    return raw.strip() or None


def _existing_directory(raw: str) -> str | None:
    path = raw.strip()
    if not path:
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory")
    return path


# variable -> (field, parser)
_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "ENVIRONMENT": ("environment", _enum(Environment)),
    "LOG_LEVEL": ("log_level", _log_level),
    "HOST": ("host", _text),
    "PORT": ("port", _int_in(0, 65535)),
    "WORKERS": ("workers", _int_in(1, 64)),
    "ROLE": ("role", _enum(Role)),
    "DATABASE_URL": ("database_url", _text),
    "DATABASE_SCHEMA": ("database_schema", _text),
    "DATABASE_POOL_SIZE": ("database_pool_size", _int_in(2, 200)),
    "MIGRATE_ON_START": ("migrate_on_start", _bool),
    "REDIS_URL": ("redis_url", _text),
    "CALCULATION_SERVICE_URL": ("calculation_service_url", _text),
    "DATA_SERVICE_URL": ("data_service_url", _text),
    "INTERNAL_SERVICE_SECRET": ("internal_service_secret", _text),
    "BACKEND_TIMEOUT_SECONDS": ("backend_timeout_seconds", _float_in(0.001, 600)),
    "BACKEND_BATCH_TIMEOUT_SECONDS": ("backend_batch_timeout_seconds", _float_in(0.001, 3600)),
    "BACKEND_BREAKER_FAILURES": ("backend_breaker_failures", _int_in(1, 1000)),
    "BACKEND_BREAKER_OPEN_SECONDS": ("backend_breaker_open_seconds", _float_in(0.1, 3600)),
    "BACKEND_MAX_CONNECTIONS": ("backend_max_connections", _int_in(1, 10_000)),
    "SOURCE_TIMEOUT_SECONDS": ("source_timeout_seconds", _float_in(0.001, 600)),
    "SOURCE_MAX_AGE_SECONDS": ("source_max_age_seconds", _float_in(1, 86_400 * 7)),
    "SOURCE_COLD_FETCH_MS": ("source_cold_fetch_ms", _float_in(0, 60_000)),
    "SOURCE_MAX_CONCURRENCY": ("source_max_concurrency", _int_in(1, 1000)),
    "LENDER_API_URL": ("lender_api_url", _http_url),
    "LENDER_API_KEY": ("lender_api_key", _text),
    "VOLATILITY_API_URL": ("volatility_api_url", _http_url),
    "VOLATILITY_API_KEY": ("volatility_api_key", _text),
    "EVENT_API_URL": ("event_api_url", _http_url),
    "EVENT_API_KEY": ("event_api_key", _text),
    "LENDER_REFRESH_SECONDS": ("lender_refresh_seconds", _float_in(0.1, 86_400)),
    "VOLATILITY_REFRESH_SECONDS": ("volatility_refresh_seconds", _float_in(0.1, 86_400)),
    "EVENT_REFRESH_SECONDS": ("event_refresh_seconds", _float_in(0.1, 86_400 * 7)),
    "SOURCE_BREAKER_OPEN_SECONDS": ("source_breaker_open_seconds", _float_in(0.1, 3600)),
    "API_KEY_PEPPER": ("api_key_pepper", _text),
    "JWT_SECRET_KEY": ("jwt_secret_key", _text),
    "JWT_TTL_SECONDS": ("jwt_ttl_seconds", _int_in(60, 86_400)),
    "JWT_ISSUER": ("jwt_issuer", _text),
    "JWT_AUDIENCE": ("jwt_audience", _text),
    "BOOTSTRAP_ADMIN_KEY": ("bootstrap_admin_key", _text),
    "ENABLE_AUTHENTICATION": ("enable_authentication", _bool),
    "ENABLE_RATE_LIMITING": ("enable_rate_limiting", _bool),
    "RATE_LIMIT_PER_MINUTE": ("rate_limit_per_minute", _int_in(1, 10_000_000)),
    "RATE_LIMIT_BURST": ("rate_limit_burst", _int_in(1, 10_000_000)),
    "POSITIONS_LIMIT_PER_MINUTE": ("positions_limit_per_minute", _int_in(1, 1_000_000_000)),
    "EXPECTED_REPLICAS": ("expected_replicas", _int_in(1, 1000)),
    "CORS_ORIGINS": ("cors_origins", _origins),
    "MAX_BODY_BYTES": ("max_body_bytes", _int_in(1024, 1 << 30)),
    "MAX_BATCH_BODY_BYTES": ("max_batch_body_bytes", _int_in(1024, 1 << 32)),
    "MAX_BATCH_SIZE": ("max_batch_size", _int_in(1, 10_000_000)),
    "SLOW_REQUEST_MS": ("slow_request_ms", _float_in(0, 3_600_000)),
    "ENABLE_METRICS": ("enable_metrics", _bool),
    "VOLATILITY_FACTOR": ("volatility_factor", _decimal_in("0", "1", 6)),
    "VOLATILITY_THRESHOLD": ("volatility_threshold", _decimal_in("0", "200", 4)),
    "DEFAULT_VOLATILITY_INDEX": ("default_volatility_index", _decimal_in("0", "200", 4)),
    "EVENT_RISK_FACTOR": ("event_risk_factor", _decimal_in("0", "10", 6)),
    "EVENT_WINDOW_DAYS": ("event_window_days", _int_in(0, 366)),
    "MIN_BORROW_RATE": ("min_borrow_rate", _decimal_in("0", "10", 8)),
    "MAX_BORROW_RATE": ("max_borrow_rate", _decimal_in("0.00000001", "10", 8)),
    "RATE_CACHE_TTL_SECONDS": ("rate_cache_ttl_seconds", _float_in(0, 86_400)),
    "AUDIT_SPOOL_DIR": ("audit_spool_dir", _optional_path),
    "SHUTDOWN_DRAIN_SECONDS": ("shutdown_drain_seconds", _float_in(0, 600)),
    "MARKET_DATA_STALE_AFTER_HOURS": ("market_data_stale_after_hours", _float_in(0, 24 * 365)),
    "MEMORY_QUOTES_MAX_ROWS": ("memory_quotes_max_rows", _int_in(1, 100_000_000)),
    "DEMO_KEYS_FILE": ("demo_keys_file", _optional_path),
    "SEED_DEMO_DATA": ("seed_demo_data", _bool),
    # ---- audit durability (issue 16) ----
    "AUDIT_DURABILITY": ("audit_durability", _enum(AuditDurability)),
    # keys and authentication availability (issue 16)
    "KEY_CACHE_TTL_SECONDS": ("key_cache_ttl_seconds", _float_in(0.1, 3600)),
    "KEY_CACHE_STALE_SECONDS": ("key_cache_stale_seconds", _float_in(0, 86_400)),
    # Connection hygiene, shutdown and several workers (issue 16, server).
    "HEADER_READ_TIMEOUT_SECONDS": ("header_read_timeout_seconds", _float_in(0.1, 3600)),
    "BODY_READ_TIMEOUT_SECONDS": ("body_read_timeout_seconds", _float_in(0.1, 3600)),
    "MAX_HEADER_BYTES": ("max_header_bytes", _int_in(1024, 16 << 20)),
    "MAX_CONNECTIONS": ("max_connections", _int_in(16, 1_000_000)),
    "METRICS_MULTIPROC_DIR": ("metrics_multiproc_dir", _existing_directory),
    # Market data while PostgreSQL is down (issue 16, PostgreSQL outage).
    "RATE_CACHE_STALE_SECONDS": ("rate_cache_stale_seconds", _float_in(0, 86_400)),
    # Batches off the event loop (issue 14).
    "BATCH_WORKERS": ("batch_workers", _int_in(0, 64)),
    "BATCH_INLINE_MAX_BYTES": ("batch_inline_max_bytes", _int_in(0, 1 << 32)),
}


# Every variable the engine reads: what a benchmark or a test scrubs from an inherited environment.
SETTING_NAMES = frozenset(_PARSERS)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and check every variable; raise SettingsError naming the first bad one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for variable, (field, parse) in _PARSERS.items():
        raw = env.get(variable)
        if raw is None or (
            raw.strip() == ""
            and variable not in {"DEMO_KEYS_FILE", "AUDIT_SPOOL_DIR", "METRICS_MULTIPROC_DIR"}
        ):
            continue
        try:
            values[field] = parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{variable}: {exc}") from None
    settings = Settings(**values)
    _check_consistency(settings, env)
    return settings


def _check_consistency(settings: Settings, env: Mapping[str, str]) -> None:
    hardened = settings.environment in (Environment.STAGING, Environment.PROD)
    for variable in ("API_KEY_PEPPER", "JWT_SECRET_KEY"):
        if hardened and not env.get(variable, "").strip():
            raise SettingsError(f"{variable}: required when ENVIRONMENT is {settings.environment.value}")
    if settings.environment is Environment.PROD and not settings.enable_authentication:
        raise SettingsError("ENABLE_AUTHENTICATION: false is refused when ENVIRONMENT is prod")
    if settings.workers > 1 and (settings.database_url is None or settings.redis_url is None):
        raise SettingsError("WORKERS: more than one worker needs DATABASE_URL and REDIS_URL")
    if Decimal(settings.min_borrow_rate) > Decimal(settings.max_borrow_rate):
        raise SettingsError("MIN_BORROW_RATE: must not exceed MAX_BORROW_RATE")
    if "*" in settings.cors_origins and len(settings.cors_origins) > 1:
        raise SettingsError("CORS_ORIGINS: '*' cannot be mixed with named origins")
    _check_role(settings)
    _refuse_development_secrets(settings)


# At least this many characters: the secret signs every internal call's principal (HMAC-SHA256).
MIN_INTERNAL_SECRET_LENGTH = 16


def _check_role(settings: Settings) -> None:
    """A split deployment (DESIGN §1 Roles): the gateway needs where its services are, and every part
    the secret that signs and checks the internal credential. Keys, clients, market data and the audit
    trail are shared through the database, so every part needs DATABASE_URL (in-memory stores would give
    each process its own)."""
    if settings.role is Role.ALL:
        return
    name = settings.role.value
    if settings.role is Role.GATEWAY:
        for variable, value in (
            ("CALCULATION_SERVICE_URL", settings.calculation_service_url),
            ("DATA_SERVICE_URL", settings.data_service_url),
        ):
            if not value:
                raise SettingsError(f"{variable}: required when ROLE is gateway")
            if not value.startswith(("http://", "https://")):
                raise SettingsError(f"{variable}: expected http://host[:port] or https://host[:port]")
    secret = settings.internal_service_secret
    if not secret:
        raise SettingsError(f"INTERNAL_SERVICE_SECRET: required when ROLE is {name}")
    if len(secret) < MIN_INTERNAL_SECRET_LENGTH:
        raise SettingsError(f"INTERNAL_SERVICE_SECRET: at least {MIN_INTERNAL_SECRET_LENGTH} characters")
    if settings.database_url is None:
        raise SettingsError(f"DATABASE_URL: required when ROLE is {name} (the roles share the database)")


def _refuse_development_secrets(settings: Settings) -> None:
    """The development values are published in this repository: anyone could forge admin tokens (JWT
    secret) or test stolen hashes offline (pepper). They are refused wherever keys outlive the process
    (a database holds them) and outside dev. The embedded default (no database, dev) keeps them: its keys
    are random at each start and live only in the process's memory."""
    if settings.database_url is None and settings.environment is Environment.DEV:
        return
    reason = (
        "DATABASE_URL is set"
        if settings.environment is Environment.DEV
        else f"ENVIRONMENT is {settings.environment.value}"
    )
    in_use = development_defaults_in_use(settings)
    if in_use:
        raise SettingsError(f"{in_use[0]}: the development value is refused when {reason}; set a secret")


def development_defaults_in_use(settings: Settings) -> list[str]:
    """Names of the secrets left at their development values (warned about at start-up)."""
    names = []
    if settings.api_key_pepper == DEV_API_KEY_PEPPER:
        names.append("API_KEY_PEPPER")
    if settings.jwt_secret_key == DEV_JWT_SECRET_KEY:
        names.append("JWT_SECRET_KEY")
    return names
