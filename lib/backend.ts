import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { ResolvedRoute, UpstreamTarget } from './options'
import { Bridge } from './bridge'
import { Heartbeat } from './heartbeat'
import { RoutePool, type UpstreamEntry } from './upstream-pool'
import { chooseTarget, redactedUrl, redactingRequestSerializer } from './target'
import { readTokens } from './options'
import { watchTokenFile } from './token-file'
import { checkHandshake } from './handshake'
import { checkOrigin } from './origin'
import { chosenSubprotocol, selectSubprotocol } from './subprotocol'
import { proxyHeader } from './proxy-protocol'
import { ClientGoneError, ShuttingDownError, TooManyPendingError } from './errors'
import rateLimit from '@fastify/rate-limit'
import type { Registry } from 'prom-client'
import { healthHandler } from './health'
import { RouteStats, refusalReason, type RefusalReason } from './stats'
import { connectionLimits, handshakeRateLimit } from './limits'
import { releaseUpgradeResponse } from './private-internals'

const kPending = Symbol('wstunnel.pending-upstream')

/** An upstream connected before the upgrade, waiting for the WebSocket to adopt it. */
interface Pending {
  upstream: Socket
  target: UpstreamTarget
  /** A token's short hash, for the log: never the token. */
  token: string | undefined
  preambleLength: number
  onClientGone: () => void
}

const kRefusal = Symbol('wstunnel.refusal')
/** Why the handshake was refused; null once counted. */
type RawWithPending = FastifyRequest['raw'] & { [kPending]?: Pending, [kRefusal]?: RefusalReason | null }

/** What the plugin and its routes share: the open bridges, and whether the server is closing. */
export interface BackendState {
  bridges: Set<Bridge>
  closing: boolean
  /** Aborts the upstream connects of handshakes in progress. */
  connecting: AbortController
  /** Each route's upstreams and their health, by the route's full path. */
  pools: Map<string, RoutePool>
  /** Each route's counters, by the route's full path. */
  stats: Map<string, RouteStats>
  /** Feeds the connect-time histogram, when metrics are on: route's full path, seconds. */
  observeConnect: ((route: string, seconds: number) => void) | null
  /** How bridges are closed on shutdown: the code, and how long upstream bytes may still flow first. */
  drain: { code: 1001 | 1012, timeout: number }
  /** Called when the plugin closes: health checks, token file watchers. */
  stoppers: Array<() => void>
}

export interface BackendOptions {
  routes: ResolvedRoute[]
  state: BackendState
  /** Where the health and metrics endpoints are served, if they are. */
  endpoints: { health: string | null, metrics: { path: string, registry: Registry } | null }
}

/** The encapsulated backend service: one WebSocket route per declared path, each bridged to an upstream of
 *  its pool, chosen by the route's balance policy and passive health, or per request by its target. */
