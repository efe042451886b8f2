import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import type { Socket } from 'node:net'
import WebSocket from 'ws'
import { closed, openClient, startEcho, startGateway, startTcp, waitFor } from './helpers'

const MB = 1024 * 1024
// Gateway-side bytes allowed per connection: its high-water mark towards the client, one TCP read, socket buffers.
const BOUND = 4 * MB

test('a client that reads nothing stops the gateway reading a 200 MB upstream, and then gets every byte', { timeout: 60000 }, async (t) => {
  const total = 200 * MB
  const block = Buffer.alloc(64 * 1024)
  for (let i = 0; i < block.length; i++) block[i] = (i * 31) & 0xff
  let written = 0
  const sent = createHash('sha256')
  const source = await startTcp(socket => {
    // Write as fast as the gateway takes it, and no faster.
    const pump = (): void => {
      while (written < total) {
        written += block.length
        sent.update(block)
        if (!socket.write(block)) {
          socket.once('drain', pump)
          return
        }
      }
      socket.end()
    }
    pump()
  })
  const gateway = await startGateway({ routes: { '/source': { upstream: source.address } } })
  t.after(async () => { await gateway.app.close(); await source.close() })

  const ws = await openClient(`${gateway.url}/source`)
  ws.pause() // reads nothing: the client's socket stops reading

  let peak = 0
  const sample = setInterval(() => { peak = Math.max(peak, gateway.app.wstunnel.bufferedBytes()) }, 5)
  t.after(() => clearInterval(sample))
  // Let the stall settle: the source must stop far short of 200 MB.
  let last = -1
  await waitFor(() => {
    const still = written === last
    last = written
    return still && written > 0
  }, 20000)
  await new Promise(resolve => setTimeout(resolve, 300))
  const stalledAt = written
  assert.ok(stalledAt < 32 * MB, `the source wrote ${stalledAt} bytes into a client that reads nothing`)
  assert.ok(peak < BOUND, `the gateway buffered ${peak} bytes`)
  t.diagnostic(`stalled after ${(stalledAt / MB).toFixed(1)} MB written by the source; gateway peak buffered ${peak} bytes`)

  // Now read: every byte arrives, in order.
  const received = createHash('sha256')
  let length = 0
  ws.removeAllListeners('message')
  ws.on('message', (data: Buffer) => { received.update(data); length += data.length })
  ws.resume()
  await waitFor(() => length === total, 40000)
  clearInterval(sample)
  assert.equal(received.digest('hex'), sent.digest('hex'))
  assert.ok(peak < BOUND, `the gateway buffered ${peak} bytes while draining`)
  t.diagnostic(`peak gateway buffered bytes over the whole transfer: ${peak}`)
  ws.close()
})

test('an upstream that reads nothing stops the gateway reading the client', { timeout: 30000 }, async (t) => {
  let upstream: Socket | undefined
  const sink = await startTcp(socket => {
    upstream = socket
    socket.pause() // reads nothing
  })
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address }, '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/sink`)
  // Distinct bytes in every message, so that bytes overwritten while queued for the upstream would show.
  const messages = Array.from({ length: 7 }, () => randomBytes(64 * 1024))
  const sentHash = createHash('sha256')
  const offer = 64 * MB
  let sent = 0
  let peak = 0
  let stalledSince = Date.now()
  // Send whenever the client's own buffer is small; stop once it has stayed full for half a second.
  while (sent < offer && Date.now() - stalledSince < 500) {
    if (ws.bufferedAmount < 2 * MB) {
      const message = messages[(sent / messages[0].length) % messages.length]
      ws.send(message)
      sentHash.update(message)
      sent += message.length
      stalledSince = Date.now()
    }
    peak = Math.max(peak, gateway.app.wstunnel.bufferedBytes())
    await new Promise(resolve => setImmediate(resolve))
  }
  assert.ok(sent < 32 * MB, `the client handed off ${sent} bytes to a gateway whose upstream reads nothing`)
  assert.ok(peak < BOUND, `the gateway buffered ${peak} bytes`)
  t.diagnostic(`client stopped after ${(sent / MB).toFixed(1)} MB; gateway peak buffered ${peak} bytes`)

  // Meanwhile another bridge carries traffic both ways: the gateway's reads for it must not touch the
  // bytes still queued for the stalled upstream.
  const other = await openClient(`${gateway.url}/echo`)
  let echoed = 0
  other.on('message', (data: Buffer) => { echoed += data.length })
  for (let i = 0; i < 16; i++) other.send(randomBytes(64 * 1024))
  await waitFor(() => echoed === 16 * 64 * 1024, 10000)
  other.close()

  // Once the upstream reads, every byte the client sent arrives.
  let length = 0
  const receivedHash = createHash('sha256')
  upstream!.on('data', (chunk: Buffer) => { length += chunk.length; receivedHash.update(chunk) })
  upstream!.resume()
  await waitFor(() => length === sent, 20000)
  assert.equal(receivedHash.digest('hex'), sentHash.digest('hex'), 'the upstream got exactly the bytes sent, in order')
  ws.close()
})

/** Sends `total` bytes from `ws` as 64 KiB messages, as fast as its own buffer lets it, until it closes;
 *  resolves with their hash. */
async function sendAll (ws: WebSocket, total: number): Promise<string> {
  const hash = createHash('sha256')
  for (let sent = 0; sent < total && ws.readyState === WebSocket.OPEN; sent += 64 * 1024) {
    const message = randomBytes(64 * 1024)
    hash.update(message)
    ws.send(message)
    while (ws.bufferedAmount > 4 * MB && ws.readyState === WebSocket.OPEN) await new Promise(resolve => setTimeout(resolve, 5))
  }
  return hash.digest('hex')
}

test('a client paused because its upstream is not reading is not taken for dead by the heartbeat', { timeout: 30000 }, async (t) => {
  let upstream: Socket | undefined
  const sink = await startTcp(socket => {
    upstream = socket
    socket.pause()
  })
  const gateway = await startGateway({ pingInterval: 100, routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })
  const ws = await openClient(`${gateway.url}/sink`)

  const total = 24 * MB
  const sending = sendAll(ws, total)
  // The gateway stops reading the client (and its pongs) while the upstream reads nothing: 10 pings go by.
  await new Promise(resolve => setTimeout(resolve, 1000))
  assert.equal(ws.readyState, WebSocket.OPEN, 'the client was not terminated')
  let length = 0
  const received = createHash('sha256')
  upstream!.on('data', (chunk: Buffer) => { length += chunk.length; received.update(chunk) })
  upstream!.resume()
  const sent = await sending
  await waitFor(() => length === total, 20000)
  assert.equal(received.digest('hex'), sent)
  assert.equal(ws.readyState, WebSocket.OPEN)
  ws.close()
})

test('an upstream that closes with writes pending resumes the paused client, and the close completes', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const sink = await startTcp(socket => {
    upstream = socket
    socket.pause()
  })
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })
  const ws = await openClient(`${gateway.url}/sink`)
  sendAll(ws, 64 * MB).catch(() => {})
  await waitFor(() => ws.bufferedAmount > 2 * MB, 5000) // the gateway has stopped reading the client
  upstream!.destroy()
  // ws would wait 30 s for a close reply the paused gateway never read.
  const { code } = await closed(ws)
  assert.ok(code === 1000 || code === 1011, `closed with ${code}`)
})
