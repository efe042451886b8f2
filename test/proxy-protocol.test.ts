import { test } from 'node:test'
import assert from 'node:assert/strict'
import type { Server } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyHttpOptions } from 'fastify'
import { V1ProxyProtocol, V2ProxyProtocol } from 'proxy-protocol-js'
import { proxyHeader, TLV } from '../lib/proxy-protocol'
import { openClient, readBytes, startGateway, startTcp, waitFor, type Client, type Gateway, type TcpServer } from './helpers'

/** An upstream that keeps everything each connection sends. */
async function recordingUpstream (): Promise<TcpServer & { received: () => Buffer }> {
  let socket: Socket | undefined
  const chunks: Buffer[] = []
  const server = await startTcp(accepted => {
    socket = accepted
    accepted.on('data', (chunk: Buffer) => chunks.push(chunk))
  })
  return Object.assign(server, { received: () => { assert.ok(socket !== undefined); return Buffer.concat(chunks) } })
}

/** The client's own address and port, as the gateway sees them. */
function clientEnd (ws: Client): { address: string, port: number } {
  const socket = (ws as unknown as { _socket: Socket })._socket
  return { address: socket.localAddress!, port: socket.localPort! }
}

function gatewayPort (gateway: Gateway): number {
  return Number(new URL(gateway.url).port)
}

/** Reads the TLVs of a v2 header: type → UTF-8 value. */
function tlvs (header: Buffer, addressBytes: number): Map<number, string> {
  const end = 16 + header.readUInt16BE(14)
  const found = new Map<number, string>()
  for (let at = 16 + addressBytes; at < end;) {
    const length = header.readUInt16BE(at + 1)
    found.set(header[at], header.subarray(at + 3, at + 3 + length).toString('utf8'))
    at += 3 + length
  }
  return found
}

for (const family of ['IPv4', 'IPv6'] as const) {
  const host = family === 'IPv4' ? '127.0.0.1' : '::1'

  test(`PROXY v1 tells the upstream the ${family} client and gateway addresses, before the client's bytes`, { timeout: 10000 }, async (t) => {
    const upstream = await recordingUpstream()
    const gateway = await startGateway({ routes: { '/x': { upstream: upstream.address, proxyProtocol: 'v1' } } }, undefined, { host })
    t.after(async () => { await gateway.app.close(); await upstream.close() })

    const ws = await openClient(`${gateway.url}/x`)
    ws.send('hello')
    await waitFor(() => upstream.received().toString().endsWith('hello'))
    const bytes = upstream.received().toString()
    const line = bytes.slice(0, bytes.indexOf('\r\n') + 2)
    assert.equal(bytes.slice(line.length), 'hello')
    const parsed = V1ProxyProtocol.parse(line)
    const client = clientEnd(ws)
    assert.equal(parsed.inetProtocol, family === 'IPv4' ? 'TCP4' : 'TCP6')
    assert.equal(parsed.source.ipAddress, client.address)
    assert.equal(parsed.source.port, client.port)
    assert.equal(parsed.destination.ipAddress, host)
    assert.equal(parsed.destination.port, gatewayPort(gateway))
    ws.close()
    // The byte counts in the log are the client's bytes only, not the header's.
    await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 1)
    assert.equal(gateway.logs.find('wstunnel bridge closed')[0].clientToUpstream, 5)
  })

  test(`PROXY v2 carries the ${family} addresses and TLVs for Host, sub-protocol, path and Origin`, { timeout: 10000 }, async (t) => {
    const upstream = await recordingUpstream()
    const gateway = await startGateway({
      routes: { '/x': { upstream: upstream.address, proxyProtocol: 'v2', subprotocols: ['mqtt'] } }
    }, undefined, { host })
    t.after(async () => { await gateway.app.close(); await upstream.close() })

    const ws = await openClient(`${gateway.url}/x?token=abc`, ['mqtt'], { origin: 'https://app.example.com' })
    ws.send('after')
    await waitFor(() => upstream.received().toString('latin1').endsWith('after'))
    const bytes = upstream.received()
    const headerLength = 16 + bytes.readUInt16BE(14)
    assert.equal(bytes.subarray(headerLength).toString(), 'after')
    const header = bytes.subarray(0, headerLength)

    const parsed = V2ProxyProtocol.parse(new Uint8Array(header))
    assert.equal(parsed.command, 1, 'PROXY command')
    assert.equal(parsed.transportProtocol, 1, 'STREAM')
    const client = clientEnd(ws)
    const address = parsed.proxyAddress as unknown as { sourceAddress: { address: number[] }, sourcePort: number, destinationAddress: { address: number[] }, destinationPort: number }
    const expected = family === 'IPv4' ? [127, 0, 0, 1] : [...new Array(15).fill(0), 1]
    assert.deepEqual(address.sourceAddress.address, expected)
    assert.deepEqual(address.destinationAddress.address, expected)
    assert.equal(address.sourcePort, client.port)
    assert.equal(address.destinationPort, gatewayPort(gateway))

    const values = tlvs(header, family === 'IPv4' ? 12 : 36)
    assert.equal(values.get(TLV.AUTHORITY), new URL(gateway.url).host)
    assert.equal(values.get(TLV.SUBPROTOCOL), 'mqtt')
    assert.equal(values.get(TLV.PATH), '/x?token=abc')
    assert.equal(values.get(TLV.ORIGIN), 'https://app.example.com')
    assert.deepEqual([...values.keys()], [0x02, 0xe0, 0xe1, 0xe2])
    ws.close()
  })
}

