"""OpenTelemetry traces, configured by the standard OTEL_* variables.

With no traces exporter (OTEL_TRACES_EXPORTER unset or `none`) tracing is off and `span()` returns one
shared no-op context manager: the hot path pays a flag check, nothing more. With sampling, a request the
sampler drops makes its root span only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pricer import __version__
from pricer.settings import SettingsError

NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
_propagator = TraceContextTextMapPropagator()


class Tracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer = provider.get_tracer("pricer", __version__) if provider is not None else None

    def span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None:
            return NO_SPAN
        current = trace.get_current_span()
        if current.get_span_context().is_valid and not current.is_recording():
            # Inside a trace the sampler dropped: its children would be dropped too (same trace id, or
            # a parent-based sampler), so skip making and attaching them.
            return NO_SPAN
        return self.tracer.start_as_current_span(name, attributes=dict(attributes or {}))

    def request_span(
        self, name: str, attributes: Mapping[str, Any], headers: Iterable[tuple[bytes, bytes]]
    ) -> contextlib.AbstractContextManager[Any]:
        """The span of an incoming request: a child of the caller's span when the request carries a W3C
        `traceparent` (a gateway calling a backend service: one trace across the services)."""
        if self.tracer is None:
            return NO_SPAN
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        if not carrier:
            return self.tracer.start_as_current_span(name, attributes=dict(attributes))
        parent = _propagator.extract(carrier)
        return self.tracer.start_as_current_span(name, context=parent, attributes=dict(attributes))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def exporter_from_environment(environ: Mapping[str, str] | None = None) -> SpanExporter | None:
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise SettingsError(
                "OTEL_TRACES_EXPORTER: otlp needs the package opentelemetry-exporter-otlp-proto-http"
            ) from None
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    raise SettingsError("OTEL_TRACES_EXPORTER: expected none, console or otlp")


def build_tracing(
    processor: SpanProcessor | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    service_name: str = "api-gateway",
) -> Tracing:
    """Tracing for this process: the given processor (tests), else the OTEL_* exporter, else off.

    The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG as the SDK reads them."""
    if processor is None:
        exporter = exporter_from_environment(environ)
        if exporter is None:
            return Tracing(None)
        processor = BatchSpanProcessor(exporter)
    env = os.environ if environ is None else environ
    # OTEL_SERVICE_NAME wins; else the runbook's name of the role (api-gateway, calculation-service, ...).
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    return Tracing(provider)


def set_route(span_name: str) -> None:
    """Name the current request span after its route template once the route is known."""
    current = trace.get_current_span()
    if current.is_recording():
        current.update_name(span_name)
