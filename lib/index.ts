import type { IncomingMessage } from 'node:http'
import type { FastifyInstance, FastifyPluginAsync } from 'fastify'
import fp from 'fastify-plugin'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import { resolveOptions, type FastifyWstunnelOptions } from './options'
import { backend, type BackendState } from './backend'
import { installSubprotocolChooser } from './subprotocol'
import { probeInternals } from './private-internals'

/** What the plugin adds to the Fastify instance as `fastify.wstunnel`. */
export interface WstunnelDecorator {
  /** Number of open bridged connections. */
  readonly connections: number
  /** Bytes queued inside the gateway across all bridged connections, both ways. */
  bufferedBytes (): number
}

declare module 'fastify' {
  interface FastifyInstance {
    wstunnel: WstunnelDecorator
  }
}

async function fastifyWstunnel (fastify: FastifyInstance, rawOptions: FastifyWstunnelOptions): Promise<void> {
  const options = resolveOptions(rawOptions)
  const state: BackendState = { bridges: new Set(), closing: false, connecting: new AbortController() }
  const { bridges } = state
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

  const decorator: WstunnelDecorator = {
    get connections () { return bridges.size },
    bufferedBytes () {
      let total = 0
      for (const bridge of bridges) total += bridge.bufferedBytes()
      return total
    }
  }
  fastify.decorate('wstunnel', decorator)
  // An upgrade request answered over HTTP (401, 403, 502...) holds a socket the HTTP server no longer
  // manages. @fastify/websocket closes it only if its own onRequest hook ran, which a hook registered
  // before it can prevent; so close it here whenever the answer was not an upgrade.
  fastify.addHook('onSend', (request, reply, payload, done) => {
    if (isUpgradeRequest(request.raw)) reply.header('connection', 'close') // so no client reuses it
    done(null, payload)
  })
  fastify.addHook('onResponse', (request, _reply, done) => {
    if (isUpgradeRequest(request.raw)) request.raw.socket.destroy()
    done()
  })
  // Handshakes still in progress are answered 503 and their upstream connects aborted; one that upgrades
  // after this is closed with 1001 at once; every client has closeTimeout to answer its 1001.
  fastify.addHook('preClose', (done) => {
    state.closing = true
    state.connecting.abort()
    for (const bridge of bridges) bridge.shutdown()
    done()
  })

  await fastify.register(backend, { routes: options.routes, state })
}

/** ws assembles messages only where the bridge cannot read the frames itself (private-internals.ts says
 *  when); there a message is bounded by the largest route maxPayload, or by ws's own default of 100 MiB
 *  where a route has none, and each route's own limit is checked on the whole message. ws keeps the limit
 *  in 32 bits. */
function assembledLimit (routes: Array<{ maxPayload: number }>): number {
  const limit = routes.some(route => route.maxPayload === 0) ? 100 * 1024 * 1024 : Math.max(...routes.map(route => route.maxPayload))
  return Math.min(limit, 2 ** 31 - 1)
}

function isUpgradeRequest (request: IncomingMessage): boolean {
  return request.headers.upgrade !== undefined && /\bupgrade\b/i.test(request.headers.connection ?? '')
}

const plugin: FastifyPluginAsync<FastifyWstunnelOptions> = fp(fastifyWstunnel, {
  fastify: '5.x',
  name: 'fastify-wstunnel'
})

export type { FastifyWstunnelOptions, RouteOptions, UpstreamOption } from './options'
export default plugin

// CommonJS callers get the plugin itself, as with every Fastify plugin; these assignments are the
// form Node's CommonJS lexer reads, so `import { fastifyWstunnel }` works too.
module.exports = plugin
module.exports.default = plugin
module.exports.fastifyWstunnel = plugin
