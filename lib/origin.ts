import { isIPv4 } from 'node:net'
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

const DEFAULT_PORTS: Record<string, number> = { 'http:': 80, 'https:': 443, 'ws:': 80, 'wss:': 443, 'ftp:': 21 }
const PATTERN = /^([a-z][a-z0-9+.-]*):\/\/(\*\.)?(\[[0-9a-f:.]+\]|[^\s/\\:[\]?#@*%]+)(?::(\d{1,5}|\*))?\/?$/i
// What a browser sends: scheme://host[:port] (RFC 6454), the host an IP literal or letters, digits, '-', '_' and '.'.
const HOST = '(\\[[0-9a-f:.]+\\]|[a-z0-9_.-]+)(?::(\\d{1,5}))?'
const ORIGIN = new RegExp(`^([a-z][a-z0-9+.-]*)://${HOST}$`, 'i')
const HOST_HEADER = new RegExp(`^${HOST}$`, 'i')
const HOSTNAME = /^[^\s/\\:[\]?#@*%]+$/
export const PATTERN_HELP = "'*', 'same-origin', 'null', 'scheme://host[:port]', 'scheme://*.domain' or 'scheme://host:*'"

/** Compiles the `origins` option into one matcher; every pattern is parsed here, once.
 *  Each entry that is not an origin pattern adds a line naming it to `problems`. */
export function compileOrigins (option: OriginsOption, at: string, problems: string[], hostnames: ReadonlySet<string>): OriginMatcher {
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
      patterns.push(compilePattern(entry, Array.isArray(option) ? `${at}[${index}]` : at, hostnames))
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

function compilePattern (entry: unknown, at: string, hostnames: ReadonlySet<string>): PatternTest {
  if (entry instanceof RegExp) {
    const regexp = new RegExp(entry.source, entry.flags.replace(/[gy]/g, '')) // a stateless copy
    return (_origin, parsed) => parsed !== null && regexp.test(parsed.serialized)
  }
  if (typeof entry !== 'string') throw new Error(`${at}: must be an origin string, a RegExp or a function`)
  if (entry === '*') return (_origin, parsed) => parsed !== null
  if (entry === 'null') return origin => origin === 'null'
  if (entry === 'same-origin') return (_origin, parsed, request) => parsed !== null && isSameOrigin(parsed, request.headers.host, hostnames)
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

/** Parses an Origin header value; null if it is 'null', opaque or not exactly scheme://host[:port]
 *  (case and an explicit default port aside): nothing the URL parser would strip, decode or reinterpret. */
export function parseOrigin (origin: string): ParsedOrigin | null {
  const match = ORIGIN.exec(origin)
  if (match === null) return null
  const scheme = match[1].toLowerCase() + ':'
  if (scheme === 'file:') return null // file: origins are opaque
  const hostname = canonicalHost(match[2])
  const port = match[3] === undefined ? DEFAULT_PORTS[scheme] ?? 0 : Number(match[3])
  if (hostname === null || port > 65535) return null
  const shown = port === (DEFAULT_PORTS[scheme] ?? 0) ? '' : `:${port}`
  return { serialized: `${scheme}//${hostname}${shown}`, scheme, hostname, port }
}

/** The host as a browser serialises it (lower case; IPv6 compressed), or null if the URL parser would
 *  rewrite it otherwise: '0x7f.1' and '127.1' are 127.0.0.1 to it, so no browser sends them. */
function canonicalHost (host: string): string | null {
  let hostname: string
  try {
    hostname = new URL(`http://${host}`).hostname
  } catch {
    return null
  }
  return hostname.startsWith('[') || hostname === host.toLowerCase() ? hostname : null
}

/** Lower-case, punycode form of a pattern's host, or null if it is not a host. */
function normaliseHost (host: string): string | null {
  if (host.startsWith('[')) return canonicalHost(host)
  const ascii = domainToASCII(host)
  return ascii === '' ? null : ascii
}

/** Compiles the `hostnames` option into a set of lower-case punycode names, as browsers send them in Host.
 *  Each entry that is not a host name adds a line naming it to `problems`. */
export function compileHostnames (names: unknown, at: string, problems: string[]): ReadonlySet<string> {
  const compiled = new Set<string>()
  if (!Array.isArray(names)) return compiled // the schema reports it
  names.forEach((name: unknown, index) => {
    if (typeof name !== 'string') return // the schema reports it
    // domainToASCII would cut 'gw.example\evil.net' at the backslash, so such characters are refused first.
    const host = HOSTNAME.test(name) ? domainToASCII(name) : ''
    if (host === '') problems.push(`${at}[${index}]: ${JSON.stringify(name)} is not a host name (no scheme, port, path or wildcard)`)
    else compiled.add(host)
  })
  return compiled
}

/** True if the origin names the same host and port as the request's Host header, and that host is one a
 *  DNS-rebinding page cannot claim: an IP literal, localhost, or one of `hostnames`. */
function isSameOrigin (origin: ParsedOrigin, host: string | undefined, hostnames: ReadonlySet<string>): boolean {
  // Only a web page can share this gateway's origin; Host carries no scheme to tell 'capacitor://localhost' apart.
  if (origin.scheme !== 'http:' && origin.scheme !== 'https:') return false
  const match = host === undefined ? null : HOST_HEADER.exec(host)
  if (match === null) return false
  const hostname = canonicalHost(match[1])
  const port = match[2] === undefined ? DEFAULT_PORTS[origin.scheme] ?? 0 : Number(match[2])
  return hostname === origin.hostname && port === origin.port && isKnownHost(hostname, hostnames)
}

/** An IP literal is what the client connected to; localhost and *.localhost are loopback's alone (RFC 6761);
 *  any other name may resolve wherever its owner likes, so it must be listed. */
function isKnownHost (hostname: string, hostnames: ReadonlySet<string>): boolean {
  return hostname.startsWith('[') || isIPv4(hostname) || hostname === 'localhost' || hostname.endsWith('.localhost') ||
    hostnames.has(hostname)
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
