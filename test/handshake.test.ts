import { test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import { once } from 'node:events'
import { connect, type Socket } from 'node:net'
import { randomBytes } from 'node:crypto'
import { startGateway, startTcp, waitFor, type Gateway, type TcpServer } from './helpers'
import { frame } from './raw-client'

// A request to a bridged route that is not a valid WebSocket opening handshake (RFC 6455 section 4.2.1) is
// answered over HTTP before any upstream is touched. These tests write raw HTTP over a TCP socket, so they
// control every header, and the route sends a PROXY header: an upstream connection would show at once.

/** A parsed HTTP response head, and its body (none for HEAD or 101). */
interface RawResponse { status: number, headers: Record<string, string>, body: string, socket: Socket, rest: Buffer }

type Headers = Record<string, string | undefined>

/** A valid opening handshake's headers; a test overrides one, or drops it with undefined. */
function validHeaders (host: string): Headers {
  return {
    Host: host,
    Upgrade: 'websocket',
    Connection: 'Upgrade',
    'Sec-WebSocket-Key': randomBytes(16).toString('base64'),
    'Sec-WebSocket-Version': '13'
  }
}

/** Sends one request over a new TCP connection and resolves with the response (the socket stays open). */
async function rawRequest (gateway: Gateway, method: string, path: string, overrides: Headers, version = '1.1'): Promise<RawResponse> {
  const { hostname, port } = new URL(gateway.url)
  const headers = { ...validHeaders(`${hostname}:${port}`), ...overrides }
  const socket = connect(Number(port), hostname)
  await once(socket, 'connect')
  let request = `${method} ${path} HTTP/${version}\r\n`
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) request += `${name}: ${value}\r\n`
  socket.write(request + '\r\n')
  return await new Promise((resolve, reject) => {
    let buffered = Buffer.alloc(0)
    const onData = (chunk: Buffer): void => {
      buffered = Buffer.concat([buffered, chunk])
      const end = buffered.indexOf('\r\n\r\n')
      if (end < 0) return
      const [statusLine, ...lines] = buffered.subarray(0, end).toString().split('\r\n')
      const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(statusLine)?.[1])
      const parsed: Record<string, string> = {}
      for (const line of lines) {
        const colon = line.indexOf(':')
        parsed[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim()
      }
      const bodyLength = method === 'HEAD' || status === 101 ? 0 : Number(parsed['content-length'] ?? 0)
      if (buffered.length < end + 4 + bodyLength) return
      socket.removeListener('data', onData)
      socket.removeListener('close', onClose)
      const body = buffered.subarray(end + 4, end + 4 + bodyLength).toString()
      resolve({ status, headers: parsed, body, socket, rest: buffered.subarray(end + 4 + bodyLength) })
    }
    const onClose = (): void => reject(new Error(`closed without a whole response: ${JSON.stringify(buffered.toString())}`))
    socket.on('data', onData)
    socket.once('close', onClose)
  })
}

/** The `code` of a Fastify error body, or the body itself if it is not JSON. */
function errorCode (body: string): unknown {
  try {
    return JSON.parse(body).code
  } catch {
    return body
  }
}

/** A gateway whose route sends a PROXY v1 header, in front of an upstream that keeps what it receives. */
async function gatewayWithProxyProtocol (t: TestContext): Promise<{ gateway: Gateway, upstream: TcpServer, received: () => string }> {
  const chunks: Buffer[] = []
  const upstream = await startTcp(socket => {
    socket.on('data', (chunk: Buffer) => chunks.push(chunk))
    socket.write('welcome')
  })
  const gateway = await startGateway({ routes: { '/tunnel': { upstream: upstream.address, proxyProtocol: 'v1' } } })
  t.after(async () => { await gateway.app.close(); await upstream.close() })
  return { gateway, upstream, received: () => Buffer.concat(chunks).toString() }
}

interface Refusal {
  name: string
  method?: string
  version?: string
  headers: Headers
  status: number | null // null: anything but 101
  code?: string
  header?: [string, string]
}

