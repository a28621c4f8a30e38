"""Client for exo's HTTP API (v1 and v0) and for any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import quote, urlencode

import aiohttp
import msgspec

from kowalski.common.errors import ExoApiError, KowalskiError, NetworkError, ParseError
from kowalski.controller.models.chat_types import (
    ChatDelta,
    ChatRequest,
    ChatResult,
    Usage,
    WireCompletion,
    encode_request,
)
from kowalski.controller.models.exo_connection import (
    CHAT_PATH,
    READY_PARTS,
    ClientStats,
    EndpointConnection,
)
from kowalski.controller.models.exo_errors import (
    ExoTimeoutError,
    IncompleteAnswerError,
    IncompleteStreamError,
    InstanceFailedError,
    InstanceNotReadyError,
    ModelMismatchError,
    ModelNotServedError,
    PlacementError,
    http_error,
    in_band_error,
)
from kowalski.controller.models.exo_stream import StreamTally, read_stream
from kowalski.controller.models.exo_types import (
    ClusterState,
    InstanceId,
    ModelId,
    ModelInfo,
    PlacementResult,
    decode,
    parse_instance,
)
from kowalski.controller.models.exo_v0 import (
    check_model,
    enforce_limits,
    model_error,
    one_token_per_chunk,
)

__all__ = ["CHAT_PATH", "ClientStats", "ExoClient"]

Sharding = Literal["Pipeline", "Tensor"]
InstanceMeta = Literal["MlxRing", "MlxJaccl"]


class _CommandAnswer(msgspec.Struct, frozen=True, kw_only=True):
    command_id: str
    message: str = ""



class ExoClient(EndpointConnection):
    """One endpoint: flavour detection, cluster view, chat, and instance placement."""

    # --- chat ------------------------------------------------------------------------------

    def _count_tokens(self, usage: Usage | None) -> None:
        if usage is not None:
            self.stats.prompt_tokens += usage.prompt_tokens
            self.stats.completion_tokens += usage.completion_tokens

    def _refusal(self, error: KowalskiError, model: str) -> KowalskiError:
        """Type an answer refusing the model, and remember the refusal."""
        if isinstance(error, ExoApiError):
            error = model_error(error, model)
        if isinstance(error, ModelNotServedError | ModelMismatchError):
            self.served.refused(model)
        return error

    async def chat(self, request: ChatRequest) -> ChatResult:
        """One completion, waited for whole; an answer from another model is an error."""
        await self.detect()
        body = encode_request(request, stream=False)
        url = self.base_url + CHAT_PATH
        try:
            data, latency_ms = await self._call("POST", CHAT_PATH, body=body, first_byte=True)
            answer = self._parse(lambda d, s: decode(d, WireCompletion, s), data, CHAT_PATH)
            if answer.error_text() is not None:
                raise self._failed(in_band_error(answer, data, url))
            if not answer.choices:
                raise self._failed(ParseError(f"{url}: the answer has no choices"))
            check_model(request.model, answer.model, self.base_url)
            if answer.choices[0].finish_reason is None:
                # exo answers 200 with the partial text when the request is cancelled or
                # its instance deleted mid-generation: that text is not the answer.
                partial = answer.choices[0].content()
                raise self._failed(IncompleteAnswerError(
                    f"POST {url}", "200 without a finish_reason", partial))
        except ModelMismatchError as exc:
            raise self._failed(self._refusal(exc, request.model)) from None
        except KowalskiError as exc:
            raise self._refusal(exc, request.model) from None
        self.served.answered(request.model)
        choice = answer.choices[0]
        text, finish, usage = enforce_limits(
            choice.content(), choice.finish_reason, answer.usage, request)
        self._count_tokens(usage)
        return ChatResult(
            text=text, finish_reason=finish, usage=usage, latency_ms=latency_ms,
            endpoint=self.base_url, id=answer.id, model=answer.model, reasoning=choice.reasoning(),
        )

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """A streamed completion: text pieces as they come, then one done=True item with totals."""
        flavour = await self.detect()
        url = self.base_url + CHAT_PATH
        # llama-server reports usage in a stream only when asked to.
        extra = {"stream_options": {"include_usage": True}} if flavour == "openai" else None
        body = encode_request(request, stream=True, extra=extra)
        self.stats.requests += 1
        started = time.monotonic()
        tally = StreamTally()
        # Where a chunk is a token, max_tokens is kept here: the server may ignore it.
        limit = request.max_tokens if one_token_per_chunk(flavour) else None
        pieces = 0
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open(stack, "POST", url, body, first_byte=True)
                if response.status >= 400:
                    raise http_error(response.status, await response.read(), url)
                async with contextlib.aclosing(read_stream(response, url, tally)) as texts:
                    async for text, reasoning in texts:
                        if pieces == 0:
                            check_model(request.model, tally.model, self.base_url)
                        pieces += 1
                        yield ChatDelta(text=text, reasoning=reasoning, id=tally.completion_id)
                        if limit is not None and pieces >= limit:
                            tally.finish = tally.finish or "length"
                            break
        except KowalskiError as exc:
            raise self._failed(self._refusal(exc, request.model)) from None
        except TimeoutError as exc:
            limit_s = self._timeout.total
            timeout = ExoTimeoutError(f"POST {url}: stream not done within {limit_s:g} s")
            raise self._failed(timeout) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            broken = IncompleteStreamError(f"POST {url}", f"the stream broke off ({exc})",
                                           tally.arrived)
            raise self._failed(broken) from exc
        except aiohttp.ClientError as exc:
            raise self._failed(NetworkError(f"POST {url} failed: {exc}")) from exc
        # exo v0 ends a stream after the finish_reason chunk; the others then send [DONE].
        capped = limit is not None and pieces >= limit
        if tally.finish is None or (flavour != "v0" and not tally.done and not capped):
            missing = "a finish_reason" if tally.finish is None else "[DONE]"
            raise self._failed(IncompleteStreamError(
                f"POST {url}", f"the stream ended without {missing}", tally.arrived))
        self.served.answered(request.model)
        latency_ms = (time.monotonic() - started) * 1000
        self.stats.total_latency_ms += latency_ms
        self._count_tokens(tally.usage)
        yield ChatDelta(
            done=True, finish_reason=tally.finish, usage=tally.usage, latency_ms=latency_ms,
            endpoint=self.base_url, id=tally.completion_id,
        )

    # --- placement (exo v1) ----------------------------------------------------------------

    async def place_instance(
        self,
        model_id: str,
        *,
        sharding: Sharding = "Pipeline",
        instance_meta: InstanceMeta = "MlxRing",
        min_nodes: int = 1,
    ) -> PlacementResult:
        """Place an instance (exo's placement, then exactly that instance); see wait_ready."""
        await self._require_v1("place_instance")
        query = urlencode({"model_id": model_id, "sharding": sharding,
                           "instance_meta": instance_meta, "min_nodes": min_nodes})
        try:
            # A synchronous answer: a placement exo cannot make is refused here, with its
            # reason, instead of only in the master's log after "Command received.".
            instance, _ = await self._call("GET", f"/instance/placement?{query}")
        except ExoApiError as exc:
            if exc.status == 404 and "Not Found" in exc.body:
                return await self._place_by_command(model_id, sharding, instance_meta, min_nodes)
            raise PlacementError(exc.status, exc.body, url=exc.url, model_id=model_id) from None
        instance_id = self._parse(parse_instance, instance, "/instance/placement")
        try:
            data, _ = await self._call("POST", "/instance", body=b'{"instance":%s}' % instance)
        except ExoApiError as exc:
            raise PlacementError(exc.status, exc.body, url=exc.url, model_id=model_id) from None
        answer = self._parse(lambda d, s: decode(d, _CommandAnswer, s), data, "/instance")
        return PlacementResult(command_id=answer.command_id, message=answer.message,
                               model_id=ModelId(model_id), instance_id=instance_id)

    async def _place_by_command(
        self, model_id: str, sharding: Sharding, instance_meta: InstanceMeta, min_nodes: int,
    ) -> PlacementResult:
        """An exo without /instance/placement: POST /place_instance, instance id unknown."""
        body = msgspec.json.encode({
            "model_id": model_id, "sharding": sharding, "instance_meta": instance_meta,
            "min_nodes": min_nodes,
        })
        try:
            data, _ = await self._call("POST", "/place_instance", body=body)
        except ExoApiError as exc:
            raise PlacementError(exc.status, exc.body, url=exc.url, model_id=model_id) from None
        answer = self._parse(lambda d, s: decode(d, _CommandAnswer, s), data, "/place_instance")
        return PlacementResult(
            command_id=answer.command_id, message=answer.message, model_id=ModelId(model_id),
        )

    async def get_instance(self, instance_id: str) -> InstanceId:
        """Whether exo knows the instance: its id, or a 404 ExoApiError."""
        await self._require_v1("get_instance")
        path = f"/instance/{quote(instance_id, safe='')}"
        data, _ = await self._call("GET", path)
        return self._parse(parse_instance, data, path)

    async def delete_instance(self, instance_id: str) -> str:
        """Ask exo to shut an instance down; returns the command id."""
        await self._require_v1("delete_instance")
        path = f"/instance/{quote(instance_id, safe='')}"
        data, _ = await self._call("DELETE", path)
        return self._parse(lambda d, s: decode(d, _CommandAnswer, s), data, path).command_id

    async def cancel(self, command_id: str) -> bool:
        """Stop a generation by its chat id; False when it had already finished."""
        await self._require_v1("cancel")
        try:
            await self._call("POST", f"/v1/cancel/{quote(command_id, safe='')}")
        except ExoApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def wait_ready(
        self, model_id: str, timeout_s: float, *, poll_interval_s: float | None = None,
        instance_id: str | None = None,
    ) -> ModelInfo:
        """Poll until the model can answer (exo v1: an instance with every runner Ready).

        With `instance_id` (from place_instance), wait for that instance; a runner of it that
        fails raises InstanceFailedError at once, with the runner's error.
        """
        interval = poll_interval_s if poll_interval_s is not None else self.poll_interval_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        detail = "no answer yet"
        while True:
            try:
                if await self.detect() == "v1":
                    # One snapshot gives both the answer and, failing that, the reason.
                    state = await self.state(READY_PARTS)
                    ready, detail = state.ready_models(), state.describe_model(model_id)
                    if instance_id is not None:
                        ready = _placed(state, model_id, instance_id)
                else:
                    ready, detail = await self.ready_models(), "not listed as ready"
            except KowalskiError as exc:
                if not exc.is_recoverable:
                    raise
                ready, detail = [], exc.message
            for model in ready:
                if model.model_id == model_id:
                    return model
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InstanceNotReadyError(model_id, timeout_s, detail)
            await asyncio.sleep(min(interval, remaining))


def _placed(state: ClusterState, model_id: str, instance_id: str) -> list[ModelInfo]:
    """The model as served by one instance once its runners are Ready; raise if one failed."""
    instance = state.instances.get(InstanceId(instance_id))
    if instance is None:
        return []
    runners = [state.runners.get(r) for r in instance.runner_ids]
    failed = [r for r in runners if r is not None and r.status == "Failed"]
    if failed:
        errors = "; ".join(r.error_message or "no error message" for r in failed)
        raise InstanceFailedError(model_id, instance_id, f"runner Failed: {errors}")
    if not state.instance_ready(instance):
        return []
    return [ModelInfo(model_id=instance.model_id, ready=True,
                      name=instance.model_id.rsplit("/", 1)[-1],
                      context_length=instance.context_length, instance_ids=(instance.instance_id,))]
