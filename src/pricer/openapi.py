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
from pricer.schemas import ErrorBody

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


def build_openapi(routes: Sequence[ApiRoute]) -> dict[str, Any]:
    types: list[Any] = [ErrorBody]
    for route in routes:
        for kind in (route.request_body, route.query, *route.responses.values()):
            if kind is not None:
                types.append(kind)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref = dict(zip([id(kind) for kind in types], schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = _PARAM.sub(r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation: dict[str, Any] = {
                "operationId": f"{route.name}_{method.lower()}",
                "summary": route.summary or route.name,
                "parameters": [
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                    for name in _PARAM.findall(route.path)
                ],
                "responses": {},
            }
            if route.required_scopes is not None:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                operation["description"] = "Scopes: " + " or ".join(
                    sorted(s.value for s in route.required_scopes)
                )
            if route.query is not None and method == "GET":
                props = components[route.query.__name__]["properties"]
                required = set(components[route.query.__name__].get("required", ()))
                operation["parameters"] += [
                    {"name": name, "in": "query", "required": name in required, "schema": schema}
                    for name, schema in props.items()
                ]
            if route.request_body is not None and method in ("POST", "PUT"):
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        media: {"schema": ref[id(route.request_body)]} for media in route.request_media
                    },
                }
            for status, kind in route.responses.items():
                operation["responses"][str(status)] = {
                    "description": "Success" if status < 300 else "",
                    "content": {"application/json": {"schema": ref[id(kind)]}} if kind is not None else {},
                }
            for error in _ERRORS:
                if error.status >= 400 and str(error.status) not in operation["responses"]:
                    operation["responses"][str(error.status)] = {
                        "description": error.code,
                        "content": {"application/json": {"schema": ref[id(ErrorBody)]}},
                    }
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Borrow Rate & Locate Fee Pricing Engine",
            "version": __version__,
            "description": (
                "Borrow rates and locate-fee quotes, exact to the cent. Money is dollars with at most "
                "two decimals; rates are annual fractions. Errors use one envelope (`ErrorBody`)."
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
