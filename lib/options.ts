import Type, { type Static, type TSchema } from 'typebox'
import { Compile } from 'typebox/compile'
import { Settings } from 'typebox/system'
import { InvalidOptionsError } from './errors'
import type { ConnectionOptions } from 'node:tls'
import { compileHostnames, compileOrigins, PATTERN_HELP, type OriginMatcher, type OriginsOption } from './origin'
import { resolveTls } from './tls'
import { readTokenFile } from './token-file'
import { compileAllowList, type AllowList } from './allow-list'
import type { ResolveUpstream } from './target'
import type { Registry } from 'prom-client'

const PORT = '([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])'

const UpstreamString = Type.String({
  pattern: `^(unix:.+|\\[[0-9A-Fa-f:.]+\\]:${PORT}|[^\\s:\\[\\]/]+:${PORT})$`,
  errorMessage: "must be 'host:port', '[ipv6]:port' (port 1 to 65535) or 'unix:/path'"
})
const Port = Type.Integer({ minimum: 1, maximum: 65535 })

// TLS to the upstream. In JSON the certificates are file paths, read at registration; PEM text works too.
const TlsSchema = Type.Union([
  Type.Boolean(),
  Type.Object({
    servername: Type.Optional(Type.String({ minLength: 1 })),
    ca: Type.Optional(Type.Union([Type.String({ minLength: 1 }), Type.Array(Type.String({ minLength: 1 }), { minItems: 1 })], {
      errorMessage: 'must be a file path or PEM text, or a non-empty list of them'
    })),
    cert: Type.Optional(Type.String({ minLength: 1 })),
    key: Type.Optional(Type.String({ minLength: 1 })),
    rejectUnauthorized: Type.Optional(Type.Boolean())
  }, { additionalProperties: false })
], { errorMessage: 'must be true, false or { servername, ca, cert, key, rejectUnauthorized } (ca, cert and key: file paths or PEM text)' })

/** Where a TCP service lives. */
export const UpstreamSchema = Type.Union([
  UpstreamString,
  Type.Object({ host: Type.String({ minLength: 1 }), port: Port, tls: Type.Optional(TlsSchema) }, { additionalProperties: false }),
  Type.Object({ path: Type.String({ minLength: 1 }), tls: Type.Optional(TlsSchema) }, { additionalProperties: false })
], { errorMessage: "must be 'host:port', '[ipv6]:port', 'unix:/path', { host, port } or { path }" })

/** One upstream, or several that the route balances over. */
export const UpstreamsSchema = Type.Union([
  UpstreamSchema,
  Type.Array(UpstreamSchema, { minItems: 1, errorMessage: 'must be a non-empty list of upstreams' })
], { errorMessage: "must be an upstream ('host:port', '[ipv6]:port', 'unix:/path', { host, port } or { path }) or a non-empty list of them" })

const TOKEN_CHARS = "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$"
const TokenSource = Type.Enum(['query', 'path', 'cookie', 'subprotocol'])

/** A target chosen per request: by a token, or by a query parameter checked against an allow-list. */
const TargetSchema = Type.Union([
  Type.Object({
    from: Type.Literal('token'),
    tokens: Type.Optional(Type.Record(Type.String({ minLength: 1 }), UpstreamsSchema)),
    tokensFile: Type.Optional(Type.String({ minLength: 1 })),
    source: Type.Optional(Type.Union([TokenSource, Type.Array(TokenSource, { minItems: 1 })], {
      errorMessage: "must be 'query', 'path', 'cookie', 'subprotocol' or a non-empty list of them"
    })),
    name: Type.Optional(Type.String({ pattern: TOKEN_CHARS, errorMessage: 'must be a name (letters, digits and !#$%&\'*+-.^_`|~)' }))
  }, { additionalProperties: false }),
  Type.Object({
    from: Type.Literal('query'),
    param: Type.Optional(Type.String({ minLength: 1 })),
    allow: Type.Optional(Type.Array(Type.String(), { minItems: 1, errorMessage: 'must be a non-empty list of allowed targets' }))
  }, { additionalProperties: false })
], { errorMessage: "must be { from: 'token', tokens or tokensFile, source, name } or { from: 'query', param, allow }" })

const HealthCheckSchema = Type.Object({
  interval: Type.Integer({ minimum: 100, maximum: 2147483647 })
}, { additionalProperties: false })

