import { test } from 'node:test'
import assert from 'node:assert/strict'
import Fastify, { type FastifyInstance } from 'fastify'
import websocket from '@fastify/websocket'
import wstunnel from '../lib/index'
import { Settings } from 'typebox/system'
import { resolveOptions } from '../lib/options'
import { closed, openClient, receiveBytes, startEcho, startGateway, waitFor } from './helpers'

function openConnections (app: FastifyInstance): Promise<number> {
  return new Promise((resolve, reject) => app.server.getConnections((err, count) => err ? reject(err) : resolve(count)))
}

async function waitForAsync (predicate: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (await predicate()) return
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  throw new Error('condition not met in time')
}

test('register rejects invalid options with one error that lists every problem with its path', { timeout: 10000 }, async () => {
  const app = Fastify()
  const error = await app.register(wstunnel, {
    routes: {
      '/vnc': { upstream: { host: '127.0.0.1', port: 70000 }, frame: 'binary' },
      chat: { upstream: '127.0.0.1:9001' },
      '/x': { upstream: 'localhost', idleTimeout: -5, colour: 'red' }
    } as never,
    pingInterval: 'often' as never
  }).ready().then(() => null, (err: Error & { code: string }) => err)
  await app.close()
  assert.equal(error?.code, 'FST_WSTUNNEL_INVALID_OPTIONS')
  const lines = error.message.split('\n').slice(1)
  assert.deepEqual(lines.sort(), [
    "routes['/vnc'].upstream.port: must be an integer from 1 to 65535",
    "routes['/x'].colour: is not a known option",
    "routes['/x'].idleTimeout: must be an integer from 0 to 2147483647",
    "routes['/x'].upstream: must be 'host:port', '[ipv6]:port' (port 1 to 65535) or 'unix:/path'",
    "routes.chat: is not a route path (it must start with '/' and hold no spaces)",
    'pingInterval: must be an integer from 0 to 2147483647'
  ].sort())
})

test('register rejects missing or non-object options', { timeout: 10000 }, async () => {
  for (const options of [undefined, { routes: 5 }, { routes: { '/a': {} } }]) {
    const app = Fastify()
    const error = await app.register(wstunnel, options as never).ready().then(() => null, (err: Error & { code: string }) => err)
    await app.close()
    assert.equal(error?.code, 'FST_WSTUNNEL_INVALID_OPTIONS', JSON.stringify(options))
  }
})

test('options are plain JSON: they survive a JSON round trip and defaults come from the schema', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const options = JSON.parse(JSON.stringify({ routes: { '/echo': { upstream: echo.address } } }))
  const gateway = await startGateway(options)
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const ws = await openClient(`${gateway.url}/echo`)
  const reply = receiveBytes(ws, 2)
  ws.send('ok')
  assert.equal((await reply).toString(), 'ok')
  ws.close()
})

test('undeclared paths get the normal 404, and a plain GET to a route gets 426 without touching the upstream', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const missing = await openClient(`${gateway.url}/nowhere`).then(() => null, (err: { statusCode: number }) => err)
  assert.equal(missing?.statusCode, 404)
  const plain = await gateway.app.inject({ method: 'GET', url: '/echo' })
  assert.equal(plain.statusCode, 426)
  assert.equal(plain.headers.upgrade, 'websocket')
  assert.equal(plain.json().code, 'FST_WSTUNNEL_UPGRADE_REQUIRED')
  assert.equal(echo.connections, 0)
})

test("the user's own hooks run before the upgrade, and a refusal costs no upstream connection", { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } }, app => {
    app.addHook('onRequest', async (request, reply) => {
      if (request.headers.authorization !== 'Bearer secret') await reply.code(401).send({ error: 'unauthorized' })
    })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const refused = await openClient(`${gateway.url}/echo`).then(() => null, (err: { statusCode: number }) => err)
  assert.equal(refused?.statusCode, 401)
  assert.equal(echo.connections, 0)
  // The refused handshake's socket is closed, not left half-open.
  await waitForAsync(async () => await openConnections(gateway.app) === 0)
  const ws = await openClient(`${gateway.url}/echo`, undefined, { headers: { authorization: 'Bearer secret' } })
  assert.equal(echo.connections, 1)
  ws.close()
})

