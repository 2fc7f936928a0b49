"""The OpenAPI 3.1 document, generated from the routes and the msgspec Structs they use."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from pricer import __version__
from pricer.errors import (
    ClientNotFound,
    Forbidden,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PricerError,
    RateLimitExceeded,
    ServiceUnavailable,
    TickerNotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from pricer.routing import ApiRoute
from pricer.schemas import TICKER_PATTERN, WHOLE_NUMBER, ErrorBody

_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")
_ERRORS: Sequence[type[PricerError]] = (
    InvalidParameter,
    Unauthorized,
    Forbidden,
    NotFound,
    TickerNotFound,
    ClientNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimitExceeded,
    PricerError,
    ServiceUnavailable,
)


# What each path parameter accepts (the endpoints check the same rules; a key or quote id of another form is
# simply not found, 404).
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    # Trimmed, then 1 to 10 characters: the pattern bounds the length (a path has no maxLength check).
    "ticker": {"type": "string", "pattern": TICKER_PATTERN},
    "client_id": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{3,50}$"},
    "key_id": {"type": "string", "pattern": r"^[a-z0-9]{8,16}$"},
    "quote_id": {"type": "string", "pattern": r"^[0-9a-f]{32}$"},
}
_TEXT_BODY = {"type": "string", "description": "The file's content, as the engine's loaders read it"}


# The rules of ClientBody that depend on the fee type (client_from_body checks them): a FLAT amount is dollars
# with at most 2 decimals, a PERCENTAGE one is from 0 to 100.
_CLIENT_FEE_RULES = {
    "if": {"properties": {"transaction_fee_type": {"const": "FLAT"}}},
    "then": {"properties": {"transaction_amount": {"multipleOf": 0.01}}},
    "else": {"properties": {"transaction_amount": {"maximum": 100}}},
}


def _integers(node: Any) -> None:
    """Every schema marked WHOLE_NUMBER becomes `"type": "integer"` (30.0 is one, as the endpoints see it)."""
    if isinstance(node, dict):
        if node.pop(WHOLE_NUMBER, False):
            node["type"] = "integer"
        for value in node.values():
            _integers(value)
    elif isinstance(node, list):
        for value in node:
            _integers(value)


def _query_parameters(route: ApiRoute, method: str, components: dict[str, Any]) -> list[dict[str, Any]]:
    """The route's query Struct as parameters, for the methods that read it (`ApiRoute.query_params`)."""
    if route.query is None or not route.query_params(method):
        return []
    component = components[route.query.__name__]
    required = set(component.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": schema}
        for name, schema in component["properties"].items()
    ]


def build_openapi(routes: Sequence[ApiRoute]) -> dict[str, Any]:
    types: list[Any] = [ErrorBody]
    for route in routes:
        for kind in (route.request_body, route.query, *route.responses.values()):
            # A tuple of Structs is a body of either form (the batch's rows or columns): `oneOf` them.
            types.extend(kind if isinstance(kind, tuple) else () if kind is None else (kind,))
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    by_id = dict(zip([id(kind) for kind in types], schemas, strict=True))

    def schema_of(kind: Any) -> Any:
        if isinstance(kind, tuple):
            return {"oneOf": [by_id[id(one)] for one in kind]}
        return by_id[id(kind)]

    _integers(components)
    if "ClientBody" in components:
        components["ClientBody"]["allOf"] = [_CLIENT_FEE_RULES]

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation: dict[str, Any] = {
                "operationId": f"{route.name}_{method.lower()}",
                "summary": route.summary or route.name,
                "parameters": [
                    {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMS[name]}
                    for name in _PARAM.findall(route.path)
                ]
                + _query_parameters(route, method, components),
                "responses": {},
            }
            if route.required_scopes is not None:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                operation["description"] = "Scopes: " + " or ".join(
                    sorted(s.value for s in route.required_scopes)
                )
            if route.request_body is not None and method in ("POST", "PUT"):
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        media: {"schema": schema_of(route.request_body)} for media in route.request_media
                    },
                }
            elif method == "POST" and route.request_media[0].startswith("text/"):
                # The market-data uploads: the file as a text body.
                operation["requestBody"] = {
                    "required": True,
                    "content": {media: {"schema": _TEXT_BODY} for media in route.request_media},
                }
            for status, kind in route.responses.items():
                operation["responses"][str(status)] = {
                    "description": "Success" if status < 300 else "",
                    "content": {"application/json": {"schema": schema_of(kind)}} if kind is not None else {},
                }
            for error in _ERRORS:
                if error.status >= 400 and str(error.status) not in operation["responses"]:
                    operation["responses"][str(error.status)] = {
                        "description": error.code,
                        "content": {"application/json": {"schema": schema_of(ErrorBody)}},
                    }
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Borrow Rate & Locate Fee Pricing Engine",
            "version": __version__,
            "description": (
                "Borrow rates and locate-fee quotes, exact to the cent. Money is dollars with at most "
                "two decimals; rates are annual fractions. Decimals are counted on the number as written "
                "(100.00999999999999999 has 17, trailing zeros aside; `multipleOf` states each limit); an "
                "integer may be written 30.0. Errors use one envelope (`ErrorBody`)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }
