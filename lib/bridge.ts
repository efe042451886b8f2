import type { Socket } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import WebSocket from 'ws'
import type { ResolvedRoute, UpstreamTarget } from './options'
import type { Heartbeat } from './heartbeat'
import type { RouteStats } from './stats'
import { TextFramer } from './text-frame'
import { readUpstream } from './upstream'
import { readClientFrames, binaryFrame, type FrameTarget, type MessageLimits } from './frames'
import { closeFrameReceived, passToReceiver } from './private-internals'

/** Bytes the gateway lets queue towards a client before it stops reading the upstream. */
export const CLIENT_HIGH_WATER = 512 * 1024

const kBridge = Symbol('wstunnel.bridge')
const TEXT = { binary: false }
const BINARY = { binary: true }

type Tagged<T> = T & { [kBridge]: Bridge }

function bridgeOf (emitter: WebSocket | Socket): Bridge {
  return (emitter as Tagged<WebSocket | Socket>)[kBridge]
}
export type ClosedBy = 'client' | 'upstream' | 'gateway'

// ws's error codes (documented in its errors.md) and the close status each is sent with.
const WS_ERROR_STATUS: Record<string, number> = {
  WS_ERR_INVALID_UTF8: 1007,
  WS_ERR_UNSUPPORTED_DATA_PAYLOAD_LENGTH: 1009,
  WS_ERR_UNSUPPORTED_MESSAGE_LENGTH: 1009,
  WS_ERR_TOO_MANY_BUFFERED_PARTS: 1008
}

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
  limits: MessageLimits
  stats: RouteStats
  /** On shutdown: the close code, and how long upstream bytes may still flow before it is sent. */
  drain: { code: 1001 | 1012, timeout: number }
}

/** While draining, an upstream that reads nothing new for this long has given all it had. */
const DRAIN_QUIET = 50

/** Pumps bytes both ways between an accepted WebSocket and its connected upstream socket,
 *  with backpressure each way, and closes each side when the other ends. */
export class Bridge implements FrameTarget {
  alive = true
  closedBy: ClosedBy | undefined
  code: number | undefined
  reason = ''
  /** The client's socket when the bridge reads its frames and writes binary frames to it; null: ws does. */
  readonly socket: Socket | null
  readonly framer: TextFramer | null
  private open = 2 // the WebSocket and the upstream; the summary is logged when both have closed
  private readonly started = Date.now()
  private clientPaused = false // by the bridge, because the upstream is not reading
  private upstreamFinished = false
  private shutdownTimer: NodeJS.Timeout | null = null
  private drainTimer: NodeJS.Timeout | null = null
  private draining = false

  constructor (readonly ws: WebSocket, readonly upstream: Socket, readonly context: BridgeContext) {
    const route = context.route
    this.framer = route.frame === 'text' ? new TextFramer(route.invalidUtf8) : null
    ;(ws as Tagged<WebSocket>)[kBridge] = this
    ;(upstream as Tagged<Socket>)[kBridge] = this
    // Synchronously: the client may already have sent its first message.
    this.socket = readClientFrames(ws, this, context.limits)
    if (this.socket === null) ws.on('message', clientOnMessage)
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
    context.stats.live.add(this)
    context.heartbeat?.add(this)
    readUpstream(upstream, upstreamOnData, this.framer === null)
  }

  /** Client payload bytes, from one read of the client socket (or one message): one write to the upstream.
   *  Once the WebSocket is closing they are dropped, so nothing queues for an upstream that may not read. */
  clientData (bytes: Buffer): void {
    this.alive = true
    if (this.ws.readyState !== WebSocket.OPEN || !this.upstream.writable) return
    if (!this.upstream.write(bytes)) {
      this.clientPaused = true
      this.ws.pause()
    }
  }

