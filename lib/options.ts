import Type, { type Static, type TSchema } from 'typebox'
import { Compile } from 'typebox/compile'
import { Settings } from 'typebox/system'
import { InvalidOptionsError } from './errors'
import { compileHostnames, compileOrigins, PATTERN_HELP, type OriginMatcher, type OriginsOption } from './origin'

const PORT = '([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])'

const UpstreamString = Type.String({
  pattern: `^(unix:.+|\\[[0-9A-Fa-f:.]+\\]:${PORT}|[^\\s:\\[\\]/]+:${PORT})$`,
  errorMessage: "must be 'host:port', '[ipv6]:port' (port 1 to 65535) or 'unix:/path'"
})
const Port = Type.Integer({ minimum: 1, maximum: 65535 })

/** Where a route's TCP service lives. */
export const UpstreamSchema = Type.Union([
  UpstreamString,
  Type.Object({ host: Type.String({ minLength: 1 }), port: Port }, { additionalProperties: false }),
  Type.Object({ path: Type.String({ minLength: 1 }) }, { additionalProperties: false })
], { errorMessage: "must be 'host:port', '[ipv6]:port', 'unix:/path', { host, port } or { path }" })

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
  requireSubprotocol: Type.Boolean({ default: false })
}

// Settings with no default: absent means the feature is off.
const optionalSettings = {
  // Strings, lists of strings, and in JavaScript RegExps and functions: checked and compiled by origin.ts.
  origins: Type.Optional(Type.Unsafe<OriginsOption>({ description: `${PATTERN_HELP}, a RegExp, a function, or a list of them` })),
  // The names 'same-origin' trusts besides IP literals and localhost: checked and normalised by origin.ts.
  hostnames: Type.Optional(Type.Array(Type.String(), { minItems: 1, errorMessage: 'must be a non-empty list of host names' })),
  proxyProtocol: Type.Optional(Type.Enum(['v1', 'v2']))
}

const SubprotocolName = Type.String({
  pattern: "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$",
  errorMessage: 'must be a sub-protocol name (letters, digits and !#$%&\'*+-.^_`|~)'
})

