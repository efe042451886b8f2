import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import type { Socket } from 'node:net'
import { closed, openClient, readBytes, startEcho, startGateway, startTcp, texts, waitFor } from './helpers'

test('client close half-closes the upstream, which can still finish before it is destroyed', { timeout: 10000 }, async (t) => {
  const events: string[] = []
  const server = await startTcp(socket => {
    socket.on('data', () => {})
    socket.on('end', () => {
      events.push('end')
      // The upstream may still write after reading EOF; the gateway waits for it to finish.
      socket.end('bye')
    })
    socket.on('close', () => events.push('close'))
  })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  ws.close(1000, 'done')
  await waitFor(() => events.includes('close'))
  assert.deepEqual(events, ['end', 'close'])
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  const line = gateway.logs.find('wstunnel bridge closed')[0]
  assert.equal(line.closedBy, 'client')
  assert.equal(line.code, 1000)
})

test('an upstream that ignores the half-close is destroyed after closeTimeout', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address, closeTimeout: 200 } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  await waitFor(() => upstream !== undefined)
  // This upstream never ends its side: allowHalfOpen keeps it from answering the FIN.
  upstream!.allowHalfOpen = true
  let ended = false
  upstream!.on('end', () => { ended = true })
  upstream!.resume()
  const started = Date.now()
  ws.close()
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  assert.equal(ended, true, 'the upstream got a FIN first')
  assert.ok(Date.now() - started >= 150, 'destroyed before the grace period')
  // The gateway's socket is gone: writing into it ends in a reset.
  const gone = new Promise(resolve => upstream!.once('close', resolve))
  upstream!.write('anyone there?')
  setTimeout(() => upstream!.write('hello?'), 20)
  await gone
})

test('upstream EOF closes the client with 1000 after all its bytes', { timeout: 10000 }, async (t) => {
  const server = await startTcp(socket => socket.end('last words'))
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  const { code } = await closed(ws)
  assert.equal(code, 1000)
  assert.equal(texts(ws).join(''), 'last words')
})

test('an upstream reset closes the client with 1011', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  await waitFor(() => upstream !== undefined)
  upstream!.resetAndDestroy()
  const { code } = await closed(ws)
  assert.equal(code, 1011)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  assert.equal(gateway.logs.find('wstunnel bridge closed')[0].closedBy, 'upstream')
})

test('idleTimeout closes a silent connection with 1000 "idle", and traffic either way keeps it open', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address, idleTimeout: 300 } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  await waitFor(() => upstream !== undefined)
  upstream!.resume()
  const started = Date.now()
  let open = true
  ws.on('close', () => { open = false })
  // 600 ms of traffic, alternating directions every 100 ms: twice the idle timeout, never idle.
  for (let i = 0; i < 6; i++) {
    if (i % 2 === 0) ws.send('ping')
    else upstream!.write('pong')
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  assert.equal(open, true, 'closed while traffic flowed')
  const { code, reason } = await closed(ws)
  assert.equal(code, 1000)
  assert.equal(reason, 'idle')
  // The last traffic was at about 500 ms.
  assert.ok(Date.now() - started >= 750, `closed after ${Date.now() - started} ms`)
})

test('pingInterval terminates a client that does not answer pings, and keeps one that does', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address, pingInterval: 100 } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const mute = await openClient(`${gateway.url}/x`, undefined, { autoPong: false })
  const polite = await openClient(`${gateway.url}/x`)
  let pings = 0
  polite.on('ping', () => { pings++ })
  const { code } = await closed(mute)
  assert.equal(code, 1006)
  assert.equal(polite.readyState, polite.OPEN)
  await waitFor(() => pings >= 3)
  assert.equal(polite.readyState, polite.OPEN)
  polite.close()
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').some(line => line.reason === 'no pong'))
})

test('a client message over maxPayload closes with 1009 and is not forwarded', { timeout: 10000 }, async (t) => {
  const received: Buffer[] = []
  const server = await startTcp(socket => socket.on('data', (chunk: Buffer) => received.push(chunk)))
  const gateway = await startGateway({ maxPayload: 1024, routes: { '/x': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  ws.send(Buffer.alloc(1024, 1))
  ws.send(Buffer.alloc(1025, 2))
  const { code } = await closed(ws)
  assert.equal(code, 1009)
  const bytes = Buffer.concat(received)
  assert.equal(bytes.length, 1024)
  assert.ok(bytes.every(byte => byte === 1))
})

test('fastify.close() closes every bridge with 1001 and its upstream', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/x': { upstream: echo.address } } })
  t.after(() => echo.close())

  const clients = await Promise.all([1, 2, 3].map(() => openClient(`${gateway.url}/x`)))
  assert.equal(echo.sockets.size, 3)
  const codes = Promise.all(clients.map(closed))
  await gateway.app.close()
  assert.deepEqual((await codes).map(result => result.code), [1001, 1001, 1001])
  await waitFor(() => echo.sockets.size === 0)
})

test('an upstream that writes after the client left does not crash or leak', { timeout: 10000 }, async (t) => {
  let upstream: Socket | undefined
  const server = await startTcp(socket => { upstream = socket })
  const gateway = await startGateway({ routes: { '/x': { upstream: server.address } } })
  t.after(async () => { await gateway.app.close(); await server.close() })

  const ws = await openClient(`${gateway.url}/x`)
  await waitFor(() => upstream !== undefined)
  const fromClient = readBytes(upstream!, 3)
  ws.send('abc')
  await fromClient
  ws.terminate()
  for (let i = 0; i < 20; i++) upstream!.write(Buffer.alloc(1024))
  upstream!.end()
  await once(upstream!, 'close')
  await waitFor(() => gateway.app.wstunnel.connections === 0)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
})
