import { test } from 'node:test'
import assert from 'node:assert/strict'
import Fastify, { type FastifyRequest } from 'fastify'
import type { FastifyWstunnelOptions } from '../lib/index'
import wstunnel from '../lib/index'
import { compileOrigins } from '../lib/origin'
import { openClient, startEcho, startGateway, type TcpServer } from './helpers'

/** Tries a handshake with the given headers; resolves with 101 or the refusal's status and body. */
async function handshake (url: string, headers: Record<string, string>): Promise<{ status: number, body: string }> {
  try {
    const ws = await openClient(url, undefined, { headers })
    ws.close()
    return { status: 101, body: '' }
  } catch (err) {
    const { statusCode, body } = err as { statusCode: number, body: string }
    return { status: statusCode, body }
  }
}

async function gatewayWith (echo: TcpServer, route: Partial<FastifyWstunnelOptions['routes'][string]>, top: Partial<FastifyWstunnelOptions> = {}) {
  return startGateway({ ...top, routes: { '/x': { upstream: echo.address, ...route } } })
}

test('origin shapes: exact, list, wildcard subdomain, any port, same-origin, *, null, RegExp, function', { timeout: 20000 }, async (t) => {
  const echo = await startEcho()
  t.after(() => echo.close())
  const cases: Array<{ origins: FastifyWstunnelOptions['origins'], allowed: string[], refused: string[] }> = [
    {
      origins: 'https://app.example.com',
      allowed: ['https://app.example.com', 'HTTPS://APP.Example.COM', 'https://app.example.com:443'],
      refused: ['http://app.example.com', 'https://app.example.com:8443', 'https://app.example.com.evil.net', 'https://evil.com', 'https://app.example.com\\.evil.net']
    },
    {
      origins: ['http://localhost:8000', 'http://127.0.0.1:8000'],
      allowed: ['http://localhost:8000', 'http://127.0.0.1:8000'],
      refused: ['http://localhost:8001', 'http://127.0.0.2:8000']
    },
    {
      origins: 'https://*.example.com',
      allowed: ['https://a.example.com', 'https://a.b.example.com', 'https://A.EXAMPLE.com'],
      refused: ['https://example.com', 'https://example.com.evil.net', 'https://aexample.com', 'http://a.example.com', 'https://a.example.com:444']
    },
    {
      origins: 'http://localhost:*',
      allowed: ['http://localhost', 'http://localhost:3000', 'http://localhost:65535'],
      refused: ['https://localhost:3000', 'http://localhost.evil.net:3000', 'http://127.0.0.1:3000']
    },
    { origins: 'http://[::1]:8000', allowed: ['http://[::1]:8000', 'http://[0:0:0:0:0:0:0:1]:8000'], refused: ['http://[::2]:8000', 'http://localhost:8000'] },
    { origins: 'https://bücher.example', allowed: ['https://xn--bcher-kva.example'], refused: ['https://bucher.example'] },
    { origins: 'http://a.test:80', allowed: ['http://a.test', 'http://a.test:80'], refused: ['http://a.test:8080'] },
    { origins: '*', allowed: ['https://anything.example', 'http://localhost:1'], refused: ['null', 'not an origin', 'https://a.example/path'] },
    { origins: ['null', 'https://a.example'], allowed: ['null', 'https://a.example'], refused: ['https://b.example'] },
    { origins: /^https:\/\/(staging|www)\.example\.org$/, allowed: ['https://www.example.org', 'https://WWW.example.org:443'], refused: ['https://dev.example.org', 'null'] },
    { origins: [(origin: string) => origin.endsWith('.trusted.test')], allowed: ['https://a.trusted.test'], refused: ['https://a.untrusted.test'] },
    { origins: async (origin: string) => origin === 'https://async.test', allowed: ['https://async.test'], refused: ['https://sync.test'] }
  ]
  for (const { origins, allowed, refused } of cases) {
    const gateway = await gatewayWith(echo, { origins })
    for (const origin of allowed) {
      assert.equal((await handshake(`${gateway.url}/x`, { origin })).status, 101, `${String(origins)} should allow ${origin}`)
    }
    const before = echo.connections
    for (const origin of refused) {
      const { status, body } = await handshake(`${gateway.url}/x`, { origin })
      assert.equal(status, 403, `${String(origins)} should refuse ${origin}`)
      assert.equal(JSON.parse(body).code, 'FST_WSTUNNEL_ORIGIN_FORBIDDEN')
    }
    assert.equal(echo.connections, before, 'a refused origin made an upstream connection')
    await gateway.app.close()
  }
})