test('works when the app registered @fastify/websocket itself', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } }, async app => {
    await app.register(websocket)
    app.get('/own', { websocket: true }, socket => { socket.send('own route') })
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  const reply = receiveBytes(ws, 3)
  ws.send('abc')
  assert.equal((await reply).toString(), 'abc')
  const own = await openClient(`${gateway.url}/own`)
  await waitFor(() => own.inbox.length === 1)
  assert.equal(own.inbox[0].data.toString(), 'own route')
  own.close()
  // Shutdown still tells bridged clients 1001, whoever registered @fastify/websocket.
  const code = closed(ws)
  await gateway.app.close()
  assert.equal((await code).code, 1001)
})

test('one log line when a bridge opens and one when it closes, none per message', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const ws = await openClient(`${gateway.url}/echo`)
  const reply = receiveBytes(ws, 1000)
  for (let i = 0; i < 100; i++) ws.send('0123456789')
  await reply
  const before = gateway.logs.lines.length
  ws.close(1000)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)

  const open = gateway.logs.find('wstunnel bridge open')
  assert.equal(open.length, 1)
  assert.equal(open[0].route, '/echo')
  assert.equal(open[0].upstream, echo.address)
  assert.match(String(open[0].client), /^127\.0\.0\.1:\d+$/)
  const [summary] = gateway.logs.find('wstunnel bridge closed')
  assert.equal(summary.route, '/echo')
  assert.equal(summary.upstream, echo.address)
  assert.equal(summary.client, open[0].client)
  assert.equal(summary.clientToUpstream, 1000)
  assert.equal(summary.upstreamToClient, 1000)
  assert.equal(summary.code, 1000)
  assert.equal(summary.closedBy, 'client')
  assert.equal(typeof summary.durationMs, 'number')
  // Between the last message and the close, only the close summary was logged.
  assert.equal(gateway.logs.lines.length - before, 1)
  assert.ok(gateway.logs.lines.length < 10, `${gateway.logs.lines.length} log lines for 100 messages`)
})

test('an option set to undefined is an option left out: the default or the plugin-wide value applies', () => {
  const upstream = '127.0.0.1:1'
  const plain = resolveOptions({ origins: 'http://a.test', routes: { '/a': { upstream } } })
  const unset = resolveOptions({
    closeTimeout: undefined,
    pingInterval: undefined,
    maxPayload: undefined,
    hostnames: undefined,
    proxyProtocol: undefined,
    origins: 'http://a.test',
    routes: { '/a': { upstream, closeTimeout: undefined, pingInterval: undefined, maxPayload: undefined, origins: undefined, frame: undefined, subprotocols: undefined } }
  })
  const [route] = unset.routes
  assert.equal(route.closeTimeout, 2000)
  assert.equal(route.pingInterval, 30000)
  assert.equal(route.maxPayload, 0)
  assert.equal(route.frame, 'binary')
  assert.deepEqual(route.subprotocols, [])
  assert.notEqual(route.origins, null, 'the plugin-wide origins apply')
  assert.equal(unset.maxPayload, 0)
  const { origins: _a, ...settings } = route
  const { origins: _b, ...expected } = plain.routes[0]
  assert.deepEqual(settings, expected)

  // Other wrong values still fail, naming the option.
  assert.throws(() => resolveOptions({ closeTimeout: null, maxPayload: '1024', hostnames: null, origins: null, routes: { '/a': { upstream, pingInterval: null } } }), (err: Error) => {
    assert.deepEqual(err.message.split('\n').slice(1).sort(), [
      'closeTimeout: must be an integer from 0 to 2147483647',
      'hostnames: must be a non-empty list of host names',
      'maxPayload: must be an integer from 0 to 9007199254740991',
      'origins: must be an origin string, a RegExp or a function',
      "routes['/a'].pingInterval: must be an integer from 0 to 2147483647"
    ])
    return true
  })
})

