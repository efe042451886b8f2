import type { FastifyReply, onRequestHookHandler } from 'fastify'
import { BadHandshakeError, UpgradeRequiredError } from './errors'

// A Sec-WebSocket-Key is 16 bytes in base64 (RFC 6455 section 4.1): 22 characters, the last of which
// carries only 2 bits, then '=='.
const KEY = /^[+/0-9A-Za-z]{21}[AQgw]==$/

/** The route's first onRequest hook: a request that is not a valid WebSocket opening handshake is answered
 *  here (426 with the headers RFC 6455 and RFC 7230 ask for, else 400), before any upstream is touched. */
export const checkHandshake: onRequestHookHandler = function checkHandshake (request, reply, done) {
  const headers = request.headers
  if (!request.ws) {
    upgradeRequired(reply)
    return done(new UpgradeRequiredError('this route speaks WebSocket only: send an Upgrade: websocket request'))
  }
  let problem: string | null = null
  if (request.method !== 'GET') {
    problem = 'the method must be GET'
  } else if (!/^(1\.[1-9]|[2-9]\.\d)$/.test(request.raw.httpVersion)) {
    problem = 'the request must be HTTP/1.1 or later'
  } else if (headers.host === undefined && request.raw.socket !== undefined) { // injectWS has neither
    problem = 'the Host header is required'
  } else if (headers.upgrade?.toLowerCase() !== 'websocket') {
    problem = 'the Upgrade header must be "websocket"'
  } else if (headers['sec-websocket-key'] === undefined || !KEY.test(headers['sec-websocket-key'])) {
    problem = 'Sec-WebSocket-Key must be 16 bytes in base64'
  }
  if (problem !== null) return done(new BadHandshakeError(problem))
  // String(): @fastify/websocket's injectWS sends the version as a number.
  if (String(headers['sec-websocket-version']) !== '13') {
    upgradeRequired(reply).header('sec-websocket-version', '13')
    return done(new UpgradeRequiredError('Sec-WebSocket-Version must be 13'))
  }
  done()
}

/** A 426 names the protocol to switch to (RFC 9110 section 15.5.22). */
function upgradeRequired (reply: FastifyReply): FastifyReply {
  return reply.header('upgrade', 'websocket').header('connection', 'upgrade')
}
