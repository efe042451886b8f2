import type { FastifyRequest } from 'fastify'
import type { TargetSpec, UpstreamOption, UpstreamTarget, ResolvedRoute } from './options'
import { parseResolvedUpstreams } from './options'
import { allowedAddresses, parseTargetAddress } from './allow-list'
import { parseSubprotocols } from './subprotocol'
import { tokenId } from './token'
import { BadTargetError, InvalidUpstreamError, NoUpstreamError, TargetForbiddenError, UnknownTokenError } from './errors'

/** Chooses a request's upstream in JavaScript, after the app's own hooks: null (or undefined) answers 404. */
export type ResolveUpstream = (request: FastifyRequest) =>
  UpstreamOption | UpstreamOption[] | null | undefined | Promise<UpstreamOption | UpstreamOption[] | null | undefined>

/** The upstreams a request chose, and how they are named in logs (a token only by its short hash). */
export interface ChosenTarget {
  upstreams: UpstreamTarget[]
  /** Chosen per request from outside the configuration (a query target, resolveUpstream): not kept for long. */
  dynamic: boolean
  token?: string
}

/** The upstreams a request on a route with a per-request target may reach. Throws the error to answer with,
 *  before any connection attempt: 404 for no or an unknown token (or no upstream from resolveUpstream), 400 for
 *  a malformed query target, 403 for one the allow-list refuses. */
export async function chooseTarget (route: ResolvedRoute, tokens: ReadonlyMap<string, UpstreamTarget[]>, request: FastifyRequest): Promise<ChosenTarget> {
  if (route.resolveUpstream !== null) {
    const value = await route.resolveUpstream(request)
    if (value === null || value === undefined) throw new NoUpstreamError()
    const upstreams = parseResolvedUpstreams(value, route.tls)
    if (typeof upstreams === 'string') throw new InvalidUpstreamError(upstreams)
    return { upstreams, dynamic: true }
  }
  const target = route.target as TargetSpec
  if (target.from === 'token') {
    const token = findToken(target, request)
    if (token === null) throw new UnknownTokenError(`no token given (${target.sources.map(source => describeSource(source, target.name)).join(', ')})`)
    const upstreams = tokens.get(token)
    if (upstreams === undefined) throw new UnknownTokenError(`unknown token ${tokenId(token)}`)
    return { upstreams, dynamic: false, token: tokenId(token) }
  }
  const value = queryValue(request, target.param)
  if (value === null) throw new BadTargetError(`the query parameter '${target.param}' must name the target as host:port`)
  const address = parseTargetAddress(value)
  if (address === null) throw new BadTargetError(`${JSON.stringify(value.slice(0, 300))} is not host:port or [ipv6]:port`)
  const allowed = await allowedAddresses(target.allow, address)
  if (allowed.length === 0) throw new TargetForbiddenError(value.slice(0, 300))
  const named = address.host
  return {
    upstreams: allowed.map(({ host, port }) => ({
      host,
      port,
      label: host === named ? formatAddress(host, port) : `${formatAddress(named, port)} (${host})`,
      // A name resolved here is still the name its certificate is for.
      tls: route.tls === null || host === named || route.tls.servername !== undefined ? route.tls : { ...route.tls, servername: named }
    })),
    dynamic: true
  }
}

/** The token, from the first of the target's sources that holds one; null if none does. */
function findToken (target: Extract<TargetSpec, { from: 'token' }>, request: FastifyRequest): string | null {
  for (const source of target.sources) {
    let token: string | null = null
    if (source === 'query') token = queryValue(request, target.name)
    else if (source === 'path') token = (request.params as Record<string, string | undefined>)[target.name] ?? null
    else if (source === 'cookie') token = cookieValue(request.headers.cookie, target.name)
    else token = bearerSubprotocol(request.headers['sec-websocket-protocol'], target.name)
    if (token !== null && token !== '') return token
  }
  return null
}

function describeSource (source: string, name: string): string {
  if (source === 'subprotocol') return `sub-protocol '${name}.<token>'`
  if (source === 'path') return `path segment :${name}`
  return `${source} '${name}'`
}

/** The first value of a query parameter, or null. */
function queryValue (request: FastifyRequest, name: string): string | null {
  const query = request.raw.url?.split('?')[1]
  if (query === undefined) return null
  return new URLSearchParams(query.split('#')[0]).get(name)
}

/** A cookie's value from a Cookie header (RFC 6265 section 4.2), percent-decoded where that is valid. */
export function cookieValue (header: string | undefined, name: string): string | null {
  if (header === undefined) return null
  for (const pair of header.split(';')) {
    const equals = pair.indexOf('=')
    if (equals === -1 || pair.slice(0, equals).trim() !== name) continue
    const value = pair.slice(equals + 1).trim().replace(/^"(.*)"$/, '$1')
    try {
      return decodeURIComponent(value)
    } catch {
      return value
    }
  }
  return null
}

/** The token a client put in Sec-WebSocket-Protocol as the entry `<name>.<token>`; null if none. */
export function bearerSubprotocol (header: string | undefined, name: string): string | null {
  if (header === undefined) return null
  let offered: string[]
  try {
    offered = parseSubprotocols(header)
  } catch {
    return null // the sub-protocol hook has answered 400 already
  }
  const prefix = name + '.'
  for (const entry of offered) if (entry.startsWith(prefix)) return entry.slice(prefix.length)
  return null
}

function formatAddress (host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`
}

/** The request's URL with a token it carries (query or path) replaced by the token's id; as is otherwise. */
export function redactedUrl (target: TargetSpec | null, request: FastifyRequest): string {
  const url = request.url
  if (target?.from !== 'token') return url
  const token = findToken({ ...target, sources: target.sources.filter(source => source === 'query' || source === 'path') }, request)
  if (token === null) return url
  const [path, query] = url.split('?', 2)
  const params = new URLSearchParams(query ?? '')
  if (params.has(target.name)) params.set(target.name, tokenId(params.get(target.name) ?? ''))
  return path.split('/').map(segment => safeDecode(segment) === token ? tokenId(token) : segment).join('/') +
    (query === undefined ? '' : `?${params.toString()}`)
}

/** Fastify's request log line with the token in the URL (query or path) replaced by its short hash. */
export function redactingRequestSerializer (target: TargetSpec): (request: FastifyRequest) => Record<string, unknown> {
  return function serializeRequest (request) {
    return {
      method: request.method,
      url: redactedUrl(target, request),
      version: request.headers['accept-version'],
      host: request.host,
      remoteAddress: request.ip,
      remotePort: request.socket?.remotePort
    }
  }
}

function safeDecode (segment: string): string {
  try {
    return decodeURIComponent(segment)
  } catch {
    return segment
  }
}
