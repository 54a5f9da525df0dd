"""A claim's envVars for a warm E2B sandbox go to that sandbox's envd `/init` only: with the
token it already has, to the configured place, never to a host a record names."""

import json

import httpx
import pytest

from sandboxd.api.e2binit import InitFailed, client, envd_url, set_env_vars

pytestmark = pytest.mark.timeout(10)


def recording(status: int = 204, **answer_options) -> tuple[httpx.AsyncClient, list]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, **answer_options)

    return client(transport=httpx.MockTransport(answer)), seen


async def test_env_vars_go_to_the_sandboxs_envd_init_with_its_token():
    http, seen = recording()
    async with http:
        await set_env_vars(http, "iabc123", "tok", {"A": "1"}, sandbox_url=None, domain=None)
        await set_env_vars(
            http, "iabc123", "tok", {"A": "1"}, sandbox_url="http://127.0.0.1:9/", domain="x"
        )
    direct, routed = seen
    assert str(direct.url) == "https://49983-iabc123.e2b.app/init"
    assert str(routed.url) == "http://127.0.0.1:9/init"
    for request in seen:
        assert request.method == "POST"
        assert request.headers["e2b-sandbox-id"] == "iabc123"
        assert request.headers["x-access-token"] == "tok"
        assert json.loads(request.content) == {"envVars": {"A": "1"}, "accessToken": "tok"}


@pytest.mark.parametrize(
    "forged", ["a@evil.example", "a.evil.example", "a/../x", "a#", "", "a b", "-a", "x" * 101]
)
async def test_a_record_cannot_send_them_anywhere_else(forged):
    http, seen = recording()
    async with http:
        with pytest.raises(InitFailed, match="not an E2B sandbox id"):
            await set_env_vars(http, forged, "tok", {"A": "1"}, sandbox_url=None, domain=None)
    assert seen == []
    with pytest.raises(InitFailed):
        envd_url(forged, sandbox_url="http://127.0.0.1:9", domain=None)


@pytest.mark.parametrize("status", [401, 404, 502])
async def test_a_refusal_is_an_error_that_names_no_secret_retryable_only_if_envd_was_busy(
    status,
):
    http, _ = recording(status)
    async with http:
        with pytest.raises(InitFailed) as failed:
            await set_env_vars(
                http, "iabc", "tok-secret", {"K": "v-secret"}, sandbox_url=None, domain=None
            )
    assert str(status) in str(failed.value)
    assert "secret" not in str(failed.value)
    assert failed.value.retryable == (status == 502)


@pytest.mark.parametrize("token", ["t\u00e9", "t\r\nX-Evil: 1", "t" * 600])
async def test_a_token_that_is_not_one_is_refused_before_any_request(token):
    http, seen = recording()
    async with http:
        with pytest.raises(InitFailed, match="access token is not one") as failed:
            await set_env_vars(http, "iabc", token, {}, sandbox_url=None, domain=None)
    assert seen == [] and token not in str(failed.value)


async def test_no_cookie_an_envd_sets_reaches_another():
    http, seen = recording(headers={"set-cookie": "planted=1; Path=/"})
    async with http:
        await set_env_vars(http, "iaaa", "tok", {}, sandbox_url="http://127.0.0.1:9", domain=None)
        await set_env_vars(http, "ibbb", "tok", {}, sandbox_url="http://127.0.0.1:9", domain=None)
    assert "cookie" not in seen[1].headers


async def test_a_sandbox_without_a_token_is_sent_none():
    """envd sets the token /init names: an empty one would lock the SDK out."""
    http, seen = recording()
    async with http:
        await set_env_vars(http, "iabc", "", {"A": "1"}, sandbox_url=None, domain=None)
    assert "x-access-token" not in seen[0].headers
    assert json.loads(seen[0].content) == {"envVars": {"A": "1"}}


async def test_an_unreachable_envd_is_an_error():
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        with pytest.raises(InitFailed, match="not reached: ConnectError"):
            await set_env_vars(http, "iabc", "tok", {}, sandbox_url=None, domain=None)
