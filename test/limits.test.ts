import { test } from 'node:test'
import assert from 'node:assert/strict'
import { connect } from 'node:net'
import { once } from 'node:events'
import { openClient, startEcho, startGateway, startTcp, waitFor } from './helpers'

async function refusal (url: string, headers?: Record<string, string>): Promise<{ statusCode: number, body: { code: string }, headers: Record<string, string | string[] | undefined> }> {
  const { default: WebSocket } = await import('ws')
  return await new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers })
    ws.once('open', () => { ws.terminate(); reject(new Error('opened')) })
    ws.once('error', () => {})
    ws.once('unexpected-response', (_request, response) => {
      let body = ''
      response.on('data', (chunk: Buffer) => { body += chunk.toString() })
      response.on('end', () => { ws.terminate(); resolve({ statusCode: response.statusCode ?? 0, body: JSON.parse(body), headers: response.headers }) })
    })
  })
}

test('maxConnections answers 503 and maxConnectionsPerIp 429 before any upstream connection; slots come back on close', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({
    routes: {
      '/total': { upstream: echo.address, maxConnections: 2 },
      '/per-ip': { upstream: echo.address, maxConnectionsPerIp: 2 }
    }
  }, undefined, { fastify: { trustProxy: true } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const a = await openClient(`${gateway.url}/total`)
  const b = await openClient(`${gateway.url}/total`)
  const before = echo.connections
  const full = await refusal(`${gateway.url}/total`)
  assert.equal(full.statusCode, 503)
  assert.equal(full.body.code, 'FST_WSTUNNEL_TOO_MANY_CONNECTIONS')
  assert.equal(echo.connections, before, 'no upstream connection for a refused handshake')
  a.close()
  await waitFor(() => gateway.app.wstunnel.connections === 1)
  const c = await openClient(`${gateway.url}/total`) // a's slot came back
  // Per address, as trustProxy gives it: one address is limited, another is not.
  const mine = { 'x-forwarded-for': '198.51.100.1' }
  const d = await openClient(`${gateway.url}/per-ip`, undefined, { headers: mine })
  const e = await openClient(`${gateway.url}/per-ip`, undefined, { headers: mine })
  const limited = await refusal(`${gateway.url}/per-ip`, mine)
  assert.equal(limited.statusCode, 429)
  assert.equal(limited.body.code, 'FST_WSTUNNEL_TOO_MANY_FROM_CLIENT')
  const other = await openClient(`${gateway.url}/per-ip`, undefined, { headers: { 'x-forwarded-for': '198.51.100.2' } })
  // A refused handshake's slot comes back too: after the refusals, closing one opens one.
  d.close()
  let f: Awaited<ReturnType<typeof openClient>> | null = null
  const deadline = Date.now() + 3000
  while (f === null && Date.now() < deadline) { // the slot comes back when d's socket has closed
    f = await openClient(`${gateway.url}/per-ip`, undefined, { headers: mine }).catch(() => null)
    if (f === null) await new Promise(resolve => setTimeout(resolve, 20))
  }
  assert.ok(f !== null, 'a closed bridge gives its slot back')
  for (const ws of [b, c, e, f, other]) ws?.close()
  assert.equal(gateway.app.wstunnel.stats().routes['/total'].refused.limit, 1)
  assert.ok(gateway.app.wstunnel.stats().routes['/per-ip'].refused.limit >= 1) // and the retries above
})

test('handshakeRate answers 429 with Retry-After, per client address', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/r': { upstream: echo.address, handshakeRate: { max: 2, timeWindow: 60000 } } } },
    undefined, { fastify: { trustProxy: true } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const mine = { 'x-forwarded-for': '198.51.100.9' }

  for (let index = 0; index < 2; index++) (await openClient(`${gateway.url}/r`, undefined, { headers: mine })).close()
  const limited = await refusal(`${gateway.url}/r`, mine)
  assert.equal(limited.statusCode, 429)
  assert.equal(limited.body.code, 'FST_WSTUNNEL_RATE_LIMITED')
  assert.ok(Number(limited.headers['retry-after']) > 0, `Retry-After: ${String(limited.headers['retry-after'])}`)
  ;(await openClient(`${gateway.url}/r`, undefined, { headers: { 'x-forwarded-for': '198.51.100.10' } })).close()
  assert.equal(echo.connections, 3, 'the refused handshake reached no upstream')
})

test('maxPendingHandshakes answers 503 while that many handshakes wait for their upstream', { timeout: 20000 }, async (t) => {
  // A TLS upstream that accepts and never answers the handshake: each connect waits for connectTimeout.
  const silent = await startTcp()
  t.after(() => silent.close())
  const slow = await startGateway({ routes: { '/p': { upstream: { host: '127.0.0.1', port: silent.port, tls: true }, maxPendingHandshakes: 2, connectTimeout: 3000 } } })
  t.after(() => slow.app.close())
  const waiting = [openClient(`${slow.url}/p`).catch(() => null), openClient(`${slow.url}/p`).catch(() => null)]
  await waitFor(() => silent.connections === 2)
  const refused = await refusal(`${slow.url}/p`)
  assert.equal(refused.statusCode, 503)
  assert.equal(refused.body.code, 'FST_WSTUNNEL_TOO_MANY_PENDING')
  assert.equal(silent.connections, 2)
  await Promise.all(waiting)
})

test('handshakeTimeout cuts a client that sends half a request line and stops', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ handshakeTimeout: 300, routes: { '/e': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const port = Number(new URL(gateway.url).port)

  const slow = connect(port, '127.0.0.1')
  slow.on('error', () => {})
  await once(slow, 'connect')
  slow.write('GET /e HT')
  const started = Date.now()
  await once(slow, 'close')
  const took = Date.now() - started
  assert.ok(took >= 250 && took < 5000, `closed after ${took} ms`)
  // A client that sends its request in time is not cut.
  const ws = await openClient(`${gateway.url}/e`)
  await new Promise(resolve => setTimeout(resolve, 500))
  assert.equal(ws.readyState, 1)
  ws.close()
  assert.equal(echo.connections, 1)
})

test("handshakeRate is the route's own even when the app registered @fastify/rate-limit globally", { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/r': { upstream: echo.address, handshakeRate: { max: 2, timeWindow: 60000 } } } }, async (app) => {
    await app.register((await import('@fastify/rate-limit')).default, { global: true, max: 1000 })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  for (let index = 0; index < 2; index++) (await openClient(`${gateway.url}/r`)).close()
  const limited = await refusal(`${gateway.url}/r`)
  assert.equal(limited.statusCode, 429)
  assert.equal(limited.body.code, 'FST_WSTUNNEL_RATE_LIMITED')
  assert.equal(gateway.app.wstunnel.stats().routes['/r'].refused.limit, 1)
})