const Millis = (fallback: number) => Type.Integer({ minimum: 0, maximum: 2147483647, default: fallback })

// Settings a route may set and the plugin may set for all routes; the defaults live here once.
const routeSettings = {
  frame: Type.Enum(['binary', 'text'], { default: 'binary' }),
  invalidUtf8: Type.Enum(['close', 'replace'], { default: 'close' }),
  connectTimeout: Millis(10000),
  idleTimeout: Millis(0),
  pingInterval: Millis(30000),
  closeTimeout: Millis(2000),
  // 0 is no limit; the largest safe integer is as far as a byte count can be exact.
  maxPayload: Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER, default: 0 }),
  requireOrigin: Type.Boolean({ default: false }),
  requireSubprotocol: Type.Boolean({ default: false }),
  balance: Type.Enum(['round-robin', 'least-connections', 'random', 'first', 'client-ip'], { default: 'round-robin' }),
  // Passive health: this many failed connects in a row mark an upstream down for failBackoff, doubling
  // at each failed retry up to failBackoffMax.
  maxFailures: Type.Integer({ minimum: 1, maximum: 1000000, default: 3 }),
  failBackoff: Type.Integer({ minimum: 1, maximum: 2147483647, default: 1000 }),
  failBackoffMax: Type.Integer({ minimum: 1, maximum: 2147483647, default: 30000 }),
  // Limits, checked before any upstream connection; 0 is no limit.
  maxConnections: Type.Integer({ minimum: 0, maximum: 2147483647, default: 0 }),
  maxConnectionsPerIp: Type.Integer({ minimum: 0, maximum: 2147483647, default: 0 }),
  maxPendingHandshakes: Type.Integer({ minimum: 0, maximum: 2147483647, default: 0 })
}

const LogLevel = Type.Enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
const EndpointPath = Type.Union([Type.Boolean(), Type.String({ pattern: '^/\\S*$' })], { errorMessage: "must be true, false or a path starting with '/'" })

// Settings with no default: absent means the feature is off.
const optionalSettings = {
  // Strings, lists of strings, and in JavaScript RegExps and functions: checked and compiled by origin.ts.
  origins: Type.Optional(Type.Unsafe<OriginsOption>({ description: `${PATTERN_HELP}, a RegExp, a function, or a list of them` })),
  // The names 'same-origin' trusts besides IP literals and localhost: checked and normalised by origin.ts.
  hostnames: Type.Optional(Type.Array(Type.String(), { minItems: 1, errorMessage: 'must be a non-empty list of host names' })),
  proxyProtocol: Type.Optional(Type.Enum(['v1', 'v2'])),
  tls: Type.Optional(TlsSchema),
  healthCheck: Type.Optional(HealthCheckSchema),
  // Handshakes per client address (request.ip) in a window, through @fastify/rate-limit: 429 with Retry-After.
  handshakeRate: Type.Optional(Type.Object({
    max: Type.Integer({ minimum: 1, maximum: 2147483647 }),
    timeWindow: Type.Integer({ minimum: 1, maximum: 2147483647 })
  }, { additionalProperties: false }))
}

const SubprotocolName = Type.String({
  pattern: "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$",
  errorMessage: 'must be a sub-protocol name (letters, digits and !#$%&\'*+-.^_`|~)'
})

const RouteSchema = Type.Object({
  upstream: Type.Optional(UpstreamsSchema),
  target: Type.Optional(TargetSchema),
  logLevel: Type.Optional(LogLevel),
  // JavaScript only: chooses the upstream per request, after the app's own hooks (checked by resolveOptions).
  resolveUpstream: Type.Optional(Type.Unsafe<ResolveUpstream>({ description: 'a function (request) => upstream | upstream[] | null, or a promise of one' })),
  subprotocols: Type.Optional(Type.Union([
    Type.Array(SubprotocolName, { minItems: 1, errorMessage: 'must be a non-empty list of sub-protocol names' }),
    Type.Record(Type.String({ pattern: TOKEN_CHARS }), UpstreamsSchema, {
      additionalProperties: false,
      keyMessage: 'is not a sub-protocol name (letters, digits and !#$%&\'*+-.^_`|~)'
    })
  ], { errorMessage: 'must be a list of sub-protocol names, or an object mapping each to its upstream' })),
  ...optional(routeSettings),
  ...optionalSettings
}, { additionalProperties: false })

