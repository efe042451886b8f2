import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { connect } from 'node:net'
import { randomBytes } from 'node:crypto'
import { closed, openClient, receiveBytes, startGateway, startTcp, waitFor, type TcpServer } from './helpers'

// A bridge carries a byte stream: a message is as large as the route allows (no limit by default), and
// a message over the route's maxPayload closes the connection with 1009.

const MiB = 1024 * 1024

/** An echo server that also keeps what it received. */
async function recordingEcho (): Promise<{ server: TcpServer, received: () => Buffer }> {
  const chunks: Buffer[] = []
  const server = await startTcp(socket => {
    socket.on('data', (chunk: Buffer) => {
      chunks.push(chunk)
      socket.write(chunk)
    })
  })
  return { server, received: () => Buffer.concat(chunks) }
}

test('with default options, 2 MiB binary and text messages pass through intact', { timeout: 30000 }, async (t) => {
  const echo = await recordingEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.server.address } } })
  t.after(async () => { await gateway.app.close(); await echo.server.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  t.after(() => { ws.terminate() })
  const binary = randomBytes(2 * MiB)
  // 1 + 2 + 3 + 4 bytes a repetition, padded to exactly 2 MiB: characters of every UTF-8 length.
  const text = 'aé☃😀'.repeat(209715) + 'aa'
  assert.equal(Buffer.byteLength(text), 2 * MiB)
  ws.send(binary)
  ws.send(text)
  const expected = Buffer.concat([binary, Buffer.from(text)])

  // The echo comes back in as many messages as the upstream's reads: count bytes, not messages.
  const echoed = await receiveBytes(ws, expected.length)
  assert.equal(echoed.length, expected.length)
  assert.ok(echoed.equals(expected), 'the client got back exactly what it sent')
  assert.ok(echo.received().equals(expected), 'the upstream received exactly what the client sent')
  assert.equal(ws.readyState, ws.OPEN)
})

test('a 2 MiB message over the route\'s maxPayload of 1000000 closes with 1009, and the client sees it', { timeout: 20000 }, async (t) => {
  const echo = await recordingEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.server.address, maxPayload: 1000000 } } })
  t.after(async () => { await gateway.app.close(); await echo.server.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  t.after(() => { ws.terminate() })
  ws.send(randomBytes(2 * MiB))
  const { code } = await closed(ws)
  assert.equal(code, 1009)
  assert.equal(echo.received().length, 0, 'nothing of the message reached the upstream')
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  const line = gateway.logs.find('wstunnel bridge closed')[0]
  assert.deepEqual([line.code, line.closedBy], [1009, 'gateway'])
})

test('a route\'s maxPayload wins over the plugin-wide one, larger or smaller', { timeout: 20000 }, async (t) => {
  const echo = await recordingEcho()
  const gateway = await startGateway({
    maxPayload: 10000,
    routes: {
      '/larger': { upstream: echo.server.address, maxPayload: 100000 },
      '/smaller': { upstream: echo.server.address, maxPayload: 1000 },
      '/plugin-wide': { upstream: echo.server.address }
    }
  })
  t.after(async () => { await gateway.app.close(); await echo.server.close() })

  // 50000 bytes: over the plugin-wide limit, under the route's.
  const larger = await openClient(`${gateway.url}/larger`)
  t.after(() => { larger.terminate() })
  const big = randomBytes(50000)
  larger.send(big)
  assert.ok((await receiveBytes(larger, big.length)).equals(big))
  assert.equal(larger.readyState, larger.OPEN)

  // 5000 bytes: under the plugin-wide limit, over the route's.
  const smaller = await openClient(`${gateway.url}/smaller`)
  smaller.send(randomBytes(5000))
  assert.equal((await closed(smaller)).code, 1009)

  // A route without its own takes the plugin-wide one.
  const pluginWide = await openClient(`${gateway.url}/plugin-wide`)
  const fits = randomBytes(5000)
  pluginWide.send(fits)
  assert.ok((await receiveBytes(pluginWide, fits.length)).equals(fits))
  pluginWide.send(randomBytes(20000))
  assert.equal((await closed(pluginWide)).code, 1009)
})

test('a protocol error ws reports itself (a ping of 126 bytes) is logged with code 1002', { timeout: 10000 }, async (t) => {
  const echo = await recordingEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.server.address } } })
  t.after(async () => { await gateway.app.close(); await echo.server.close() })

  // A raw client: no WebSocket library would send this ping.
  const { hostname, port } = new URL(gateway.url)
  const socket = connect(Number(port), hostname)
  t.after(() => { socket.destroy() })
  await once(socket, 'connect')
  socket.write(`GET /echo HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
    `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`)
  let received = Buffer.alloc(0)
  socket.on('data', (chunk: Buffer) => { received = Buffer.concat([received, chunk]) })
  await waitFor(() => received.includes('\r\n\r\n'))
  assert.match(received.toString(), /^HTTP\/1.1 101 /)
  await waitFor(() => echo.server.connections === 1)

  // A masked ping whose 126-byte payload takes the 16-bit length form: control frames carry at most 125.
  const ping = Buffer.concat([Buffer.from([0x89, 0x80 | 126, 0, 126]), randomBytes(4), Buffer.alloc(126)])
  socket.write(ping)
  // The gateway answers with a close frame, 1002.
  const head = received.indexOf('\r\n\r\n') + 4
  await waitFor(() => received.length >= head + 4)
  assert.deepEqual([received[head], received.readUInt16BE(head + 2)], [0x88, 1002])
  socket.end()
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  const line = gateway.logs.find('wstunnel bridge closed')[0]
  assert.deepEqual([line.code, line.closedBy], [1002, 'gateway'])
})
