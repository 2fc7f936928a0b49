from __future__ import annotations

import pytest

from tests.conftest import Engine

pytestmark = pytest.mark.anyio


async def test_published_vector_through_the_api(engine: Engine) -> None:
    response = await engine.client.post(
        "/api/v1/calculate-locate",
        json={"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"},
        headers=engine.as_client(),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["borrow_rate_used"] == 0.003
    assert body["breakdown"] == {"borrow_cost": 24.66, "markup": 1.23, "transaction_fees": 25.0}
