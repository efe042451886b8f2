import type { Socket } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import WebSocket from 'ws'
import type { ResolvedRoute, UpstreamTarget } from './options'
import type { Heartbeat } from './heartbeat'
import { TextFramer } from './text-frame'
import { readUpstream } from './upstream'
import { readClientFrames, binaryFrame, type FrameTarget } from './frames'

/** Bytes the gateway lets queue towards a client before it stops reading the upstream. */
export const CLIENT_HIGH_WATER = 512 * 1024

const kBridge = Symbol('wstunnel.bridge')
const TEXT = { binary: false }

type Tagged<T> = T & { [kBridge]: Bridge }

function bridgeOf (emitter: WebSocket | Socket): Bridge {
  return (emitter as Tagged<WebSocket | Socket>)[kBridge]
}
export type ClosedBy = 'client' | 'upstream' | 'gateway'

/** Where a bridge reports: the set of open bridges, the route's heartbeat, the request's logger. */
export interface BridgeContext {
  route: ResolvedRoute
  upstream: UpstreamTarget
  subprotocol: string
  log: FastifyBaseLogger
  client: string
  bridges: Set<Bridge>
  heartbeat: Heartbeat | null
  preambleLength: number
  /** The client's TCP socket, which ws also writes to. */
  socket: Socket
  /** Largest client message, as ws's maxPayload (0: no limit). */
  maxPayload: number
}

/** Pumps bytes both ways between an accepted WebSocket and its connected upstream socket,
 *  with backpressure each way, and closes each side when the other ends. */
export class Bridge implements FrameTarget {
  alive = true
  closedBy: ClosedBy | undefined
  code: number | undefined
  reason = ''
  private open = 2 // the WebSocket and the upstream; the summary is logged when both have closed
  private readonly started = Date.now()
  readonly framer: TextFramer | null

  constructor (readonly ws: WebSocket, readonly upstream: Socket, readonly context: BridgeContext) {
    const route = context.route
    this.framer = route.frame === 'text' ? new TextFramer(route.invalidUtf8) : null
    ;(ws as Tagged<WebSocket>)[kBridge] = this
    ;(upstream as Tagged<Socket>)[kBridge] = this
    // Synchronously: the client may already have sent its first message.
    if (!readClientFrames(ws, this, context.maxPayload)) ws.on('message', clientOnMessage)
    ws.on('close', clientOnClose)
    ws.on('error', clientOnError)
    ws.on('pong', clientOnPong)
    upstream.on('drain', upstreamOnDrain)
    upstream.on('end', upstreamOnEnd)
    upstream.on('error', upstreamOnError)
    upstream.on('close', upstreamOnClose)
    upstream.on('timeout', upstreamOnTimeout)
    // No traffic either way means no traffic on the upstream socket, so its timer is the idle timer.
    if (route.idleTimeout > 0) upstream.setTimeout(route.idleTimeout)
    context.bridges.add(this)
    context.heartbeat?.add(this)
    readUpstream(upstream, upstreamOnData)
    context.log.info({ route: route.path, client: context.client, upstream: context.upstream.label, subprotocol: context.subprotocol || undefined }, 'wstunnel bridge open')
  }

  /** Client payload bytes, from one read of the client socket: one write to the upstream. */
  clientData (bytes: Buffer): void {
    this.alive = true
    if (!this.upstream.writable) return
    if (!this.upstream.write(bytes)) this.ws.pause()
  }

  /** The client broke the protocol: ws-style, close with the status and log it. */
  clientFault (code: number, reason: string): void {
    this.context.log.debug({ code, reason }, 'websocket protocol error')
    this.close(code, reason, 'gateway')
  }

  /** Records how the connection ended, unless a side already did. */
  record (code: number, reason: string, by: ClosedBy): void {
    if (this.closedBy === undefined) {
      this.closedBy = by
      this.code = code
      this.reason = reason
    }
  }

  /** Closes the client with `code` and records who decided it. */
  close (code: number, reason: string, by: ClosedBy): void {
    this.record(code, reason, by)
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(code, reason)
  }

  /** Called by the heartbeat: pings, or terminates a client that did not answer the last ping. */
  beat (): void {
    if (!this.alive) {
      this.record(1006, 'no pong', 'gateway') // 1006 is reported, never sent
      this.ws.terminate()
      return
    }
    this.alive = false
    this.ws.ping()
  }

  /** Closes the client with 1001 and drops the upstream, for server shutdown. */
  shutdown (): void {
    this.close(1001, 'server shutting down', 'gateway')
    this.upstream.destroy()
  }

  /** Bytes queued in the gateway for this connection, both ways. */
  bufferedBytes (): number {
    return this.ws.bufferedAmount + this.upstream.writableLength + this.upstream.readableLength
  }