/** The plugin's options; JSON-able, so a config file can hold them. */
export const OptionsSchema = Type.Object({
  routes: Type.Record(Type.String({ pattern: '^/\\S*$' }), RouteSchema, {
    additionalProperties: false,
    keyMessage: "is not a route path (it must start with '/' and hold no spaces)"
  }),
  // Fastify's own register options, for the plugin's routes.
  prefix: Type.Optional(Type.String({ pattern: '^(/\\S*)?$', errorMessage: "must be a path starting with '/'" })),
  logLevel: Type.Optional(LogLevel),
  // Operating it: a health endpoint for load balancers, Prometheus metrics, and how shutdown drains.
  health: Type.Optional(EndpointPath),
  metrics: Type.Optional(EndpointPath),
  // JavaScript only: a prom-client Registry of the app's, to hold the metrics (checked by resolveOptions).
  metricsRegistry: Type.Optional(Type.Unsafe<Registry>({ description: 'a prom-client Registry' })),
  closeCode: Type.Union([Type.Literal(1001), Type.Literal(1012)], { default: 1001, errorMessage: 'must be 1001 (going away) or 1012 (service restart)' }),
  drainTimeout: Millis(2000),
  handshakeTimeout: Millis(10000),
  ...routeSettings,
  ...optionalSettings
}, { additionalProperties: false })

export type UpstreamOption = Static<typeof UpstreamSchema>
export type RouteOptions = Static<typeof RouteSchema>
export type FastifyWstunnelOptions = Partial<Static<typeof OptionsSchema>> & { routes: Record<string, RouteOptions> }

type RouteSettings = { [K in keyof typeof routeSettings]: Static<(typeof routeSettings)[K]> }

/** A TCP or unix-socket address, parsed once, with its TLS settings (null: plain). */
export type UpstreamTarget = ({ host: string, port: number } | { path: string }) & { label: string, tls: ConnectionOptions | null }

export type TokenSourceName = Static<typeof TokenSource>

/** A route's per-request target, compiled: a token table, or a query parameter behind an allow-list. */
export type TargetSpec =
  | {
    from: 'token'
    /** The tokens given inline; they win over the file's. */
    tokens: Map<string, UpstreamTarget[]>
    tokensFile: string | null
    /** The file's tokens as read at registration. */
    fileTokens: Map<string, UpstreamTarget[]>
    sources: TokenSourceName[]
    name: string
  }
  | { from: 'query', param: string, allow: AllowList }

/** A route's options with the plugin's defaults applied, its upstreams parsed and its origins compiled. */
export interface ResolvedRoute extends RouteSettings {
  path: string
  /** For clients that ask for no sub-protocol (or when the route has no sub-protocol map). */
  upstreams: UpstreamTarget[] | null
  /** The accepted sub-protocols in the server's order of preference; empty when the route names none. */
  subprotocols: string[]
  /** When `subprotocols` is a map: the upstreams of each. */
  upstreamBySubprotocol: Map<string, UpstreamTarget[]> | null
  /** When the target is chosen per request from the request itself. */
  target: TargetSpec | null
  resolveUpstream: ResolveUpstream | null
  /** The route's TLS settings, for upstreams chosen per request. */
  tls: ConnectionOptions | null
  healthCheck: { interval: number } | null
  handshakeRate: { max: number, timeWindow: number } | null
  logLevel: Static<typeof LogLevel> | undefined
  origins: OriginMatcher | null
  /** The names 'same-origin' trusts besides IP literals and localhost: lower-case, punycode. */
  hostnames: ReadonlySet<string>
  proxyProtocol: 'v1' | 'v2' | null
}

export interface ResolvedOptions {
  /** The plugin-wide maxPayload: each route's own is on the route. */
  maxPayload: number
  prefix: string
  logLevel: Static<typeof OptionsSchema>['logLevel']
  /** Where the health and metrics endpoints are served (under the prefix); null: not served. */
  health: string | null
  metrics: string | null
  metricsRegistry: Registry | null
  closeCode: 1001 | 1012
  drainTimeout: number
  handshakeTimeout: number
  routes: ResolvedRoute[]
}

