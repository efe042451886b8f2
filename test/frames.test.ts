import { test, type TestContext } from 'node:test'
import assert from 'node:assert/strict'
import type { Socket } from 'node:net'
import { randomBytes } from 'node:crypto'
import websocket from '@fastify/websocket'
import type { FastifyInstance } from 'fastify'
import type { WebSocket } from 'ws'
import { startGateway, startTcp, waitFor } from './helpers'
import { CLOSE, PING, closeFrame, frame, openRaw, writeCut, type RawClient } from './raw-client'

// The gateway reads the client's frames itself (lib/frames.ts); these tests speak raw RFC 6455 (raw-client.ts).

/** A gateway in front of a sink that keeps what it receives, and a raw client bridged to it. */
async function bridgedToSink (t: TestContext, maxPayload?: number, onConnection?: (socket: Socket) => void, raw: { allowHalfOpen?: boolean } = {}): Promise<{ client: RawClient, received: () => Buffer, logs: () => Array<Record<string, unknown>>, upstreamEnded: () => boolean }> {
  const chunks: Buffer[] = []
  let ended = false
  const sink = await startTcp(socket => {
    socket.on('data', (chunk: Buffer) => chunks.push(chunk))
    socket.on('end', () => { ended = true })
  })
  const setup = onConnection === undefined ? undefined : (app: FastifyInstance) => { app.server.on('connection', onConnection) }
  const gateway = await startGateway({ ...(maxPayload === undefined ? {} : { maxPayload }), routes: { '/sink': { upstream: sink.address } } }, setup)
  t.after(async () => { await gateway.app.close(); await sink.close() })
  const upstream = sink.nextSocket()
  const client = await openRaw(`${gateway.url}/sink`, raw)
  await upstream
  return { client, received: () => Buffer.concat(chunks), logs: () => gateway.logs.find('wstunnel bridge closed'), upstreamEnded: () => ended }
}

/** The symbol under which a net.Socket keeps its `onread` callback (null when it reads the stream way). */
function onreadCallback (socket: Socket): symbol {
  return Object.getOwnPropertySymbols(socket).find(symbol => symbol.description === 'kBufferCb') as symbol
}

/** Sends frames cut anywhere through a bridge to a sink and checks the sink got the exact payloads. */
async function framesCutAnywhere (t: TestContext, onConnection: (socket: Socket) => void): Promise<void> {
  const { client, received } = await bridgedToSink(t, undefined, onConnection)

  const small = randomBytes(10)
  const medium = randomBytes(300) // 16-bit length
  const large = randomBytes(70000) // 64-bit length: JS and native unmasking both
  const parts = [randomBytes(5), randomBytes(7), randomBytes(1)]
  const text = Buffer.from('naïve — ☃ 😀 done') // multi-byte characters cut between fragments below
  const stream = Buffer.concat([
    frame(2, small),
    frame(2, medium),
    frame(2, parts[0], { fin: false }),
    frame(PING, 'are you there'), // a control frame between fragments
    frame(0, parts[1], { fin: false }),
    frame(0, parts[2]),
    frame(1, text.subarray(0, 7), { fin: false }), // 'ï' is bytes 3-4, '—' 6-8: cut inside it
    frame(0, text.subarray(7, 13), { fin: false }),
    frame(0, text.subarray(13)),
    frame(2, Buffer.alloc(0)), // empty messages carry nothing and break nothing
    frame(2, large)
  ])
  // Cut after 1 byte of a header, inside a 16-bit length, inside a mask, inside the ping's payload (345),
  // at odd payload offsets, and one byte at a time through the first frames.
  const cuts = [1, 2, 3, 5, 7, 9, 11, 13, 17, 20, 23, 29, 40, 100, 250, 333, 345, 360, 380, 400, 420, 440, 460, 470, 480, 490, 600, 5000, 40000, 70000]
  await writeCut(client.socket, stream, cuts.filter(cut => cut < stream.length))

  const expected = Buffer.concat([small, medium, ...parts, text, large])
  await waitFor(() => received().length >= expected.length, 10000)
  assert.equal(received().length, expected.length)
  assert.ok(received().equals(expected), 'the upstream got the payloads, unmasked and in order')
  const pong = client.frames.find(f => f.opcode === 0xa)
  assert.equal(pong?.payload.toString(), 'are you there', 'ws answered the ping that came between fragments')
  assert.equal(client.frames.some(f => f.opcode === CLOSE), false)
  client.socket.destroy()
}

