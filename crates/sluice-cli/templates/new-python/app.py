"""{{name}}: a sluice function in Python. It answers every request with a greeting that names the
request's method and path, and writes one log line per call (`sluice logs {{name}}` shows them).

componentize-py turns this module into a component exporting wasi:http/incoming-handler: the
class below is that export. No sluice SDK.
"""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Other,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        method = request.method()
        # wasi:http methods are classes (Method_Get, ...); Method_Other carries its name.
        name = method.value if isinstance(method, Method_Other) else type(method).__name__[7:].upper()
        path = request.path_with_query() or "/"
        # Guest stdout and stderr become the invocation's log lines.
        print(f"{name} {path}")

        # Environment variables set with `sluice deploy --env K=V`: call
        # dict(environment.get_environment()) (from wit_world.imports import environment) at call
        # time; os.environ holds what it was when the component was built.
        body = f"hello from {{name}}: {name} {path}\n".encode()
        headers = [("content-type", b"text/plain"), ("content-length", str(len(body)).encode())]
        response = OutgoingResponse(Fields.from_list(headers))
        out = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with out.write() as stream:
            stream.blocking_write_and_flush(body)
        OutgoingBody.finish(out, None)
