"""Answers for requests BentoML cannot read, in the service's own error shape (``ErrorBody``).

BentoML 1.4 turns a request into an API's input (form or JSON -> the pydantic model of the
endpoint's signature) before the endpoint, and its ``answers_errors``, run; and it answers its
own failures there: validation errors as a 400 in another shape, anything else as a 500 (an
unknown multipart field holding binary data, a filename too long for a temporary file, a
malformed body). It also downloads a file field sent as text when the text is a URL.
:class:`RequestGuard`, registered on the service (``add_asgi_middleware``), stands between the
client and that parser on every API route:

- it reads the part headers of a form body as the body streams through (python-multipart, the
  parser Starlette itself uses; the data are not copied) and stops the request at the first unknown
  field, file field sent as text, value field sent as a file or overlong filename, with a 400
  naming the accepted fields, before BentoML reads any of it;
- an error BentoML answers before the endpoint started (``service.errors.ENDPOINT_MARK``) is
  answered as an ErrorBody instead: its validation errors with the field and the reason, never
  the value; its other failures as a 400, since only the request's content can have caused them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote_plus

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, QuerystringParser, parse_options_header

from service.errors import ENDPOINT_MARK, ApiError, EndpointMark, shown

MAX_FILENAME_BYTES = 200  # BentoML names its temporary file after the upload: keep it under the filesystem's 255
MAX_MESSAGE_CHARS = 300  # validation messages are joined up to this length
MAX_BUFFERED_ERROR_BYTES = 64 * 1024  # BentoML's error bodies are small; a larger one passes unchanged

# pydantic error types that mean the body itself could not be read as JSON.
_JSON_ERRORS = {"json_invalid", "json_type"}


@dataclass(frozen=True)
class ApiFields:
    """One API's input fields, from the pydantic model BentoML built from its signature."""

    route: str
    fields: tuple[str, ...]
    files: frozenset[str]

    @classmethod
    def of_service(cls, service: Any) -> dict[str, "ApiFields"]:
        return {api.route: cls(api.route, tuple(api.input_spec.model_fields), frozenset(api.input_spec.multipart_fields))
                for api in service.apis.values()}