const check = Compile(OptionsSchema)
const checkRoute = Compile(RouteSchema)
const checkTls = Compile(TlsSchema)
// Value.Default trips over a Record with additionalProperties: false, and only top-level keys have defaults.
const defaultSettings = Object.fromEntries(Object.entries(OptionsSchema.properties)
  .filter(([, schema]) => 'default' in schema).map(([key, schema]) => [key, (schema as unknown as { default: unknown }).default]))

/** Validates raw options, applies defaults, parses upstreams and reads the files they name.
 *  Throws one FST_WSTUNNEL_INVALID_OPTIONS error listing every problem. */
export function resolveOptions (raw: unknown): ResolvedOptions {
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new InvalidOptionsError('options: must be an object with a "routes" object')
  }
  // A key set to undefined is a key left out, so the default or the plugin-wide value applies.
  const given = definedOnly(raw)
  if (isObject(given.routes)) {
    given.routes = Object.fromEntries(Object.entries(given.routes).map(([path, route]) => [path, isObject(route) ? definedOnly(route) : route]))
  }
  const options = { ...defaultSettings, ...given } as Static<typeof OptionsSchema>
  const problems = check.Check(options) ? [] : describeErrors(OptionsSchema, allErrors(options))
  // Checks the schema cannot express; each is safe on any input, so every problem is reported at once.
  const defaultHostnames = compileHostnames(options.hostnames, 'hostnames', problems)
  if (options.origins !== undefined) compileOrigins(options.origins, 'origins', problems, defaultHostnames) // reported once, even with no routes
  if (options.metricsRegistry !== undefined && typeof (options.metricsRegistry as { registerMetric?: unknown } | null)?.registerMetric !== 'function') {
    problems.push('metricsRegistry: must be a prom-client Registry')
  }
  const defaultTls = checkTls.Check(options.tls) ? resolveTls(options.tls, null, 'tls', problems) : null
  const resolved = new Map<string, Partial<ResolvedRoute>>()
  const routeEntries = isObject(options.routes) ? Object.entries(options.routes) : []
  for (const [path, route] of routeEntries) {
    if (!isObject(route)) continue
    const at = joinPath('routes', path)
    const hostnames = route.hostnames === undefined ? defaultHostnames : compileHostnames(route.hostnames, `${at}.hostnames`, problems)
    // Compiled per route, as 'same-origin' needs the route's own hostnames.
    const [origins, originsAt] = route.origins === undefined ? [options.origins, 'origins'] : [route.origins, `${at}.origins`]
    checkWays(route, at, problems)
    resolved.set(path, {
      origins: origins === undefined ? null : compileOrigins(origins, originsAt, problems, hostnames),
      hostnames,
      // The rest reads files and parses upstreams: only for a route whose shape is right.
      ...(checkRoute.Check(route) ? resolveTargets(path, route, at, defaultTls, problems) : {})
    })
  }
  if (problems.length > 0) throw new InvalidOptionsError([...new Set(problems)].join('\n'))

  const defaults: Record<string, unknown> = { ...options }
  delete defaults.routes
  const routes = routeEntries.map(([path, route]): ResolvedRoute => ({
    ...(defaults as RouteSettings),
    ...route,
    ...(resolved.get(path) as Omit<ResolvedRoute, keyof RouteSettings | 'proxyProtocol'>),
    path,
    subprotocols: route.subprotocols === undefined ? [] : Array.isArray(route.subprotocols) ? route.subprotocols : Object.keys(route.subprotocols),
    healthCheck: route.healthCheck ?? options.healthCheck ?? null,
    handshakeRate: route.handshakeRate ?? options.handshakeRate ?? null,
    proxyProtocol: route.proxyProtocol ?? options.proxyProtocol ?? null
  }))
  return {
    maxPayload: options.maxPayload,
    prefix: options.prefix ?? '',
    logLevel: options.logLevel,
    health: endpoint(options.health, '/health'),
    metrics: endpoint(options.metrics, '/metrics'),
    metricsRegistry: options.metricsRegistry ?? null,
    closeCode: options.closeCode,
    drainTimeout: options.drainTimeout,
    handshakeTimeout: options.handshakeTimeout,
    routes
  }
}

function endpoint (option: boolean | string | undefined, fallback: string): string | null {
  return option === true ? fallback : typeof option === 'string' ? option : null
}