test('a gateway registered with undefined settings bridges and closes as with none', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({
    closeTimeout: undefined,
    pingInterval: undefined,
    maxPayload: undefined,
    origins: undefined,
    routes: { '/echo': { upstream: echo.address, closeTimeout: undefined, idleTimeout: undefined, maxPayload: undefined } }
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const ws = await openClient(`${gateway.url}/echo`)
  const reply = receiveBytes(ws, 2)
  ws.send('ok')
  assert.equal((await reply).toString(), 'ok')
  ws.close(1000)
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
  assert.equal(gateway.logs.find('wstunnel bridge closed')[0].code, 1000)
  assert.equal(gateway.app.wstunnel.connections, 0)
})

test('maxPayload is a route setting, off (0) by default, the top level setting it for every route', () => {
  const upstream = '127.0.0.1:1'
  const byDefault = resolveOptions({ routes: { '/a': { upstream } } })
  assert.equal(byDefault.maxPayload, 0)
  assert.equal(byDefault.routes[0].maxPayload, 0)
  const set = resolveOptions({ maxPayload: 4096, routes: { '/a': { upstream }, '/b': { upstream, maxPayload: 0 }, '/c': { upstream, maxPayload: Number.MAX_SAFE_INTEGER } } })
  assert.equal(set.maxPayload, 4096)
  assert.deepEqual(set.routes.map(route => route.maxPayload), [4096, 0, Number.MAX_SAFE_INTEGER])
  assert.throws(() => resolveOptions({ maxPayload: 2 ** 53, routes: { '/a': { upstream, maxPayload: -1 }, '/b': { upstream, maxPayload: 1.5 } } }), (err: Error) => {
    assert.deepEqual(err.message.split('\n').slice(1).sort(), [
      'maxPayload: must be an integer from 0 to 9007199254740991',
      "routes['/a'].maxPayload: must be an integer from 0 to 9007199254740991",
      "routes['/b'].maxPayload: must be an integer from 0 to 9007199254740991"
    ])
    return true
  })
})

test("every problem is reported, and TypeBox's process-wide settings are left as the app had them", () => {
  Settings.Reset() // TypeBox's own defaults, as an app that never touched them has
  const before = Settings.Get().maxErrors
  const routes = Object.fromEntries(Array.from({ length: 12 }, (_, i) => [`/r${i}`, { upstream: 'nowhere' }]))
  assert.throws(() => resolveOptions({ routes }), (err: Error) => err.message.split('\n').length > 12)
  assert.equal(Settings.Get().maxErrors, before)
})

test('the bound on messages ws assembles is 16 MiB, the largest route maxPayload, and never none', async (t) => {
  for (const [routes, expected] of [[{}, 16 * 1024 * 1024], [{ '/a': { upstream: '127.0.0.1:1', maxPayload: 1000 } }, 1000], [{ '/a': { upstream: '127.0.0.1:1', maxPayload: 2 ** 40 } }, 2 ** 31 - 1]] as const) {
    const app = Fastify()
    t.after(() => app.close())
    await app.register(wstunnel, { routes })
    assert.equal(app.websocketServer.options.maxPayload, expected)
  }
})

test('the operating options say what they accept when they are wrong', async () => {
  assert.throws(() => resolveOptions({ routes: {}, closeCode: 1000, health: 'health', metrics: 5, drainTimeout: -1, routes2: 1 }), (err: Error) => {
    assert.deepEqual(err.message.split('\n').slice(1).sort(), [
      'closeCode: must be 1001 (going away) or 1012 (service restart)',
      'drainTimeout: must be an integer from 0 to 2147483647',
      "health: must be true, false or a path starting with '/'",
      "metrics: must be true, false or a path starting with '/'",
      'routes2: is not a known option'
    ])
    return true
  })
})