export async function backend (fastify: FastifyInstance, { routes, state, endpoints }: BackendOptions): Promise<void> {
  const { bridges } = state
  // For createRateLimit only: an app that registered @fastify/rate-limit already has it.
  if (routes.some(route => route.handshakeRate !== null) && !fastify.hasDecorator('createRateLimit')) await fastify.register(rateLimit, { global: false })
  if (endpoints.health !== null) fastify.get(endpoints.health, healthHandler(state))
  const metrics = endpoints.metrics
  if (metrics !== null) {
    fastify.get(metrics.path, async (_request, reply) => await reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()))
  }
  for (const route of routes) {
    const heartbeat = route.pingInterval > 0 ? new Heartbeat(route.pingInterval) : null
    const configured = [...route.upstreams ?? [], ...[...route.upstreamBySubprotocol?.values() ?? []].flat()]
    const target = route.target
    if (target?.from === 'token') configured.push(...[...target.tokens.values(), ...target.fileTokens.values()].flat())
    const pool = new RoutePool(route, configured, fastify.log)
    const counters = new RouteStats()
    const fullPath = fastify.prefix + route.path
    state.pools.set(fullPath, pool)
    state.stats.set(fullPath, counters)
    const observe = state.observeConnect
    if (observe !== null) counters.observeConnect = seconds => { observe(fullPath, seconds) }
    let pending = 0
    state.stoppers.push(() => { pool.close() })
    if (route.healthCheck !== null) pool.startChecks(route.healthCheck.interval)
    // Inline tokens win over the file's.
    let tokens = target?.from === 'token' ? new Map([...target.fileTokens, ...target.tokens]) : new Map<string, UpstreamTarget[]>()
    if (target?.from === 'token' && target.tokensFile !== null) {
      const file = target.tokensFile
      // A changed file replaces the table for new connections; open bridges keep going. A file that no longer
      // reads (half written, a bad line) leaves the table as it was.
      state.stoppers.push(watchTokenFile(file, () => {
        const problems: string[] = []
        const read = readTokens(file, route.tls, problems)
        if (problems.length > 0) {
          fastify.log.warn({ route: route.path, problems }, 'wstunnel token file not reloaded')
          return
        }
        tokens = new Map([...read, ...target.tokens])
        fastify.log.info({ route: route.path, file, tokens: tokens.size }, 'wstunnel token file reloaded')
      }, err => { fastify.log.warn({ route: route.path, file, err }, 'wstunnel token file is not watched: changes need a restart') }))
    }

    // Runs after every user hook, so a hook that refuses the request costs no upstream connection.
    async function connectBeforeUpgrade (request: FastifyRequest): Promise<void> {
      if (state.closing) throw new ShuttingDownError()
      if (route.maxPendingHandshakes > 0 && pending >= route.maxPendingHandshakes) throw new TooManyPendingError(route.maxPendingHandshakes)
      pending++
      try {
        await connect(request)
      } finally {
        pending--
      }
    }

    async function connect (request: FastifyRequest): Promise<void> {
      const client = request.raw.socket as Socket | undefined // none under injectWS
      // Shutdown, or the client leaving, stops the choice and the connects: nothing goes on connecting for nobody.
      const abort = new AbortController()
      const onAbort = (): void => { abort.abort(state.closing ? new ShuttingDownError() : new ClientGoneError()) }
      state.connecting.signal.addEventListener('abort', onAbort)
      client?.once('close', onAbort)
      let connected: { socket: Socket, entry: UpstreamEntry }
      let token: string | undefined
      let preambleLength = 0
      const subprotocol = chosenSubprotocol(request)
      try {
        let entries: UpstreamEntry[]
        if (route.target !== null || route.resolveUpstream !== null) {
          const chosen = await unlessAborted(chooseTarget(route, tokens, request), abort.signal)
          entries = pool.entriesFor(chosen.upstreams, chosen.dynamic)
          token = chosen.token
        } else {
          const targets = (subprotocol !== null ? route.upstreamBySubprotocol?.get(subprotocol) : undefined) ?? route.upstreams
          if (targets === null) throw new Error('no upstream for this request') // the sub-protocol hook refuses this case first
          entries = pool.entriesFor(targets, false)
        }
        const preamble = route.proxyProtocol === null ? undefined : proxyHeader(route.proxyProtocol, proxyInfo(request, subprotocol, redactedUrl(route.target, request)))
        preambleLength = preamble?.length ?? 0
        const started = performance.now()
        connected = await pool.connect(pool.order(entries, request.ip), preamble, abort.signal)
        counters.connected(performance.now() - started)
      } finally {
        state.connecting.signal.removeEventListener('abort', onAbort)
        client?.removeListener('close', onAbort)
      }
      const { socket: upstream, entry } = connected
      if (client?.destroyed === true) {
        upstream.destroy()
        countGone(request.raw as RawWithPending)
        return
      }
      // If the upgrade never completes (client gone, handshake refused), the upstream goes too.
      const onClientGone = (): void => {
        upstream.destroy()
        countGone(request.raw as RawWithPending) // ws drops a dead socket without a word
      }
      client?.once('close', onClientGone)
      ;(request.raw as RawWithPending)[kPending] = { upstream, target: entry.target, token, preambleLength, onClientGone }
    }

    function bridge (ws: WebSocket, request: FastifyRequest): void {
      const raw = request.raw as RawWithPending
      const pending = raw[kPending]
      if (pending === undefined) {
        ws.close(1011, 'no upstream')
        return
      }
      raw[kPending] = undefined
      const client = request.raw.socket as Socket | undefined
      client?.removeListener('close', pending.onClientGone)
      try {
        adopt(ws, request, pending, client)
      } catch (err) {
        request.log.error({ err, route: route.path }, 'wstunnel bridge failed to open')
        pending.upstream.destroy()
        ws.terminate()
      }
    }

    function adopt (ws: WebSocket, request: FastifyRequest, pending: Pending, client: Socket | undefined): void {
      const { upstream } = pending
      // Bridges are tracked by the plugin, which closes them with 1001 on shutdown; left in ws's own set
      // (there is none with clientTracking off), an earlier-registered @fastify/websocket preClose would close
      // them first, with no status (1005).
      fastify.websocketServer.clients?.delete(ws)
      if (upstream.destroyed) { // reset while the upgrade completed
        request.log.info({ route: route.path, upstream: pending.target.label }, 'wstunnel upstream closed before the bridge opened')
        ws.close(1011, 'upstream closed')
        return
      }
      // Let the HTTP request go once upgraded: the socket's ServerResponse and @fastify/websocket's error
      // listener (a closure over request and reply) would keep them, and their headers, for the bridge's life.
      // The bridge's own listener reports client errors; ws closes the connection itself.
      if (client !== undefined) releaseUpgradeResponse(client)
      ws.removeAllListeners('error')
      const log = request.log
      const context = {
        route,
        upstream: pending.target,
        subprotocol: ws.protocol,
        log,
        client: `${request.ip}:${request.socket?.remotePort ?? 0}`,
        bridges,
        heartbeat,
        preambleLength: pending.preambleLength,
        limits: { maxPayload: route.maxPayload, maxFragments: fastify.websocketServer.options.maxFragments ?? 0 },
        stats: counters,
        drain: state.drain
      }
      counters.opened++
      const opened = new Bridge(ws, upstream, context)
      log.info({ route: route.path, client: context.client, upstream: context.upstream.label, subprotocol: context.subprotocol || undefined, token: pending.token }, 'wstunnel bridge open')
      if (state.closing) opened.shutdown() // upgraded after the plugin's preClose
    }

    function countRefusal (raw: RawWithPending): void {
      if (raw[kRefusal] === null) return // counted already
      counters.refuse(raw[kRefusal] ?? 'other')
      raw[kRefusal] = null
    }

    /** A handshake whose client left: counted as gone, unless it was counted already (refused, then closed). */
    function countGone (raw: RawWithPending): void {
      if (raw[kRefusal] === null) return
      raw[kRefusal] = 'client_gone'
      countRefusal(raw)
    }

    // Cheapest first; a route pays only for the checks it has.
    const onRequest = [
      checkHandshake,
      ...route.handshakeRate !== null ? [handshakeRateLimit(fastify, route.handshakeRate)] : [],
      ...route.maxConnections > 0 || route.maxConnectionsPerIp > 0 ? [connectionLimits(route.maxConnections, route.maxConnectionsPerIp)] : [],
      ...route.origins !== null || route.requireOrigin ? [checkOrigin(route)] : [],
      selectSubprotocol(route)
    ]
    // The request log line would hold a token given in the URL: it shows its short hash instead.
    const logSerializers = target?.from === 'token' && target.sources.some(source => source === 'query' || source === 'path')
      ? { req: redactingRequestSerializer(target) }
      : undefined
    fastify.get(route.path, {
      websocket: true,
      onRequest,
      preHandler: connectBeforeUpgrade,
      logSerializers,
      ...route.logLevel === undefined ? {} : { logLevel: route.logLevel },
      // A refused handshake is counted once, by the reason of the error that refused it (else 'other').
      onError (request, _reply, error, done) {
        const raw = request.raw as RawWithPending
        raw[kRefusal] = refusalReason((error as { code?: string }).code)
        // A client that has gone gets no response, so no onResponse: counted here.
        if (raw.socket?.destroyed === true) countRefusal(raw)
        done()
      },
      onResponse (request, reply, done) {
        if (reply.statusCode !== 101) countRefusal(request.raw as RawWithPending)
        done()
      }
    }, bridge)
  }
}