const RouteSchema = Type.Object({
  upstream: Type.Optional(UpstreamSchema),
  subprotocols: Type.Optional(Type.Union([
    Type.Array(SubprotocolName, { minItems: 1, errorMessage: 'must be a non-empty list of sub-protocol names' }),
    Type.Record(Type.String({ pattern: "^[!#$%&'*+\\-.^_`|~0-9A-Za-z]+$" }), UpstreamSchema, {
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
  ...routeSettings,
  ...optionalSettings
}, { additionalProperties: false })

export type UpstreamOption = Static<typeof UpstreamSchema>
export type RouteOptions = Static<typeof RouteSchema>
export type FastifyWstunnelOptions = Partial<Static<typeof OptionsSchema>> & { routes: Record<string, RouteOptions> }

type RouteSettings = { [K in keyof typeof routeSettings]: Static<(typeof routeSettings)[K]> }

/** A TCP or unix-socket address, parsed once. */
export type UpstreamTarget = { host: string, port: number, label: string } | { path: string, label: string }

/** A route's options with the plugin's defaults applied, its upstreams parsed and its origins compiled. */
export interface ResolvedRoute extends RouteSettings {
  path: string
  /** For clients that ask for no sub-protocol (or when the route has no sub-protocol map). */
  upstream: UpstreamTarget | null
  /** The accepted sub-protocols in the server's order of preference; empty when the route names none. */
  subprotocols: string[]
  /** When `subprotocols` is a map: the upstream of each. */
  upstreamBySubprotocol: Map<string, UpstreamTarget> | null
  origins: OriginMatcher | null
  /** The names 'same-origin' trusts besides IP literals and localhost: lower-case, punycode. */
  hostnames: ReadonlySet<string>
  proxyProtocol: 'v1' | 'v2' | null
}

export interface ResolvedOptions {
  /** The plugin-wide maxPayload: each route's own is on the route. */
  maxPayload: number
  routes: ResolvedRoute[]
}

const check = Compile(OptionsSchema)
// Value.Default trips over a Record with additionalProperties: false, and only top-level keys have defaults.
const defaultSettings = Object.fromEntries(Object.entries(OptionsSchema.properties)
  .filter(([, schema]) => 'default' in schema).map(([key, schema]) => [key, (schema as unknown as { default: unknown }).default]))

/** Validates raw options, applies defaults and parses upstreams.
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
  const compiled = new Map<string, { origins: OriginMatcher | null, hostnames: ReadonlySet<string> }>()
  const routeEntries = isObject(options.routes) ? Object.entries(options.routes) : []
  for (const [path, route] of routeEntries) {
    if (!isObject(route)) continue
    const at = joinPath('routes', path)
    if (route.upstream === undefined && !isObject(route.subprotocols)) {
      problems.push(`${at}.upstream: is required (unless subprotocols maps each sub-protocol to an upstream)`)
    }
    const hostnames = route.hostnames === undefined ? defaultHostnames : compileHostnames(route.hostnames, `${at}.hostnames`, problems)
    // Compiled per route, as 'same-origin' needs the route's own hostnames.
    const [origins, originsAt] = route.origins === undefined ? [options.origins, 'origins'] : [route.origins, `${at}.origins`]
    compiled.set(path, { origins: origins === undefined ? null : compileOrigins(origins, originsAt, problems, hostnames), hostnames })
  }
  if (problems.length > 0) throw new InvalidOptionsError([...new Set(problems)].join('\n'))

  const defaults: Record<string, unknown> = { ...options }
  delete defaults.routes
  const routes = routeEntries.map(([path, route]): ResolvedRoute => {
    const map = route.subprotocols !== undefined && !Array.isArray(route.subprotocols) ? route.subprotocols : null
    return {
      ...(defaults as RouteSettings),
      ...route,
      path,
      upstream: route.upstream === undefined ? null : parseUpstream(route.upstream),
      subprotocols: route.subprotocols === undefined ? [] : Array.isArray(route.subprotocols) ? route.subprotocols : Object.keys(route.subprotocols),
      upstreamBySubprotocol: map === null ? null : new Map(Object.entries(map).map(([name, upstream]) => [name, parseUpstream(upstream)])),
      origins: compiled.get(path)?.origins ?? null,
      hostnames: compiled.get(path)?.hostnames ?? new Set(),
      proxyProtocol: route.proxyProtocol ?? options.proxyProtocol ?? null
    }
  })
  return { maxPayload: options.maxPayload, routes }
}

/** Every problem, not only TypeBox's first eight; its process-wide setting is put back for the host app. */
function allErrors (options: unknown): SchemaError[] {
  const { maxErrors } = Settings.Get()
  Settings.Set({ maxErrors: 1000 })
  try {
    return [...check.Errors(options)]
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

/** Turns any accepted upstream form into a target with a printable label. */
export function parseUpstream (upstream: UpstreamOption): UpstreamTarget {
  if (typeof upstream === 'object') {
    if ('path' in upstream) return { path: upstream.path, label: `unix:${upstream.path}` }
    const host = upstream.host.replace(/^\[(.*)\]$/, '$1')
    return { host, port: upstream.port, label: host.includes(':') ? `[${host}]:${upstream.port}` : `${host}:${upstream.port}` }
  }
  if (upstream.startsWith('unix:')) return { path: upstream.slice(5), label: upstream }
  const colon = upstream.lastIndexOf(':')
  const host = upstream.slice(0, colon).replace(/^\[(.*)\]$/, '$1')
  return { host, port: Number(upstream.slice(colon + 1)), label: upstream }
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
  // For a union, report only the branch whose shape fits the value, or the union's own message.
  for (const union of errors.filter(error => error.keyword === 'anyOf')) {
    const inside = errors.filter(error => error.schemaPath.startsWith(union.schemaPath + '/anyOf/') &&
      error.instancePath.startsWith(union.instancePath))
    const branchOf = (error: SchemaError) => error.schemaPath.slice(union.schemaPath.length + 7).split('/')[0]
    const misshapen = new Set(inside.filter(error => error.instancePath === union.instancePath && error.keyword === 'type').map(branchOf))
    // Of the branches whose type fits, the one whose errors reach deepest into the value is the one meant.
    let fitting: SchemaError | undefined
    for (const error of inside) {
      if (!misshapen.has(branchOf(error)) && (fitting === undefined || error.instancePath.length > fitting.instancePath.length)) fitting = error
    }
    for (const error of inside) if (fitting === undefined || branchOf(error) !== branchOf(fitting)) dropped.add(error)
    if (fitting !== undefined) dropped.add(union)
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