  settle (): void {
    if (--this.open > 0) return
    const { route, client, upstream, preambleLength } = this.context
    this.context.log.info({
      route: route.path,
      client,
      upstream: upstream.label,
      clientToUpstream: Math.max(0, this.upstream.bytesWritten - preambleLength),
      upstreamToClient: this.upstream.bytesRead,
      durationMs: Date.now() - this.started,
      code: this.code,
      closedBy: this.closedBy,
      reason: this.reason
    }, 'wstunnel bridge closed')
  }
}

/** Only with a ws whose internals the frame reader does not know: whole messages, one write each. */
function clientOnMessage (this: WebSocket, data: Buffer): void {
  bridgeOf(this).clientData(data)
}

function upstreamOnDrain (this: Socket): void {
  bridgeOf(this).ws.resume()
}

function upstreamOnData (this: Socket, chunk: Buffer): boolean {
  const bridge = bridgeOf(this)
  const ws = bridge.ws
  if (ws.readyState !== WebSocket.OPEN) return true // the client is gone; the upstream is being drained to its end
  const socket = bridge.context.socket
  // Past the high-water mark, stop reading until this frame reaches the kernel: the client sets the pace.
  const full = socket.writableLength + chunk.length > CLIENT_HIGH_WATER
  const resume = full ? () => { this.resume() } : undefined
  if (bridge.framer === null) {
    // One read, one frame, written straight to the socket: ws has nothing of its own queued
    // (it queues only while compressing, which is off), so frames stay in order.
    socket.write(binaryFrame(chunk), resume)
    return !full
  }
  const text = bridge.framer.push(chunk)
  if (text === null) {
    invalidText(bridge)
    return false
  }
  if (text.length === 0) return true
  ws.send(text, TEXT, resume)
  return !full
}

function invalidText (bridge: Bridge): void {
  bridge.context.log.warn({ route: bridge.context.route.path, upstream: bridge.context.upstream.label }, 'upstream sent bytes that are not UTF-8 on a text route')
  bridge.close(1007, 'upstream sent invalid UTF-8', 'upstream')
  bridge.upstream.destroy()
}

function upstreamOnEnd (this: Socket): void {
  const bridge = bridgeOf(this)
  if (bridge.ws.readyState !== WebSocket.OPEN) return
  if (bridge.framer !== null) {
    const rest = bridge.framer.end()
    if (rest === null) return invalidText(bridge)
    if (rest.length > 0) bridge.ws.send(rest, TEXT)
  }
  bridge.close(1000, '', 'upstream')
}

function upstreamOnError (this: Socket, err: NodeJS.ErrnoException): void {
  bridgeOf(this).close(1011, `upstream error ${err.code ?? ''}`.trim(), 'upstream')
}

function upstreamOnClose (this: Socket, hadError: boolean): void {
  const bridge = bridgeOf(this)
  bridge.close(hadError ? 1011 : 1000, '', 'upstream')
  bridge.context.heartbeat?.delete(bridge)
  bridge.settle()
}

function upstreamOnTimeout (this: Socket): void {
  const bridge = bridgeOf(this)
  if (bridge.ws.readyState === WebSocket.OPEN) bridge.close(1000, 'idle', 'gateway')
  // Either idle, or the client has gone and the upstream did not finish within closeTimeout.
  this.destroy()
}

function clientOnClose (this: WebSocket, code: number, reason: Buffer): void {
  const bridge = bridgeOf(this)
  if (bridge.closedBy === undefined) {
    bridge.closedBy = 'client'
    bridge.code = code
    bridge.reason = reason.toString()
  }
  bridge.context.bridges.delete(bridge)
  bridge.context.heartbeat?.delete(bridge)
  const upstream = bridge.upstream
  if (!upstream.destroyed) {
    const grace = bridge.context.route.closeTimeout
    if (grace === 0) {
      upstream.destroy()
    } else {
      // Half-close: the upstream reads EOF and may finish; it is destroyed when it ends or after the grace.
      upstream.end()
      upstream.setTimeout(grace)
      upstream.resume()
    }
  }
  bridge.settle()
}

function clientOnError (this: WebSocket, err: Error & { code?: string }): void {
  // ws has already answered a bad frame with the right close code (1002, 1007, 1009).
  const bridge = bridgeOf(this)
  bridge.context.log.debug({ err }, 'websocket error')
  if (bridge.closedBy === undefined) {
    bridge.closedBy = 'gateway'
    bridge.reason = err.code ?? err.message
  }
}

function clientOnPong (this: WebSocket): void {
  bridgeOf(this).alive = true
}
