"""A bounded schemathesis run: generated requests for every operation, against a live server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from edge_kit import TOKEN, live_server, settings_for, write_model
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from edge_client.service.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 25


def fuzz(operation: Any, base: str, tried: dict[str, int]) -> None:
    """Send generated requests for one operation and validate every answer."""
    headers = {"Authorization": f"Bearer {TOKEN}"}

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case[Any]) -> None:
        # No 5xx, documented status codes and content types, bodies match their schemas.
        # Rules JSON Schema cannot state (a timestamp at most a day ahead of *now*, ``value``
        # exactly for ratings) make some schema-valid events 422s, so positive-data
        # acceptance is not checked; every other default check is.
        case.call_and_validate(
            base_url=base, headers=headers, excluded_checks=[positive_data_acceptance]
        )
        tried[operation.label] = tried.get(operation.label, 0) + 1

    run()


def test_every_operation_honours_its_openapi_schema(site: Path) -> None:
    # Arrange: a served model, so that recommendations exercise the ORT path
    write_model(site / "models", "v1")
    config = settings_for(site)
    schema = schemathesis.openapi.from_dict(create_app(config).openapi())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    tried: dict[str, int] = {}
    # Act / Assert
    with live_server(config) as base:
        for operation in operations:
            fuzz(operation, base, tried)
    assert len(tried) == len(operations) >= 10
