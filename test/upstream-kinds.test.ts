import { test } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer, type Server, type Socket } from 'node:net'
import { createServer as createTlsServer } from 'node:tls'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import Fastify from 'fastify'
import wstunnel from '../lib/index'
import { openClient, receiveBytes, startGateway, startTcp, waitFor } from './helpers'

// A self-signed certificate for localhost and 127.0.0.1 (test/fixtures), its own CA.
const certFile = join(__dirname, 'fixtures', 'localhost-cert.pem')
const keyFile = join(__dirname, 'fixtures', 'localhost-key.pem')

async function startTlsEcho (): Promise<{ port: number, servernames: Array<string | false | null>, close: () => Promise<void> }> {
  const servernames: Array<string | false | null> = []
  const sockets = new Set<Socket>()
  const { readFileSync } = await import('node:fs')
  const server = createTlsServer({ key: readFileSync(keyFile), cert: readFileSync(certFile) }, (socket) => {
    servernames.push(socket.servername)
    sockets.add(socket)
    socket.on('error', () => {})
    socket.write('tls\n')
    socket.pipe(socket)
  })
  server.on('tlsClientError', () => {})
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return {
    port: (server.address() as { port: number }).port,
    servernames,
    close: async () => {
      for (const socket of sockets) socket.destroy()
      await new Promise(resolve => server.close(resolve))
    }
  }
}

test('a TLS upstream with a self-signed certificate is reached with its CA, and refused without it', { timeout: 20000 }, async (t) => {
  const upstream = await startTlsEcho()
  const gateway = await startGateway({
    routes: {
      '/trusted': { upstream: { host: 'localhost', port: upstream.port, tls: { ca: certFile } } },
      '/by-address': { upstream: `127.0.0.1:${upstream.port}`, tls: { ca: [certFile] } },
      '/untrusted': { upstream: { host: 'localhost', port: upstream.port, tls: true } },
      '/wrong-name': { upstream: `127.0.0.1:${upstream.port}`, tls: { ca: certFile, servername: 'example.com' } }
    }
  })
  t.after(async () => { await gateway.app.close(); await upstream.close() })

  const ws = await openClient(`${gateway.url}/trusted`)
  const payload = randomBytes(200000)
  ws.send(payload)
  const received = await receiveBytes(ws, 4 + payload.length)
  assert.equal(received.subarray(0, 4).toString(), 'tls\n')
  assert.ok(received.subarray(4).equals(payload), 'the exact bytes came back through TLS')
  ws.close()
  const byAddress = await openClient(`${gateway.url}/by-address`)
  await waitFor(() => byAddress.inbox.length > 0)
  byAddress.close()
  assert.deepEqual(upstream.servernames, ['localhost', false], 'SNI names the host, never an address')

  for (const path of ['/untrusted', '/wrong-name']) {
    const error = await openClient(`${gateway.url}${path}`).then(() => null, (err: { statusCode: number, body: string }) => err)
    assert.equal(error?.statusCode, 502, path)
    assert.match(JSON.parse(error.body).message, path === '/untrusted' ? /SELF_SIGNED|UNABLE_TO_VERIFY/ : /ERR_TLS_CERT_ALTNAME_INVALID/)
  }
  assert.equal(gateway.app.wstunnel.upstreams()['/trusted'][0].tls, true)
})

test('a certificate file that cannot be read is a registration error naming it', async () => {
  const app = Fastify()
  await assert.rejects(async () => {
    await app.register(wstunnel, {
      routes: { '/x': { upstream: { host: 'localhost', port: 1, tls: { ca: '/nonexistent/ca.pem', cert: '/nonexistent/cert.pem', key: keyFile } } } }
    })
  }, /routes\['\/x'\]\.upstream\.tls\.ca: cannot read \/nonexistent\/ca\.pem: ENOENT\nroutes\['\/x'\]\.upstream\.tls\.cert: cannot read \/nonexistent\/cert\.pem: ENOENT/)
  await app.close()
})

test('host names are resolved at connect, trying IPv6 and IPv4; unix sockets join a pool like any upstream', { timeout: 20000 }, async (t) => {
  // Listening on IPv4 only: 'localhost' may resolve to ::1 first, and the IPv4 address is then tried.
  const v4 = await startTcp(socket => { socket.end('v4\n') })
  const dir = mkdtempSync(join(tmpdir(), 'wstunnel-kinds-'))
  const path = join(dir, 'upstream.sock')
  const unix: Server = createServer((socket) => { socket.end('unix\n') })
  unix.listen(path)
  await once(unix, 'listening')
  const gateway = await startGateway({ routes: { '/mixed': { upstream: [`localhost:${v4.port}`, `unix:${path}`] } } })
  t.after(async () => {
    await gateway.app.close()
    await v4.close()
    await new Promise(resolve => unix.close(resolve))
    rmSync(dir, { recursive: true, force: true })
  })

  const greetings: string[] = []
  for (let index = 0; index < 4; index++) {
    const ws = await openClient(`${gateway.url}/mixed`)
    await waitFor(() => ws.inbox.length > 0)
    greetings.push(ws.inbox[0].data.toString().trim())
    ws.close()
  }
  assert.deepEqual(greetings, ['v4', 'unix', 'v4', 'unix'])
})