/** Settles as `promise` does, or rejects with the abort's reason first. */
async function unlessAborted<T> (promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) throw signal.reason
  let onAbort: (() => void) | undefined
  try {
    return await Promise.race([promise, new Promise<never>((_resolve, reject) => {
      onAbort = () => { reject(signal.reason) }
      signal.addEventListener('abort', onAbort)
    })])
  } finally {
    if (onAbort !== undefined) signal.removeEventListener('abort', onAbort)
  }
}

/** The client's real address (Fastify's request.ip honours trustProxy) and what it asked for. */
function proxyInfo (request: FastifyRequest, subprotocol: string | null, path: string): Parameters<typeof proxyHeader>[1] {
  const socket = request.socket as Socket | undefined
  // Behind a trusted proxy the client's port is unknown: the socket's is the proxy's.
  const sourcePort = request.ip === socket?.remoteAddress ? socket.remotePort ?? 0 : 0
  const origin = request.headers.origin ?? request.headers['sec-websocket-origin']
  return {
    sourceAddress: request.ip,
    sourcePort,
    destinationAddress: socket?.localAddress ?? '',
    destinationPort: socket?.localPort ?? 0,
    authority: request.headers.host,
    subprotocol: subprotocol ?? undefined,
    path, // with a token it carries shown by its id
    origin: typeof origin === 'string' ? origin : undefined
  }
}