/** A route reaches its upstream one way: `upstream` (or a sub-protocol map), `target` or `resolveUpstream`. */
function checkWays (route: Record<string, unknown>, at: string, problems: string[]): void {
  const ways = [route.upstream !== undefined || isObject(route.subprotocols), route.target !== undefined, route.resolveUpstream !== undefined].filter(Boolean).length
  if (ways === 0) problems.push(`${at}.upstream: is required (unless subprotocols maps each sub-protocol to an upstream, or the route has a target or resolveUpstream)`)
  if (ways > 1) problems.push(`${at}: give one of upstream (or a subprotocols map), target and resolveUpstream`)
  if (route.resolveUpstream !== undefined && typeof route.resolveUpstream !== 'function') problems.push(`${at}.resolveUpstream: must be a function`)
}

type TargetParts = Pick<ResolvedRoute, 'upstreams' | 'upstreamBySubprotocol' | 'target' | 'resolveUpstream' | 'tls'>

/** A route's upstreams, sub-protocol map, per-request target and TLS, each problem added to `problems`. */
function resolveTargets (path: string, route: RouteOptions, at: string, defaultTls: ConnectionOptions | null, problems: string[]): TargetParts {
  const tls = resolveTls(route.tls, defaultTls, `${at}.tls`, problems)
  const map = route.subprotocols !== undefined && !Array.isArray(route.subprotocols) ? route.subprotocols : null
  let target: TargetSpec | null = null
  if (route.target?.from === 'token') {
    const sources = route.target.source === undefined ? ['query' as const] : Array.isArray(route.target.source) ? route.target.source : [route.target.source]
    const name = route.target.name ?? 'token'
    if (route.target.tokens === undefined && route.target.tokensFile === undefined) problems.push(`${at}.target: a token target needs tokens or tokensFile`)
    if (sources.includes('subprotocol') && !Array.isArray(route.subprotocols)) problems.push(`${at}.target.source: 'subprotocol' needs the route to list its sub-protocols (subprotocols), as the token entry is never answered and clients fail a handshake answered with none`)
    if (sources.includes('path') && !path.split('/').includes(`:${name}`)) problems.push(`${at}.target.source: 'path' needs the route path to hold the segment ':${name}'`)
    const tokens = new Map(Object.entries(route.target.tokens ?? {}).map(([token, upstreams]) =>
      [token, parseUpstreams(upstreams, tls, `${at}.target.tokens${joinPath('', token)}`, problems)]))
    const tokensFile = route.target.tokensFile ?? null
    const fileTokens = tokensFile === null ? new Map() : readTokens(tokensFile, tls, problems)
    target = { from: 'token', tokens, tokensFile, fileTokens, sources: [...new Set(sources)], name }
  } else if (route.target?.from === 'query') {
    if (route.target.allow === undefined) problems.push(`${at}.target.allow: is required: a query target without an allow-list would let any client reach any address`)
    target = { from: 'query', param: route.target.param ?? 'address', allow: compileAllowList(route.target.allow ?? [], `${at}.target.allow`, problems) }
  }
  return {
    tls,
    target,
    resolveUpstream: route.resolveUpstream ?? null,
    upstreams: route.upstream === undefined ? null : parseUpstreams(route.upstream, tls, `${at}.upstream`, problems),
    upstreamBySubprotocol: map === null
      ? null
      : new Map(Object.entries(map).map(([name, upstreams]) => [name, parseUpstreams(upstreams, tls, `${at}.subprotocols${joinPath('', name)}`, problems)]))
  }
}

const checkUpstreams = Compile(UpstreamsSchema)

/** Reads a websockify token file into a table; each bad line or upstream adds a problem naming the line. */
export function readTokens (file: string, tls: ConnectionOptions | null, problems: string[]): Map<string, UpstreamTarget[]> {
  const tokens = new Map<string, UpstreamTarget[]>()
  for (const { token, upstream, line } of readTokenFile(file, problems)) {
    if (!checkUpstreams.Check(upstream)) problems.push(`${file}:${line}: ${JSON.stringify(upstream)} is not 'host:port', '[ipv6]:port' or 'unix:/path'`)
    else tokens.set(token, parseUpstreams(upstream, tls, `${file}:${line}`, problems))
  }
  return tokens
}