test('the active health check marks an upstream down and up again without any client', { timeout: 20000 }, async (t) => {
  const server = await startTcp()
  const gateway = await startGateway({ routes: { '/hc': { upstream: server.address, healthCheck: { interval: 100 }, maxFailures: 2, failBackoff: 50 } } })
  t.after(() => gateway.app.close())
  const state = (): string => gateway.app.wstunnel.upstreams()['/hc'][0].state

  await waitFor(() => server.connections >= 2, 5000) // probed
  assert.equal(state(), 'up')
  const port = server.port
  await server.close()
  await waitFor(() => state() === 'down', 5000)
  assert.match(gateway.app.wstunnel.upstreams()['/hc'][0].lastError ?? '', /health check: ECONNREFUSED/)
  const again = createServer(socket => { socket.destroy() })
  again.listen(port, '127.0.0.1')
  await once(again, 'listening')
  t.after(() => new Promise(resolve => again.close(resolve)))
  await waitFor(() => state() === 'up', 5000)
  assert.equal(gateway.app.wstunnel.upstreams()['/hc'][0].failures, 0)
})

test('two registrations under different prefixes share nothing: routes, upstream state, bridges', { timeout: 20000 }, async (t) => {
  const one = await startTcp(socket => { socket.write('one\n'); socket.pipe(socket) })
  const two = await startTcp(socket => { socket.write('two\n'); socket.pipe(socket) })
  const gateway = await startGateway({ prefix: '/a', routes: { '/echo': { upstream: one.address } } }, async (app) => {
    await app.register(wstunnel, { prefix: '/b', routes: { '/echo': { upstream: two.address, maxFailures: 1 } } })
  })
  t.after(async () => { await gateway.app.close(); await one.close(); await two.close() })

  const a = await openClient(`${gateway.url}/a/echo`)
  const b = await openClient(`${gateway.url}/b/echo`)
  await waitFor(() => a.inbox.length > 0 && b.inbox.length > 0)
  assert.equal(a.inbox[0].data.toString(), 'one\n')
  assert.equal(b.inbox[0].data.toString(), 'two\n')
  const upstreams = gateway.app.wstunnel.upstreams()
  assert.deepEqual(Object.keys(upstreams).sort(), ['/a/echo', '/b/echo'])
  assert.equal(upstreams['/a/echo'][0].upstream, one.address)
  assert.equal(upstreams['/b/echo'][0].upstream, two.address)
  assert.equal(gateway.app.wstunnel.connections, 2)
  a.close()
  b.close()
  await waitFor(() => gateway.app.wstunnel.connections === 0)
})

test('with proxyProtocol, a TLS upstream gets the PROXY header in the clear, then the TLS handshake', { timeout: 20000 }, async (t) => {
  const { readFileSync } = await import('node:fs')
  const { TLSSocket } = await import('node:tls')
  const headers: string[] = []
  const sockets = new Set<Socket>()
  // What HAProxy's accept-proxy with ssl does: read the PROXY line, then speak TLS on the rest.
  const server = createServer((raw) => {
    sockets.add(raw)
    raw.on('error', () => {})
    raw.once('readable', () => {
      const head = raw.read() as Buffer
      const end = head.indexOf('\r\n')
      headers.push(head.subarray(0, end).toString())
      raw.unshift(head.subarray(end + 2))
      const secure = new TLSSocket(raw, { isServer: true, key: readFileSync(keyFile), cert: readFileSync(certFile) })
      secure.on('error', () => {})
      secure.on('secure', () => { secure.write('secure\n') })
      secure.pipe(secure)
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as { port: number }).port
  const gateway = await startGateway({ routes: { '/pp': { upstream: `localhost:${port}`, proxyProtocol: 'v1', tls: { ca: certFile } } } })
  t.after(async () => {
    await gateway.app.close()
    for (const socket of sockets) socket.destroy()
    await new Promise(resolve => server.close(resolve))
  })

  const ws = await openClient(`${gateway.url}/pp`)
  ws.send('hello')
  const received = await receiveBytes(ws, 'secure\nhello'.length)
  assert.equal(received.toString(), 'secure\nhello')
  assert.match(headers[0], /^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ \d+$/)
  ws.close()
})

test('one address with two TLS settings is two upstreams: neither connects with the other\'s settings', { timeout: 20000 }, async (t) => {
  const upstream = await startTlsEcho()
  const gateway = await startGateway({
    routes: {
      '/bus': {
        subprotocols: {
          lax: { host: '127.0.0.1', port: upstream.port, tls: { ca: certFile, servername: 'localhost', rejectUnauthorized: false } },
          strict: { host: '127.0.0.1', port: upstream.port, tls: { ca: certFile, servername: 'other.example' } }
        }
      }
    }
  })
  t.after(async () => { await gateway.app.close(); await upstream.close() })

  const lax = await openClient(`${gateway.url}/bus`, 'lax')
  await waitFor(() => lax.inbox.length > 0)
  lax.close()
  for (let index = 0; index < 2; index++) {
    const error = await openClient(`${gateway.url}/bus`, 'strict').then(() => null, (err: { statusCode: number, body: string }) => err)
    assert.equal(error?.statusCode, 502, 'the strict upstream checks its certificate against its own servername')
  }
  assert.equal(gateway.app.wstunnel.upstreams()['/bus'].length, 2)
})

test('a TLS upstream that accepts TCP and never answers the handshake is cut at connectTimeout (504), its socket closed', { timeout: 20000 }, async (t) => {
  const silent = await startTcp(socket => socket.resume()) // reads, and never answers the TLS ClientHello
  const gateway = await startGateway({ routes: { '/tls': { upstream: { host: '127.0.0.1', port: silent.port, tls: true }, connectTimeout: 300 } } })
  t.after(async () => { await gateway.app.close(); await silent.close() })

  const errors = await Promise.all(Array.from({ length: 5 }, async () =>
    await openClient(`${gateway.url}/tls`).then(() => null, (err: { statusCode: number, body: string }) => err)))
  for (const error of errors) {
    assert.equal(error?.statusCode, 504)
    assert.match(JSON.parse(error.body).message, /timed out after 300 ms \(1 of 1 upstreams tried\)/)
  }
  await waitFor(() => silent.sockets.size === 0, 5000)
})
