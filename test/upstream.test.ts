import { test } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { connect, createServer, type Socket } from 'node:net'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { deadPort, openClient, receiveBytes, startEcho, startGateway, startStalledListener, startTcp, waitFor } from './helpers'
import { connectUpstream, readUpstream } from '../lib/upstream'

test('a refused upstream answers HTTP 502 and no WebSocket opens', { timeout: 10000 }, async (t) => {
  const port = await deadPort()
  const gateway = await startGateway({ routes: { '/dead': { upstream: `127.0.0.1:${port}` } } })
  t.after(() => gateway.app.close())

  const error = await openClient(`${gateway.url}/dead`).then(() => null, (err: { statusCode: number, body: string }) => err)
  assert.equal(error?.statusCode, 502)
  const body = JSON.parse(error.body)
  assert.equal(body.code, 'FST_WSTUNNEL_UPSTREAM_UNREACHABLE')
  assert.match(body.message, /ECONNREFUSED/)
  assert.equal(gateway.app.wstunnel.connections, 0)
})

test('an upstream that does not answer within connectTimeout answers HTTP 504', { timeout: 10000 }, async (t) => {
  const stalled = await startStalledListener()
  const gateway = await startGateway({ routes: { '/slow': { upstream: `127.0.0.1:${stalled.port}`, connectTimeout: 300 } } })
  t.after(async () => {
    stalled.close()
    await gateway.app.close()
  })

  const started = Date.now()
  const error = await openClient(`${gateway.url}/slow`).then(() => null, (err: { statusCode: number, body: string }) => err)
  assert.equal(error?.statusCode, 504)
  assert.equal(JSON.parse(error.body).code, 'FST_WSTUNNEL_UPSTREAM_TIMEOUT')
  assert.ok(Date.now() - started >= 250, 'answered before the timeout')
})

test('unix-socket upstreams work in both forms', { timeout: 10000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-'))
  const path = join(dir, 'echo.sock')
  const server = createServer(socket => socket.pipe(socket))
  server.listen(path)
  await once(server, 'listening')
  const gateway = await startGateway({ routes: { '/a': { upstream: `unix:${path}` }, '/b': { upstream: { path } } } })
  t.after(async () => {
    await gateway.app.close()
    await new Promise(resolve => server.close(resolve))
    rmSync(dir, { recursive: true, force: true })
  })

  for (const route of ['/a', '/b']) {
    const ws = await openClient(gateway.url + route)
    const reply = receiveBytes(ws, 5)
    ws.send(route + 'xyz')
    assert.equal((await reply).toString(), route + 'xyz')
    ws.close()
  }
})

test('IPv6 upstreams work as [::1]:port and { host, port }', { timeout: 10000 }, async (t) => {
  const server = createServer(socket => socket.pipe(socket))
  server.listen(0, '::1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  const gateway = await startGateway({ routes: { '/a': { upstream: `[::1]:${port}` }, '/b': { upstream: { host: '::1', port } } } })
  t.after(async () => {
    await gateway.app.close()
    await new Promise(resolve => server.close(resolve))
  })

  for (const route of ['/a', '/b']) {
    const ws = await openClient(gateway.url + route)
    const reply = receiveBytes(ws, 2)
    ws.send(route)
    assert.equal((await reply).toString(), route)
    ws.close()
  }
})

test('a client that leaves while the upstream is connecting leaves no upstream connection behind', { timeout: 10000 }, async (t) => {
  let accepted: Socket | undefined
  const server = await startTcp(socket => { accepted = socket })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } }, app => {
    // Holds the request after the upstream connected, long enough for the client to give up.
    app.addHook('onRoute', route => {
      route.preHandler = [...[route.preHandler ?? []].flat(), async () => { await new Promise(resolve => setTimeout(resolve, 200)) }]
    })
  })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const request = connect(Number(new URL(gateway.url).port), '127.0.0.1')
  request.write('GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n' +
    'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  await waitFor(() => accepted !== undefined)
  request.destroy()
  await once(accepted!, 'close')
  assert.equal(gateway.app.wstunnel.connections, 0)
})