test('same-origin compares the Origin with the Host the client connected to', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await gatewayWith(echo, { origins: 'same-origin' })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const host = new URL(gateway.url).host
  assert.equal((await handshake(`${gateway.url}/x`, { origin: `http://${host}` })).status, 101)
  assert.equal((await handshake(`${gateway.url}/x`, { origin: `http://${host.replace('127.0.0.1', 'localhost')}` })).status, 403)
  assert.equal((await handshake(`${gateway.url}/x`, { origin: 'http://127.0.0.1:1' })).status, 403)
  assert.equal((await handshake(`${gateway.url}/x`, { origin: 'http://localhost', host: 'localhost' })).status, 101)
})

test('same-origin refuses a DNS-rebinding page: a name must be an IP literal, localhost or one of hostnames', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await gatewayWith(echo, { origins: 'same-origin' })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const at = (host: string, origin = `http://${host}`) => handshake(`${gateway.url}/x`, { host, origin })
  // The rebinding page: evil.example now resolves to the gateway, and the browser sends its own name in both headers.
  assert.equal((await at('evil.example:8080')).status, 403)
  assert.equal((await at('gw.example')).status, 403)
  assert.equal(echo.connections, 0)
  // Names no DNS answer can move pass with no configuration.
  for (const host of ['127.0.0.1:8080', '[::1]:8080', 'localhost:8080', 'app.localhost', 'LOCALHOST']) {
    assert.equal((await at(host)).status, 101, host)
  }
  // Never an app or extension origin, nor a Host the URL parser would rewrite.
  assert.equal((await at('localhost', 'capacitor://localhost')).status, 403)
  assert.equal((await at('0x7f.1', 'http://127.0.0.1')).status, 403)
  assert.equal((await at('evil.example@127.0.0.1', 'http://127.0.0.1')).status, 403)
})