test('behind a trusted proxy, the PROXY header names the forwarded client, not the proxy', { timeout: 10000 }, async (t) => {
  const upstream = await recordingUpstream()
  const gateway = await startGateway({ routes: { '/x': { upstream: upstream.address, proxyProtocol: 'v1' } } }, undefined, { fastify: { trustProxy: '127.0.0.1' } })
  const untrusting = await startGateway({ routes: { '/x': { upstream: upstream.address, proxyProtocol: 'v1' } } })
  t.after(async () => { await gateway.app.close(); await untrusting.app.close(); await upstream.close() })

  const ws = await openClient(`${gateway.url}/x`, undefined, { headers: { 'x-forwarded-for': '203.0.113.9' } })
  await waitFor(() => upstream.received().includes('\r\n'))
  const parsed = V1ProxyProtocol.parse(upstream.received().toString())
  assert.equal(parsed.source.ipAddress, '203.0.113.9')
  assert.equal(parsed.source.port, 0, 'the forwarded client port is not known')
  ws.close()

  // Without trustProxy the header cannot be spoofed by the client.
  const next = upstream.nextSocket()
  const spoofing = await openClient(`${untrusting.url}/x`, undefined, { headers: { 'x-forwarded-for': '203.0.113.9' } })
  const line = (await readBytes(await next, 20)).toString()
  assert.match(line, /^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 \d+ \d+\r\n/)
  spoofing.close()
})

