import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import { setMaxListeners } from 'node:events'
import type { FastifyInstance, FastifyPluginAsync } from 'fastify'
import fp from 'fastify-plugin'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import { resolveOptions, type FastifyWstunnelOptions } from './options'
import { backend, type BackendState } from './backend'
import type { UpstreamStatus } from './upstream-pool'
import { Registry } from 'prom-client'
import { totalOf, type RouteStatsSnapshot } from './stats'
import { registerMetrics } from './metrics'
import { installHandshakeTimeout } from './limits'
import { InvalidOptionsError } from './errors'
import { installSubprotocolChooser } from './subprotocol'
import { probeInternals } from './private-internals'

/** What the plugin adds to the Fastify instance as `fastify.wstunnel`, over every registration of the plugin. */
export interface WstunnelDecorator {
  /** Number of open bridged connections. */
  readonly connections: number
  /** Bytes queued inside the gateway across all bridged connections, both ways. */
  bufferedBytes (): number
  /** Each route's upstreams (by the route's full path), with their state, open connections and failures. */
  upstreams (): Record<string, UpstreamStatus[]>
  /** Counters per route (by its full path) and in total: bridges open, opened and closed (by code and side),
   *  handshakes refused (by reason), bytes each way, upstream connect time. */
  stats (): { total: RouteStatsSnapshot, routes: Record<string, RouteStatsSnapshot> }
}

const kRegistrations = Symbol('wstunnel.registrations')
type Registrations = Set<BackendState>

declare module 'fastify' {
  interface FastifyInstance {
    wstunnel: WstunnelDecorator
  }
}

async function fastifyWstunnel (fastify: FastifyInstance, rawOptions: FastifyWstunnelOptions): Promise<void> {
  const options = resolveOptions(rawOptions)
  // Each registration is a service of its own: two (under different prefixes) share no state.
  const state: BackendState = {
    bridges: new Set(),
    closing: false,
    connecting: new AbortController(),
    pools: new Map(),
    stats: new Map(),
    stoppers: [],
    observeConnect: null,
    drain: { code: options.closeCode, timeout: options.drainTimeout }
  }
  setMaxListeners(0, state.connecting.signal) // one listener per upstream connect in progress
  await probeInternals()

  if (!fastify.hasDecorator('websocketServer')) {
    await fastify.register(websocket, {
      options: { maxPayload: assembledLimit(options.routes), perMessageDeflate: false },
      // ws has already closed a client that sent a bad frame with the right code; only log it.
      errorHandler (error, socket, request) {
        request.log.debug({ err: error }, 'websocket error')
        if (socket.readyState === WebSocket.OPEN) socket.terminate()
      },
      // The default closes with no status; clients of a server going away should see 1001.
      preClose (done) {
        for (const client of this.websocketServer.clients) client.close(1001, 'server shutting down')
        done()
      }
    })
  }

  installSubprotocolChooser(fastify.websocketServer)

  if (!fastify.hasDecorator('wstunnel')) fastify.decorate('wstunnel', decorator(new Set()))
  const registrations = (fastify.wstunnel as WstunnelDecorator & { [kRegistrations]: Registrations })[kRegistrations]
  registrations.add(state)
  fastify.addHook('onClose', async () => {
    for (const stop of state.stoppers) stop()
    // The server has closed when the sockets have; each bridge's close line and counts come a moment later
    // (ws reports a close after its socket's). Waited for, briefly, so that a process exiting next loses none.
    const deadline = Date.now() + 1000
    while ([...state.stats.values()].some(counters => counters.live.size > 0) && Date.now() < deadline) {
      await new Promise(resolve => setTimeout(resolve, 5))
    }
    registrations.delete(state)
  })
  // An upgrade request answered over HTTP (401, 403, 502...) holds a socket the HTTP server no longer
  // manages. @fastify/websocket closes it only if its own onRequest hook ran, which a hook registered
  // before it can prevent; so close it here whenever the answer was not an upgrade.
  fastify.addHook('onSend', (request, reply, payload, done) => {
    if (isUpgradeRequest(request.raw)) reply.header('connection', 'close') // so no client reuses it
    done(null, payload)
  })
  fastify.addHook('onResponse', (request, _reply, done) => {
    if (isUpgradeRequest(request.raw)) request.raw.socket?.destroy() // none under injectWS
    done()
  })
  // Fastify answers some requests before any hook runs (a malformed URL: 400; a server closing: 503), and
  // does so while routing, synchronously. Node no longer reads an upgrade's socket, so not even the client
  // leaving would free it: once such an answer is written, the socket is closed.
  fastify.server.on('upgrade', (_request: IncomingMessage, socket: Socket) => {
    if (socket.bytesWritten > 0 && !socket.writableEnded) socket.end(() => { socket.destroy() })
  })
  installHandshakeTimeout(fastify.server, options.handshakeTimeout)
  // Handshakes still in progress are answered 503 and their upstream connects aborted; every bridge drains (its
  // upstream's bytes flow on until it is quiet, at most drainTimeout), then closes with closeCode, and so does
  // one that upgrades after this; every client has closeTimeout to answer.
  fastify.addHook('preClose', (done) => {
    state.closing = true
    state.connecting.abort()
    for (const bridge of state.bridges) bridge.shutdown()
    done()
  })

  // Metrics go to the app's registry if it gives one, else to one of the plugin's own.
  const registry = options.metricsRegistry ?? (options.metrics !== null ? new Registry() : null)
  if (registry !== null) {
    if (registry.getSingleMetric('wstunnel_bridges_open') !== undefined) {
      throw new InvalidOptionsError('metricsRegistry: another registration of fastify-wstunnel already exports its metrics to this registry')
    }
    const metrics = registerMetrics(registry, () => routeSnapshots(state), () => state.stats)
    state.observeConnect = metrics.observe
    state.stoppers.push(metrics.remove)
  }

  const { prefix, logLevel } = options
  await fastify.register(backend, {
    routes: options.routes,
    state,
    endpoints: { health: options.health, metrics: options.metrics === null ? null : { path: options.metrics, registry: registry as Registry } },
    prefix,
    ...(logLevel === undefined ? {} : { logLevel })
  })
}

