import type { Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import type { ResolvedRoute } from './options'
import { Bridge } from './bridge'
import { Heartbeat } from './heartbeat'
import { connectUpstream } from './upstream'

const kPending = Symbol('wstunnel.pending-upstream')

/** An upstream connected before the upgrade, waiting for the WebSocket to adopt it. */
interface Pending {
  upstream: Socket
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

    // Runs after every user hook, so an auth hook that refuses the request costs no upstream connection.
    async function connectBeforeUpgrade (request: FastifyRequest): Promise<void> {
      if (!request.ws) return // a plain HTTP request: @fastify/websocket answers 404
      const upstream = await connectUpstream(route.upstream, route.connectTimeout)
      const client = request.raw.socket
      if (client.destroyed) {
        upstream.destroy()
        return
      }
      // If the upgrade never completes (client gone, handshake refused), the upstream goes too.
      const onClientGone = (): void => { upstream.destroy() }
      client.once('close', onClientGone)
      ;(request.raw as RawWithPending)[kPending] = { upstream, onClientGone }
    }

    function bridge (ws: WebSocket, request: FastifyRequest): void {
      const raw = request.raw as RawWithPending
      const pending = raw[kPending]
      if (pending === undefined) {
        ws.close(1011, 'no upstream')
        return
      }
      raw[kPending] = undefined
      // Bridges are tracked by the plugin, which closes them with 1001 on shutdown; left in ws's own set,
      // an earlier-registered @fastify/websocket preClose would close them first, with no status (1005).
      fastify.websocketServer.clients.delete(ws)
      request.raw.socket.removeListener('close', pending.onClientGone)
      const client = `${request.ip}:${request.socket.remotePort ?? 0}`
      new Bridge(ws, pending.upstream, { route, log: request.log, client, bridges, heartbeat, preambleLength: 0 }) // eslint-disable-line no-new
    }

    fastify.get(route.path, { websocket: true, preHandler: connectBeforeUpgrade }, bridge)
  }
}