test('the echo route answers many concurrent clients', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const clients = await Promise.all(Array.from({ length: 20 }, () => openClient(`${gateway.url}/echo`)))
  assert.equal(gateway.app.wstunnel.connections, 20)
  assert.equal(echo.connections, 20)
  await Promise.all(clients.map(async (ws, i) => {
    const reply = receiveBytes(ws, String(i).length)
    ws.send(String(i))
    assert.equal((await reply).toString(), String(i))
    ws.close()
  }))
  await waitFor(() => gateway.app.wstunnel.connections === 0)
})

test('bytes an upstream sends before a bridge adopts it are kept, and come first', { timeout: 10000 }, async (t) => {
  const server = await startTcp(socket => {
    socket.write('banner 1\n')
    setTimeout(() => socket.write('banner 2\n'), 20)
  })
  t.after(() => server.close())
  const upstream = await connectUpstream({ host: '127.0.0.1', port: server.port, label: server.address, tls: null }, 1000, undefined, new AbortController().signal)
  t.after(() => upstream.destroy())
  await new Promise(resolve => setTimeout(resolve, 100)) // both banners reach the gateway before anyone reads
  const received: string[] = []
  readUpstream(upstream, (buffer, length) => { received.push(buffer.toString('latin1', 0, length)); return true }, false)
  server.sockets.values().next().value?.write('after\n')
  await waitFor(() => received.join('') === 'banner 1\nbanner 2\nafter\n')
})

test('a large upstream read is handed on to keep, and nothing ever reads into that memory again', { timeout: 10000 }, async (t) => {
  const sent = randomBytes(4 * 1024 * 1024)
  const server = await startTcp(socket => { socket.end(sent) })
  t.after(() => server.close())
  const upstream = await connectUpstream({ host: '127.0.0.1', port: server.port, label: server.address, tls: null }, 1000, undefined, new AbortController().signal)
  t.after(() => upstream.destroy())
  const kept: Array<{ at: number, bytes: Buffer }> = []
  const copies: Buffer[] = []
  let received = 0
  readUpstream(upstream, (buffer, length, owned) => {
    const bytes = buffer.subarray(0, length)
    if (owned) kept.push({ at: received, bytes }) // kept as it is, as a bridge does
    copies.push(Buffer.from(bytes))
    received += length
    return true
  }, true)
  await waitFor(() => received === sent.length, 8000)
  assert.ok(Buffer.concat(copies).equals(sent))
  assert.ok(kept.length > 0, 'bulk reads were handed on to keep')
  // Every kept buffer still holds the bytes it was handed with: no later read of this socket wrote into it.
  for (const { at, bytes } of kept) assert.ok(bytes.equals(sent.subarray(at, at + bytes.length)), `bytes kept at ${at} were overwritten`)
  assert.equal(new Set(kept.map(({ bytes }) => bytes.buffer)).size, kept.length, 'each kept read has memory of its own')
  for (const { bytes } of kept) assert.ok(bytes.length * 2 >= bytes.buffer.byteLength, 'a kept read fills at least half its memory')
})

test('a reader that keeps nothing is never handed a read to keep; one that throws loses its upstream, not the process', { timeout: 10000 }, async (t) => {
  const sent = randomBytes(2 * 1024 * 1024)
  const server = await startTcp(socket => { socket.end(sent) })
  t.after(() => server.close())
  const signal = new AbortController().signal
  const plain = await connectUpstream({ host: '127.0.0.1', port: server.port, label: server.address, tls: null }, 1000, undefined, signal)
  t.after(() => plain.destroy())
  let received = 0
  let owned = 0
  readUpstream(plain, (_buffer, length, keep) => { received += length; if (keep) owned++; return true }, false)
  await waitFor(() => received === sent.length, 8000)
  assert.equal(owned, 0)

  const throwing = await connectUpstream({ host: '127.0.0.1', port: server.port, label: server.address, tls: null }, 1000, undefined, signal)
  const errors: Error[] = []
  throwing.on('error', err => errors.push(err))
  readUpstream(throwing, (_buffer, _length, keep) => { if (keep) throw new Error('reader failed'); return true }, true)
  await waitFor(() => throwing.destroyed, 8000)
  assert.deepEqual(errors.map(err => err.message), ['reader failed'])
})