test('PROXY v2 leaves out a TLV that would take the header past 65535 bytes, and never throws', () => {
  const base = { sourceAddress: '192.0.2.1', sourcePort: 5000, destinationAddress: '192.0.2.2', destinationPort: 80 }
  const huge = 'h'.repeat(70000)
  // One value too long for any TLV; the others still go.
  let header = proxyHeader('v2', { ...base, authority: huge, subprotocol: 'mqtt', path: '/x', origin: 'https://a.example' })
  assert.equal(header.length, 16 + header.readUInt16BE(14))
  assert.deepEqual(tlvs(header, 12), new Map([[TLV.SUBPROTOCOL, 'mqtt'], [TLV.PATH, '/x'], [TLV.ORIGIN, 'https://a.example']]))
  // Values that fit one by one but not together: those that fit, in order, and never a cut one.
  const path = '/' + 'p'.repeat(40000)
  header = proxyHeader('v2', { ...base, authority: 'a'.repeat(30000), path, origin: 'o'.repeat(30000) })
  assert.ok(header.readUInt16BE(14) <= 0xffff)
  assert.deepEqual([...tlvs(header, 12).entries()].map(([type, value]) => [type, value.length]), [[TLV.AUTHORITY, 30000], [TLV.ORIGIN, 30000]])
  header = proxyHeader('v2', { ...base, authority: 'gw.example', path })
  assert.deepEqual(tlvs(header, 12), new Map([[TLV.AUTHORITY, 'gw.example'], [TLV.PATH, path]]))
  // The largest TLV that fits exactly: 12 address bytes + 3 + 65520 = 65535.
  header = proxyHeader('v2', { ...base, path: 'x'.repeat(65520) })
  assert.equal(header.readUInt16BE(14), 65535)
  assert.equal(tlvs(header, 12).get(TLV.PATH)?.length, 65520)
  header = proxyHeader('v2', { ...base, path: 'x'.repeat(65521) })
  assert.equal(header.readUInt16BE(14), 12)
  // A cut would split a UTF-8 character; nothing is cut.
  header = proxyHeader('v2', { sourceAddress: '::1', sourcePort: 1, destinationAddress: '::1', destinationPort: 2, path: '/' + 'é'.repeat(40000) })
  assert.equal(header.readUInt16BE(14), 36)
  assert.doesNotThrow(() => V2ProxyProtocol.parse(new Uint8Array(header)))
})

test('a handshake with a path too long for a PROXY v2 TLV is bridged, the path left out of the header', { timeout: 10000 }, async (t) => {
  const upstream = await recordingUpstream()
  const fastify: FastifyHttpOptions<Server> = { http: { maxHeaderSize: 200000 } } // room for the long path
  const gateway = await startGateway({ routes: { '/x': { upstream: upstream.address, proxyProtocol: 'v2' } } }, undefined, { fastify })
  t.after(async () => { await gateway.app.close(); await upstream.close() })
  const ws = await openClient(`${gateway.url}/x?q=${'q'.repeat(70000)}`)
  ws.send('after')
  await waitFor(() => upstream.received().toString('latin1').endsWith('after'))
  const bytes = upstream.received()
  const header = bytes.subarray(0, 16 + bytes.readUInt16BE(14))
  assert.equal(bytes.subarray(header.length).toString(), 'after')
  assert.deepEqual([...tlvs(header, 12).keys()], [TLV.AUTHORITY])
  ws.close()
})

test('PROXY v1 and v2 drop an IPv6 zone id: the upstream gets the plain address', () => {
  const info = { sourceAddress: 'fe80::1%eth0', sourcePort: 5000, destinationAddress: 'fe80::a:2%25', destinationPort: 443 }
  const line = proxyHeader('v1', info).toString()
  assert.equal(line, 'PROXY TCP6 fe80::1 fe80::a:2 5000 443\r\n')
  assert.equal(V1ProxyProtocol.parse(line).source.ipAddress, 'fe80::1')
  const header = proxyHeader('v2', info)
  assert.equal(header[13], 0x21, 'TCP over IPv6')
  assert.deepEqual([...header.subarray(16, 32)], [0xfe, 0x80, ...new Array(13).fill(0), 1])
  assert.deepEqual([...header.subarray(32, 48)], [0xfe, 0x80, ...new Array(11).fill(0), 0x0a, 0, 2])
  // An IPv4-mapped address with a zone is IPv4 once the zone is gone.
  assert.equal(proxyHeader('v1', { ...info, sourceAddress: '::ffff:192.0.2.1%eth0', destinationAddress: '192.0.2.2' }).toString(), 'PROXY TCP4 192.0.2.1 192.0.2.2 5000 443\r\n')
})