/** Checks and parses what resolveUpstream returned: an upstream or a list, in any accepted form. */
export function parseResolvedUpstreams (value: unknown, tls: ConnectionOptions | null): UpstreamTarget[] | string {
  if (!checkUpstreams.Check(value)) return describeErrors(UpstreamsSchema, allErrors(value, checkUpstreams)).join('; ')
  const problems: string[] = []
  const upstreams = parseUpstreams(value, tls, 'upstream', problems)
  return problems.length > 0 ? problems.join('; ') : upstreams
}

/** Turns one upstream or a list into targets, each with its TLS settings over the route's. */
export function parseUpstreams (upstreams: Static<typeof UpstreamsSchema>, tls: ConnectionOptions | null, at: string, problems: string[]): UpstreamTarget[] {
  return Array.isArray(upstreams)
    ? upstreams.map((upstream, index) => parseUpstream(upstream, tls, `${at}[${index}]`, problems))
    : [parseUpstream(upstreams, tls, at, problems)]
}

/** Every problem, not only TypeBox's first eight; its process-wide setting is put back for the host app. */
function allErrors (value: unknown, checker: { Errors: (value: unknown) => Iterable<unknown> } = check): SchemaError[] {
  const { maxErrors } = Settings.Get()
  Settings.Set({ maxErrors: 1000 })
  try {
    return [...checker.Errors(value)] as SchemaError[]
  } finally {
    Settings.Set({ maxErrors })
  }
}

