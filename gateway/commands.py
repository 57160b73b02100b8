"""Command endpoints: validate, publish to JetStream, answer 202 once it is stored."""

from __future__ import annotations

import logging
import uuid
from uuid import UUID

from nats.errors import Error as NatsError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from broker.commands import AnyCommand, publish_command
from domain.commands import CancelRequest, RequestSpec, RerunRequest, RerunSpec, SubmitRequest
from domain.status import RunStatus
from gateway import idempotency, scope
from gateway._http import deps, json_body, path_id
from gateway.auth import current_key
from gateway.errors import ApiError, not_found, validation_failed

log = logging.getLogger(__name__)

# Ids derived from an Idempotency-Key are the same forever, on every gateway.
_IDEMPOTENCY_NAMESPACE = UUID("5b0e7f0e-6f38-4f0b-9d0e-3c1f6a7e2a41")
MAX_IDEMPOTENCY_KEY = 255


async def submit_request(request: Request) -> JSONResponse:
    body = await json_body(request)
    try:
        spec = RequestSpec.model_validate(body)
    except ValidationError as exc:
        raise validation_failed(exc) from None
    scope.check_submit(request, spec.labels)
    key = request.headers.get("idempotency-key")
    if key is not None:
        if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise ApiError(
                400,
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
            )
        request_id = uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"request:{key}")
        run_id = uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"run:{request_id}:1")
        if not await idempotency.claim(deps(request).pool, key, request_id, spec):
            raise ApiError(
                409,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request; use a new key",
            )
    else:
        request_id, run_id = uuid.uuid4(), uuid.uuid4()
    command = SubmitRequest(
        command_id=f"submit:{request_id}",
        request_id=request_id,
        run_id=run_id,
        spec=spec,
        idempotency_key=key,
        submitted_by=current_key(request).id,
    )
    await _publish(request, command)
    return JSONResponse(
        {
            "request_id": str(request_id),
            "run_id": str(run_id),
            "status_url": f"/v1/requests/{request_id}",
        },
        status_code=202,
    )


async def rerun_request(request: Request) -> JSONResponse:
    request_id = path_id(request, "request")
    await scope.check_request(request, request_id)
    body = await json_body(request, optional=True)
    try:
        spec = RerunSpec.model_validate(body)
    except ValidationError as exc:
        raise validation_failed(exc) from None
    status = await _latest_run_status(request, request_id)
    if not status.is_terminal:
        raise ApiError(
            409, "run_active", f"the latest run is {status.value}; wait for it or cancel it first"
        )
    run_id = uuid.uuid4()
    await _publish(
        request,
        RerunRequest(
            command_id=f"rerun:{run_id}",
            request_id=request_id,
            run_id=run_id,
            prompt=spec.prompt,
            requested_by=current_key(request).id,
        ),
    )
    return JSONResponse({"request_id": str(request_id), "run_id": str(run_id)}, status_code=202)


async def cancel_request(request: Request) -> JSONResponse:
    request_id = path_id(request, "request")
    await scope.check_request(request, request_id)
    status = await _latest_run_status(request, request_id)
    if status.is_terminal:
        raise ApiError(
            409, "nothing_active", f"the latest run is {status.value}; there is nothing to cancel"
        )
    existing = await deps(request).views.get_request(request_id)
    assert existing is not None
    await _publish(
        request,
        CancelRequest(
            command_id=f"cancel:{uuid.uuid4()}",
            request_id=request_id,
            run_id=UUID(existing["latest_run_id"]),
            requested_by=current_key(request).id,
        ),
    )
    return JSONResponse(
        {"request_id": str(request_id), "run_id": existing["latest_run_id"]}, status_code=202
    )


async def _latest_run_status(request: Request, request_id: UUID) -> RunStatus:
    status = await deps(request).views.latest_run_status(request_id)
    if status is None:
        raise not_found("request", str(request_id))
    return RunStatus(status)


async def _publish(request: Request, command: AnyCommand) -> None:
    try:
        await publish_command(deps(request).js, command)
    except (NatsError, TimeoutError) as exc:
        log.warning("command %s not stored: %s", command.command_id, exc)
        raise ApiError(
            503,
            "broker_unavailable",
            "the command could not be stored (NATS JetStream unavailable); "
            "nothing was recorded, retry later",
        ) from None