test('frames cut anywhere (in the header, length, mask or payload) still give the exact bytes', { timeout: 20000 }, async (t) => {
  let server: Socket | undefined
  await framesCutAnywhere(t, socket => { server = socket })
  assert.equal(typeof (server as unknown as Record<symbol, unknown>)[onreadCallback(server as Socket)], 'function', 'the client socket read into the shared buffer')
})

test('a client socket that cannot read into the shared buffer is read the stream way, with the same bytes', { timeout: 20000 }, async (t) => {
  // An onread callback with no buffer: Node still reads the stream way, and the gateway finds the socket taken.
  const taken = (): boolean => true
  let server: Socket | undefined
  await framesCutAnywhere(t, socket => {
    server = socket
    ;(socket as unknown as Record<symbol, unknown>)[onreadCallback(socket)] = taken
  })
  assert.equal((server as unknown as Record<symbol, unknown>)[onreadCallback(server as Socket)], taken, 'the gateway left the socket as it was')
})

test('text streams as it is checked: whole characters pass at once, a cut one waits, invalid bytes never pass', { timeout: 10000 }, async (t) => {
  const { client, received, logs } = await bridgedToSink(t)

  client.socket.write(Buffer.concat([frame(1, 'first '), frame(1, Buffer.from([0x61, 0x62, 0xe2, 0x98]), { fin: false })]))
  await waitFor(() => received().length >= 8)
  await new Promise(resolve => setTimeout(resolve, 50))
  assert.equal(received().toString(), 'first ab', 'the cut character is held back, the rest passes')
  // The character completes in the next fragment, and then the message carries an invalid byte.
  client.socket.write(frame(0, Buffer.from([0x83, 0x21]), { fin: false }))
  await waitFor(() => received().length >= 12)
  client.socket.write(frame(0, Buffer.from([0x21, 0xff])))
  assert.deepEqual(await closeFrame(client), { code: 1007, reason: 'invalid UTF-8 in a text message' })
  await waitFor(() => logs().length === 1)
  assert.equal(received().toString(), 'first ab\u2603!', 'none of the invalid read reached the upstream')
  assert.equal(logs()[0].closedBy, 'gateway')
})

test('a text message that ends on a cut character closes with 1007', { timeout: 10000 }, async (t) => {
  const { client, received } = await bridgedToSink(t)
  client.socket.write(Buffer.concat([frame(1, Buffer.from([0x61, 0xe2]), { fin: false })]))
  await waitFor(() => received().length >= 1)
  client.socket.write(frame(0, Buffer.from([0x98])))
  assert.deepEqual(await closeFrame(client), { code: 1007, reason: 'invalid UTF-8 in a text message' })
  assert.equal(received().toString(), 'a')
})

const faults: Array<{ name: string, frames: () => Buffer[], code: number, reason: string }> = [
  { name: 'RSV bits set without an extension', frames: () => [frame(2, 'x', { rsv: 4 })], code: 1002, reason: 'RSV bits must be clear' },
  { name: 'an unmasked client frame', frames: () => [frame(2, 'x', { masked: false })], code: 1002, reason: 'client frames must be masked' },
  { name: 'a continuation with no message', frames: () => [frame(0, 'x')], code: 1002, reason: 'continuation frame outside a message' },
  { name: 'a new message inside a fragmented one', frames: () => [frame(2, 'x', { fin: false }), frame(2, 'y')], code: 1002, reason: 'new message before the last one ended' },
  { name: 'an unknown opcode', frames: () => [frame(3, 'x')], code: 1002, reason: 'unknown opcode 3' },
  { name: 'a message whose fragments add up past maxPayload', frames: () => [frame(2, Buffer.alloc(600), { fin: false }), frame(0, Buffer.alloc(600))], code: 1009, reason: 'message too big' }
]

for (const fault of faults) {
  test(`${fault.name} closes with ${fault.code}; the messages before it are kept`, { timeout: 10000 }, async (t) => {
    const { client, received, logs } = await bridgedToSink(t, 1000)
    client.socket.write(Buffer.concat([frame(2, 'before;'), ...fault.frames(), frame(2, 'after;')]))
    assert.deepEqual(await closeFrame(client), { code: fault.code, reason: fault.reason })
    client.socket.destroy()
    await waitFor(() => logs().length === 1)
    const forwarded = received().toString()
    assert.equal(forwarded.startsWith('before;'), true)
    assert.equal(forwarded.includes('after;'), false, 'nothing after the bad frame is read')
    assert.deepEqual([logs()[0].code, logs()[0].closedBy, logs()[0].reason], [fault.code, 'gateway', fault.reason])
  })
}