const refusals: Refusal[] = [
  { name: 'a handshake without Sec-WebSocket-Key', headers: { 'Sec-WebSocket-Key': undefined }, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  { name: 'a Sec-WebSocket-Key of 15 bytes', headers: { 'Sec-WebSocket-Key': randomBytes(15).toString('base64') }, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  { name: 'a Sec-WebSocket-Key that is not base64', headers: { 'Sec-WebSocket-Key': '!'.repeat(22) + '==' }, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  { name: 'Sec-WebSocket-Version: 8', headers: { 'Sec-WebSocket-Version': '8' }, status: 426, code: 'FST_WSTUNNEL_UPGRADE_REQUIRED', header: ['sec-websocket-version', '13'] },
  { name: 'a handshake without Sec-WebSocket-Version', headers: { 'Sec-WebSocket-Version': undefined }, status: 426, code: 'FST_WSTUNNEL_UPGRADE_REQUIRED', header: ['sec-websocket-version', '13'] },
  { name: 'Upgrade: foo with Connection: Upgrade', headers: { Upgrade: 'foo' }, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  { name: 'a HEAD with the upgrade headers', method: 'HEAD', headers: {}, status: null },
  { name: 'an HTTP/1.0 upgrade', version: '1.0', headers: {}, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  { name: 'a handshake without Host', headers: { Host: undefined }, status: 400, code: 'FST_WSTUNNEL_BAD_HANDSHAKE' },
  {
    name: 'a plain GET with no Upgrade',
    headers: { Upgrade: undefined, Connection: undefined, 'Sec-WebSocket-Key': undefined, 'Sec-WebSocket-Version': undefined },
    status: 426,
    code: 'FST_WSTUNNEL_UPGRADE_REQUIRED',
    header: ['upgrade', 'websocket']
  }
]

for (const refusal of refusals) {
  test(`${refusal.name} is refused (${refusal.status ?? 'not 101'}) before any upstream connection or PROXY header`, { timeout: 10000 }, async (t) => {
    const { gateway, upstream, received } = await gatewayWithProxyProtocol(t)
    const response = await rawRequest(gateway, refusal.method ?? 'GET', '/tunnel', refusal.headers, refusal.version)
    t.after(() => { response.socket.destroy() })
    if (refusal.status === null) {
      assert.notEqual(response.status, 101)
    } else {
      assert.equal(response.status, refusal.status, response.body)
    }
    // An upstream connection made for this request would have been opened before the answer; give its
    // accept, and its PROXY header, time to reach the upstream.
    await new Promise(resolve => setTimeout(resolve, 100))
    assert.equal(upstream.connections, 0, 'no upstream connection was made')
    assert.equal(received(), '', 'no PROXY header was sent')
    if (refusal.code !== undefined) assert.equal(errorCode(response.body), refusal.code)
    if (refusal.header !== undefined) assert.equal(response.headers[refusal.header[0]], refusal.header[1])
  })
}

test('after every refused handshake, a valid one is bridged: the upstream\'s only connection, the PROXY header first', { timeout: 10000 }, async (t) => {
  const { gateway, upstream, received } = await gatewayWithProxyProtocol(t)
  for (const refusal of refusals) {
    const response = await rawRequest(gateway, refusal.method ?? 'GET', '/tunnel', refusal.headers, refusal.version)
    response.socket.destroy()
    assert.notEqual(response.status, 101, refusal.name)
  }
  // The same request builder, with no header changed, is a valid handshake.
  const response = await rawRequest(gateway, 'GET', '/tunnel', {})
  t.after(() => { response.socket.destroy() })
  assert.equal(response.status, 101)
  assert.equal(response.headers.upgrade, 'websocket')
  let fromGateway = response.rest
  response.socket.on('data', (chunk: Buffer) => { fromGateway = Buffer.concat([fromGateway, chunk]) })
  response.socket.write(frame(2, 'hello'))
  await waitFor(() => received().endsWith('hello'))
  assert.match(received(), /^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ \d+\r\nhello$/)
  assert.equal(upstream.connections, 1, 'the refused handshakes made no upstream connection')
  // The upstream's greeting came back as one binary frame.
  await waitFor(() => fromGateway.length >= 2 + 'welcome'.length)
  assert.deepEqual([fromGateway[0], fromGateway[1], fromGateway.subarray(2).toString()], [0x82, 'welcome'.length, 'welcome'])
  response.socket.destroy() // now, not after the gateway's close, which would wait closeTimeout for its answer
})

test('an upgrade Fastify answers before any hook runs (a malformed URL: 400) has its socket closed by the gateway', { timeout: 10000 }, async (t) => {
  const { gateway, upstream } = await gatewayWithProxyProtocol(t)
  const response = await rawRequest(gateway, 'GET', '/tunnel%zz', {})
  t.after(() => { response.socket.destroy() })
  assert.equal(response.status, 400)
  // Node no longer reads such a socket: without the gateway closing it, it would stay open for good.
  await new Promise(resolve => { response.socket.once('end', resolve) })
  assert.equal(upstream.connections, 0)
})
