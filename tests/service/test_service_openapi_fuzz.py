"""Fuzz the published OpenAPI contract (schemathesis + hypothesis) against the real server.

Every operation gets a bounded number of generated requests (valid and not); each response
must be no server error, use a documented status code, and match its documented schema.
The schema is the app's own (`create_app(...).openapi()`, no model needed), so the test list
is known at collection time; schemathesis' pytest plugin is not used.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from ovd.service.app import create_app
from ovd.service.settings import Settings

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(model_dir="unused")).openapi())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]
EXAMPLES = 20


# Negative (schema-violating) requests only where there is a body to violate.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if op.method == "post"]


@pytest.mark.parametrize("operation,mode", CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES])
def test_api_contract(operation, mode, server):
    statuses = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=server.url, timeout=30)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 response_schema_conformance])

    check()
    assert statuses  # the generated requests reached the server