function isObject (value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

/** A shallow copy without the keys whose value is undefined. */
function definedOnly (object: object): Record<string, unknown> {
  return Object.fromEntries(Object.entries(object).filter(([, value]) => value !== undefined))
}

/** Turns any accepted upstream form into a target with a printable label and its TLS settings. */
export function parseUpstream (upstream: UpstreamOption, routeTls: ConnectionOptions | null = null, at = 'upstream', problems: string[] = []): UpstreamTarget {
  if (typeof upstream === 'object') {
    const tls = resolveTls(upstream.tls, routeTls, `${at}.tls`, problems)
    if ('path' in upstream) return { path: upstream.path, label: `unix:${upstream.path}`, tls }
    const host = upstream.host.replace(/^\[(.*)\]$/, '$1')
    return { host, port: upstream.port, label: host.includes(':') ? `[${host}]:${upstream.port}` : `${host}:${upstream.port}`, tls }
  }
  if (upstream.startsWith('unix:')) return { path: upstream.slice(5), label: upstream, tls: routeTls }
  const colon = upstream.lastIndexOf(':')
  const host = upstream.slice(0, colon).replace(/^\[(.*)\]$/, '$1')
  return { host, port: Number(upstream.slice(colon + 1)), label: upstream, tls: routeTls }
}

function optional<T extends Record<string, TSchema>> (properties: T): { [K in keyof T]: ReturnType<typeof Type.Optional<T[K]>> } {
  const result: Record<string, TSchema> = {}
  for (const [key, schema] of Object.entries(properties)) {
    const copy = { ...schema } as Record<string, unknown>
    delete copy.default // a route inherits the plugin-wide value, so it has no default of its own
    result[key] = Type.Optional(copy as unknown as TSchema)
  }
  return result as { [K in keyof T]: ReturnType<typeof Type.Optional<T[K]>> }
}

interface SchemaError {
  keyword: string
  schemaPath: string
  instancePath: string
  params: Record<string, unknown>
  message: string
}

/** Turns schema errors into lines like `routes['/vnc'].upstream.port: must be an integer from 1 to 65535`. */
export function describeErrors (schema: TSchema, errors: SchemaError[]): string[] {
  const dropped = new Set<SchemaError>()
  // Unions none of whose branches has the value's shape: to a union around them, a type that does not fit.
  const shapeless = new Set<string>()
  // For a union, report only the branch whose shape fits the value, or the union's own message. Inner unions
  // come first in the list, so an outer one knows which of its branches are shapeless.
  for (const union of errors.filter(error => error.keyword === 'anyOf')) {
    // Errors of this value and of what it holds: not of a sibling whose name merely starts the same ('abc', 'abcd').
    const inside = errors.filter(error => error.schemaPath.startsWith(union.schemaPath + '/anyOf/') &&
      (error.instancePath === union.instancePath || error.instancePath.startsWith(union.instancePath + '/')))
    const branchOf = (error: SchemaError) => error.schemaPath.slice(union.schemaPath.length + 7).split('/')[0]
    const branchPath = (error: SchemaError) => `${union.schemaPath}/anyOf/${branchOf(error)}`
    // A branch is misshapen when its own type does not fit, when it is a shapeless union, or when a constant of
    // its own (a discriminator such as `from: 'token'`) does not; a type error deeper down is not.
    const misshapen = new Set(inside.filter(error =>
      (error.instancePath === union.instancePath && error.schemaPath === branchPath(error) && (error.keyword === 'type' || shapeless.has(`${error.schemaPath} ${error.instancePath}`))) ||
      (error.keyword === 'const' && error.schemaPath.startsWith(branchPath(error) + '/properties/') && error.schemaPath.split('/').length === branchPath(error).split('/').length + 2)
    ).map(branchOf))
    // Of the branches whose type fits, the one whose errors reach deepest into the value is the one meant.
    let fitting: SchemaError | undefined
    for (const error of inside) {
      if (error.keyword === 'boolean') continue // the echo of an unknown key, as deep as the key
      if (!misshapen.has(branchOf(error)) && (fitting === undefined || error.instancePath.length > fitting.instancePath.length)) fitting = error
    }
    // A plain value that fits a branch's type but not its rule (a pattern, a constant) is better told by the
    // union's own message, when it has one and the branch's rule has none.
    const unionMessage = (resolvePointer(schema, union.schemaPath) as Record<string, unknown> | undefined)?.errorMessage
    if (fitting !== undefined && fitting.instancePath === union.instancePath && typeof unionMessage === 'string' &&
      typeof (resolvePointer(schema, fitting.schemaPath) as Record<string, unknown> | undefined)?.errorMessage !== 'string') fitting = undefined
    for (const error of inside) if (fitting === undefined || branchOf(error) !== branchOf(fitting)) dropped.add(error)
    if (fitting !== undefined) dropped.add(union)
    else shapeless.add(`${union.schemaPath} ${union.instancePath}`) // the same schema serves every route
  }
  const lines: string[] = []
  for (const error of errors) {
    if (dropped.has(error) || error.keyword === 'boolean') continue // 'boolean' repeats an additionalProperties error
    const node = resolvePointer(schema, error.schemaPath) as Record<string, unknown> | undefined
    const at = formatPath(error.instancePath)
    if (error.keyword === 'additionalProperties') {
      const message = typeof node?.keyMessage === 'string' ? node.keyMessage : 'is not a known option'
      for (const key of error.params.additionalProperties as string[]) lines.push(`${joinPath(at, key)}: ${message}`)
    } else if (error.keyword === 'required') {
      for (const key of error.params.requiredProperties as string[]) lines.push(`${joinPath(at, key)}: is required`)
    } else {
      lines.push(`${at || 'options'}: ${explain(error, node)}`)
    }
  }
  return [...new Set(lines)]
}

function explain (error: SchemaError, node: Record<string, unknown> | undefined): string {
  if (typeof node?.errorMessage === 'string') return node.errorMessage
  if (node?.type === 'integer' && node.minimum !== undefined && node.maximum !== undefined) {
    return `must be an integer from ${String(node.minimum)} to ${String(node.maximum)}`
  }
  if (Array.isArray(node?.enum)) return `must be one of ${node.enum.map(value => JSON.stringify(value)).join(', ')}`
  return error.message
}

function resolvePointer (schema: unknown, pointer: string): unknown {
  let node = schema
  for (const segment of pointer.replace(/^#\/?/, '').split('/')) {
    if (segment === '' || node === null || typeof node !== 'object') continue
    node = (node as Record<string, unknown>)[segment.replace(/~1/g, '/').replace(/~0/g, '~')]
  }
  return node
}

function formatPath (pointer: string): string {
  let path = ''
  for (const segment of pointer.split('/').slice(1)) path = joinPath(path, segment.replace(/~1/g, '/').replace(/~0/g, '~'))
  return path
}

function joinPath (path: string, key: string): string {
  if (/^[A-Za-z_$][\w$]*$/.test(key)) return path === '' ? key : `${path}.${key}`
  if (/^\d+$/.test(key)) return `${path}[${key}]`
  return `${path}[${JSON.stringify(key).replace(/^"|"$/g, "'")}]`
}