test('control frames are ws\'s to check: a ping over 125 bytes closes with 1002', { timeout: 10000 }, async (t) => {
  const { client, received } = await bridgedToSink(t)
  client.socket.write(Buffer.concat([frame(2, 'before;'), frame(PING, Buffer.alloc(126)), frame(2, 'after;')]))
  assert.equal((await closeFrame(client)).code, 1002)
  await new Promise(resolve => setTimeout(resolve, 50))
  assert.equal(received().toString(), 'before;')
  client.socket.destroy()
})

test('nothing after a close frame is read, and the close handshake completes', { timeout: 10000 }, async (t) => {
  const { client, received, logs } = await bridgedToSink(t)
  const code = Buffer.alloc(2)
  code.writeUInt16BE(4000)
  client.socket.write(Buffer.concat([frame(2, 'last;'), frame(CLOSE, Buffer.concat([code, Buffer.from('bye')])), frame(2, 'ignored;')]))
  assert.deepEqual(await closeFrame(client), { code: 4000, reason: 'bye' })
  await waitFor(() => received().length >= 'last;'.length)
  // Both close frames have crossed: ws ends the TCP connection when the client does.
  client.socket.end()
  await waitFor(() => client.ended)
  await waitFor(() => logs().length === 1)
  assert.equal(received().toString(), 'last;')
  assert.deepEqual([logs()[0].code, logs()[0].closedBy, logs()[0].reason], [4000, 'client', 'bye'])
})

test('with a ws whose internals it does not know, the bridge falls back to ws\'s messages', { timeout: 10000 }, async (t) => {
  const chunks: Buffer[] = []
  const sink = await startTcp(socket => socket.on('data', (chunk: Buffer) => chunks.push(chunk)))
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } }, async (app) => {
    await app.register(websocket)
    // @fastify/websocket announces each connection before the route sees it: hide one internal.
    app.websocketServer.on('connection', (ws: WebSocket) => { delete (ws as unknown as { _receiver: { _errored?: boolean } })._receiver._errored })
  })
  t.after(async () => { await gateway.app.close(); await sink.close() })
  const upstream = sink.nextSocket()
  const client = await openRaw(`${gateway.url}/sink`)
  await upstream
  client.socket.write(Buffer.concat([frame(2, 'one;', { fin: false }), frame(0, 'two;'), frame(1, 'three;')]))
  await waitFor(() => Buffer.concat(chunks).toString() === 'one;two;three;')
  client.socket.write(frame(2, 'x', { rsv: 4 }))
  const { code, reason } = await closeFrame(client)
  assert.equal(code, 1002)
  assert.equal(reason, '', 'ws, not the reader, refused the frame')
  client.socket.destroy()
})

// ws waits 30 s for a close frame it will never read; these must end long before (the tests' timeouts).
test('after a protocol fault the gateway ends the TCP connection at once, and the upstream gets its FIN', { timeout: 8000 }, async (t) => {
  const { client, received, upstreamEnded } = await bridgedToSink(t)
  client.socket.write(Buffer.concat([frame(2, 'before;'), frame(3, 'x')]))
  assert.equal((await closeFrame(client)).code, 1002)
  await waitFor(() => client.ended && upstreamEnded(), 5000)
  assert.equal(received().toString(), 'before;')
})

test("a client's close frame ends the upstream's input at once, while the client's TCP connection stays open", { timeout: 8000 }, async (t) => {
  const { client, received, upstreamEnded, logs } = await bridgedToSink(t, undefined, undefined, { allowHalfOpen: true })
  const code = Buffer.alloc(2)
  code.writeUInt16BE(1000)
  client.socket.write(Buffer.concat([frame(2, 'last;'), frame(CLOSE, code)]))
  await waitFor(() => upstreamEnded(), 5000)
  assert.equal(received().toString(), 'last;')
  assert.equal(client.socket.destroyed, false, 'the client has not closed its TCP connection')
  client.socket.destroy()
  await waitFor(() => logs().length === 1)
  assert.deepEqual([logs()[0].code, logs()[0].closedBy], [1000, 'client'])
})

test('a message of more fragments than ws allows (16384) closes with 1008, however empty they are', { timeout: 10000 }, async (t) => {
  const { client, received } = await bridgedToSink(t)
  const empty = frame(0, Buffer.alloc(0), { fin: false })
  client.socket.write(Buffer.concat([frame(2, 'before;'), frame(2, 'x', { fin: false }), ...new Array(17000).fill(empty)]))
  assert.deepEqual(await closeFrame(client), { code: 1008, reason: 'too many message fragments' })
  assert.ok(received().toString().startsWith('before;'))
})