  /** A control frame's bytes go to ws; a close frame from the client ends the upstream's input at once. */
  clientControl (bytes: Buffer): boolean {
    this.alive = true
    const more = passToReceiver(this.ws, bytes)
    if (closeFrameReceived(this.ws)) {
      this.record(undefined, '', 'client') // its code comes with ws's 'close'
      this.finishUpstream()
    }
    return more
  }

  /** The client broke the protocol: close with the status, then end the TCP connection without waiting for
   *  the client's close frame (RFC 6455 section 7.1.7: a failed connection's data is not processed). */
  clientFault (code: number, reason: string): void {
    this.context.log.debug({ code, reason }, 'websocket protocol error')
    this.close(code, reason, 'gateway')
    this.socket?.end()
    this.finishUpstream()
  }

  /** Resumes reading the client if the bridge paused it (not while draining: the client is not read then). */
  resumeClient (): void {
    if (!this.clientPaused || this.draining) return
    this.clientPaused = false
    // Its pongs were not read while it was paused: it gets a full interval from now before it is judged (a beat
    // could otherwise come before its first read, and take it for dead).
    this.alive = true
    this.ws.resume()
  }

  /** The client sends no more: the upstream gets a FIN and closeTimeout to finish, then is destroyed. */
  finishUpstream (): void {
    if (this.upstreamFinished) return
    this.upstreamFinished = true
    const upstream = this.upstream
    if (upstream.destroyed) return
    const grace = this.context.route.closeTimeout
    if (grace === 0) {
      upstream.destroy()
    } else {
      // Half-close: the upstream reads EOF and may finish; it is destroyed when it ends or after the grace.
      upstream.end()
      upstream.setTimeout(grace)
      upstream.resume()
    }
  }