class FormInspector:
    """Checks the part headers of a multipart or urlencoded body, fed chunk by chunk; the first
    problem found is kept in :attr:`error`."""

    def __init__(self, api: ApiFields, content_type: bytes, boundary: bytes | None):
        self.api = api
        self.error: ApiError | None = None
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""
        if content_type == b"multipart/form-data":
            if not boundary:
                self.error = ApiError(400, "invalid_multipart", "multipart/form-data without a boundary")
                return
            self.parser: MultipartParser | QuerystringParser = MultipartParser(boundary, {
                "on_header_field": self._on_header_field, "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end, "on_headers_finished": self._on_part_headers})
        else:  # urlencoded: every field is text
            self.parser = QuerystringParser({"on_field_name": self._on_field_name, "on_field_end": self._on_field_end})

    @classmethod
    def for_request(cls, api: ApiFields, content_type_header: str | None) -> "FormInspector | None":
        content_type, options = parse_options_header(content_type_header)
        if content_type not in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
            return None  # JSON (and anything else, which BentoML reads as JSON)
        return cls(api, content_type, options.get(b"boundary"))

    def feed(self, chunk: bytes, last: bool) -> ApiError | None:
        if self.error is None:
            try:
                self.parser.write(chunk)
                if last:
                    self.parser.finalize()  # the urlencoded parser ends its last field here
            except FormParserError as exc:
                self.fail(400, "invalid_multipart" if isinstance(self.parser, MultipartParser) else "invalid_form",
                          f"the form body is malformed, or a part header (a filename?) too long: {shown(str(exc))}")
        return self.error

    def fail(self, status: int, code: str, message: str, accepted: list[str] | None = None) -> None:
        if self.error is None:
            self.error = ApiError(status, code, message, accepted)

    # ---- multipart: one part's headers at a time --------------------------------------------------
    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._name.strip().lower()] = self._value.strip()
        self._name = self._value = b""

    def _on_part_headers(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._headers = {}
        if b"name" not in options:
            return self.fail(400, "invalid_multipart", "a multipart part has no Content-Disposition name")
        filename = options.get(b"filename")
        self._check(options[b"name"].decode("utf-8", "replace"), filename)

    # ---- urlencoded -------------------------------------------------------------------------------
    def _on_field_name(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_field_end(self) -> None:
        name, self._name = unquote_plus(self._name.decode("latin-1")), b""
        self._check(name, None)

    def _check(self, name: str, filename: bytes | None) -> None:
        api, accepted = self.api, list(self.api.fields)
        if name not in api.fields:
            return self.fail(400, "unknown_field", f"{api.route} has no field {shown(name)}", accepted)
        if name in api.files and filename is None:
            # BentoML would download a URL sent here: files come only as files.
            return self.fail(400, "not_a_file", f"{name} must be a file part (curl -F {name}=@face.jpg), not text or a URL; "
                             f"or send JSON {name}_base64", accepted)
        if name not in api.files and filename is not None:
            return self.fail(400, "not_a_value", f"{name} takes a value, not a file", accepted)
        if filename is not None and len(filename) > MAX_FILENAME_BYTES:
            return self.fail(400, "filename_too_long", f"{name}: the filename has {len(filename)} bytes; the limit is {MAX_FILENAME_BYTES}")


def answer_for_bentoml_error(api: ApiFields, status: int, body: bytes) -> ApiError:
    """BentoML's own answer to a request it could not read, as an ErrorBody that never quotes the input."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    details = data.get("detail") if isinstance(data, dict) else None
    accepted = list(api.fields)
    if isinstance(details, list) and details:  # pydantic's errors (BentoML leaves the input out of them)
        types = {d.get("type") for d in details}
        parts = [f"{'.'.join(str(x) for x in d.get('loc', ())) or 'body'}: {d.get('msg', '')}" for d in details]
        message = "; ".join(parts)
        message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
        if types & _JSON_ERRORS:
            return ApiError(400, "invalid_json", f"the body is not valid JSON ({message}); send JSON or multipart/form-data", accepted)
        if types == {"missing"}:
            return ApiError(400, "missing_field", message, accepted)
        return ApiError(422, "invalid_value", message, accepted)
    if 400 <= status < 500:
        return ApiError(status, "bad_request", f"{api.route} cannot read this request (HTTP {status})", accepted)
    return ApiError(400, "unreadable_request", f"{api.route} could not read the request as its input; see the accepted fields", accepted)


class RequestGuard:
    """ASGI middleware: clear 4xx answers for requests that fail in BentoML's input parsing (module docstring)."""

    def __init__(self, app: Callable, service: Any):
        self.app = app
        self.apis = ApiFields.of_service(service)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        api = self.apis.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if api is None:
            return await self.app(scope, receive, send)
        headers = dict((k.lower(), v) for k, v in scope.get("headers", ()))
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        inspector = FormInspector.for_request(api, ctype)
        mark = EndpointMark()
        token = ENDPOINT_MARK.set(mark)
        held: dict = {}  # the start message and body of an error answer being replaced

        async def checked_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request" and inspector.feed(message.get("body", b""), not message.get("more_body", False)):
                # Stop BentoML's parser here: it fails, and its answer is replaced by the inspector's.
                raise ValueError(f"request refused: {inspector.error.body.error}")
            return message

        async def guarded_send(message: dict) -> None:
            if held.get("sent"):
                return  # the rest of a replaced answer
            refused = inspector.error if inspector is not None else None
            if message["type"] == "http.response.start":
                if refused or (message["status"] >= 400 and not mark.started):
                    held.update(start=message, body=b"")  # replaced once its body is in
                    return
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False) and len(held["body"]) <= MAX_BUFFERED_ERROR_BYTES:
                    return
                response = (refused or answer_for_bentoml_error(api, held["start"]["status"], held["body"])).response()
                held["sent"] = True
                await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
                await send({"type": "http.response.body", "body": response.body})
                return
            await send(message)

        try:
            await self.app(scope, checked_receive if inspector is not None else receive, guarded_send)
        finally:
            ENDPOINT_MARK.reset(token)
