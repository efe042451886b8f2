import createError from '@fastify/error'

/** Invalid plugin options: the message lists every problem with its path. */
export const InvalidOptionsError = createError('FST_WSTUNNEL_INVALID_OPTIONS', 'invalid fastify-wstunnel options:\n%s', 500)

/** The upstream refused or failed the connection before the upgrade. */
export const UpstreamUnreachableError = createError('FST_WSTUNNEL_UPSTREAM_UNREACHABLE', 'upstream %s is unreachable: %s', 502)

/** The upstream did not accept the connection within connectTimeout. */
export const UpstreamTimeoutError = createError('FST_WSTUNNEL_UPSTREAM_TIMEOUT', 'upstream %s did not answer within %d ms', 504)

/** The request's Origin is not allowed on this route. */
export const OriginForbiddenError = createError('FST_WSTUNNEL_ORIGIN_FORBIDDEN', 'origin %s is not allowed', 403)

/** The client offered no acceptable sub-protocol, or none when one is required. */
export const SubprotocolRefusedError = createError('FST_WSTUNNEL_SUBPROTOCOL_REFUSED', '%s; accepted sub-protocols: %s', 400)

/** The Sec-WebSocket-Protocol header does not parse. */
export const BadSubprotocolHeaderError = createError('FST_WSTUNNEL_BAD_SUBPROTOCOL_HEADER', 'invalid Sec-WebSocket-Protocol header: %s', 400)

/** The server is closing: a handshake still in progress is refused. */
export const ShuttingDownError = createError('FST_WSTUNNEL_SHUTTING_DOWN', 'the server is shutting down', 503)

/** A request to a bridged route that is not a valid WebSocket handshake (RFC 6455 section 4.2.1). */
export const BadHandshakeError = createError('FST_WSTUNNEL_BAD_HANDSHAKE', 'invalid WebSocket handshake: %s', 400)

/** A request to a bridged route that asks for no upgrade, or for a WebSocket version other than 13. */
export const UpgradeRequiredError = createError('FST_WSTUNNEL_UPGRADE_REQUIRED', '%s', 426)
