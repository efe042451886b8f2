import { Socket } from 'node:net'
import { ServerResponse, createServer } from 'node:http'
import { Writable, type Duplex } from 'node:stream'
import { once } from 'node:events'
import WebSocket, { WebSocketServer } from 'ws'
import type { ReadCallback } from './read-buffer'

// Every use of a private internal of Node.js or ws lives in this file, and nowhere else reaches into them.
// For each: why it is here, what the benchmark measured it to be worth, how it is detected, and what runs
// without it. `probeInternals()` checks them by behaviour, once per process, on a real loopback connection;
// one that does not behave as expected is switched off, and the plain path runs. So "what breaks on the next
// Node.js or ws release?" has one answer: the probe switches that piece off, and the bridge gets slower.
//
// 1. clientOnread (Node.js: net.Socket's `onread` symbols kBuffer/kBufferCb, `_handle.useUserBuffer`).
//    Why: an accepted client socket cannot be created with `onread`; switched to it, every read lands in
//    the shared read buffer with no allocation and no 'data' event. Worth (bench, 2026-11-26, on against
//    off): echo 1.58 against 2.07 CPU µs per message. Without it: the socket is read the stream way.
// 2. wsFrames (ws 8: `_receiver`, `_closeFrameReceived`, the Receiver's `_errored`, `_socket`, a replaced
//    `receiver.write`; binary frames written to the socket beside ws's Sender). Why: a byte-stream bridge
//    needs no message assembly; the bridge reads the client's data frames itself (frames.ts) and hands ws
//    only the control frames, and writes each upstream read as one frame. Worth: echo 1.58 against 8.01
//    CPU µs per message. Without it: ws's 'message' events and `ws.send`.
//    A connection that negotiated an extension (permessage-deflate) uses the plain path: compressed
//    frames are ws's to read, even where the internals are present.
// 3. releaseRequest (Node.js: `socket._httpMessage.detachSocket()`). Why: the ServerResponse that
//    @fastify/websocket made for the upgrade stays on the socket, and keeps the request and its headers for
//    the bridge's life. Worth: 10.4 against 13.4 KB per idle connection.
//    Without it: the response stays attached (more memory, nothing else).

/** Which internals behave as this file expects; each starts off and is switched on by the probe. */
export const internals = { clientOnread: false, wsFrames: false, releaseRequest: false }

// --- 1. clientOnread ---------------------------------------------------------------------------------

type OnreadSocket = Socket & { _handle?: { useUserBuffer?: (buffer: Uint8Array) => void } | null, encrypted?: boolean } & Record<symbol, unknown>

const onreadKeys = ((): { buffer: symbol, callback: symbol } | null => {
  const byName = new Map(Object.getOwnPropertySymbols(new Socket()).map(symbol => [symbol.description, symbol]))
  const buffer = byName.get('kBuffer')
  const callback = byName.get('kBufferCb')
  return buffer !== undefined && callback !== undefined ? { buffer, callback } : null
})()

/** Makes an open TCP or unix socket (not TLS) read into `buffer`, as if created with `onread: { buffer,
 *  callback }`. Returns false, changing nothing, where that is switched off or cannot be done. */
export function readSocketInto (socket: Duplex, buffer: Buffer, callback: ReadCallback): boolean {
  return internals.clientOnread && switchToOnread(socket, buffer, callback)
}

function switchToOnread (socket: Duplex, buffer: Buffer, callback: ReadCallback): boolean {
  if (onreadKeys === null || !(socket instanceof Socket)) return false
  const target = socket as OnreadSocket
  const handle = target._handle
  if (target.encrypted !== undefined || typeof handle?.useUserBuffer !== 'function' ||
    target[onreadKeys.buffer] !== null || target[onreadKeys.callback] !== null) return false
  target[onreadKeys.buffer] = buffer
  target[onreadKeys.callback] = callback
  handle.useUserBuffer(buffer)
  return true
}

// --- 2. wsFrames -------------------------------------------------------------------------------------

type Receiver = Writable & { _errored?: unknown }
type WsPrivate = WebSocket & { _receiver?: Receiver, _closeFrameReceived?: unknown, _socket?: Duplex }
const receiverWrite: (this: Writable, chunk: Buffer) => boolean = Writable.prototype.write

/** From now on, every byte ws reads from this client goes to `push` instead of ws's Receiver. Returns the
 *  client's socket, to write frames to beside ws's Sender, or null (changing nothing) where that is
 *  switched off, ws is not as expected, or the connection negotiated an extension. */
export function takeClientBytes (ws: WebSocket, push: (chunk: Buffer) => void): Duplex | null {
  return internals.wsFrames ? interceptReceiver(ws, push) : null
}

function interceptReceiver (ws: WebSocket, push: (chunk: Buffer) => void): Duplex | null {
  const { _receiver: receiver, _closeFrameReceived: closeFrameReceived, _socket: socket } = ws as WsPrivate
  if (receiver === undefined || typeof receiver._errored !== 'boolean' || typeof closeFrameReceived !== 'boolean' ||
    socket === undefined || ws.extensions !== '') return null
  receiver.write = function write (chunk: Buffer): boolean {
    push(chunk)
    return true
  }
  return socket
}

