import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { createServer, type Server, type Socket } from 'node:net'
import { deadPort, openClient, startGateway, startStalledListener, startTcp, waitFor, type Client, type TcpServer } from './helpers'
import { RoutePool } from '../lib/upstream-pool'

/** A TCP server that greets each connection with its name, then echoes. */
function startNamed (name: string): Promise<TcpServer> {
  return startTcp(socket => {
    socket.write(`${name}\n`)
    socket.pipe(socket)
  })
}

/** Opens a client and resolves with it and the name of the upstream that greeted it. */
async function reach (url: string, headers?: Record<string, string>): Promise<{ ws: Client, name: string }> {
  const ws = await openClient(url, undefined, { headers })
  await waitFor(() => ws.inbox.length > 0, 5000)
  return { ws, name: ws.inbox[0].data.toString().trim() }
}

async function names (url: string, count: number, headers?: Record<string, string>): Promise<string[]> {
  const reached: string[] = []
  for (let index = 0; index < count; index++) {
    const { ws, name } = await reach(url, headers)
    reached.push(name)
    ws.close()
  }
  return reached
}

/** Listens again on a port a test server gave up. */
async function relisten (port: number, name: string): Promise<Server> {
  const server = createServer((socket: Socket) => {
    socket.on('error', () => {})
    socket.write(`${name}\n`)
    socket.pipe(socket)
  })
  server.listen(port, '127.0.0.1')
  await once(server, 'listening')
  return server
}

async function threeUpstreams (t: { after: (fn: () => Promise<void>) => void }): Promise<TcpServer[]> {
  const servers = await Promise.all(['A', 'B', 'C'].map(startNamed))
  t.after(async () => { await Promise.all(servers.map(server => server.close())) })
  return servers
}

test('round-robin takes the upstreams in turn; first always takes the first; random reaches each', { timeout: 30000 }, async (t) => {
  const [a, b, c] = await threeUpstreams(t)
  const list = [a.address, b.address, c.address]
  const gateway = await startGateway({
    routes: {
      '/rr': { upstream: list },
      '/first': { upstream: list, balance: 'first' },
      '/random': { upstream: list, balance: 'random' }
    }
  })
  t.after(() => gateway.app.close())

  assert.deepEqual(await names(`${gateway.url}/rr`, 6), ['A', 'B', 'C', 'A', 'B', 'C'])
  assert.deepEqual(await names(`${gateway.url}/first`, 4), ['A', 'A', 'A', 'A'])
  const random = await names(`${gateway.url}/random`, 30)
  for (const name of ['A', 'B', 'C']) assert.ok(random.includes(name), `random reached ${name} in 30 connections: ${random.join('')}`)
  assert.notDeepEqual(random.slice(0, 9), ['A', 'B', 'C', 'A', 'B', 'C', 'A', 'B', 'C'], 'random is not round-robin')
})

test('least-connections sends a new client to the upstream with the fewest open bridges', { timeout: 20000 }, async (t) => {
  const [a, b, c] = await threeUpstreams(t)
  const gateway = await startGateway({ routes: { '/lc': { upstream: [a.address, b.address, c.address], balance: 'least-connections' } } })
  t.after(() => gateway.app.close())
  const url = `${gateway.url}/lc`

  const open = [await reach(url), await reach(url), await reach(url)]
  assert.deepEqual(open.map(client => client.name).sort(), ['A', 'B', 'C'], 'one each while all are equal')
  // Two more on each of A and C, so B alone has one.
  const extra: Array<{ ws: Client, name: string }> = []
  for (let index = 0; index < 6; index++) extra.push(await reach(url))
  const byName = (name: string): number => [...open, ...extra].filter(client => client.name === name && client.ws.readyState === 1).length
  assert.deepEqual([byName('A'), byName('B'), byName('C')], [3, 3, 3])
  // Close two of B's: the next two clients go to B.
  const onB = [...open, ...extra].filter(client => client.name === 'B')
  onB[0].ws.close()
  onB[1].ws.close()
  await waitFor(() => gateway.app.wstunnel.upstreams()['/lc'].find(status => status.upstream === b.address)?.connections === 1)
  const next = [await reach(url), await reach(url)]
  assert.deepEqual(next.map(client => client.name), ['B', 'B'])
  for (const client of [...open, ...extra, ...next]) client.ws.close()
})