test('hostnames: the names same-origin trusts, plugin-wide or per route; bad names fail registration', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({
    origins: 'same-origin',
    hostnames: ['gw.example', 'bücher.example'],
    routes: {
      '/a': { upstream: echo.address },
      '/b': { upstream: echo.address, hostnames: ['other.example'] },
      '/c': { upstream: echo.address, origins: ['null', 'same-origin'] }
    }
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  const at = (path: string, host: string, origin = `http://${host}`) => handshake(`${gateway.url}${path}`, { host, origin })
  assert.equal((await at('/a', 'gw.example')).status, 101)
  assert.equal((await at('/a', 'GW.Example:8443', 'http://gw.EXAMPLE:8443')).status, 101)
  assert.equal((await at('/a', 'xn--bcher-kva.example')).status, 101)
  assert.equal((await at('/a', 'evil.example')).status, 403)
  assert.equal((await at('/a', 'gw.example', 'http://gw.example:8080')).status, 403, 'still the same port')
  assert.equal((await at('/b', 'gw.example')).status, 403, "the route's own list replaces the plugin's")
  assert.equal((await at('/b', 'other.example')).status, 101)
  assert.equal((await at('/c', 'gw.example')).status, 101, "a route's own origins use the plugin's list")

  const app = Fastify()
  const error = await app.register(wstunnel, {
    hostnames: ['gw.example:8080', 'http://gw.example', 'gw.example\\evil.net', '*.example', ''],
    routes: { '/a': { upstream: '127.0.0.1:1', hostnames: [] }, '/b': { upstream: '127.0.0.1:1', hostnames: 'gw.example' as never } }
  }).ready().then(() => null, (err: Error & { code: string }) => err)
  await app.close()
  assert.equal(error?.code, 'FST_WSTUNNEL_INVALID_OPTIONS')
  assert.deepEqual(error.message.split('\n').slice(1).sort(), [
    'hostnames[0]: "gw.example:8080" is not a host name (no scheme, port, path or wildcard)',
    'hostnames[1]: "http://gw.example" is not a host name (no scheme, port, path or wildcard)',
    'hostnames[2]: "gw.example\\\\evil.net" is not a host name (no scheme, port, path or wildcard)',
    'hostnames[3]: "*.example" is not a host name (no scheme, port, path or wildcard)',
    'hostnames[4]: "" is not a host name (no scheme, port, path or wildcard)',
    "routes['/a'].hostnames: must be a non-empty list of host names",
    "routes['/b'].hostnames: must be a non-empty list of host names"
  ])
})

/** Runs a compiled `origins` option against one Origin header, as the route's hook would. */
function allows (option: FastifyWstunnelOptions['origins'], origin: string, host = 'gw.test'): Promise<boolean> {
  const problems: string[] = []
  const matcher = compileOrigins(option!, 'origins', problems, new Set())
  assert.deepEqual(problems, [])
  return matcher(origin, { headers: { host } } as unknown as FastifyRequest)
}

test('origins of schemes the URL parser has no origin for (extensions, app shells) match by scheme, host and port', async () => {
  const cases: Array<{ origins: FastifyWstunnelOptions['origins'], allowed: string[], refused: string[] }> = [
    {
      origins: 'chrome-extension://abcdefghijklmnop',
      allowed: ['chrome-extension://abcdefghijklmnop', 'chrome-extension://ABCDEFGHIJKLMNOP', 'Chrome-Extension://abcdefghijklmnop'],
      refused: ['chrome-extension://abcdefghijklmnopq', 'moz-extension://abcdefghijklmnop', 'chrome-extension://abcdefghijklmnop:1', 'https://abcdefghijklmnop']
    },
    { origins: 'capacitor://localhost', allowed: ['capacitor://localhost'], refused: ['http://localhost', 'capacitor://localhost:8080', 'capacitor://localhost.evil'] },
    { origins: 'tauri://LOCALHOST:12', allowed: ['tauri://localhost:12'], refused: ['tauri://localhost', 'tauri://localhost:13'] },
    { origins: 'moz-extension://0a1b2c3d-4e5f-6789-abcd-ef0123456789', allowed: ['moz-extension://0A1B2C3D-4E5F-6789-ABCD-EF0123456789'], refused: ['moz-extension://0a1b2c3d'] },
    { origins: 'app://*.example', allowed: ['app://a.example'], refused: ['app://example', 'https://a.example'] },
    { origins: '*', allowed: ['chrome-extension://abcdefghijklmnop', 'capacitor://localhost'], refused: ['chrome-extension://', 'capacitor:localhost'] },
    { origins: /^chrome-extension:\/\/[a-p]{16}$/, allowed: ['chrome-extension://abcdefghijklmnop', 'CHROME-EXTENSION://ABCDEFGHIJKLMNOP'], refused: ['chrome-extension://abcdefghijklmnoz'] }
  ]
  for (const { origins, allowed, refused } of cases) {
    for (const origin of allowed) assert.equal(await allows(origins, origin), true, `${String(origins)} should allow ${origin}`)
    for (const origin of refused) assert.equal(await allows(origins, origin), false, `${String(origins)} should refuse ${origin}`)
  }
})

test('an Origin that is not exactly scheme://host[:port], or that the URL parser would rewrite, matches nothing', async () => {
  const hostile = [
    'https://a.example.com\\.evil.net', // the URL parser reads the backslash as a path: a.example.com
    'https://a.example.com\\@evil.net',
    'https://a.exa\tmple.com', // tabs and newlines are stripped
    'https://user@a.example.com',
    'https://a.example.com@evil.net',
    'https://a.example.com/',
    'https://a.example.com/path',
    'https://a.example.com?x',
    'https://a.example.com#x',
    'https://a.example.com:',
    'https://%61.example.com', // percent-decoded to a.example.com
    'https://a\u00ad.example.com', // a soft hyphen, dropped by IDNA mapping
    'https://\u00aa.example.com', // 'ª', mapped to 'a'
    'https://a.example.com ',
    ' https://a.example.com'
  ]
  for (const origin of hostile) {
    for (const option of ['https://a.example.com', 'https://*.example.com', '*', /example/] as const) {
      assert.equal(await allows(option, origin), false, `${String(option)} should refuse ${JSON.stringify(origin)}`)
    }
  }
  // Dotted IPv4 is the only form a browser sends; the URL parser reads all these as 127.0.0.1.
  for (const origin of ['http://0x7f.1', 'http://127.1', 'http://2130706433', 'http://0177.0.0.1', 'http://127.0.0.01']) {
    assert.equal(await allows(['http://127.0.0.1', '*'], origin), false, origin)
  }
  // What a browser sends, and the harmless variants of it, still match.
  for (const origin of ['https://a.example.com', 'HTTPS://A.Example.COM', 'https://a.example.com:443']) {
    assert.equal(await allows('https://a.example.com', origin), true, origin)
  }
  assert.equal(await allows('http://127.0.0.1', 'http://127.0.0.1'), true)
  // The same holes are closed in patterns: a backslash or percent-encoding is refused at registration.
  for (const pattern of ['https://a.example.com\\.evil.net', 'https://%61.example.com']) {
    const problems: string[] = []
    compileOrigins(pattern, 'origins', problems, new Set())
    assert.match(problems.join(), /is not an origin pattern/, pattern)
  }
})

test("mod_websocket's localhost-vs-127.0.0.1 case: one list admits both", { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await gatewayWith(echo, { origins: ['http://localhost:*', 'http://127.0.0.1:*', 'http://[::1]:*'] })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  for (const origin of ['http://127.0.0.1:8000', 'http://localhost:8000', 'http://[::1]:8000']) {
    assert.equal((await handshake(`${gateway.url}/x`, { origin })).status, 101, origin)
  }
})

test('the legacy Sec-WebSocket-Origin header is honoured when Origin is absent', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await gatewayWith(echo, { origins: 'http://ok.test' })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  assert.equal((await handshake(`${gateway.url}/x`, { 'sec-websocket-origin': 'http://ok.test' })).status, 101)
  assert.equal((await handshake(`${gateway.url}/x`, { 'sec-websocket-origin': 'http://bad.test' })).status, 403)
  // Origin wins when both are present.
  assert.equal((await handshake(`${gateway.url}/x`, { origin: 'http://bad.test', 'sec-websocket-origin': 'http://ok.test' })).status, 403)
})

