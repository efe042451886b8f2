import type { FastifyInstance, FastifyPluginAsync } from 'fastify'
import fp from 'fastify-plugin'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import { resolveOptions, type FastifyWstunnelOptions } from './options'
import { backend } from './backend'
import type { Bridge } from './bridge'

/** What the plugin adds to the Fastify instance as `fastify.wstunnel`. */
export interface WstunnelDecorator {
  /** Number of open bridged connections. */
  readonly connections: number
  /** Bytes queued inside the gateway across all bridged connections, both ways. */
  bufferedBytes (): number
}

async function fastifyWstunnel (fastify: FastifyInstance, rawOptions: FastifyWstunnelOptions): Promise<void> {
  const options = resolveOptions(rawOptions)
  const bridges = new Set<Bridge>()

  if (!fastify.hasDecorator('websocketServer')) {
    await fastify.register(websocket, {
      options: { maxPayload: options.maxPayload, perMessageDeflate: false },
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

  const decorator: WstunnelDecorator = {
    get connections () { return bridges.size },
    bufferedBytes () {
      let total = 0
      for (const bridge of bridges) total += bridge.bufferedBytes()
      return total
    }
  }
  fastify.decorate('wstunnel', decorator)
  fastify.addHook('preClose', (done) => {
    for (const bridge of bridges) bridge.shutdown()
    done()
  })

  await fastify.register(backend, { routes: options.routes, bridges })
}

const plugin: FastifyPluginAsync<FastifyWstunnelOptions> = fp(fastifyWstunnel, {
  fastify: '5.x',
  name: 'fastify-wstunnel'
})

export type { FastifyWstunnelOptions, RouteOptions, UpstreamOption } from './options'
export default plugin

// CommonJS callers get the plugin itself, as with every Fastify plugin.
module.exports = Object.assign(plugin, { default: plugin, fastifyWstunnel: plugin })
