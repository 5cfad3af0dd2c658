"""Refusing malformed requests to `/slack/events` before bolt sees them, fast and with a
4xx: Slack retries a 5xx or a slow answer, so every request bolt would fail on (bytes
that are not UTF-8, JSON that is not an object or is nested absurdly deep, envelope fields
of the wrong type, a timestamp that is not a number) would otherwise cost three deliveries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

log = logging.getLogger(__name__)

MAX_JSON_DEPTH = 32
# Envelope fields bolt reads, and the type each must have when present.
_OPTIONAL_STR = (str, type(None))
EVENT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "token": str,
    "team_id": str,
    "api_app_id": str,
    "event_id": str,
    "event_time": int,
    "event_context": str,
    "event": dict,
    "authorizations": list,
    "enterprise_id": _OPTIONAL_STR,
    "context_team_id": _OPTIONAL_STR,
    "context_enterprise_id": _OPTIONAL_STR,
    "is_ext_shared_channel": bool,
    "challenge": str,
}
AUTHORIZATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "enterprise_id": _OPTIONAL_STR,
    "team_id": _OPTIONAL_STR,
    "user_id": str,
    "is_bot": bool,
    "is_enterprise_install": bool,
}
# Fields of the inner event bolt reads before any listener runs.
INNER_EVENT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "subtype": str,
    "user": (str, dict),
    "channel": (str, dict),
    "team": str,
    "ts": str,
    "thread_ts": str,
    "event_ts": str,
    "text": str,
    "bot_id": str,
    "channel_type": str,
}
INTERACTION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "user": dict,
    "team": (dict, type(None)),
    "channel": (dict, type(None)),
    "actions": list,
    "container": dict,
    "message": dict,
    "api_app_id": str,
    "trigger_id": str,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_with(headers: Any, body: bytes) -> tuple[int, str] | None:
    """(status, reason) for a request bolt must not see; None for one it may."""
    timestamp = str(headers.get("X-Slack-Request-Timestamp", ""))
    if not timestamp.strip().isdigit():
        return 401, "X-Slack-Request-Timestamp is missing or not a number"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return 400, "the body is not UTF-8"
    content_type = str(headers.get("Content-Type", ""))
    if content_type.startswith("application/json"):
        return _check_object(text, EVENT_FIELDS, "body")
    if content_type.startswith("application/x-www-form-urlencoded"):
        form = parse_qs(text)
        if "payload" in form:
            return _check_object(form["payload"][0], INTERACTION_FIELDS, "payload")
    return None


def _check_object(
    text: str, fields: dict[str, type | tuple[type, ...]], what: str
) -> tuple[int, str] | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return 400, f"the {what} is not valid JSON"
    if not isinstance(data, dict):
        return 400, f"the {what} is not a JSON object"
    if _depth(data) > MAX_JSON_DEPTH:
        return 400, f"the {what} is nested too deeply"
    wrong = _wrongly_typed(data, fields)
    if isinstance(data.get("event"), dict):
        wrong += [f"event.{k}" for k in _wrongly_typed(data["event"], INNER_EVENT_FIELDS)]
    authorizations = data.get("authorizations")
    for n, item in enumerate(authorizations if isinstance(authorizations, list) else []):
        if not isinstance(item, dict):
            wrong.append(f"authorizations[{n}]")
        else:
            wrong += [
                f"authorizations[{n}].{k}" for k in _wrongly_typed(item, AUTHORIZATION_FIELDS)
            ]
    if wrong:
        return 400, f"{what} fields of the wrong type: {', '.join(wrong)}"
    user = data.get("user")
    if isinstance(user, dict) and not isinstance(user.get("id"), str):
        return 400, f"the {what}'s user has no id"
    return None


def _wrongly_typed(data: dict[str, Any], fields: dict[str, type | tuple[type, ...]]) -> list[str]:
    return [k for k, kind in fields.items() if k in data and not isinstance(data[k], kind)]


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            stack.extend((child, depth + 1) for child in children)
    return deepest


@web.middleware
async def reject_malformed(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "POST" and request.path == "/slack/events":
        found = problem_with(request.headers, await request.read())
        if found is not None:
            status, reason = found
            log.warning("refused a Slack request (%d): %s", status, reason)
            return web.json_response({"ok": False, "error": reason}, status=status)
    return await handler(request)
