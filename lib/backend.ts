import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { ResolvedRoute, UpstreamTarget } from './options'
import { Bridge } from './bridge'
import { Heartbeat } from './heartbeat'
import { connectUpstream } from './upstream'
import { checkHandshake } from './handshake'
import { checkOrigin } from './origin'
import { chosenSubprotocol, selectSubprotocol } from './subprotocol'
import { proxyHeader } from './proxy-protocol'
import { ShuttingDownError } from './errors'
import { releaseUpgradeResponse } from './private-internals'

const kPending = Symbol('wstunnel.pending-upstream')

/** An upstream connected before the upgrade, waiting for the WebSocket to adopt it. */
interface Pending {
  upstream: Socket
  target: UpstreamTarget
  preambleLength: number
  onClientGone: () => void
}

type RawWithPending = FastifyRequest['raw'] & { [kPending]?: Pending }

/** What the plugin and its routes share: the open bridges, and whether the server is closing. */
export interface BackendState {
  bridges: Set<Bridge>
  closing: boolean
  /** Aborts the upstream connects of handshakes in progress. */
  connecting: AbortController
}

export interface BackendOptions {
  routes: ResolvedRoute[]
  state: BackendState
}

/** The encapsulated backend service: one WebSocket route per declared path, each bridged to its upstream. */
export async function backend (fastify: FastifyInstance, { routes, state }: BackendOptions): Promise<void> {
  const { bridges } = state
  for (const route of routes) {
    const heartbeat = route.pingInterval > 0 ? new Heartbeat(route.pingInterval) : null

    // Runs after every user hook, so a hook that refuses the request costs no upstream connection.
    async function connectBeforeUpgrade (request: FastifyRequest): Promise<void> {
      if (state.closing) throw new ShuttingDownError()
      const subprotocol = chosenSubprotocol(request)
      const target = (subprotocol !== null ? route.upstreamBySubprotocol?.get(subprotocol) : undefined) ?? route.upstream
      if (target === null) throw new Error('no upstream for this request') // the sub-protocol hook refuses this case first
      const preamble = route.proxyProtocol === null ? undefined : proxyHeader(route.proxyProtocol, proxyInfo(request, subprotocol))
      const upstream = await connectUpstream(target, route.connectTimeout, preamble, state.connecting.signal)
      const client = request.raw.socket as Socket | undefined // none under injectWS
      if (client?.destroyed === true) {
        upstream.destroy()
        return
      }
      // If the upgrade never completes (client gone, handshake refused), the upstream goes too.
      const onClientGone = (): void => { upstream.destroy() }
      client?.once('close', onClientGone)
      ;(request.raw as RawWithPending)[kPending] = { upstream, target, preambleLength: preamble?.length ?? 0, onClientGone }
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
        limits: { maxPayload: route.maxPayload, maxFragments: fastify.websocketServer.options.maxFragments ?? 0 }
      }
      const opened = new Bridge(ws, upstream, context)
      log.info({ route: route.path, client: context.client, upstream: context.upstream.label, subprotocol: context.subprotocol || undefined }, 'wstunnel bridge open')
      if (state.closing) opened.shutdown() // upgraded after the plugin's preClose
    }

    const onRequest = route.origins !== null || route.requireOrigin
      ? [checkHandshake, checkOrigin(route), selectSubprotocol(route)]
      : [checkHandshake, selectSubprotocol(route)]
    fastify.get(route.path, { websocket: true, onRequest, preHandler: connectBeforeUpgrade }, bridge)
  }
}

/** The client's real address (Fastify's request.ip honours trustProxy) and what it asked for. */
function proxyInfo (request: FastifyRequest, subprotocol: string | null): Parameters<typeof proxyHeader>[1] {
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
    path: request.url,
    origin: typeof origin === 'string' ? origin : undefined
  }
}