test('client-ip keeps each client address on one upstream while it is up, and spreads addresses', { timeout: 30000 }, async (t) => {
  const [a, b, c] = await threeUpstreams(t)
  const gateway = await startGateway({ routes: { '/ip': { upstream: [a.address, b.address, c.address], balance: 'client-ip' } } },
    undefined, { fastify: { trustProxy: true } })
  t.after(() => gateway.app.close())

  const reachedBy = new Map<string, string>()
  for (let host = 1; host <= 12; host++) {
    const ip = `192.0.2.${host}`
    const reached = await names(`${gateway.url}/ip`, 3, { 'x-forwarded-for': ip })
    assert.equal(new Set(reached).size, 1, `${ip} reached ${reached.join(', ')}`)
    reachedBy.set(ip, reached[0])
  }
  assert.ok(new Set(reachedBy.values()).size >= 2, 'twelve addresses do not all land on one upstream')

  // Its upstream down, a client goes elsewhere; back up, it returns.
  const [ip, home] = [...reachedBy].find(([, name]) => name === 'B') ?? [...reachedBy][0]
  const server = { A: a, B: b, C: c }[home as 'A' | 'B' | 'C']
  await server.close()
  const away = await names(`${gateway.url}/ip`, 2, { 'x-forwarded-for': ip })
  assert.ok(!away.includes(home), `with ${home} down, ${ip} reached ${away.join(', ')}`)
  const back = await relisten(server.port, home)
  t.after(() => new Promise(resolve => back.close(resolve)))
  assert.deepEqual(await names(`${gateway.url}/ip`, 2, { 'x-forwarded-for': ip }), [home, home])
})

test('a stopped upstream fails over within the request, is marked down after maxFailures, and is back when it restarts', { timeout: 30000 }, async (t) => {
  const [a, b, c] = await threeUpstreams(t)
  const gateway = await startGateway({
    routes: { '/pool': { upstream: [a.address, b.address, c.address], maxFailures: 2, failBackoff: 200, failBackoffMax: 400 } }
  })
  t.after(() => gateway.app.close())
  const url = `${gateway.url}/pool`
  const status = (): Record<string, { state: string, failures: number, connections: number, lastError: string | null }> =>
    Object.fromEntries(gateway.app.wstunnel.upstreams()['/pool'].map(entry => [entry.upstream, entry]))

  const kept = await reach(url) // on A, kept open through the test
  assert.equal(kept.name, 'A')
  await b.close()
  // Every client still gets a bridge: B's turn fails over to C.
  const reached = await names(url, 6)
  assert.ok(!reached.includes('B'))
  assert.equal(reached.length, 6)
  assert.equal(status()[b.address].state, 'down')
  assert.equal(status()[b.address].failures, 2)
  assert.match(status()[b.address].lastError ?? '', /ECONNREFUSED/)
  await waitFor(() => status()[a.address].connections === 1) // the clients closed meanwhile are settled
  assert.ok(gateway.logs.find('wstunnel upstream down').some(line => line.upstream === b.address))
  // While B is down it is not tried first: no more failures pile up within its backoff.
  const failuresWhileDown = status()[b.address].failures
  await names(url, 3)
  assert.ok(status()[b.address].failures <= failuresWhileDown + 1)

  const restarted = await relisten(b.port, 'B')
  t.after(() => new Promise(resolve => restarted.close(resolve)))
  await new Promise(resolve => setTimeout(resolve, 450)) // past the longest backoff
  const after = await names(url, 6)
  assert.ok(after.includes('B'), `B is reached again: ${after.join('')}`)
  assert.equal(status()[b.address].state, 'up')
  assert.equal(status()[b.address].failures, 0)
  assert.ok(gateway.logs.find('wstunnel upstream up').some(line => line.upstream === b.address))
  assert.equal(kept.ws.readyState, 1, 'the bridge to A was never disturbed')
  kept.ws.close()
})

test('when every upstream refuses, the 502 says how many were tried; all down are still tried', { timeout: 20000 }, async (t) => {
  const ports = [await deadPort(), await deadPort()]
  const gateway = await startGateway({ routes: { '/dead': { upstream: ports.map(port => `127.0.0.1:${port}`), maxFailures: 1, failBackoff: 60000 } } })
  t.after(() => gateway.app.close())

  for (let round = 0; round < 2; round++) {
    const error = await openClient(`${gateway.url}/dead`).then(() => null, (err: { statusCode: number, body: string }) => err)
    assert.equal(error?.statusCode, 502)
    const body = JSON.parse(error.body)
    assert.equal(body.code, 'FST_WSTUNNEL_UPSTREAM_UNREACHABLE')
    assert.match(body.message, /\(2 of 2 upstreams tried\)/)
    for (const port of ports) assert.match(body.message, new RegExp(`127\\.0\\.0\\.1:${port} ECONNREFUSED`))
  }
  // Both are down (maxFailures 1), yet a server that comes back is reached at once: all-down means try them all.
  const back = await relisten(ports[1], 'back')
  t.after(() => new Promise(resolve => back.close(resolve)))
  const { ws, name } = await reach(`${gateway.url}/dead`)
  assert.equal(name, 'back')
  ws.close()
})

