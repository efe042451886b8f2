import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, type Socket } from 'node:net'
import { Registry } from 'prom-client'
import { closed, deadPort, openClient, receiveBytes, startEcho, startGateway, startTcp, waitFor } from './helpers'

test('stats() counts bridges, closes by code and side, refusals by reason, bytes each way and connect time', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const dead = await deadPort()
  const gateway = await startGateway({
    routes: {
      '/echo': { upstream: echo.address, origins: ['http://ok.example'], subprotocols: ['chat'] },
      '/dead': { upstream: `127.0.0.1:${dead}` }
    }
  }, (app) => {
    app.addHook('onRequest', async (request, reply) => { if (request.headers['x-deny'] !== undefined) await reply.code(401).send() })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const url = `${gateway.url}/echo`
  const origin = { origin: 'http://ok.example' }

  const a = await openClient(url, 'chat', { headers: origin })
  a.send(Buffer.alloc(1000))
  await receiveBytes(a, 1000)
  const live = gateway.app.wstunnel.stats().routes['/echo']
  assert.equal(live.open, 1)
  assert.deepEqual(live.bytes, { clientToUpstream: 1000, upstreamToClient: 1000 }, 'an open bridge\'s bytes count')
  a.close(4000, 'done')
  await closed(a)
  const b = await openClient(url, 'chat', { headers: origin })
  await echo.close() // the upstream goes away: closed by the upstream, 1000... or 1011 on a reset
  await closed(b)
  await openClient(url, 'chat', { headers: { origin: 'http://evil.example' } }).catch(() => null)
  await openClient(url, 'nope', { headers: origin }).catch(() => null)
  await openClient(url, 'chat', { headers: { ...origin, 'x-deny': '1' } }).catch(() => null)
  await openClient(`${gateway.url}/dead`).catch(() => null)
  await waitFor(() => gateway.app.wstunnel.stats().total.closed.total === 2)

  const { total, routes } = gateway.app.wstunnel.stats()
  const echoStats = routes['/echo']
  assert.equal(echoStats.opened, 2)
  assert.equal(echoStats.open, 0)
  assert.equal(echoStats.closed.byCode['4xxx'], 1, 'an application close code counts by its thousand')
  assert.equal(echoStats.closed.bySide.client, 1)
  assert.equal(echoStats.closed.bySide.upstream, 1)
  assert.deepEqual(echoStats.bytes, { clientToUpstream: 1000, upstreamToClient: 1000 })
  assert.equal(echoStats.refused.origin, 1)
  assert.equal(echoStats.refused.subprotocol, 1)
  assert.equal(echoStats.refused.other, 1, "the app's own 401")
  assert.equal(routes['/dead'].refused.upstream, 1)
  assert.equal(echoStats.upstreamConnect.count, 2)
  assert.ok(echoStats.upstreamConnect.totalMs > 0)
  assert.equal(total.opened, 2)
  assert.equal(total.refused.origin + total.refused.subprotocol + total.refused.other + total.refused.upstream, 4)
})

test('metrics: true serves the same counters in Prometheus text, labelled by route only; an app registry can hold them', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ metrics: true, routes: { '/echo': { upstream: echo.address } } })
  const registry = new Registry()
  const own = await startGateway({ metricsRegistry: registry, routes: { '/mine': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await own.app.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  ws.send('hello')
  await receiveBytes(ws, 5)
  assert.equal((await fetch(`${gateway.url.replace('ws', 'http')}/echo`)).status, 426) // no upgrade: refused as a bad handshake
  const response = await fetch(`${gateway.url.replace('ws', 'http')}/metrics`)
  assert.equal(response.status, 200)
  assert.match(response.headers.get('content-type') ?? '', /text\/plain/)
  const text = await response.text()
  assert.match(text, /^wstunnel_bridges_open\{route="\/echo"\} 1$/m)
  assert.match(text, /^wstunnel_bridges_opened_total\{route="\/echo"\} 1$/m)
  assert.match(text, /^wstunnel_bytes_total\{route="\/echo",direction="client_to_upstream"\} 5$/m)
  assert.match(text, /^wstunnel_handshakes_refused_total\{route="\/echo",reason="handshake"\} 1$/m)
  assert.match(text, /^wstunnel_upstream_connect_seconds_count\{route="\/echo"\} 1$/m)
  ws.close()
  await waitFor(() => gateway.app.wstunnel.connections === 0)
  const after = await (await fetch(`${gateway.url.replace('ws', 'http')}/metrics`)).text()
  assert.match(after, /^wstunnel_bridges_closed_total\{route="\/echo",code="1005",side="client"\} 1$/m) // closed with no status
  for (const line of after.split('\n').filter(line => line.startsWith('wstunnel_'))) {
    assert.doesNotMatch(line, /client=|port=|ip=/, 'no per-connection label')
  }
  // The app's registry holds them; no endpoint unless asked for.
  assert.match(await registry.metrics(), /wstunnel_bridges_open\{route="\/mine"\} 0/)
  assert.equal((await fetch(`${own.url.replace('ws', 'http')}/metrics`)).status, 404)
  await own.app.close()
  assert.doesNotMatch(await registry.metrics(), /wstunnel_/, 'taken out of the app\'s registry on close')
})

test('health: true answers 200 while every route has an upstream up, 503 with the route named otherwise, and while closing', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const dead = await deadPort()
  const gateway = await startGateway({
    health: true,
    maxFailures: 1,
    failBackoff: 60000,
    routes: {
      '/pool': { upstream: [echo.address, `127.0.0.1:${dead}`], balance: 'first' },
      '/one': { upstream: `127.0.0.1:${dead}` },
      '/q': { target: { from: 'query', allow: ['127.0.0.1:*'] } }
    }
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const health = async (): Promise<{ status: number, body: { status: string, routes: Record<string, { status: string, upstreams: Array<{ upstream: string, state: string }> }> } }> => {
    const response = await fetch(`${gateway.url.replace('ws', 'http')}/health`)
    return { status: response.status, body: await response.json() as never }
  }

  assert.equal((await health()).status, 200)
  await openClient(`${gateway.url}/one`).catch(() => null) // marks /one's only upstream down
  await openClient(`${gateway.url}/q?address=127.0.0.1:${dead}`).catch(() => null) // a client's bad target
  const down = await health()
  assert.equal(down.status, 503)
  assert.equal(down.body.status, 'down')
  assert.equal(down.body.routes['/one'].status, 'down')
  assert.equal(down.body.routes['/one'].upstreams[0].state, 'down')
  assert.equal(down.body.routes['/pool'].status, 'ok')
  assert.equal(down.body.routes['/q'].status, 'ok', 'an address a client named says nothing of the route')
})

test('health answers 503 "closing" while the server drains', { timeout: 20000 }, async (t) => {
  const echo = await startTcp(socket => { socket.resume() })
  const gateway = await startGateway({ health: true, drainTimeout: 1000, routes: { '/s': { upstream: echo.address } } })
  t.after(async () => { await echo.close() })
  const ws = await openClient(`${gateway.url}/s`)
  const http = gateway.url.replace('ws', 'http')
  assert.equal((await fetch(`${http}/health`)).status, 200)
  // The upstream keeps sending, so the bridge drains for the whole drainTimeout.
  const stream = setInterval(() => { for (const socket of echo.sockets) socket.write('x') }, 10)
  const closing = gateway.app.close()
  await new Promise(resolve => setTimeout(resolve, 100))
  const response = await fetch(`${http}/health`).catch(() => null)
  clearInterval(stream)
  // The listener may already be closed (then nothing answers); if it answers, it says closing.
  if (response !== null) {
    assert.equal(response.status, 503)
    assert.equal((await response.json() as { status: string }).status, 'closing')
  }
  await closing
  ws.terminate()
})

test('a bridge whose client has closed still counts, bytes and all, until its upstream has finished too', { timeout: 20000 }, async (t) => {
  let upstream: Socket | undefined
  // Reads, and does not end when it reads EOF: the gateway's half-close leaves it open.
  const server = createServer({ allowHalfOpen: true }, socket => { upstream = socket; socket.on('error', () => {}); socket.resume() })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const gateway = await startGateway({ closeTimeout: 1000, routes: { '/h': { upstream: `127.0.0.1:${(server.address() as { port: number }).port}` } } })
  t.after(async () => { await gateway.app.close(); upstream?.destroy(); server.close() })
  const ws = await openClient(`${gateway.url}/h`)
  await waitFor(() => upstream !== undefined)
  upstream!.write(Buffer.alloc(3000))
  await receiveBytes(ws, 3000)
  ws.close()
  await closed(ws)
  const during = gateway.app.wstunnel.stats().routes['/h']
  assert.equal(during.open, 1, 'the upstream has closeTimeout to finish')
  assert.equal(during.bytes.upstreamToClient, 3000)
  await waitFor(() => gateway.app.wstunnel.stats().routes['/h'].open === 0, 5000)
  assert.equal(gateway.app.wstunnel.stats().routes['/h'].bytes.upstreamToClient, 3000)
})

test('a client that resets its connection while its upstream connects is counted as gone', { timeout: 20000 }, async (t) => {
  const silent = await startTcp(socket => { socket.resume() }) // a TLS upstream that never answers
  const gateway = await startGateway({ routes: { '/g': { upstream: { host: '127.0.0.1', port: silent.port, tls: true }, connectTimeout: 1500 } } })
  t.after(async () => { await gateway.app.close(); await silent.close() })
  const { connect } = await import('node:net')
  const client = connect(Number(new URL(gateway.url).port), '127.0.0.1')
  client.on('error', () => {})
  client.write('GET /g HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  await waitFor(() => silent.connections === 1)
  client.resetAndDestroy()
  await waitFor(() => {
    const refused = gateway.app.wstunnel.stats().routes['/g'].refused
    return refused.client_gone + refused.upstream === 1
  }, 5000)
  const refused = gateway.app.wstunnel.stats().routes['/g'].refused
  assert.equal(refused.client_gone + refused.upstream, 1, `counted once: ${JSON.stringify(refused)}`)
})

test('a client that closes normally while resolveUpstream runs is counted as gone, once', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/r': { resolveUpstream: async () => { await new Promise(resolve => setTimeout(resolve, 150)); return echo.address } } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const { connect } = await import('node:net')
  const client = connect(Number(new URL(gateway.url).port), '127.0.0.1')
  client.on('error', () => {})
  client.write('GET /r HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
  await new Promise(resolve => setTimeout(resolve, 30))
  client.end() // a FIN, not a reset
  await waitFor(() => gateway.app.wstunnel.stats().routes['/r'].refused.client_gone === 1, 5000)
  await new Promise(resolve => setTimeout(resolve, 300))
  const stats = gateway.app.wstunnel.stats().routes['/r']
  assert.equal(stats.refused.client_gone, 1)
  assert.equal(stats.opened, 0)
  assert.equal(echo.sockets.size, 0, 'the upstream connected for it is gone too')
})
