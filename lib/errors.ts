import createError from '@fastify/error'

/** Invalid plugin options: the message lists every problem with its path. */
export const InvalidOptionsError = createError('FST_WSTUNNEL_INVALID_OPTIONS', 'invalid fastify-wstunnel options:\n%s', 500)

/** No upstream accepted the connection, and at least one refused or failed it: each tried one with its error. */
export const UpstreamUnreachableError = createError('FST_WSTUNNEL_UPSTREAM_UNREACHABLE', 'upstream unreachable: %s (%d of %d upstreams tried)', 502)

/** No upstream accepted the connection within connectTimeout: each tried one with its error. */
export const UpstreamTimeoutError = createError('FST_WSTUNNEL_UPSTREAM_TIMEOUT', 'upstream did not answer: %s (%d of %d upstreams tried)', 504)

/** A token target found no token in the request, or an unknown one (named by its short hash, never whole). */
export const UnknownTokenError = createError('FST_WSTUNNEL_UNKNOWN_TOKEN', '%s', 404)

/** resolveUpstream found no upstream for the request. */
export const NoUpstreamError = createError('FST_WSTUNNEL_NO_UPSTREAM', 'no upstream for this request', 404)

/** A query target that is missing or is not 'host:port'. */
export const BadTargetError = createError('FST_WSTUNNEL_BAD_TARGET', '%s', 400)

/** A query target that the route's allow-list does not allow (after resolving a host name). */
export const TargetForbiddenError = createError('FST_WSTUNNEL_TARGET_FORBIDDEN', 'target %s is not allowed', 403)

/** resolveUpstream returned something that is not an upstream. */
export const InvalidUpstreamError = createError('FST_WSTUNNEL_INVALID_UPSTREAM', 'resolveUpstream returned an invalid upstream: %s', 500)

/** The request's Origin is not allowed on this route. */
export const OriginForbiddenError = createError('FST_WSTUNNEL_ORIGIN_FORBIDDEN', 'origin %s is not allowed', 403)

/** The client offered no acceptable sub-protocol, or none when one is required. */
export const SubprotocolRefusedError = createError('FST_WSTUNNEL_SUBPROTOCOL_REFUSED', '%s; accepted sub-protocols: %s', 400)

/** The Sec-WebSocket-Protocol header does not parse. */
export const BadSubprotocolHeaderError = createError('FST_WSTUNNEL_BAD_SUBPROTOCOL_HEADER', 'invalid Sec-WebSocket-Protocol header: %s', 400)

/** The server is closing: a handshake still in progress is refused. */
export const ShuttingDownError = createError('FST_WSTUNNEL_SHUTTING_DOWN', 'the server is shutting down', 503)

/** The client closed its connection while its upstream was being chosen or connected (nginx's 499). */
export const ClientGoneError = createError('FST_WSTUNNEL_CLIENT_GONE', 'the client left before its upstream connected', 499)

/** A request to a bridged route that is not a valid WebSocket handshake (RFC 6455 section 4.2.1). */
export const BadHandshakeError = createError('FST_WSTUNNEL_BAD_HANDSHAKE', 'invalid WebSocket handshake: %s', 400)

/** A request to a bridged route that asks for no upgrade, or for a WebSocket version other than 13. */
export const UpgradeRequiredError = createError('FST_WSTUNNEL_UPGRADE_REQUIRED', '%s', 426)

/** The route has maxConnections bridges open or opening. */
export const TooManyConnectionsError = createError('FST_WSTUNNEL_TOO_MANY_CONNECTIONS', 'the route has its limit of %d connections', 503)

/** The client's address has maxConnectionsPerIp bridges open or opening on the route. */
export const TooManyFromClientError = createError('FST_WSTUNNEL_TOO_MANY_FROM_CLIENT', 'this address has its limit of %d connections on the route', 429)

/** The client's address opened more than handshakeRate allows (answered with Retry-After). */
export const RateLimitedError = createError('FST_WSTUNNEL_RATE_LIMITED', 'too many handshakes from this address: retry in %s', 429)

/** The route has maxPendingHandshakes handshakes waiting for their upstream. */
export const TooManyPendingError = createError('FST_WSTUNNEL_TOO_MANY_PENDING', 'the route has its limit of %d handshakes waiting for an upstream', 503)
