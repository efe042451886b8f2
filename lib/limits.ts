import type { Server } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyInstance, onRequestAsyncHookHandler, onRequestHookHandler } from 'fastify'
import { RateLimitedError, TooManyConnectionsError, TooManyFromClientError } from './errors'

/** A route's maxConnections and maxConnectionsPerIp, an onRequest hook: a handshake takes a slot, refused with
 *  503 or 429 when none is free, and gives it back when its socket closes (refused, bridged and ended, or
 *  gone): so bridges open and handshakes in progress count alike, and no path forgets to give a slot back. */
export function connectionLimits (max: number, maxPerIp: number): onRequestHookHandler {
  let total = 0
  const perIp = new Map<string, number>()
  return function checkConnectionLimits (request, _reply, done) {
    const socket = request.raw.socket as Socket | undefined
    if (socket === undefined) return done() // injectWS: no connection to count
    const ip = request.ip
    const fromIp = perIp.get(ip) ?? 0
    if (max > 0 && total >= max) return done(new TooManyConnectionsError(max))
    if (maxPerIp > 0 && fromIp >= maxPerIp) return done(new TooManyFromClientError(maxPerIp))
    total++
    perIp.set(ip, fromIp + 1)
    socket.once('close', () => {
      total--
      const left = (perIp.get(ip) ?? 1) - 1
      if (left === 0) perIp.delete(ip)
      else perIp.set(ip, left)
    })
    done()
  }
}

/** A route's handshakeRate, an onRequest hook: past `max` handshakes from one client address in `timeWindow` ms,
 *  429 with Retry-After. The counting is @fastify/rate-limit's (`createRateLimit`), called from this hook rather
 *  than through route config, so that an app's own registration of that plugin neither skips nor answers for it. */
export function handshakeRateLimit (fastify: FastifyInstance, limit: { max: number, timeWindow: number }): onRequestAsyncHookHandler {
  const check = fastify.createRateLimit(limit)
  return async function checkHandshakeRate (request, reply) {
    const result = await check(request)
    if (result.isAllowed || !result.isExceeded) return
    const seconds = Math.max(1, result.ttlInSeconds)
    reply.header('retry-after', seconds).header('x-ratelimit-limit', result.max).header('x-ratelimit-remaining', 0).header('x-ratelimit-reset', seconds)
    throw new RateLimitedError(`${seconds} s`)
  }
}

const kTimer = Symbol('wstunnel.handshake-timer')
const kInstalled = Symbol('wstunnel.handshake-timeout')
type TimedSocket = Socket & { [kTimer]?: NodeJS.Timeout }

/** Cuts a connection whose first request head has not fully arrived `timeout` ms after it was accepted: a slow
 *  or half-sent upgrade request holds no socket for longer. Once per server; applies to every connection. */
export function installHandshakeTimeout (server: Server, timeout: number): void {
  const marked = server as Server & { [kInstalled]?: true }
  if (timeout === 0 || marked[kInstalled] === true) return
  marked[kInstalled] = true
  // An HTTPS server's request sockets are its TLS sockets: counted from the end of the TLS handshake, which
  // Node bounds with the server's own handshakeTimeout.
  const accepted = 'setSecureContext' in server ? 'secureConnection' : 'connection'
  server.on(accepted, (socket: TimedSocket) => {
    const timer = setTimeout(() => { socket.destroy() }, timeout)
    timer.unref()
    socket[kTimer] = timer
    socket.once('close', () => { clearTimeout(timer) })
  })
  const headArrived = (request: { socket?: TimedSocket }): void => {
    const timer = request.socket?.[kTimer] // injectWS emits 'upgrade' with no socket
    if (timer !== undefined) clearTimeout(timer)
  }
  server.on('request', headArrived)
  server.on('upgrade', headArrived)
}