/** Each route's counters, with the bytes of its live bridges added. */
function routeSnapshots (state: BackendState): Record<string, RouteStatsSnapshot> {
  const routes: Record<string, RouteStatsSnapshot> = {}
  for (const [path, counters] of state.stats) routes[path] = counters.snapshot()
  return routes
}

function decorator (registrations: Registrations): WstunnelDecorator {
  return {
    [kRegistrations]: registrations,
    get connections () {
      let total = 0
      for (const state of registrations) total += state.bridges.size
      return total
    },
    bufferedBytes () {
      let total = 0
      for (const state of registrations) for (const bridge of state.bridges) total += bridge.bufferedBytes()
      return total
    },
    upstreams () {
      const routes: Record<string, UpstreamStatus[]> = {}
      for (const state of registrations) for (const [path, pool] of state.pools) routes[path] = pool.status()
      return routes
    },
    stats () {
      let routes: Record<string, RouteStatsSnapshot> = {}
      for (const state of registrations) routes = { ...routes, ...routeSnapshots(state) }
      return { total: totalOf(Object.values(routes)), routes }
    }
  } as WstunnelDecorator
}

const ASSEMBLED_DEFAULT = 16 * 1024 * 1024

/** Where ws assembles messages (a connection whose frames the bridge cannot read itself: private-internals.ts
 *  says when), the memory they take is bounded: by the largest route maxPayload, and by 16 MiB where a route
 *  sets none. Each route's own limit is then checked on the whole message. ws keeps the limit in 32 bits. */
function assembledLimit (routes: Array<{ maxPayload: number }>): number {
  let largest = routes.length === 0 ? ASSEMBLED_DEFAULT : 0
  for (const route of routes) largest = Math.max(largest, route.maxPayload === 0 ? ASSEMBLED_DEFAULT : route.maxPayload)
  return Math.min(largest, 2 ** 31 - 1)
}

function isUpgradeRequest (request: IncomingMessage): boolean {
  return request.headers.upgrade !== undefined && /\bupgrade\b/i.test(request.headers.connection ?? '')
}

const plugin: FastifyPluginAsync<FastifyWstunnelOptions> = fp(fastifyWstunnel, {
  fastify: '5.x',
  name: 'fastify-wstunnel'
})

export type { FastifyWstunnelOptions, RouteOptions, UpstreamOption } from './options'
export type { UpstreamStatus } from './upstream-pool'
export type { RouteStatsSnapshot, RefusalReason } from './stats'
export type { ResolveUpstream } from './target'
export default plugin

// CommonJS callers get the plugin itself, as with every Fastify plugin; these assignments are the
// form Node's CommonJS lexer reads, so `import { fastifyWstunnel }` works too.
module.exports = plugin
module.exports.default = plugin
module.exports.fastifyWstunnel = plugin
