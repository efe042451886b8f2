import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Socket } from 'node:net'
import { closed, openClient, startEcho, startGateway, startTcp, waitFor } from './helpers'
import { checkInternals, internals } from '../lib/private-internals'

// Each private internal the gateway uses (lib/private-internals.ts) is switched on by a probe that checks
// its behaviour. These tests run on every Node.js that CI runs: a release that changes one fails here.

test(`the probe finds every internal working on Node.js ${process.version}`, { timeout: 10000 }, async (t) => {
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })
  assert.deepEqual(internals, { clientOnread: true, wsFrames: true, releaseRequest: true })
})

test('a handle that takes no buffer of ours is found out by behaviour: ws frames stay on, onread goes off', { timeout: 10000 }, async (t) => {
  // A TCP handle whose useUserBuffer does nothing: Node reads into its own memory, and the onread callback
  // is handed our buffer with stale bytes in it. Present, but not behaving.
  const probe = new Socket()
  const echo = await startEcho()
  t.after(() => echo.close())
  probe.connect(echo.port, '127.0.0.1')
  await new Promise(resolve => probe.once('connect', resolve))
  const handle = Object.getPrototypeOf((probe as unknown as { _handle: object })._handle) as { useUserBuffer: (buffer: Uint8Array) => void }
  probe.destroy()
  const useUserBuffer = handle.useUserBuffer
  handle.useUserBuffer = function () {}
  try {
    assert.deepEqual(await checkInternals(), { clientOnread: false, wsFrames: true, releaseRequest: true })
  } finally {
    handle.useUserBuffer = useUserBuffer
  }
})

test('with every internal switched off, the bridge carries the same bytes both ways and closes the same', { timeout: 20000 }, async (t) => {
  const saved = { ...internals }
  Object.assign(internals, { clientOnread: false, wsFrames: false, releaseRequest: false })
  t.after(() => { Object.assign(internals, saved) })
  const echo = await startEcho()
  const gateway = await startGateway({ routes: { '/echo': { upstream: echo.address }, '/text': { upstream: echo.address, frame: 'text' } } })
  t.after(async () => { await gateway.app.close(); await echo.close() })

  const binary = await openClient(`${gateway.url}/echo`)
  const socket = (binary as unknown as { _socket: Socket })._socket
  const payload = Buffer.concat(Array.from({ length: 64 }, (_, i) => Buffer.alloc(4096, i)))
  binary.send(payload)
  await waitFor(() => binary.inbox.reduce((sum, m) => sum + m.data.length, 0) >= payload.length, 10000)
  assert.ok(Buffer.concat(binary.inbox.map(m => m.data)).equals(payload))
  assert.ok(binary.inbox.every(m => m.isBinary))
  assert.equal(socket.destroyed, false)

  const text = await openClient(`${gateway.url}/text`)
  text.send('naïve — ☃ 😀')
  await waitFor(() => Buffer.concat(text.inbox.map(m => m.data)).toString() === 'naïve — ☃ 😀')
  assert.ok(text.inbox.every(m => !m.isBinary))
  // ws refuses invalid UTF-8 itself.
  text.send(Buffer.from([0xff]), { binary: false }) // ws sends the bytes as they are
  assert.equal((await closed(text)).code, 1007)

  binary.close(4000, 'done')
  await waitFor(() => gateway.logs.find('wstunnel bridge closed').length === 2)
  const codes = gateway.logs.find('wstunnel bridge closed').map(line => line.code).sort()
  assert.deepEqual(codes, [1007, 4000])
})

test('where ws assembles messages (the fallback), a message is bounded: 16 MiB unless a route allows more', { timeout: 30000 }, async (t) => {
  const saved = { ...internals }
  internals.wsFrames = false
  t.after(() => { Object.assign(internals, saved) })
  let received = 0
  const sink = await startTcp(socket => socket.on('data', (chunk: Buffer) => { received += chunk.length }))
  const gateway = await startGateway({ routes: { '/sink': { upstream: sink.address } } })
  t.after(async () => { await gateway.app.close(); await sink.close() })

  const client = await openClient(`${gateway.url}/sink`)
  client.send(Buffer.alloc(2 * 1024 * 1024))
  await waitFor(() => received === 2 * 1024 * 1024, 10000)
  client.send(Buffer.alloc(17 * 1024 * 1024))
  assert.equal((await closed(client)).code, 1009)
  assert.equal(received, 2 * 1024 * 1024)
})
