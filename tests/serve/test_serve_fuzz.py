"""Property-based bad input against the OpenAPI schema (schemathesis): no request yields a 500."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from stepsaver.serve import GenerationEngine, ServeSettings, create_app


@pytest.fixture(scope="module")
def fuzz_app(embedded_pipe, trained_recommender):
    from stepsaver.predict import StepRecommender

    engine = GenerationEngine(lambda: embedded_pipe, batch_size=2, batch_wait_ms=5)
    engine.start()  # the ASGI transport below does not run the app's lifespan
    app = create_app(ServeSettings(insecure=True, max_steps=3, request_timeout_s=30), engine=engine,
                     recommender=StepRecommender.load(trained_recommender[0]))
    yield app
    engine.stop()


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case):
    response = case.call()
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text[:300])
    if response.status_code == 422:
        assert "message" in response.json() or "detail" in response.json()