  /** Records how the connection ended, unless a side already did (the side that did may fill in its code). */
  record (code: number | undefined, reason: string, by: ClosedBy): void {
    if (this.closedBy === undefined || (this.closedBy === by && this.code === undefined)) {
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

  /** Called by the heartbeat: pings, or terminates a client that did not answer the last ping. A client the
   *  bridge stopped reading (its upstream is not reading) may have answered unread, so it is not judged. */
  beat (): void {
    if (!this.alive && !this.clientPaused) {
      this.record(1006, 'no pong', 'gateway') // 1006 is reported, never sent
      this.ws.terminate()
      return
    }
    this.alive = false
    this.ws.ping()
  }

  /** Server shutdown: stops reading the client, lets the upstream's bytes flow on until it has been quiet for
   *  DRAIN_QUIET ms with the client caught up (or drain.timeout has passed), then closes the client with
   *  drain.code (1001 or 1012) and drops the upstream. A client that does not answer within closeTimeout is cut
   *  off, so that closing ends. */
  shutdown (): void {
    if (this.drainTimer !== null || this.shutdownTimer !== null) return
    const { timeout } = this.context.drain
    if (timeout === 0 || this.ws.readyState !== WebSocket.OPEN) return this.closeForShutdown()
    this.draining = true
    this.ws.pause() // what the client sends now would go to an upstream about to be dropped
    this.context.heartbeat?.delete(this) // its pongs are not read now: it must not be taken for dead
    const deadline = Date.now() + timeout
    let read = this.upstream.bytesRead
    const check = (): void => {
      const now = this.upstream.bytesRead
      // Quiet means nothing new read and nothing left to send: an upstream the bridge paused for a slow client
      // reads nothing new either, yet has more to give.
      const quiet = now === read && this.ws.bufferedAmount === 0
      if (quiet || Date.now() >= deadline || this.upstream.destroyed || this.ws.readyState !== WebSocket.OPEN) {
        this.drainTimer = null
        this.closeForShutdown()
      } else {
        read = now
        this.drainTimer = setTimeout(check, Math.min(DRAIN_QUIET, Math.max(1, deadline - Date.now())))
      }
    }
    this.drainTimer = setTimeout(check, Math.min(DRAIN_QUIET, timeout))
  }

  private closeForShutdown (): void {
    this.draining = false
    const code = this.context.drain.code
    this.close(code, code === 1012 ? 'service restart' : 'server shutting down', 'gateway')
    this.upstream.destroy()
    this.clientPaused = false
    this.ws.resume() // its close frame must be read
    this.shutdownTimer ??= setTimeout(() => { this.ws.terminate() }, this.context.route.closeTimeout)
  }

  /** Payload bytes carried so far, each way. */
  bytes (): { clientToUpstream: number, upstreamToClient: number } {
    return { clientToUpstream: Math.max(0, this.upstream.bytesWritten - this.context.preambleLength), upstreamToClient: this.upstream.bytesRead }
  }

  /** Bytes queued in the gateway for this connection, both ways. */
  bufferedBytes (): number {
    return this.ws.bufferedAmount + this.upstream.writableLength + this.upstream.readableLength
  }

  /** One side has closed; the summary is logged once both have. */
  settle (): void {
    if (--this.open > 0) return
    if (this.shutdownTimer !== null) clearTimeout(this.shutdownTimer)
    if (this.drainTimer !== null) clearTimeout(this.drainTimer)
    const { route, client, upstream } = this.context
    const { clientToUpstream, upstreamToClient } = this.bytes()
    this.context.stats.live.delete(this)
    this.context.stats.closed({ code: this.code, closedBy: this.closedBy, clientToUpstream, upstreamToClient })
    this.context.log.info({
      route: route.path,
      client,
      upstream: upstream.label,
      clientToUpstream,
      upstreamToClient,
      durationMs: Date.now() - this.started,
      code: this.code,
      closedBy: this.closedBy,
      reason: this.reason
    }, 'wstunnel bridge closed')
  }
}

/** Only where ws reads the frames: whole messages, one write each. */
function clientOnMessage (this: WebSocket, data: Buffer): void {
  const bridge = bridgeOf(this)
  const { maxPayload } = bridge.context.limits
  if (maxPayload > 0 && data.length > maxPayload) return bridge.clientFault(1009, 'message too big')
  bridge.clientData(data)
}

function upstreamOnDrain (this: Socket): void {
  bridgeOf(this).resumeClient()
}

function upstreamOnData (this: Socket, buffer: Buffer, length: number, owned: boolean): boolean {
  const bridge = bridgeOf(this)
  const ws = bridge.ws
  if (ws.readyState !== WebSocket.OPEN) return true // the client is gone; the upstream is being drained to its end
  // Past the high-water mark, stop reading until this frame reaches the kernel: the client sets the pace.
  const full = ws.bufferedAmount + length > CLIENT_HIGH_WATER
  const resume = full ? () => { this.resume() } : undefined
  if (bridge.framer === null) {
    // One read, one frame, written straight to the socket: ws queues nothing of its own on such a
    // connection (it queues only while compressing), so frames stay in order.
    if (bridge.socket !== null) {
      bridge.socket.write(binaryFrame(buffer, length, owned), resume)
    } else {
      const bytes = buffer.subarray(0, length)
      ws.send(owned ? bytes : Buffer.from(bytes), BINARY, resume)
    }
    return !full
  }
  const text = bridge.framer.push(buffer.subarray(0, length))
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
  // The client may be paused with its close reply unread.
  bridge.resumeClient()
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
  bridge.resumeClient()
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
  bridge.record(code, reason.toString(), 'client')
  bridge.context.bridges.delete(bridge)
  bridge.context.heartbeat?.delete(bridge)
  bridge.finishUpstream()
  bridge.settle()
}

function clientOnError (this: WebSocket, err: Error & { code?: string }): void {
  // ws has already answered a bad frame with the right close status.
  const bridge = bridgeOf(this)
  bridge.context.log.debug({ err }, 'websocket error')
  const code = err.code ?? ''
  bridge.record(WS_ERROR_STATUS[code] ?? (code.startsWith('WS_ERR_') ? 1002 : undefined), code || err.message, 'gateway')
}

function clientOnPong (this: WebSocket): void {
  bridgeOf(this).alive = true
}