test('an upstream that does not answer uses only its share of connectTimeout; the next one is reached in time', { timeout: 20000 }, async (t) => {
  const stalled = await startStalledListener()
  const silent = stalled.port
  const good = await startNamed('good')
  const gateway = await startGateway({ routes: { '/t': { upstream: [`127.0.0.1:${silent}`, good.address], balance: 'first', connectTimeout: 1000 } } })
  t.after(async () => {
    stalled.close()
    await good.close()
    await gateway.app.close()
  })

  const started = Date.now()
  const { ws, name } = await reach(`${gateway.url}/t`)
  assert.equal(name, 'good')
  const took = Date.now() - started
  assert.ok(took >= 400 && took < 1000, `the silent one had half the budget: ${took} ms`)
  assert.match(gateway.app.wstunnel.upstreams()['/t'][0].lastError ?? '', /timed out after 500 ms/)
  ws.close()
})

test('least-connections takes turns among equals; a down upstream\'s share is spread over all the others, and it is not tried within its backoff', { timeout: 20000 }, async (t) => {
  const [a, b, c] = await threeUpstreams(t)
  const d = await startNamed('D')
  t.after(() => d.close())
  const gateway = await startGateway({
    routes: {
      '/lc': { upstream: [a.address, b.address, c.address], balance: 'least-connections' },
      '/rr': { upstream: [a.address, b.address, c.address, d.address], maxFailures: 1, failBackoff: 60000 }
    }
  })
  t.after(() => gateway.app.close())

  // One at a time, each closed before the next: every upstream has 0 open, so they take turns.
  const sequential = []
  for (let index = 0; index < 6; index++) {
    sequential.push(...await names(`${gateway.url}/lc`, 1))
    await waitFor(() => gateway.app.wstunnel.upstreams()['/lc'].every(entry => entry.connections === 0))
  }
  assert.deepEqual(sequential.slice().sort(), ['A', 'A', 'B', 'B', 'C', 'C'], sequential.join(''))

  await b.close()
  assert.deepEqual((await names(`${gateway.url}/rr`, 2)).join(''), 'AC', "B's turn went to C")
  const failures = gateway.app.wstunnel.upstreams()['/rr'].find(entry => entry.upstream === b.address)?.failures
  assert.equal(failures, 1)
  const reached = await names(`${gateway.url}/rr`, 9)
  assert.deepEqual(['A', 'C', 'D'].map(name => reached.filter(other => other === name).length), [3, 3, 3], reached.join(''))
  assert.equal(gateway.app.wstunnel.upstreams()['/rr'].find(entry => entry.upstream === b.address)?.failures, 1, 'B, down, was not tried')
})

test('lists given alternately take turns of their own; a unix path and a host named like it are two upstreams', { timeout: 20000 }, async (t) => {
  const servers = await Promise.all(['a1', 'a2', 'b1', 'b2'].map(startNamed))
  t.after(async () => { await Promise.all(servers.map(server => server.close())) })
  const [a1, a2, b1, b2] = servers
  const gateway = await startGateway({ routes: { '/m': { subprotocols: { a: [a1.address, a2.address], b: [b1.address, b2.address] } } } })
  t.after(() => gateway.app.close())
  const reached: string[] = []
  for (const protocol of ['a', 'b', 'a', 'b']) {
    const ws = await openClient(`${gateway.url}/m`, protocol)
    await waitFor(() => ws.inbox.length > 0)
    reached.push(ws.inbox[0].data.toString().trim())
    ws.close()
  }
  assert.deepEqual(reached, ['a1', 'b1', 'a2', 'b2'])

  const pool = new RoutePool(gateway.app.wstunnel as never, [], gateway.app.log)
  const [tcp, unix] = pool.entriesFor([{ host: 'unix', port: 80, label: 'unix:80', tls: null }, { path: '80', label: 'unix:80', tls: null }], false)
  assert.notEqual(tcp, unix)
})
