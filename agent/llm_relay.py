"""Carries a session's llm_query() calls to the controller that owns the run."""

from __future__ import annotations

from kowalski.common.client import SignedClient
from kowalski.common.errors import KowalskiError
from kowalski.common.messages import LlmAnswer, LlmCallback, LlmQuery


class LlmRelay:
    """The session manager's llm_handler: one signed POST per llm_query call."""

    def __init__(self, client: SignedClient, *, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s

    async def __call__(self, callback: LlmCallback, prompts: list[str], model: str = ""
                       ) -> list[str]:
        query = LlmQuery(token=callback.token, prompts=prompts, model=model)
        answer = await self._client.call(
            "POST", callback.url, LlmAnswer, query,
            timeout_s=self._timeout_s,
        )
        if answer.error is not None:
            raise KowalskiError(f"llm_query failed: {answer.error.message}")
        if len(answer.answers) != len(prompts):
            raise KowalskiError(
                f"llm_query got {len(answer.answers)} answers for {len(prompts)} prompts")
        return answer.answers
