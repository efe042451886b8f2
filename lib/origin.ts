import { domainToASCII } from 'node:url'
import type { FastifyRequest, onRequestAsyncHookHandler } from 'fastify'
import { OriginForbiddenError } from './errors'

/** A function that decides an origin: `origin` is the raw header value. */
export type OriginFunction = (origin: string, request: FastifyRequest) => boolean | Promise<boolean>
/** One allowed origin: '*', 'same-origin', 'null', an origin, a wildcard pattern, a RegExp or a function. */
export type OriginEntry = string | RegExp | OriginFunction
/** The `origins` option: one entry or a list of them. */
export type OriginsOption = OriginEntry | OriginEntry[]

/** An origin as the matcher sees it: scheme, host and port, normalised. */
interface ParsedOrigin {
  serialized: string // scheme://host[:port], default port dropped, host lower-case and punycode
  scheme: string
  hostname: string
  port: number
}

/** Decides whether a request's origin is allowed; built once per route at registration. */
export type OriginMatcher = (origin: string, request: FastifyRequest) => Promise<boolean>
type PatternTest = (origin: string, parsed: ParsedOrigin | null, request: FastifyRequest) => boolean

const DEFAULT_PORTS: Record<string, number> = { 'http:': 80, 'https:': 443, 'ws:': 80, 'wss:': 443 }
const PATTERN = /^([a-z][a-z0-9+.-]*):\/\/(\*\.)?(\[[0-9a-f:.]+\]|[^\s/:[\]?#@*]+)(?::(\d{1,5}|\*))?\/?$/i
export const PATTERN_HELP = "'*', 'same-origin', 'null', 'scheme://host[:port]', 'scheme://*.domain' or 'scheme://host:*'"

/** Compiles the `origins` option into one matcher; every pattern is parsed here, once.
 *  Each entry that is not an origin pattern adds a line naming it to `problems`. */
export function compileOrigins (option: OriginsOption, at: string, problems: string[]): OriginMatcher {
  const entries = Array.isArray(option) ? option : [option]
  if (entries.length === 0) problems.push(`${at}: must list at least one origin (leave it out to allow any)`)
  const patterns: PatternTest[] = []
  const functions: OriginFunction[] = []
  entries.forEach((entry, index) => {
    if (typeof entry === 'function') {
      functions.push(entry)
      return
    }
    try {
      patterns.push(compilePattern(entry, Array.isArray(option) ? `${at}[${index}]` : at))
    } catch (err) {
      problems.push((err as Error).message)
    }
  })
  return async function matchOrigin (origin, request) {
    const parsed = parseOrigin(origin)
    for (const test of patterns) if (test(origin, parsed, request)) return true
    // Functions get the raw header value, and may be asynchronous.
    for (const allows of functions) if (await allows(origin, request)) return true
    return false
  }
}

function compilePattern (entry: unknown, at: string): PatternTest {
  if (entry instanceof RegExp) {
    const regexp = new RegExp(entry.source, entry.flags.replace(/[gy]/g, '')) // a stateless copy
    return (_origin, parsed) => parsed !== null && regexp.test(parsed.serialized)
  }
  if (typeof entry !== 'string') throw new Error(`${at}: must be an origin string, a RegExp or a function`)
  if (entry === '*') return (_origin, parsed) => parsed !== null
  if (entry === 'null') return origin => origin === 'null'
  if (entry === 'same-origin') return (_origin, parsed, request) => parsed !== null && isSameOrigin(parsed, request.headers.host)
  const match = PATTERN.exec(entry)
  if (match === null) throw new Error(`${at}: ${JSON.stringify(entry)} is not an origin pattern (use ${PATTERN_HELP})`)
  const scheme = match[1].toLowerCase() + ':'
  const wildcardHost = match[2] !== undefined
  const hostname = normaliseHost(match[3])
  if (hostname === null) throw new Error(`${at}: ${JSON.stringify(entry)} has an invalid host`)
  const anyPort = match[4] === '*'
  const port = match[4] === undefined || anyPort ? DEFAULT_PORTS[scheme] ?? 0 : Number(match[4])
  if (port > 65535) throw new Error(`${at}: ${JSON.stringify(entry)} has a port above 65535`)
  const suffix = '.' + hostname
  return (_origin, parsed) => parsed !== null &&
    parsed.scheme === scheme &&
    (anyPort || parsed.port === port) &&
    (wildcardHost ? parsed.hostname.endsWith(suffix) : parsed.hostname === hostname)
}

/** Parses an Origin header value; null if it is 'null', opaque or not a bare scheme://host[:port]. */
export function parseOrigin (origin: string): ParsedOrigin | null {
  if (!/^[a-z][a-z0-9+.-]*:\/\/[^/?#@\s]+$/i.test(origin)) return null
  let url: URL
  try {
    url = new URL(origin)
  } catch {
    return null
  }
  if (url.origin === 'null' || url.hostname === '') return null
  const scheme = url.protocol
  return { serialized: url.origin, scheme, hostname: url.hostname, port: url.port === '' ? DEFAULT_PORTS[scheme] ?? 0 : Number(url.port) }
}

/** Lower-case, punycode form of a host as the URL parser gives it, or null if it is not a host. */
function normaliseHost (host: string): string | null {
  if (host.startsWith('[')) {
    try {
      return new URL(`http://${host}`).hostname
    } catch {
      return null
    }
  }
  const ascii = domainToASCII(host)
  return ascii === '' ? null : ascii
}

/** True if the origin names the same host and port as the request's Host header. */
function isSameOrigin (origin: ParsedOrigin, host: string | undefined): boolean {
  if (host === undefined) return false
  let url: URL
  try {
    url = new URL(`${origin.scheme}//${host}`)
  } catch {
    return false
  }
  const port = url.port === '' ? DEFAULT_PORTS[origin.scheme] ?? 0 : Number(url.port)
  return url.hostname === origin.hostname && port === origin.port
}

/** The route's origin filter, an onRequest hook: a refused origin gets 403 before any upstream is touched.
 *  A request with no Origin (not a browser) passes unless the route sets requireOrigin. */
export function checkOrigin (route: { path: string, origins: OriginMatcher | null, requireOrigin: boolean }): onRequestAsyncHookHandler {
  const matcher = route.origins
  return async function originFilter (request) {
    const header = request.headers.origin ?? request.headers['sec-websocket-origin']
    const origin = Array.isArray(header) ? header[0] : header
    if (origin === undefined) {
      if (!route.requireOrigin) return
      request.log.info({ route: route.path }, 'wstunnel refused a request with no Origin header')
      throw new OriginForbiddenError('(none)')
    }
    if (matcher === null || await matcher(origin, request)) return
    request.log.info({ route: route.path, origin }, 'wstunnel refused origin')
    throw new OriginForbiddenError(JSON.stringify(origin))
  }
}
