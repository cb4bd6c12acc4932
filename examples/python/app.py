"""greet: a sluice function in Python, built with componentize-py (no SDK).

POST a JSON body like {"name": "Ada"}. It answers
{"message": "<GREETING>, Ada!", "lang": "python", "upstream": ...}, where GREETING is an
environment variable set at deploy (`sluice deploy --env GREETING=Hi`, default "Hello"), and
"upstream" is what `GET $UPSTREAM_URL?name=Ada` answered (JSON, or text), when UPSTREAM_URL is
set: its host must be in the function's allow list (`--allow-outbound HOST[:PORT]`).

Errors are JSON, {"error": {"code": "...", "message": "..."}}: 405 for a method other than POST,
413 for a body over 64 KiB, 400 for a body that is not JSON, 422 for a missing or empty name, 502
when the upstream call fails (a host not allowed included).
"""

import asyncio
import json
from urllib import parse

import poll_loop
from componentize_py_types import Err, Ok
from poll_loop import PollLoop, Sink, Stream
from wit_world import exports
from wit_world.imports import environment
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingBody,
    IncomingRequest,
    Method_Post,
    OutgoingRequest,
    OutgoingResponse,
    ResponseOutparam,
    Scheme_Http,
    Scheme_Https,
)

BODY_MAX = 64 * 1024


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        # wasi:http 0.2 is poll-based: componentize-py's poll_loop runs asyncio on wasi:io/poll.
        loop = PollLoop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(handle(request, response_out))


async def handle(request: IncomingRequest, response_out: ResponseOutparam) -> None:
    try:
        status, doc = 200, await greet(request)
    except HttpError as e:
        status, doc = e.status, {"error": {"code": e.code, "message": e.message}}
    body = json.dumps(doc).encode() + b"\n"
    headers = [("content-type", b"application/json"), ("content-length", str(len(body)).encode())]
    response = OutgoingResponse(Fields.from_list(headers))
    response.set_status_code(status)
    sink = Sink(response.body())
    ResponseOutparam.set(response_out, Ok(response))
    try:
        await sink.send(body)
    except Err as e:
        # Closed: nobody reads any more. The host closes the connection once the whole answer
        # is out when a request body was left unread (the 413), which can end the write's flush.
        if not isinstance(e.value, StreamError_Closed):
            raise
    sink.close()


async def greet(request: IncomingRequest) -> dict:
    if not isinstance(request.method(), Method_Post):
        raise HttpError(405, "method_not_allowed", 'send POST with a JSON body like {"name": "Ada"}')
    raw = await read_all(request.consume(), 413, "body_too_large")
    try:
        doc = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise HttpError(400, "invalid_json", f"the body is not JSON: {e}")
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise HttpError(422, "invalid_name", '"name" must be a non-empty string')

    # Read at call time: the interpreter's os.environ was captured when the component was built.
    env = dict(environment.get_environment())
    result = {"message": f"{env.get('GREETING', 'Hello')}, {name}!", "lang": "python"}
    if env.get("UPSTREAM_URL"):
        result["upstream"] = await fetch(env["UPSTREAM_URL"], name)
    return result


async def fetch(url: str, name: str) -> dict:
    """GET url?name=NAME; the status and body (parsed when it is JSON)."""
    url = f"{url}{'&' if '?' in url else '?'}name={parse.quote(name, safe='')}"
    parts = parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HttpError(502, "upstream_failed", f"UPSTREAM_URL is not an http(s) URL: {url}")
    request = OutgoingRequest(Fields.from_list([("accept", b"application/json")]))
    request.set_scheme(Scheme_Https() if parts.scheme == "https" else Scheme_Http())
    request.set_authority(parts.netloc)
    request.set_path_with_query(f"{parts.path or '/'}?{parts.query}")
    try:
        response = await poll_loop.send(request)
        text = (await read_all(response.consume(), 502, "upstream_failed")).decode(errors="replace")
    except Err as e:
        # A host outside the allow list ends here (HTTP-request-denied), without a connection.
        raise HttpError(502, "upstream_failed", f"GET {url}: {e.value}")
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return {"url": url, "status": response.status(), "body": body}


async def read_all(body: IncomingBody, status: int, code: str) -> bytes:
    stream = Stream(body)
    try:
        data = b""
        while (chunk := await stream.next()) is not None:
            data += chunk
            if len(data) > BODY_MAX:
                raise HttpError(status, code, f"a body is at most {BODY_MAX} bytes")
        return data
    finally:
        # A child resource must go before its parent (the request, the response): drop the
        # stream and the body now, also when the read stopped early, not when the garbage
        # collector gets to them (the host traps with "resource has children").
        if stream.stream is not None:
            stream.stream.__exit__(None, None, None)
        if stream.body is not None:
            stream.body.__exit__(None, None, None)
