"""Python client of the Borrow Rate & Locate Fee Pricing Engine.

from pricer_client import PricerClient
with PricerClient("http://127.0.0.1:8000", api_key) as pricer:
    quote = pricer.quote("AAPL", Decimal("100000"), 30, "demo_client")
    quote.total_fee  # Decimal('456.51'), exactly as the engine sent it
"""

from pricer_client.aio import AsyncAdminClient, AsyncPricerClient
from pricer_client.errors import (
    BackendError,
    BackendTimeout,
    ClientNotFound,
    Conflict,
    Forbidden,
    InternalError,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PricerClientError,
    PricerError,
    RateLimited,
    ServiceUnavailable,
    TickerNotFound,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    ValidationError,
)
from pricer_client.limits import RateLimits
from pricer_client.models import (
    BatchQuote,
    BatchResult,
    Event,
    Position,
    Quote,
    QuoteColumns,
    Rate,
    RateList,
)
from pricer_client.sync import AdminClient, PricerClient

__all__ = [
    "AdminClient",
    "AsyncAdminClient",
    "AsyncPricerClient",
    "BackendError",
    "BackendTimeout",
    "BatchQuote",
    "BatchResult",
    "ClientNotFound",
    "Conflict",
    "Event",
    "Forbidden",
    "InternalError",
    "InvalidParameter",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Position",
    "PricerClient",
    "PricerClientError",
    "PricerError",
    "Quote",
    "QuoteColumns",
    "Rate",
    "RateLimited",
    "RateLimits",
    "RateList",
    "ServiceUnavailable",
    "TickerNotFound",
    "TransportError",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "ValidationError",
]