test('no Origin header passes unless requireOrigin is set; refusals are logged at info', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const open = await gatewayWith(echo, { origins: 'http://ok.test' })
  const strict = await gatewayWith(echo, { origins: 'http://ok.test', requireOrigin: true })
  t.after(async () => { await open.app.close(); await strict.app.close(); await echo.close() })

  assert.equal((await handshake(`${open.url}/x`, {})).status, 101)
  const before = echo.connections
  const refused = await handshake(`${strict.url}/x`, {})
  assert.equal(refused.status, 403)
  assert.match(JSON.parse(refused.body).message, /origin \(none\) is not allowed/)
  assert.equal(echo.connections, before)
  await handshake(`${strict.url}/x`, { origin: 'http://bad.test' })
  const lines = strict.logs.lines.filter(line => /refused/.test(String(line.msg)))
  assert.equal(lines.length, 2)
  assert.ok(lines.every(line => line.level === 30), 'refusals are logged at info')
  assert.equal(lines[1].origin, 'http://bad.test')
})

test('plugin-wide origins apply to every route unless the route sets its own', { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({
    origins: 'http://default.test',
    routes: { '/a': { upstream: echo.address }, '/b': { upstream: echo.address, origins: '*' } }
  })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  assert.equal((await handshake(`${gateway.url}/a`, { origin: 'http://default.test' })).status, 101)
  assert.equal((await handshake(`${gateway.url}/a`, { origin: 'http://other.test' })).status, 403)
  assert.equal((await handshake(`${gateway.url}/b`, { origin: 'http://other.test' })).status, 101)
})

test('invalid origin patterns fail registration with a clear error', { timeout: 10000 }, async () => {
  const app = Fastify()
  const error = await app.register(wstunnel, {
    origins: 'example.com',
    routes: {
      '/a': { upstream: '127.0.0.1:1', origins: ['https://ok.test', 'http//typo.test', 'https://a.test:99999'] },
      '/b': { upstream: '127.0.0.1:1', origins: [] },
      '/c': { upstream: '127.0.0.1:1', origins: 42 as never }
    }
  }).ready().then(() => null, (err: Error & { code: string }) => err)
  await app.close()
  assert.equal(error?.code, 'FST_WSTUNNEL_INVALID_OPTIONS')
  assert.match(error.message, /^origins: "example\.com" is not an origin pattern/m)
  assert.match(error.message, /^routes\['\/a'\]\.origins\[1\]: "http\/\/typo\.test" is not an origin pattern/m)
  assert.match(error.message, /^routes\['\/a'\]\.origins\[2\]: "https:\/\/a\.test:99999" has a port above 65535/m)
  assert.match(error.message, /^routes\['\/b'\]\.origins: must list at least one origin/m)
  assert.match(error.message, /^routes\['\/c'\]\.origins: must be an origin string, a RegExp or a function/m)
})