/** Hands control-frame bytes (the caller's copy) to ws's Receiver, which checks and answers them. Returns
 *  false once ws wants nothing more: a close frame has come, or it refused the frame (and closes itself). */
export function passToReceiver (ws: WebSocket, bytes: Buffer): boolean {
  const internal = ws as WsPrivate & { _receiver: Receiver }
  receiverWrite.call(internal._receiver, bytes)
  return internal._closeFrameReceived !== true && internal._receiver._errored !== true
}

/** True once ws has received the client's close frame. */
export function closeFrameReceived (ws: WebSocket): boolean {
  return (ws as WsPrivate)._closeFrameReceived === true
}

// --- 3. releaseRequest -------------------------------------------------------------------------------

type SocketWithResponse = Duplex & { _httpMessage?: { detachSocket?: (socket: unknown) => void } | null }

/** Detaches the upgrade's ServerResponse from the socket, so the request can be collected. */
export function releaseUpgradeResponse (socket: Duplex): void {
  if (internals.releaseRequest) detachResponse(socket)
}

function detachResponse (socket: Duplex): boolean {
  const response = (socket as SocketWithResponse)._httpMessage
  if (typeof response?.detachSocket !== 'function') return false
  response.detachSocket(socket)
  return (socket as SocketWithResponse)._httpMessage === null
}

// --- The probe ---------------------------------------------------------------------------------------

let probed: Promise<void> | null = null

/** Checks, once per process, that each internal behaves as expected, and switches on those that do. */
export function probeInternals (): Promise<void> {
  probed ??= checkInternals().then(found => { Object.assign(internals, found) })
  return probed
}

/** Runs the probe afresh and returns what works, without switching anything. */
export async function checkInternals (): Promise<typeof internals> {
  const found = await probe(true)
  // Frames that came through the shared buffer wrong may be onread's fault alone: try ws without it.
  return found.wsFrames ? found : await probe(false)
}

/** A loopback WebSocket connection whose server side is read the way a bridge reads a client. */
async function probe (onread: boolean): Promise<typeof internals> {
  const found = { clientOnread: false, wsFrames: false, releaseRequest: false }
  const signal = AbortSignal.timeout(2000)
  // exclusive: in a cluster worker, a shared port-0 handle would hand the probe's connection to any worker.
  const http = createServer()
  const server = new WebSocketServer({ server: http, perMessageDeflate: false })
  let client: WebSocket | undefined
  try {
    http.listen({ host: '127.0.0.1', port: 0, exclusive: true })
    await once(http, 'listening', { signal })
    const { port } = http.address() as { port: number }
    server.once('connection', (ws, request) => {
      ws.on('error', () => {}) // a frame that came through wrong is refused: that is the probe's answer
      // As @fastify/websocket does: a ServerResponse assigned to the upgraded socket.
      new ServerResponse(request).assignSocket(request.socket)
      found.releaseRequest = detachResponse(request.socket)
      let pending = Buffer.alloc(0)
      let data = false
      const push = (chunk: Buffer): void => {
        // The client sends one masked binary frame [1, 2, 3] (9 bytes), then a ping and a close, which go
        // back to ws: it must answer both.
        if (data) {
          passToReceiver(ws, Buffer.from(chunk))
          return
        }
        pending = Buffer.concat([pending, chunk])
        if (pending.length < 9) return
        data = true
        const payload = Buffer.from(pending.subarray(6, 9).map((byte, i) => byte ^ pending[2 + i]))
        found.wsFrames = pending[0] === 0x82 && payload.equals(Buffer.from([1, 2, 3]))
        if (pending.length > 9) passToReceiver(ws, pending.subarray(9))
      }
      const socket = interceptReceiver(ws, push)
      if (socket === null) return
      const shared = Buffer.allocUnsafe(1024)
      found.clientOnread = onread && switchToOnread(socket, shared, function (length, buffer) {
        found.clientOnread &&= buffer === shared
        push(buffer.subarray(0, length))
        return true
      })
      socket.write(Buffer.from([0x82, 1, 9])) // a binary frame beside ws's Sender
    })
    client = new WebSocket(`ws://127.0.0.1:${port}`)
    client.on('error', () => {})
    const [message] = await once(client, 'message', { signal }) as [Buffer]
    client.send(Buffer.from([1, 2, 3]))
    client.ping()
    await once(client, 'pong', { signal })
    client.close(1000)
    const [code] = await once(client, 'close', { signal }) as [number]
    if (!message.equals(Buffer.from([9])) || code !== 1000) found.wsFrames = false
  } catch {
    found.wsFrames = false
  } finally {
    client?.terminate()
    for (const ws of server.clients) ws.terminate()
    server.close()
    http.close()
  }
  found.clientOnread &&= found.wsFrames // the client reads are checked through the frames
  return found
}
