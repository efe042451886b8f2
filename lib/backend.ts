import { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { ResolvedRoute, UpstreamTarget } from './options'
import { Bridge } from './bridge'
import { Heartbeat } from './heartbeat'
import { connectUpstream } from './upstream'
import { checkOrigin } from './origin'
import { chosenSubprotocol, selectSubprotocol } from './subprotocol'
import { proxyHeader } from './proxy-protocol'

const kPending = Symbol('wstunnel.pending-upstream')

/** An upstream connected before the upgrade, waiting for the WebSocket to adopt it. */
interface Pending {
  upstream: Socket
  target: UpstreamTarget
  preambleLength: number
  onClientGone: () => void
}

type RawWithPending = FastifyRequest['raw'] & { [kPending]?: Pending }

export interface BackendOptions {
  routes: ResolvedRoute[]
  bridges: Set<Bridge>
}

/** The encapsulated backend service: one WebSocket route per declared path, each bridged to its upstream. */
export async function backend (fastify: FastifyInstance, { routes, bridges }: BackendOptions): Promise<void> {
  for (const route of routes) {
    const heartbeat = route.pingInterval > 0 ? new Heartbeat(route.pingInterval) : null

    // Runs after every user hook, so a hook that refuses the request costs no upstream connection.
    async function connectBeforeUpgrade (request: FastifyRequest): Promise<void> {
      if (!request.ws) return // a plain HTTP request: @fastify/websocket answers 404
      const subprotocol = chosenSubprotocol(request)
      const target = (subprotocol !== null ? route.upstreamBySubprotocol?.get(subprotocol) : undefined) ?? route.upstream
      if (target === null) throw new Error('no upstream for this request') // the sub-protocol hook refuses this case first
      const preamble = route.proxyProtocol === null ? undefined : proxyHeader(route.proxyProtocol, proxyInfo(request, subprotocol))
      const upstream = await connectUpstream(target, route.connectTimeout, preamble)
      const client = request.raw.socket
      if (client.destroyed) {
        upstream.destroy()
        return
      }
      // If the upgrade never completes (client gone, handshake refused), the upstream goes too.
      const onClientGone = (): void => { upstream.destroy() }
      client.once('close', onClientGone)
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
      request.raw.socket.removeListener('close', pending.onClientGone)
      // Bridges are tracked by the plugin, which closes them with 1001 on shutdown; left in ws's own set,
      // an earlier-registered @fastify/websocket preClose would close them first, with no status (1005).
      fastify.websocketServer.clients.delete(ws)
      // Let the HTTP request go once upgraded: the socket's ServerResponse and @fastify/websocket's error
      // listener (a closure over request and reply) would keep them, and their headers, for the bridge's life.
      // The bridge's own listener reports client errors; ws closes the connection itself.
      const response = (request.raw.socket as typeof request.raw.socket & { _httpMessage?: { detachSocket?: (socket: unknown) => void } })._httpMessage
      response?.detachSocket?.(request.raw.socket)
      ws.removeAllListeners('error')
      request.raw.socket.end = endUnlessEnded
      new Bridge(ws, pending.upstream, { // eslint-disable-line no-new
        route,
        upstream: pending.target,
        subprotocol: ws.protocol,
        log: request.log,
        client: `${request.ip}:${request.socket.remotePort ?? 0}`,
        bridges,
        heartbeat,
        preambleLength: pending.preambleLength,
        socket: request.raw.socket,
        maxPayload: fastify.websocketServer.options.maxPayload ?? 0
      })
    }

    const onRequest = route.origins !== null || route.requireOrigin
      ? [checkOrigin(route), selectSubprotocol(route)]
      : [selectSubprotocol(route)]
    fastify.get(route.path, { websocket: true, onRequest, preHandler: connectBeforeUpgrade }, bridge)
  }
}

const endSocket = Socket.prototype.end
/** ws ends the client socket again when the client's FIN follows the closing handshake, and Node answers an
 *  end() of an ended socket by building an error, with a stack trace, only to drop it. Such a call is skipped. */
const endUnlessEnded = function (this: Socket, ...args: unknown[]): Socket {
  if (args.length === 0 && (this.writableFinished || this.destroyed)) return this
  return (endSocket as (...args: unknown[]) => Socket).apply(this, args)
} as Socket['end']

/** The client's real address (Fastify's request.ip honours trustProxy) and what it asked for. */
function proxyInfo (request: FastifyRequest, subprotocol: string | null): Parameters<typeof proxyHeader>[1] {
  const socket = request.socket
  // Behind a trusted proxy the client's port is unknown: the socket's is the proxy's.
  const sourcePort = request.ip === socket.remoteAddress ? socket.remotePort ?? 0 : 0
  const origin = request.headers.origin ?? request.headers['sec-websocket-origin']
  return {
    sourceAddress: request.ip,
    sourcePort,
    destinationAddress: socket.localAddress ?? '',
    destinationPort: socket.localPort ?? 0,
    authority: request.headers.host,
    subprotocol: subprotocol ?? undefined,
    path: request.url,
    origin: typeof origin === 'string' ? origin : undefined
  }
}
