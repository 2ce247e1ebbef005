# -*- test-case-name: tests.test_api -*-
"""
The registry's HTTP API as Klein routes over an L{IRegistry}: the seed's
publish, discover, unpublish and health endpoints, with every error answered
as JSON from one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from hsu_registry import __version__
from hsu_registry.checks.targets import CheckTargets
from hsu_registry.durations import format_duration, parse_duration
from hsu_registry.errors import (
    Forbidden,
    InvalidRequest,
    ModuleNotFound,
    RegistryError,
    TooManyRequests,
    Unauthorized,
)
from hsu_registry.interfaces import IRegistry
from hsu_registry.model import (
    DEFAULT_LIMITS,
    Limits,
    encode_discover,
    encode_json,
    parse_process_id,
    parse_publish_body,
)
from hsu_registry.security.audit import RefusalLog
from hsu_registry.security.identity import Identity, connection_identity
from hsu_registry.watch import ChangeLog
from hsu_registry.web.catalog import Answers, Built, module_entry, respond
from hsu_registry.web.responses import SUCCESS, error_response, json_response
from hsu_registry.web.watch import WatchHub, peer_of

__all__ = ["RegistryAPI"]


#: The longest a rate-limited connection is not read from.
MAX_HOLD_OFF = 5.0


class RegistryAPI:
    """
    The Klein application of the registry API.

    ``resource()`` gives an L{IResource} to serve from any Site, at its root or
    mounted under a path of a host application.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        registry: IRegistry,
        limits: Limits = DEFAULT_LIMITS,
        changelog: ChangeLog | None = None,
        clock: IReactorTime | None = None,
        identify: Callable[[IRequest], Identity] | None = None,
        targets: CheckTargets | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.clock: IReactorTime = clock if clock is not None else registry.clock
        self.changelog = changelog if changelog is not None else ChangeLog(registry, self.clock)
        self.watchers = WatchHub(self.changelog, self.clock)
        # The catalog's large answers, built in slices and shared per change.
        self.answers = Answers(registry, self.clock)
        # Refusals at the edge (tokens, rates), logged without flooding the log.
        self.refusals = RefusalLog(self.clock)
        # Vets the addresses of checked APIs at publish (None: no checks are
        # vetted here, as for a registry without a checker).
        self.targets = targets
        # Who the kernel says is at the other end of a request's connection
        # (tests pass their own); bearer tokens are read on top of it.
        self.identify_connection: Callable[[IRequest], Identity] = (
            identify if identify is not None else _connection_identity
        )

    def resource(self) -> IResource:
        """The API as a resource that answers every request with JSON."""
        return _APIResource(self)

    # -- identity --------------------------------------------------------

    def identity(self, request: IRequest) -> Identity:
        """
        Who sent C{request}: the identity of a bearer token it carries (an
        unknown one is refused with a 401), else the connection's.
        """
        authorization = request.getHeader(b"authorization")
        if authorization is None:
            return self.identify_connection(request)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer TOKEN'")
        identity = self.registry.policy.token_identity(token.strip())
        if identity is None:
            raise Unauthorized("the bearer token is not known to this registry")
        return identity

    def _check_read(self, request: IRequest, expensive: bool = False) -> None:
        """
        Refuse a read (discover, catalog, services, watch) the policy does not
        grant, and an expensive one (all but a plain discover) past the
        caller's rate.
        """
        policy = self.registry.policy
        if policy.everyone_reads and not expensive:
            return  # the default: nobody needs to be identified to discover
        identity = self.identity(request)
        if expensive:
            self.registry.spend(self.registry.read_limiter, identity)
        if policy.everyone_reads:
            return
        if not policy.may_read(identity):
            self.log.warn(
                "Refused read {path} by {identity}: no grant to read",
                path=_path_of(request),
                identity=identity.principal,
                audit=True,
            )
            raise Forbidden(f"{identity} may not read this registry")

    # -- routes ----------------------------------------------------------

    @app.route("/api/v1/publish", methods=["POST"])
    def publish(self, request: IRequest) -> bytes | Deferred[bytes]:
        # The caller's rate first: a flood past it is refused before any of
        # its bodies is parsed.
        identity = self.identity(request)
        self.registry.spend(self.registry.write_limiter, identity)
        body = request.content.read() if request.content is not None else b""
        parsed = parse_publish_body(body, self.limits)
        vetted = (
            self.targets.vet(parsed, identity.principal) if self.targets is not None else parsed
        )
        if isinstance(vetted, Deferred):  # a checked API's host name is being resolved
            done = vetted.addCallback(lambda request_: self.registry.publish(request_, identity))
        else:
            done = self.registry.publish(vetted, identity)
        return _now_or_later(done, lambda _: json_response(request, SUCCESS))

    @app.route("/api/v1/discover/<moduleID>", methods=["GET"])
    def discover(self, request: IRequest, moduleID: str) -> bytes | Deferred[bytes]:
        args = request.args or {}
        self._check_read(request, expensive=b"wait" in args or b"index" in args)
        passing = _parse_passing(args.get(b"passing"))  # before any wait: a 400 at once
        if b"wait" in args or b"index" in args:
            return self._blocking(
                request, lambda: self._discover(request, moduleID, passing), moduleID
            )
        return self._discover(request, moduleID, passing)

    def _discover(self, request: IRequest, module_id: str, passing: bool = False) -> bytes:
        registration = self.registry.discover(module_id)
        self._index_headers(request)
        body = registration.discover_body
        if passing and registration.has_checks:
            body = encode_discover(module_id, tuple(a for a in registration.apis if a.passing))
        return json_response(request, body)

    # The original answers an empty ID with 400 "module ID is required",
    # which its Go client reports as a validation error, not "not found".
    @app.route("/api/v1/discover/", methods=["GET"])
    @app.route("/api/v1/unpublish/", methods=["DELETE"])
    @app.route("/api/v1/heartbeat/", methods=["PUT"])
    def missing_module_id(self, request: IRequest) -> bytes:
        raise InvalidRequest("module ID is required", {"path": _path_of(request)})

    @app.route("/api/v1/services/", methods=["GET"])
    def missing_service_id(self, request: IRequest) -> bytes:
        raise InvalidRequest("service ID is required", {"path": _path_of(request)})

    @app.route("/api/v1/unpublish/<moduleID>", methods=["DELETE"])
    def unpublish(self, request: IRequest, moduleID: str) -> bytes | Deferred[bytes]:
        args = request.args or {}
        process_id = parse_process_id(args.get(b"processID"), self.limits)
        identity = self.identity(request)
        self.registry.spend(self.registry.write_limiter, identity)
        done = self.registry.unpublish(moduleID, process_id, identity)
        return _now_or_later(done, lambda _: json_response(request, SUCCESS))

    @app.route("/api/v1/modules", methods=["GET"])
    def modules(self, request: IRequest) -> bytes | Deferred[bytes]:
        self._check_read(request, expensive=True)
        return self._maybe_blocking(request, lambda: self._modules(request))

    def _modules(self, request: IRequest) -> Any:
        # Many blocking queries wake on the same change: the catalog is built
        # once per change index and second (its states change with time).
        return self._respond(request, self.answers.modules())

    def _respond(self, request: IRequest, built: Built | Deferred[Built]) -> Any:
        """A large answer (see L{Answers}): now or once built; bytes, or written in slices."""
        if isinstance(built, Deferred):
            return built.addCallback(lambda done: respond(request, done, self.clock))
        return respond(request, built, self.clock)

    @app.route("/api/v1/modules/<moduleID>", methods=["GET"])
    def module(self, request: IRequest, moduleID: str) -> bytes | Deferred[bytes]:
        self._check_read(request, expensive=b"index" in (request.args or {}))
        return self._maybe_blocking(request, lambda: self._module(request, moduleID))

    def _module(self, request: IRequest, module_id: str) -> bytes:
        registration = self.registry.get(module_id)
        seen = self.registry.last_seen(module_id)
        if registration is None or seen is None:
            raise ModuleNotFound(module_id)
        self._index_headers(request)
        entry = module_entry(
            registration,
            seen,
            self.clock.seconds(),
            self.registry.stale_after,
            self.registry.binding(module_id),
        )
        return json_response(request, entry)

    @app.route("/api/v1/services/<serviceID>", methods=["GET"])
    def service(self, request: IRequest, serviceID: str) -> bytes | Deferred[bytes]:
        self._check_read(request, expensive=True)
        passing = _parse_passing((request.args or {}).get(b"passing"))
        return self._maybe_blocking(request, lambda: self._service(request, serviceID, passing))

    def _service(self, request: IRequest, service_id: str, passing: bool) -> Any:
        # From the registry's index by service, built once per change index.
        return self._respond(request, self.answers.service(service_id, passing))

    @app.route("/api/v1/watch", methods=["GET"])
    def watch(self, request: IRequest) -> Any:
        self._check_read(request, expensive=True)
        last = request.getHeader(b"last-event-id")
        args = request.args or {}
        if last is None and args.get(b"index"):
            last = args[b"index"][0]
        epoch = request.getHeader(b"x-hsu-epoch")
        if epoch is None and args.get(b"epoch"):
            epoch = args[b"epoch"][0]
        last_index = _parse_index(last, "Last-Event-ID") if last is not None else None
        return self.watchers.open(
            request,
            last_index,
            epoch.decode("ascii", "replace") if epoch else None,
            peer=peer_of(self.identify_connection(request), request),
        )

    # -- blocking queries --------------------------------------------------

    def _index_headers(self, request: IRequest) -> None:
        request.setHeader(b"x-hsu-index", b"%d" % self.registry.index)
        request.setHeader(b"x-hsu-epoch", self.registry.epoch.encode("ascii"))

    def _maybe_blocking(self, request: IRequest, answer: Callable[[], Any]) -> Any:
        args = request.args or {}
        if b"index" in args:
            return self._blocking(request, answer, None)
        return answer()

    def _blocking(
        self, request: Any, answer: Callable[[], Any], module_id: str | None
    ) -> Deferred[Any]:
        """
        Hold the answer until the change index passes C{?index=} (or, for a
        discover of a module that is not there, until it appears), at most
        C{?wait=} (bounded), then answer the current state.  A query that
        waits counts against the held-query limits of its peer and of the
        daemon (see L{ChangeLog.admit}) until answered.
        """
        args = request.args or {}
        wait = _parse_wait(args.get(b"wait"), self.changelog.max_wait)
        index = args.get(b"index")
        since = _parse_index(index[0], "index") if index else None
        deadline = self.clock.seconds() + wait

        waiting: list[Deferred[int]] = []

        def client_left(_: object) -> None:
            for d in waiting:
                d.cancel()

        request.notifyFinish().addErrback(client_left)

        async def held() -> Any:
            release: Callable[[], None] | None = None
            try:
                while not self.changelog.closed:  # stopping: answer what there is
                    if since is not None:
                        if self.registry.index != since:
                            break
                    elif module_id is not None and self.registry.get(module_id) is not None:
                        break
                    remaining = deadline - self.clock.seconds()
                    if remaining <= 0:
                        break
                    if release is None:  # it waits: count it (or refuse it)
                        peer = peer_of(self.identify_connection(request), request)
                        release = self.changelog.admit(peer)
                    waiting[:] = [self.changelog.wait(self.registry.index, remaining)]
                    await waiting[0]
            finally:
                if release is not None:
                    release()
            result = answer()
            if isinstance(result, Deferred):
                result = await result  # a large answer being built
            return result

        return Deferred.fromCoroutine(held())

    @app.route("/api/v1/heartbeat/<moduleID>", methods=["PUT"])
    def heartbeat(self, request: IRequest, moduleID: str) -> bytes:
        args = request.args or {}
        process_id = parse_process_id(args.get(b"processID"), self.limits)
        identity = self.identity(request)
        self.registry.spend(self.registry.write_limiter, identity)
        self.registry.heartbeat(moduleID, process_id, identity)
        return json_response(request, SUCCESS)

    @app.route("/api/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        status = self.registry.health()
        return json_response(
            request,
            encode_json(
                {
                    "status": "healthy",
                    "registeredModules": status.registered_modules,
                    "totalAPIs": status.total_apis,
                    "uptime": format_duration(status.uptime),
                    # An extra field after the seed's four, which keep their order.
                    "version": __version__,
                }
            ),
        )

    # -- errors: one place -----------------------------------------------

    def failed(self, request: IRequest, failure: Failure) -> bytes:
        """
        Answer a failure as JSON: a domain error with its own status, werkzeug's
        routing errors as 404/405, anything else as a logged, generic 500.
        """
        error = failure.value
        if isinstance(error, RegistryError):
            if isinstance(error, Unauthorized):
                request.setHeader(b"www-authenticate", b'Bearer realm="hsu-registry"')
                identity = self.identify_connection(request).principal
                self.refusals.refuse("token", identity, _path_of(request), error.message)
            elif isinstance(error, TooManyRequests):
                # Retry-After is whole seconds: hold the connection off for as
                # long as it says, so ignoring it gains a flooder nothing.
                retry_after = max(1, math.ceil(error.retry_after))
                request.setHeader(b"retry-after", b"%d" % retry_after)
                self._hold_off(request, retry_after)
                identity = str((error.context or {}).get("identity", "unknown"))
                self.refusals.refuse("rate", identity, _path_of(request), error.message)
            return error_response(request, error.status, error.message, error.context)
        if isinstance(error, MethodNotAllowed):
            allowed = sorted(error.valid_methods or ())
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return error_response(
                request,
                405,
                f"method {request.method.decode('ascii', 'replace')} is not allowed here",
                {"allowed": allowed},
            )
        if isinstance(error, NotFound):
            return error_response(request, 404, "no such endpoint", {"path": _path_of(request)})
        if isinstance(error, HTTPException):
            return error_response(request, error.code or 400, error.name)
        self.log.failure(
            "Unhandled error serving {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return error_response(request, 500, "internal error")

    def _hold_off(self, request: Any, wait: float) -> None:
        """
        Stop reading from a connection whose identity is past its rate until
        it may send again (at most L{MAX_HOLD_OFF} seconds), once the 429 is
        written: a flooder that ignores C{Retry-After} costs the reactor one
        answer per connection per wait, not one per request it sends.
        """
        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is None or not hasattr(transport, "pauseProducing"):
            return

        def pause(_: object) -> None:
            transport.pauseProducing()
            self.clock.callLater(min(wait, MAX_HOLD_OFF), transport.resumeProducing)

        request.notifyFinish().addCallbacks(pause, lambda _: None)

    @app.handle_errors(Exception)
    def _klein_failed(self, request: IRequest, failure: Failure) -> bytes:
        # For hosts that serve ``app.resource()`` (Klein's own glue) directly.
        return self.failed(request, failure)


def _path_of(request: IRequest) -> str:
    return request.path.decode("utf-8", "replace")


def _connection_identity(request: IRequest) -> Identity:
    """
    The kernel's word on a request's peer (see L{connection_identity}),
    looked up once per connection and kept on its channel: it cannot change
    while the connection lasts.
    """
    channel = getattr(request, "channel", None)
    known: Identity | None = getattr(channel, "hsu_identity", None)
    if known is None:
        known = connection_identity(getattr(request, "transport", None))
        if channel is not None:
            channel.hsu_identity = known
    return known


def _parse_passing(values: list[bytes] | None) -> bool:
    """
    C{?passing=true} (or C{1}, or empty): only passing APIs; C{false}, C{0}
    or no C{passing} at all: every API.
    """
    if not values:
        return False
    if len(values) > 1:
        raise InvalidRequest("passing is given more than once")
    value = values[0].lower()
    if value in (b"", b"true", b"1"):
        return True
    if value in (b"false", b"0"):
        return False
    raise InvalidRequest(
        "passing must be true or false", {"passing": value.decode("utf-8", "replace")}
    )


def _parse_index(raw: bytes, what: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequest(f"{what} must be a change index (a non-negative integer)")
    return int(raw)


def _parse_wait(values: list[bytes] | None, max_wait: float) -> float:
    if not values:
        return max_wait
    try:
        return min(parse_duration(values[0].decode("ascii")), max_wait)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidRequest(f"wait must be a duration such as 30s: {e}") from None


def _now_or_later(done: Deferred[Any], answer: Callable[[Any], bytes]) -> bytes | Deferred[bytes]:
    """
    The answer to a write: at once when the store has already acknowledged it
    (the memory store always has), so the hot path pays for no Deferred
    plumbing, else a Deferred of it.  A failure that is already there is
    raised, for L{RegistryAPI.failed} to answer.
    """
    outcome: list[Any] = []

    def keep(result: Any) -> Any:
        outcome.append(result)
        return result

    done.addBoth(keep)
    if not outcome:
        return done.addCallback(answer)
    result = outcome[0]
    if isinstance(result, Failure):
        done.addErrback(lambda _: None)  # handled: raised below
        result.raiseException()
    return answer(result)


# Bounds the memo of routing decisions (one entry per distinct method and
# path), so that unique or long paths cannot grow it without limit.
_ROUTE_MEMO_SIZE = 4096
_ROUTE_MEMO_MAX_PATH = 512


class _APIResource(Resource):
    """
    Serves a L{RegistryAPI}: the Klein app's routing table decides, its
    endpoints answer, and every failure is answered by L{RegistryAPI.failed}.

    This is Klein's own glue (C{KleinResource}) cut to what the API needs, so
    the hot path does no per-request work that can be done once: the URL map
    is bound once, routing decisions are memoised per path, a synchronous
    answer is returned to twisted.web as bytes (which sets Content-Length),
    and only asynchronous answers pay for Deferreds.  A path that is not UTF-8
    once percent-decoded gets a JSON 400 (Klein's glue answers plain text).
    """

    isLeaf = True

    def __init__(self, api: RegistryAPI) -> None:
        super().__init__()
        self._api = api
        self._app = api.app
        self._adapter = api.app.url_map.bind("localhost")
        self._routes: dict[tuple[bytes, str], tuple[str, Mapping[str, Any]]] = {}

    def _route(self, method: bytes, path: str) -> tuple[str, Mapping[str, Any]]:
        key = (method, path)
        known = self._routes.get(key)
        if known is not None:
            return known
        rule, arguments = self._adapter.match(
            path, method.decode("ascii", "replace"), return_rule=True
        )
        route = (str(rule.endpoint), arguments)
        if len(path) <= _ROUTE_MEMO_MAX_PATH:
            if len(self._routes) >= _ROUTE_MEMO_SIZE:
                self._routes.clear()
            self._routes[key] = route
        return route

    def render(self, request: IRequest) -> Any:
        try:
            path = "/" + "/".join([segment.decode("utf-8") for segment in request.postpath])
        except UnicodeDecodeError:
            return error_response(request, 400, "the URL path is not UTF-8 once decoded")
        try:
            endpoint, arguments = self._route(request.method, path)
            result = self._app.execute_endpoint(endpoint, request, **arguments)
        except Exception:
            return self._api.failed(request, Failure())
        if isinstance(result, bytes) or result is NOT_DONE_YET:
            return result  # an answer now, or a stream the endpoint writes itself
        assert isinstance(result, Deferred), f"{endpoint} must answer bytes or a Deferred"
        return self._render_later(request, result)

    def _render_later(self, request: Any, result: Deferred[Any]) -> object:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(body: bytes | None) -> None:
            if gone or body is None or body is NOT_DONE_YET or request.channel is None:
                # The client left (the change itself went through), or a
                # large answer writes itself.
                return
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> bytes | None:
            if gone or request.channel is None or failure.check(CancelledError):
                return None  # the client left (its wait was cancelled): nobody to answer
            return self._api.failed(request, failure)

        result.addErrback(failed).addCallback(write)
        result.addErrback(lambda f: self._api.log.failure("Could not write an answer", f))
        return NOT_DONE_YET
